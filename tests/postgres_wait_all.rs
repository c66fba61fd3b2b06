//! `--bg` and `--wait-all` on the PostgreSQL backend: failures of
//! background jobs kept on the server (or, when it will not take them, in the
//! local lock directory) for the next `--wait-all`, which waits for holders
//! and waiters of every machine.
#![cfg(feature = "postgres")]

mod common;
use common::postgres::{Cluster, finish, held, hold, key_hex, qsem, shared};
use common::{Env, SOON, eventually, kill, run};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn setup() -> Option<(Env, &'static Cluster)> {
    Some((Env::new(), shared()?))
}

/// Whether a `--wait-all` of `id` has looked and sleeps (its session's last
/// query counted the id's waiters).
fn barrier_sleeps(c: &Cluster, id: &str) -> bool {
    c.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle' \
         AND query LIKE 'SELECT count(*)::text FROM pg_stat_activity WHERE application_name LIKE ''qsem w {} %%'' %'",
        key_hex(id)
    )) != "0"
}

/// Runs a `qsem --backend … --bg` to its return; the job's stderr (and so the
/// supervisor's report line) goes to `bg.err`, as in tests/background.rs.
fn bg(env: &Env, c: &Cluster, args: &[&str]) -> i32 {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.path("bg.err"))
        .unwrap();
    qsem(env, c)
        .args(args)
        .stdout(Stdio::null())
        .stderr(err)
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

