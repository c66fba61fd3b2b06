//! Shell completions, generated from the clap definition by the hidden
//! `--completions SHELL` option that install.sh uses.

mod common;
use common::{Env, run};
use std::process::Command;

#[test]
fn each_shell_gets_a_script_with_the_visible_options() {
    let env = Env::new();
    for (shell, marker) in [
        ("bash", "complete -F _qsem"),
        ("zsh", "#compdef qsem"),
        ("fish", "complete -c qsem"),
    ] {
        let (code, out, err) = run(env.qsem().args(["--completions", shell]));
        assert_eq!((code, err.as_str()), (0, ""), "{shell}");
        assert!(out.contains(marker), "{shell}: {out}");
        for option in ["wait-all", "each", "null", "bg", "status"] {
            assert!(out.contains(option), "{shell} lacks --{option}");
        }
        assert!(
            !out.contains("bg-supervisor"),
            "{shell} offers a hidden option"
        );
    }
}

#[test]
fn the_bash_script_is_valid_bash() {
    let env = Env::new();
    let (_, script, _) = run(env.qsem().args(["--completions", "bash"]));
    let path = env.path("qsem.bash");
    std::fs::write(&path, script).unwrap();
    let (code, _, err) = run(Command::new("bash").arg("-n").arg(&path));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn an_unknown_shell_is_bad_usage() {
    let env = Env::new();
    assert_eq!(run(env.qsem().args(["--completions", "tcsh"])).0, 2);
}

/// A full disk is an error that qsem reports, not a crash (clap_complete
/// panics when its writer fails; qsem writes what it generated itself).
#[test]
fn a_write_error_is_reported_not_a_crash() {
    let env = Env::new();
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let (code, out, err) = run(env.qsem().args(["--completions", "bash"]).stdout(full));
    assert_eq!(code, 125, "{err}");
    assert_eq!(out, "");
    assert!(err.contains("cannot write to standard output"), "{err}");
}
