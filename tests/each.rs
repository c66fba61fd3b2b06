//! `--each` (SPEC §5): one run per item of stdin, under the shared semaphore,
//! with xargs's exit statuses and output that never mixes within a line.

mod common;
use common::{Env, SOON, kill, run, wait_for_file};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` with `input` on its stdin; returns (status, stdout, stderr).
fn feed(cmd: &mut Command, input: &[u8]) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // qsem may rightly exit before reading everything (e.g. 127 up front).
    if let Err(e) = stdin.write_all(input) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sorted_lines(s: &str) -> Vec<&str> {
    let mut v: Vec<&str> = s.lines().collect();
    v.sort_unstable();
    v
}

#[test]
fn each_line_is_one_argument_never_seen_by_a_shell() {
    let env = Env::new();
    let input = "plain\nwith space\n$(touch pwned) 'q' \"d\"\n\nlast-without-newline";
    // -j1: a slot copy kept by qsem would make the second run wait for ever.
    let (code, out, err) = feed(
        env.qsem()
            .current_dir(&env.root)
            .args(["--id", "e", "-j1", "--each", "--", "printf", "[%s]\\n"]),
        input.as_bytes(),
    );
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(
        out,
        "[plain]\n[with space]\n[$(touch pwned) 'q' \"d\"]\n[last-without-newline]\n"
    );
    assert!(!env.path("pwned").exists());
}

#[test]
fn null_separated_items() {
    let env = Env::new();
    let (code, out, _) = feed(
        env.qsem().args([
            "--id", "e", "-j2", "-0", "--each", "--", "printf", "<%s>\\n",
        ]),
        b"a\nb\0c d\0",
    );
    assert_eq!(code, 0);
    assert_eq!(sorted_lines(&out), ["<a", "<c d>", "b>"]);
}

#[test]
fn at_most_n_at_once_sharing_the_limit_with_other_qsems() {
    let env = Env::new();
    let slots = env.path("slots");
    std::fs::create_dir(&slots).unwrap();
    // A run claims a file named after its slot; a shared slot, or a slot above
    // the limit, leaves a trace.
    let claim = |secs: &str| {
        format!(
            "cd {} && [ \"$QSEM_SLOT\" -le 2 ] && (set -C; : > \"$QSEM_SLOT\") && sleep {secs} && rm \"$QSEM_SLOT\" || touch ../overlap",
            slots.display()
        )
    };
    let mut other = env
        .qsem()
        .args(["--id", "e", "-j2", "-c", &claim("1")])
        .spawn()
        .unwrap();
    assert!(common::eventually(SOON, || std::fs::read_dir(&slots)
        .unwrap()
        .next()
        .is_some()));
    let start = Instant::now();
    let (code, _, err) = feed(
        env.qsem()
            .args(["--id", "e", "-j2", "--each", "-c", &claim("0.3")]),
        b"1\n2\n3\n4\n5\n6\n",
    );
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(other.wait().unwrap().success());
    assert!(!env.path("overlap").exists(), "more than two runs at once");
    // Six runs of 0.3 s on two slots, one of them busy for the first second.
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < SOON);
}

#[test]
fn exit_statuses_are_those_of_xargs() {
    let env = Env::new();
    for (script, want) in [
        ("exit 0", 0),
        ("[ $1 = b ] && exit 3; exit 0", 123),
        ("[ $1 = b ] && exit 125; exit 0", 123),
        ("[ $1 = b ] && exit 255; exit 0", 124),
        ("[ $1 = b ] && kill -TERM $$; exit 0", 125),
        (
            "[ $1 = a ] && kill -TERM $$; [ $1 = b ] && exit 255; exit 1",
            125,
        ),
    ] {
        let (code, _, err) = feed(
            env.qsem()
                .args(["--id", "x", "-j2", "--each", "-c", script]),
            b"a\nb\nc\n",
        );
        assert_eq!(code, want, "{script}: {err}");
        // All three ran, failures or not: the failed ones said so.
        if want != 0 {
            assert!(err.contains("qsem[x]:"), "{script}: {err}");
        }
    }
    let (code, _, err) = feed(
        env.qsem()
            .args(["--id", "x", "--each", "no-such-command-qsem"]),
        b"a\n",
    );
    assert_eq!(code, 127, "{err}");
    let (code, out, _) = feed(env.qsem().args(["--id", "x", "--each", "true"]), b"");
    assert_eq!((code, out.as_str()), (0, ""));
}

#[test]
fn carries_on_past_failures() {
    let env = Env::new();
    let (code, out, err) = feed(
        env.qsem()
            .args(["--id", "c", "--each", "-c", "echo $1; [ $1 != 2 ]"]),
        b"1\n2\n3\n",
    );
    assert_eq!(code, 123);
    assert_eq!(out, "1\n2\n3\n");
    assert!(err.contains("exited with status 1"), "{err}");
}

#[test]
fn lines_of_concurrent_runs_never_mix() {
    let env = Env::new();
    // Each line is written in two pieces, with a pause between them, which on
    // a shared stdout would let the other runs' pieces in between.
    let script =
        "for i in 1 2 3 4 5 6 7 8 9 10; do printf '%s-' $1; sleep 0.01; printf '%s\\n' $1; done";
    let (code, out, _) = feed(
        env.qsem()
            .args(["--id", "m", "-j4", "--each", "-c", script]),
        b"aaaa\nbbbb\ncccc\ndddd\n",
    );
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 40, "{out}");
    for line in lines {
        let (left, right) = line.split_once('-').unwrap_or((line, ""));
        assert_eq!(left, right, "mixed line: {line:?}");
    }
}

#[test]
fn runs_read_nothing_from_the_item_list() {
    let env = Env::new();
    let (code, out, _) = feed(
        env.qsem()
            .args(["--id", "i", "--each", "-c", "cat; echo got $1"]),
        b"one\ntwo\n",
    );
    assert_eq!((code, out.as_str()), (0, "got one\ngot two\n"));
}

#[test]
fn sigterm_stops_reading_and_is_passed_to_the_runs() {
    let env = Env::new();
    let started = env.path("started");
    let survived = env.path("survived");
    let script = format!(
        "touch {}; sleep 3; touch {}",
        started.display(),
        survived.display()
    );
    // stdin stays open: qsem waits for more items while the run sleeps.
    let mut child = env
        .qsem()
        .args(["--id", "t", "-j2", "--each", "-c", &script])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"1\n").unwrap();
    assert!(wait_for_file(&started, SOON));
    let t = Instant::now();
    kill(child.id(), libc::SIGTERM);
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(t.elapsed()));
    assert!(!survived.exists(), "the run was not stopped");
    // And its slot is free again.
    assert_eq!(
        run(env
            .qsem()
            .args(["--id", "t", "--wait", "0", "-E", "9", "true"]))
        .0,
        0
    );
}

#[test]
fn a_full_stdout_fails_as_it_does_under_xargs() {
    // `printf 'a\nb\n' | xargs -n1 echo >/dev/full` exits 123.
    let env = Env::new();
    let (code, _, err) = run(env
        .qsem()
        .args(["--id", "full", "--each", "--", "echo"])
        .stdin(std::fs::File::open(items(&env, "a\nb\n")).unwrap())
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        ));
    assert_eq!(code, 123, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot write to standard output"), "{err}");
}

#[test]
fn a_closed_stdout_stops_new_runs_as_xargs_does() {
    // `seq 50 | xargs -n1 echo | head -1`: xargs stops, and exits 125.
    let env = Env::new();
    let list: String = (1..=50).map(|n| format!("{n}\n")).collect();
    let counted = env.path("count");
    let script = format!("echo \"$1\"; echo x >> '{}'; sleep 0.05", counted.display());
    let mut qsem = env
        .qsem()
        .args(["--id", "head", "--each", "-c", &script])
        .stdin(std::fs::File::open(items(&env, &list)).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 2];
    std::io::Read::read_exact(qsem.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(qsem.stdout.take());
    let out = qsem.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("cannot write to standard output"), "{err}");
    let runs = std::fs::read_to_string(&counted).unwrap().lines().count();
    assert!(
        runs < 50,
        "{runs} runs: qsem went on after its stdout closed"
    );
}

fn items(env: &Env, text: &str) -> std::path::PathBuf {
    let path = env.path("items");
    std::fs::write(&path, text).unwrap();
    path
}
