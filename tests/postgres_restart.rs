//! The PostgreSQL backend across server maintenance (issue 11, findings 2
//! and 6): a restart, and a hot standby. Each test has a cluster of its own,
//! since it restarts or copies it.
#![cfg(feature = "postgres")]

mod common;
use common::postgres::{
    Cluster, Job, Options, as_server_user, finish, free_port, held, hold, qsem,
};
use common::{Env, SOON, eventually, run};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn a_restart_keeps_the_limit_the_jobs_and_the_waiters() {
    let Some(c) = Cluster::start(&Options::default()) else {
        return;
    };
    let env = Env::new();
    let args = ["--id", "restart", "-j2", "--on-lost=kill"];
    let a = hold(&env, &c, &args, "a");
    let b = hold(&env, &c, &args, "b");
    // A waiter from elsewhere (another lock directory), queued before the restart.
    let other = Env::new();
    let waited = other.path("waited");
    let waiter = Job(Some(
        qsem(&other, &c)
            .args(["--id", "restart", "-j2", "--wait", "60", "--", "touch"])
            .arg(&waited)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    assert!(eventually(SOON, || {
        let (_, out, _) = run(qsem(&env, &c).args(["--status", "--id", "restart"]));
        out.contains("2 held, 1 waiting")
    }));
    c.ctl("restart", &["-m", "fast"]);
    // Newcomers never get in while the two jobs run: not in the grace, not after.
    let until = Instant::now() + Duration::from_secs(9);
    let mut tries = 0;
    while Instant::now() < until {
        let (code, _, err) = run(qsem(&env, &c).args([
            "--id", "restart", "-j2", "--wait", "0", "-E", "75", "--", "true",
        ]));
        // 75: refused; 125: the server was not up yet. Never 0.
        assert!(
            code == 75 || code == 125,
            "a newcomer ran under -j2 with two jobs running: {code} {err}"
        );
        tries += 1;
    }
    assert!(tries >= 3, "{tries}");
    assert!(eventually(SOON, || held(&env, &c, "restart") == 2));
    assert!(!waited.exists(), "the waiter ran while two jobs did");
    // Nothing was killed, and the waiter is still in line.
    let results = finish(&env, vec![a, b]);
    for (code, err) in &results {
        assert_eq!(*code, 0, "{err}");
        assert!(err.contains("took slot") && err.contains("back"), "{err}");
    }
    let mut waiter = waiter;
    let out = waiter.0.take().unwrap().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(waited.exists());
}

#[test]
fn wait_all_waits_out_the_reclaim_grace_after_a_server_start() {
    let Some(c) = Cluster::start(&Options::default()) else {
        return;
    };
    let env = Env::new();
    c.ctl("restart", &["-m", "fast"]);
    // Right after a start, the jobs that ran before it may still be on
    // their way back to their slots, holding nothing: an id is not idle
    // until they have had their grace (6 s after the server's start).
    let (code, _, err) = run(qsem(&env, &c).args(["--id", "grace", "--wait-all", "--wait", "60s"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        c.sql("SELECT clock_timestamp() - pg_postmaster_start_time() >= interval '6 seconds'"),
        "t"
    );
}

#[test]
fn a_hot_standby_is_refused_before_the_command_runs() {
    let Some(c) = Cluster::start(&Options::default()) else {
        return;
    };
    let env = Env::new();
    let standby = c.dir.join("standby");
    let out = as_server_user(&c.bin, "pg_basebackup")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-D",
        ])
        .arg(&standby)
        .arg("-p")
        .arg(c.port.to_string())
        .env("PGPASSWORD", common::postgres::PASSWORD)
        .output()
        .expect("pg_basebackup runs");
    assert!(out.status.success(), "pg_basebackup: {out:?}");
    let port = free_port();
    let out = as_server_user(&c.bin, "pg_ctl")
        .arg("-D")
        .arg(&standby)
        .arg("-o")
        .arg(format!(
            "-p {port} -k {} -c hot_standby=on",
            c.dir.display()
        ))
        .arg("-l")
        .arg(c.dir.join("standby.log"))
        .args(["-w", "-t", "60", "start"])
        .output()
        .expect("pg_ctl runs");
    assert!(out.status.success(), "standby start: {out:?}");
    struct Stop<'a>(&'a Cluster, std::path::PathBuf);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = as_server_user(&self.0.bin, "pg_ctl")
                .arg("-D")
                .arg(&self.1)
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
    let _stop = Stop(&c, standby);
    // The primary holds the only slot.
    let holder = hold(&env, &c, &["--id", "split"], "h");
    let marker = env.path("ran");
    let url = c.url().replace(&c.port.to_string(), &port.to_string());
    let (code, out, err) = run(env
        .qsem()
        .args(["--backend", &url, "--id", "split", "--", "touch"])
        .arg(&marker));
    assert_eq!((code, out.as_str()), (125, ""), "{err}");
    assert!(err.contains("is a standby"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!marker.exists());
    finish(&env, vec![holder]);
}
