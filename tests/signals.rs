//! Signals to a running qsem reach its command exactly once (SPEC §3).

mod common;
use common::{Env, SOON, kill, wait_for_file};

#[test]
fn each_forwarded_signal_reaches_the_command_once() {
    let env = Env::new();
    let signals = [
        ("TERM", libc::SIGTERM),
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
    ];
    for (name, signo) in signals {
        let ready = env.path(&format!("{name}.ready"));
        let log = env.path(&format!("{name}.log"));
        // The job counts the signal, then exits 9: qsem must exit 9 too.
        let script = format!(
            "trap 'echo got >> {log}; exit 9' {name}; touch {ready}; while :; do sleep 0.05; done",
            log = log.display(),
            ready = ready.display()
        );
        let q = env
            .qsem()
            .args(["--id", "s", "-c", &script])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(wait_for_file(&ready, SOON), "{name}");
        kill(q.id(), signo);
        let out = q.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(9), "{name}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "got\n",
            "{name}: exactly once"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("exited with status 9"), "{name}: {err}");
    }
}

#[test]
fn a_command_that_ignores_the_signal_keeps_running_and_its_status_counts() {
    let env = Env::new();
    let ready = env.path("ready");
    let script = format!("trap '' TERM; touch {}; sleep 0.5; exit 5", ready.display());
    let q = env.qsem().args(["-q", "-c", &script]).spawn().unwrap();
    assert!(wait_for_file(&ready, SOON));
    kill(q.id(), libc::SIGTERM);
    let out = q.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5));
}

/// Ctrl-C at a terminal interrupts the command, and qsem ends with the
/// command's status. The terminal is a real pseudo-terminal, made by script(1)
/// from util-linux. (That qsem does not send the terminal's SIGINT a second
/// time is `runner::forwards`'s unit test: two SIGINTs microseconds apart are
/// merged by the kernel, so a second one cannot be seen reliably from here.)
///
/// script(1) runs its command with `$SHELL -c`; the shell is pinned and
/// `exec`s qsem, because a shell that waits instead (dash does) would take
/// the Ctrl-C itself and end with 130 whatever qsem does.
#[test]
fn ctrl_c_at_a_terminal_interrupts_the_command_once() {
    use std::io::Write;
    let env = Env::new();
    let ready = env.path("ready");
    let log = env.path("log");
    let inner = format!(
        "exec {qsem} -c 'trap \"echo got >> {log}\" INT; touch {ready}; while [ ! -e {log} ]; do sleep 0.05; done; sleep 0.5; exit 9'",
        qsem = env!("CARGO_BIN_EXE_qsem"),
        log = log.display(),
        ready = ready.display()
    );
    let mut term = std::process::Command::new("script")
        .args(["-qefc", &inner, "/dev/null"])
        .env("QSEM_DIR", &env.locks)
        .env("SHELL", "/bin/sh")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    assert!(wait_for_file(&ready, SOON));
    term.stdin.as_mut().unwrap().write_all(b"\x03").unwrap();
    let out = term.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "got\n");
}
