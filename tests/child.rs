//! The child (SPEC §3): how it is found, what it is given.

mod common;
use common::{Env, run};

#[test]
fn environment_names_id_slot_and_jobs() {
    let env = Env::new();
    let (code, out, _) = run(env.qsem().args([
        "--id",
        "a b",
        "-j3",
        "--",
        "sh",
        "-c",
        "echo \"$QSEM_ID|$QSEM_SLOT|$QSEM_JOBS|$HOME\"",
    ]));
    assert_eq!(code, 0);
    let home = std::env::var("HOME").unwrap_or_default();
    assert_eq!(out, format!("a b|1|3|{home}\n"));
}

#[test]
fn arguments_reach_the_command_untouched() {
    let env = Env::new();
    let (code, out, _) = run(env
        .qsem()
        .args(["-j2", "printf", "[%s]", "a b", "-v", "--id", "$HOME", "*"]));
    assert_eq!(code, 0);
    assert_eq!(out, "[a b][-v][--id][$HOME][*]");
}

#[test]
fn dash_c_runs_through_the_shell() {
    let env = Env::new();
    let (code, out, _) = run(env.qsem().args(["-c", "echo one | tr o O; exit 0"]));
    assert_eq!((code, out.as_str()), (0, "One\n"));
}

#[test]
fn stdin_is_the_callers() {
    let env = Env::new();
    let mut child = env
        .qsem()
        .args(["--", "tr", "a-z", "A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO\n");
}

#[test]
fn the_slot_descriptor_is_the_only_one_added() {
    let env = Env::new();
    let list = "ls /proc/self/fd | wc -l";
    let count = |out: String| out.trim().parse::<u32>().unwrap();
    let (_, direct, _) = run(std::process::Command::new("sh").args(["-c", list]));
    let (_, held, _) = run(env.qsem().args(["-c", list]));
    let (_, closed, _) = run(env.qsem().args(["-o", "-c", list]));
    let direct = count(direct);
    assert_eq!(count(held), direct + 1, "the slot is inherited");
    assert_eq!(count(closed), direct, "-o: nothing is inherited");
}
