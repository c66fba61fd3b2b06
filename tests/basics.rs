//! Exit statuses and output (SPEC §2), as a user meets them.

mod common;
use common::{Env, run};
use std::os::unix::fs::PermissionsExt;

#[test]
fn success_is_silent_and_passes_output_through() {
    let env = Env::new();
    let (code, out, err) = run(env
        .qsem()
        .args(["--id", "demo", "-j2", "--wait", "1s", "--", "echo", "hello"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "hello\n", ""));
}

#[test]
fn a_failing_command_passes_its_status_and_gets_one_report_line() {
    let env = Env::new();
    let (code, out, err) = run(env.qsem().args([
        "--id",
        "proc",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]));
    assert_eq!(code, 3);
    assert_eq!(out, "out\n");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(lines[0], "err");
    assert!(
        lines[1].starts_with(
            "qsem[proc]: sh -c 'echo out; echo err >&2; exit 3' exited with status 3 after "
        ),
        "{err}"
    );
}

#[test]
fn quiet_drops_the_report_line_but_not_the_status() {
    let env = Env::new();
    let (code, _, err) = run(env.qsem().args(["-q", "--", "sh", "-c", "exit 4"]));
    assert_eq!((code, err.as_str()), (4, ""));
}

#[test]
fn a_killed_command_is_128_plus_signal_and_named() {
    let env = Env::new();
    let (code, _, err) = run(env
        .qsem()
        .args(["--id", "oom", "--", "sh", "-c", "kill -9 $$"]));
    assert_eq!(code, 137);
    assert!(
        err.starts_with("qsem[oom]: sh -c 'kill -9 $$' was killed by SIGKILL after "),
        "{err}"
    );
    assert!(err.contains("out-of-memory"), "{err}");
    let (code, _, err) = run(env.qsem().args(["--", "sh", "-c", "kill -TERM $$"]));
    assert_eq!(code, 143);
    assert!(err.contains("killed by SIGTERM"), "{err}");
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn not_found_is_127_and_not_executable_is_126() {
    let env = Env::new();
    let (code, out, err) = run(env.qsem().args(["--", "no-such-command-anywhere"]));
    assert_eq!((code, out.as_str()), (127, ""));
    assert_eq!(
        err,
        "qsem[default]: no-such-command-anywhere: command not found\n"
    );

    let script = env.path("script");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run(env.qsem().arg("--").arg(&script));
    assert_eq!(code, 126);
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, _) = run(env.qsem().arg("--").arg(env.path("missing")));
    assert_eq!(code, 127);
    let (code, _, _) = run(env.qsem().args(["--", "/"]));
    assert_eq!(code, 126);
}

#[test]
fn bad_usage_is_2_names_the_value_and_starts_nothing() {
    let env = Env::new();
    let marker = env.path("ran");
    let cases: &[(&[&str], &str)] = &[
        (&["-j", "0"], "'0'"),
        (&["-j", "2000000"], "'2000000'"),
        (&["-j", "abc"], "'abc'"),
        (&["--wait", "1x"], "'1x'"),
        (&["--wait", "-3"], "'-3'"),
        (&["--wait", "99999999999999999999999999h"], "too large"),
        (&["--id", ""], "empty"),
        (&["-E", "300"], "'300'"),
        (&["--no-such-option"], "--no-such-option"),
    ];
    for (args, needle) in cases {
        let (code, out, err) = run(env.qsem().args(*args).args(["--", "touch"]).arg(&marker));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(out, "");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.contains("Usage:"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let (code, _, err) = run(&mut env.qsem());
    assert_eq!(code, 2);
    assert!(err.contains("no command"), "{err}");
    assert!(!marker.exists());
}

#[test]
fn help_and_version() {
    let env = Env::new();
    let (code, out, _) = run(env.qsem().arg("--help"));
    assert_eq!(code, 0);
    assert!(
        out.contains("Examples:")
            && out.contains("*/1 * * * * qsem --id proc -j2 --wait 1s -- ImportProcess")
    );
    let (code, out, _) = run(env.qsem().arg("--version"));
    assert_eq!(code, 0);
    assert!(out.starts_with("qsem "));
}

#[test]
fn an_unusable_lock_directory_is_125_naming_the_path() {
    let env = Env::new();
    let file = env.path("plainfile");
    std::fs::write(&file, "").unwrap();
    let (code, _, err) = run(env.qsem().arg("--dir").arg(file.join("sub")).arg("true"));
    assert_eq!(code, 125, "{err}");
    assert!(
        err.starts_with("qsem: ") && err.contains("plainfile"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn verbose_says_what_happens() {
    let env = Env::new();
    let (code, _, err) = run(env.qsem().args(["-v", "--id", "v", "true"]));
    assert_eq!(code, 0);
    assert_eq!(err, "qsem[v]: took slot 1 (limit 1)\n");
}
