//! The cron user's limits (issue 12): `--timeout`/`--kill-after` on the job's
//! run time and `--max-waiting` on the backlog; and the command line's
//! manners (issues 10 and 12): messages, option values that start with `-`.

mod common;
use common::{Env, SOON, eventually, held_and_waiting, holder, release, run, wait_for_file};
use std::time::{Duration, Instant};

#[test]
fn a_job_past_its_timeout_is_stopped_with_124_and_one_line() {
    let env = Env::new();
    let t = Instant::now();
    let (code, out, err) = run(env.qsem().args([
        "--id",
        "slow",
        "--timeout",
        "300ms",
        "--",
        "sh",
        "-c",
        "echo started; sleep 30",
    ]));
    assert!(t.elapsed() < SOON);
    assert_eq!(code, 124);
    assert_eq!(out, "started\n");
    assert_eq!(
        err,
        "qsem[slow]: sh -c 'echo started; sleep 30' timed out after 300ms (SIGTERM)\n"
    );
    // The slot is free again.
    assert_eq!(held_and_waiting(&env, "slow"), (0, 0));
}

#[test]
fn a_job_that_ignores_sigterm_is_killed_after_kill_after() {
    let env = Env::new();
    let t = Instant::now();
    let (code, _, err) = run(env.qsem().args([
        "--id",
        "stubborn",
        "--timeout",
        "200ms",
        "--kill-after",
        "300ms",
        "--",
        "sh",
        "-c",
        "trap '' TERM; sleep 30",
    ]));
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert!(t.elapsed() < SOON);
    assert_eq!(code, 124);
    assert!(
        err.ends_with("timed out after 200ms (SIGTERM; killed 300ms later)\n"),
        "{err}"
    );
}

#[test]
fn a_job_that_ends_in_time_keeps_its_status() {
    let env = Env::new();
    let (code, _, err) = run(env
        .qsem()
        .args(["--timeout", "10s", "--", "sh", "-c", "exit 3"]));
    assert_eq!(code, 3);
    assert!(err.contains("exited with status 3"), "{err}");
}

#[test]
fn a_timed_out_background_job_fails_the_next_wait_all() {
    let env = Env::new();
    let (code, _, _) = run(env
        .qsem()
        .args([
            "--id",
            "bgt",
            "--bg",
            "--timeout",
            "200ms",
            "--",
            "sleep",
            "30",
        ])
        .stderr(std::process::Stdio::null()));
    assert_eq!(code, 0);
    let (code, _, err) = run(env.qsem().args(["--id", "bgt", "--wait-all"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1 background job failed"), "{err}");
}

#[test]
fn each_run_has_its_own_timeout_and_counts_as_killed() {
    let env = Env::new();
    let (code, out, err) = run(env
        .qsem()
        .args([
            "--id",
            "et",
            "-j2",
            "--timeout",
            "300ms",
            "--each",
            "--",
            "sh",
            "-c",
        ])
        .arg("[ \"$0\" = slow ] && exec sleep 30; echo \"$0\"")
        .stdin(std::fs::File::open(write(&env, "items", "fast\nslow\n")).unwrap()));
    assert_eq!(code, 125, "{err}");
    assert_eq!(out, "fast\n");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("slow timed out after 300ms (SIGTERM)"),
        "{err}"
    );
}

fn write(env: &Env, name: &str, text: &str) -> std::path::PathBuf {
    let path = env.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_limits_are_usage_errors() {
    let env = Env::new();
    for args in [
        &["--timeout", "0", "true"][..],
        &["--timeout", "soon", "true"],
        &["--kill-after", "1s", "true"],
        &["--timeout", "1s", "--kill-after", "x", "true"],
        &["--max-waiting", "-1", "true"],
        &["--json", "true"],
    ] {
        let (code, out, err) = run(env.qsem().args(args));
        assert_eq!((code, out.as_str()), (2, ""), "{args:?}: {err}");
        assert!(err.starts_with("qsem: "), "{args:?}: {err}");
        assert!(err.contains("Usage: qsem"), "{args:?}: {err}");
    }
}

#[test]
fn a_full_backlog_gives_up_at_once_like_an_expired_wait() {
    let env = Env::new();
    let ready = env.path("ready");
    let job = holder(&env, &["--id", "hourly"], &ready);
    assert!(wait_for_file(&ready, SOON));
    // One waiter queues behind the holder.
    let mut waiter = env
        .qsem()
        .args(["--id", "hourly", "--max-waiting", "1", "--", "true"])
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || held_and_waiting(&env, "hourly") == (1, 1)));
    // The next finds one waiting: it gives up at once, silently, with -E.
    let t = Instant::now();
    let (code, out, err) = run(env.qsem().args([
        "--id",
        "hourly",
        "--max-waiting",
        "1",
        "-E",
        "75",
        "--",
        "true",
    ]));
    assert_eq!((code, out.as_str(), err.as_str()), (75, "", ""));
    assert!(t.elapsed() < SOON);
    // 0: run now or never, without queueing behind anyone.
    let (code, _, _) =
        run(env
            .qsem()
            .args(["--id", "hourly", "--max-waiting", "0", "-E", "9", "true"]));
    assert_eq!(code, 9);
    release(job);
    assert_eq!(waiter.wait().unwrap().code(), Some(0));
}

#[test]
fn option_values_may_start_with_a_dash() {
    let env = Env::new();
    let (code, out, err) =
        run(env
            .qsem()
            .args(["--id", "-foo", "--", "sh", "-c", "echo $QSEM_ID"]));
    assert_eq!((code, out.as_str()), (0, "-foo\n"), "{err}");
    // `/bin/sh -c -x` runs (and dash fails it): the value reached the
    // shell, not qsem's parser.
    let (_, _, err) = run(env.qsem().args(["-c", "-x"]));
    assert!(!err.contains("Usage"), "{err}");
    assert!(err.contains("qsem[default]: /bin/sh -c -x exited"), "{err}");
}

#[test]
fn clap_s_messages_speak_as_qsem_and_help_shows_defaults() {
    let env = Env::new();
    let (code, _, err) = run(env.qsem().args(["--bogus", "true"]));
    assert_eq!(code, 2);
    assert!(
        err.starts_with("qsem: unexpected argument '--bogus'"),
        "{err}"
    );
    let (code, out, _) = run(env.qsem().arg("--help"));
    assert_eq!(code, 0);
    let jobs = out
        .lines()
        .skip_while(|l| !l.contains("--jobs"))
        .take(3)
        .collect::<String>();
    assert!(jobs.contains("[default: 1]"), "{jobs}");
    for option in ["--timeout", "--kill-after", "--max-waiting"] {
        assert!(out.contains(option), "{option}");
    }
}