#[test]
fn bg_failures_are_kept_on_the_server_for_the_next_wait_all() {
    let Some((env, c)) = setup() else { return };
    let start = Instant::now();
    for job in ["sleep 0.3", "sleep 0.5; exit 3", "sleep 0.3", "sleep 0.3"] {
        assert_eq!(bg(&env, c, &["--id", "pgbg", "-j2", "--bg", "-c", job]), 0);
    }
    // From elsewhere: another lock directory, the same server.
    let other = Env::new();
    let (code, out, err) = run(qsem(&other, c).args(["--id", "pgbg", "--wait-all"]));
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(
        err,
        "qsem[pgbg]: 1 background job failed since the last --wait-all\n"
    );
    // Two rounds of -j2: it waited for the jobs, and woke soon after the last.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(600), "{took:?}");
    assert!(took < SOON, "{took:?}");
    assert_eq!(held(&env, c, "pgbg"), 0);
    let lines = std::fs::read_to_string(env.path("bg.err")).unwrap();
    assert!(
        lines.contains("qsem[pgbg]: /bin/sh -c 'sleep 0.5; exit 3' exited with status 3 after"),
        "{lines}"
    );
    // Counted once, and deleted.
    let (code, out, err) = run(qsem(&env, c).args(["--id", "pgbg", "--wait-all"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    assert_eq!(
        c.sql("SELECT count(*) FROM qsem_failures WHERE id = convert_to('pgbg', 'UTF8')"),
        "0"
    );
}

#[test]
fn wait_all_on_an_idle_id_returns_at_once() {
    let Some((env, c)) = setup() else { return };
    let t = Instant::now();
    let (code, out, err) = run(qsem(&env, c).args(["--id", "pgidle", "--wait-all"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    let (code, out, err) =
        run(qsem(&env, c).args(["--id", "pgidle", "--wait", "0", "-E", "7", "--wait-all"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn wait_all_expiry_is_silent_and_signals_stop_it() {
    let Some((env, c)) = setup() else { return };
    let holder = hold(&env, c, &["--id", "pgexp"], "h");
    let wait_all = |wait: &str| {
        let t = Instant::now();
        let got =
            run(qsem(&env, c).args(["--id", "pgexp", "--wait", wait, "-E", "7", "--wait-all"]));
        (got, t.elapsed())
    };
    let ((code, out, err), took) = wait_all("300ms");
    assert_eq!((code, out.as_str(), err.as_str()), (7, "", ""));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let ((code, out, err), took) = wait_all("0");
    assert_eq!((code, out.as_str(), err.as_str()), (7, "", ""));
    assert!(took < Duration::from_secs(3), "{took:?}");
    let mut barrier = qsem(&env, c)
        .args(["--id", "pgexp", "--wait-all"])
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || barrier_sleeps(c, "pgexp")));
    assert!(
        barrier.try_wait().unwrap().is_none(),
        "--wait-all returned early"
    );
    let t = Instant::now();
    kill(barrier.id(), libc::SIGTERM);
    assert_eq!(barrier.wait().unwrap().code(), Some(143));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    finish(&env, vec![holder]);
}

#[test]
fn wait_all_waits_for_the_waiters_too() {
    let Some((env, c)) = setup() else { return };
    let holder = hold(&env, c, &["--id", "pgq"], "h");
    let done = env.path("done");
    let mut waiter = qsem(&env, c)
        .args([
            "--id",
            "pgq",
            "--",
            "sh",
            "-c",
            "sleep 0.5; touch \"$1\"",
            "sh",
        ])
        .arg(&done)
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || {
        let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "pgq"]));
        out.contains("1 waiting")
    }));
    let barrier = qsem(&env, c)
        .args(["--id", "pgq", "--wait-all"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || barrier_sleeps(c, "pgq")));
    // The holder goes, the waiter takes over: the id is never idle between.
    finish(&env, vec![holder]);
    let out = barrier.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        done.exists(),
        "--wait-all returned before the waiter's job ended"
    );
    assert!(waiter.wait().unwrap().success());
}

#[test]
fn a_failure_the_server_will_not_take_still_fails_the_next_wait_all() {
    let Some((env, c)) = setup() else { return };
    // Since PostgreSQL 15 an ordinary role may not create tables in `public`.
    c.sql(
        "CREATE ROLE qsem_limited LOGIN PASSWORD 'limited-pw'; CREATE SCHEMA limited; \
         GRANT USAGE ON SCHEMA limited TO qsem_limited; \
         ALTER ROLE qsem_limited SET search_path = limited",
    );
    let url = format!(
        "postgres://qsem_limited:limited-pw@127.0.0.1:{}/postgres",
        c.port
    );
    let q = |args: &[&str]| {
        let mut cmd = env.qsem();
        cmd.arg("--backend")
            .arg(&url)
            .args(["--id", "lim"])
            .args(args);
        cmd
    };
    let bg_err = || std::fs::read_to_string(env.path("bg.err")).unwrap_or_default();
    let bg = |args: &[&str]| {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.path("bg.err"))
            .unwrap();
        q(args).stderr(err).status().unwrap().code()
    };
    // No table, and none can be made: the failure is said, and the job's
    // supervisor fails (125), loudly.
    assert_eq!(bg(&["--bg", "--", "sh", "-c", "exit 3"]), Some(0));
    assert!(
        eventually(SOON, || bg_err()
            .contains("permission denied for schema limited")),
        "{}",
        bg_err()
    );
    assert!(
        bg_err().contains("qsem: cannot record a failed job of 'lim' on PostgreSQL at"),
        "{}",
        bg_err()
    );
    // That failure is not lost: the next --wait-all (on this host) counts it.
    let (code, _, err) = run(&mut q(&["--wait-all"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1 background job failed"), "{err}");
    assert!(
        bg_err().contains("kept in the local lock directory"),
        "{}",
        bg_err()
    );
    // Once a DBA has made the table and granted its use, failures count.
    c.sql(
        "CREATE TABLE limited.qsem_failures (id bytea NOT NULL, \
         failed_at timestamptz NOT NULL DEFAULT now(), host text NOT NULL, line text NOT NULL); \
         GRANT SELECT, INSERT, DELETE ON limited.qsem_failures TO qsem_limited",
    );
    assert_eq!(bg(&["--bg", "--", "sh", "-c", "exit 4"]), Some(0));
    let (code, _, err) = run(&mut q(&["--wait-all"]));
    assert_eq!(code, 1, "{err} {}", bg_err());
    assert!(err.contains("1 background job failed"), "{err}");
    assert_eq!(c.sql("SELECT count(*) FROM limited.qsem_failures"), "0");
}

#[test]
fn wait_all_waits_for_a_job_running_without_its_slot() {
    let Some((env, c)) = setup() else { return };
    let id = "pglostjob";
    // A holder that lost its slot (a restart it could not reclaim after)
    // runs its job on in a session named `qsem l …`, holding no lock.
    let mut lost = c.psql_session(&format!("qsem l {} 1 4242@elsewhere", key_hex(id)));
    assert!(eventually(SOON, || {
        c.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'qsem l {} %'",
            key_hex(id)
        )) == "1"
    }));
    let (code, _, err) =
        run(qsem(&env, c).args(["--id", id, "--wait-all", "--wait", "1s", "-E", "9"]));
    assert_eq!(code, 9, "{err}");
    // Once that job's session ends, the id is idle.
    let _ = lost.kill();
    let _ = lost.wait();
    let (code, _, err) =
        run(qsem(&env, c).args(["--id", id, "--wait-all", "--wait", "20s", "-E", "9"]));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn wait_all_waits_for_a_holder_whose_session_an_operator_ended() {
    let Some((env, c)) = setup() else { return };
    let id = "pgterminated";
    let holder = hold(&env, c, &["--id", id], "holder");
    let mut barrier = qsem(&env, c)
        .args(["--id", id, "--wait-all", "--wait", "60s", "-E", "9"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || barrier_sleeps(c, id)));
    // The holder's qsem is stopped when its session is ended: for a while
    // its job runs with neither a lock nor a session on the server.
    let pid = holder.0.as_ref().unwrap().id();
    kill(pid, libc::SIGSTOP);
    let holders = format!("application_name LIKE 'qsem h {} %'", key_hex(id));
    let n = c.sql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {holders}"
    ));
    std::thread::sleep(Duration::from_millis(800));
    let returned = barrier.try_wait().unwrap();
    kill(pid, libc::SIGCONT);
    assert_eq!(n, "1");
    assert_eq!(returned, None, "--wait-all returned while the job ran");
    assert!(eventually(SOON, || held(&env, c, id) == 1));
    assert_eq!(barrier.try_wait().unwrap(), None);
    let results = finish(&env, vec![holder]);
    assert_eq!(results[0].0, 0, "{}", results[0].1);
    let out = barrier.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
