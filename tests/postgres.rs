//! The PostgreSQL backend (SPEC §7) against a real server the tests start
//! (`tests/common/postgres.rs`): admission, waiting, status, failures,
//! TLS, poolers. The fleet findings (stalls, partitions, connections per
//! host) are in `postgres_fleet.rs`, restarts and standbys in
//! `postgres_restart.rs`.
#![cfg(feature = "postgres")]

mod common;
use common::postgres::{Cluster, Job, PASSWORD, finish, free_port, held, hold, qsem, shared};
use common::{
    Env, SOON, epoch_ns, eventually, full_backlog_refuses, kill, run, wait_for_file, written_ns,
};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch environment and the shared cluster, or `None` when skipping.
fn setup() -> Option<(Env, &'static Cluster)> {
    let c = shared()?;
    Some((Env::new(), c))
}

#[test]
fn mixed_jobs_admission_across_processes() {
    let Some((env, c)) = setup() else { return };
    let a = hold(&env, c, &["--id", "mixed", "-j2"], "a");
    let b = hold(&env, c, &["--id", "mixed", "-j2"], "b");
    // Two held: a -j2 may not run, a -j3 may, and takes slot 3.
    let (code, out, err) = run(qsem(&env, c).args([
        "--id", "mixed", "-j2", "--wait", "0", "-E", "75", "--", "echo", "ran",
    ]));
    assert_eq!((code, out.as_str(), err.as_str()), (75, "", ""));
    let (code, out, _) = run(qsem(&env, c).args([
        "--id",
        "mixed",
        "-j3",
        "--wait",
        "0",
        "--",
        "sh",
        "-c",
        "echo $QSEM_SLOT $QSEM_JOBS",
    ]));
    assert_eq!((code, out.as_str()), (0, "3 3\n"));
    for (code, err) in finish(&env, vec![a, b]) {
        assert_eq!((code, err.as_str()), (0, ""));
    }
}

#[test]
fn never_more_than_n_at_once() {
    let Some((env, c)) = setup() else { return };
    let running = env.path("running");
    std::fs::create_dir_all(&running).unwrap();
    let log = env.path("counts");
    let script = format!(
        "touch {r}/$$; ls {r} | wc -l >> {log}; sleep 0.1; rm {r}/$$",
        r = running.display(),
        log = log.display()
    );
    let children: Vec<Child> = (0..12)
        .map(|i| {
            let jobs = if i % 3 == 0 { "-j2" } else { "-j3" };
            qsem(&env, c)
                .args(["--id", "invariant", jobs, "--", "sh", "-c", &script])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let counts: Vec<usize> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 12);
    assert!(counts.iter().all(|&n| (1..=3).contains(&n)), "{counts:?}");
}

#[test]
fn waiters_go_first_come_first_served() {
    let Some((env, c)) = setup() else { return };
    let holder = hold(&env, c, &["--id", "fifo"], "holder");
    let order = env.path("order");
    let mut waiters = Vec::new();
    for name in ["first", "second", "third"] {
        let script = format!("echo {name} >> {}", order.display());
        waiters.push(
            qsem(&env, c)
                .args(["--id", "fifo", "--", "sh", "-c", &script])
                .spawn()
                .unwrap(),
        );
        // Each is queued before the next arrives.
        let queued = waiters.len();
        assert!(eventually(SOON, || {
            let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "fifo"]));
            out.contains(&format!("{queued} waiting"))
        }));
    }
    finish(&env, vec![holder]);
    for mut w in waiters {
        assert!(w.wait().unwrap().success());
    }
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "first\nsecond\nthird\n"
    );
}

#[test]
fn a_killed_holder_frees_its_slot_within_a_second() {
    let Some((env, c)) = setup() else { return };
    let pidfile = env.path("jobpid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let mut holder = qsem(&env, c)
        .args(["--id", "crash", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    assert!(wait_for_file(&pidfile, SOON));
    assert!(eventually(SOON, || held(&env, c, "crash") == 1));
    let waiter_ran = env.path("waiter");
    let mut waiter = qsem(&env, c)
        .args(["--id", "crash", "--", "touch"])
        .arg(&waiter_ran)
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || {
        let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "crash"]));
        out.contains("1 waiting")
    }));
    let killed = Instant::now();
    kill(holder.id(), libc::SIGKILL);
    holder.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(1), || held(&env, c, "crash") == 0),
        "slot still held 1s after kill -9"
    );
    let freed = killed.elapsed();
    // A waiter learns of a crash by its slow poll (1s), not by a NOTIFY.
    assert!(
        wait_for_file(&waiter_ran, Duration::from_secs(3)),
        "waiter did not run"
    );
    eprintln!(
        "crash release: status shows it free after {freed:?}, waiter ran after {:?}",
        killed.elapsed()
    );
    assert!(waiter.wait().unwrap().success());
    let job: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(job, libc::SIGKILL);
}

#[test]
fn a_terminated_session_is_taken_back_and_the_job_runs_on() {
    let Some((env, c)) = setup() else { return };
    let holder = hold(&env, c, &["--id", "terminated", "--on-lost=kill"], "warn");
    let n = c.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'qsem h %' AND query LIKE '%/*qsem 7465726d696e61746564 %'");
    assert_eq!(n, "1");
    // The holder takes its slot back in a new session; nobody got it meanwhile.
    assert!(eventually(SOON, || {
        c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'qsem h %' AND query LIKE '%/*qsem 7465726d696e61746564 %'") == "1"
    }));
    let (code, _, err) = run(qsem(&env, c).args([
        "--id",
        "terminated",
        "--wait",
        "0",
        "-E",
        "75",
        "--",
        "true",
    ]));
    assert_eq!(code, 75, "{err}");
    let results = finish(&env, vec![holder]);
    let (code, err) = &results[0];
    // Not killed, although --on-lost=kill: the slot was never lost.
    assert_eq!(*code, 0, "{err}");
    // The holder hears of the end from the server, or from its heartbeat
    // if one was on its way then (the first goes 50 ms after the start).
    assert!(
        (err.contains("terminating connection") || err.contains("connection closed"))
            && err.contains("took slot 1 back"),
        "{err}"
    );
    assert!(!err.contains("lost slot"), "{err}");
}

#[test]
fn a_waiter_elsewhere_leaves_a_terminated_holders_slot_to_it() {
    let Some((env, c)) = setup() else { return };
    // The waiter runs on another host: a lock directory of its own.
    let elsewhere = Env::new();
    let id = "terminated-waited";
    let holder = hold(&env, c, &["--id", id], "holder");
    let ran = elsewhere.path("ran");
    let mut waiter = Job(Some(
        qsem(&elsewhere, c)
            .args(["--id", id, "--", "touch"])
            .arg(&ran)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let waiting = || {
        let (_, json, _) = run(qsem(&env, c).args(["--status", "--id", id, "--json"]));
        json.contains("\"waiting\":1")
    };
    assert!(eventually(SOON, waiting));
    // The holder's qsem is stopped when its session is ended, so that it
    // cannot come back for its slot at once (a machine under load, or one
    // that stalls for a moment): the waiter polls the server eight times
    // meanwhile, and each time finds the slot free.
    let pid = holder.0.as_ref().unwrap().id();
    kill(pid, libc::SIGSTOP);
    let holders = format!(
        "application_name LIKE 'qsem h %' AND query LIKE '%/*qsem {} %'",
        id.bytes().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let n = c.sql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {holders}"
    ));
    std::thread::sleep(Duration::from_millis(800));
    let ran_meanwhile = ran.exists();
    kill(pid, libc::SIGCONT);
    assert_eq!(n, "1");
    assert!(
        !ran_meanwhile,
        "the waiter took the terminated holder's slot"
    );
    // The holder takes its slot back; the waiter runs after its job.
    assert!(eventually(SOON, || c.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {holders}"
    )) == "1"));
    assert!(!ran.exists());
    let results = finish(&env, vec![holder]);
    let (code, err) = &results[0];
    assert_eq!(*code, 0, "{err}");
    assert!(err.contains("took slot 1 back"), "{err}");
    let out = waiter.0.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(ran.exists());
}

#[test]
fn on_lost_kill_stops_the_job_when_the_slot_cannot_be_taken_back() {
    let Some((env, c)) = setup() else { return };
    c.sql("CREATE ROLE qsem_killed LOGIN SUPERUSER PASSWORD 'killed-pw'");
    let url = format!(
        "postgres://qsem_killed:killed-pw@127.0.0.1:{}/postgres",
        c.port
    );
    let marker = env.path("finished");
    let started = env.path("started");
    let script = format!(
        "touch {}; sleep 30; touch {}",
        started.display(),
        marker.display()
    );
    let holder = env
        .qsem()
        .args(["--backend", &url, "--id", "killed", "--on-lost=kill"])
        .args(["--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for_file(&started, SOON));
    assert!(eventually(SOON, || held(&env, c, "killed") == 1));
    // A waiter on another host, which leaves the slot to its holder for a
    // while, and then takes it: the holder's job has been stopped by then.
    let elsewhere = Env::new();
    let next = elsewhere.path("next");
    let mut waiter = Job(Some(
        qsem(&elsewhere, c)
            .args(["--id", "killed", "--", "sh", "-c"])
            .arg(format!("date +%s%N > {}", next.display()))
            .spawn()
            .unwrap(),
    ));
    assert!(eventually(SOON, || {
        let (_, json, _) = run(qsem(&env, c).args(["--status", "--id", "killed", "--json"]));
        json.contains("\"waiting\":1")
    }));
    // The role may no longer log in: the holder cannot come back.
    let t = Instant::now();
    c.sql("ALTER ROLE qsem_killed NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'qsem_killed'");
    let out = holder.wait_with_output().unwrap();
    let ended = epoch_ns();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(122), "{err}");
    assert!(waiter.0.take().unwrap().wait().unwrap().success());
    let next: u128 = written_ns(&next);
    assert!(
        next > ended,
        "the waiter ran before the holder's job was stopped"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("lost slot 1")
            && err.contains("could not be taken back")
            && err.contains("stopping the command"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!marker.exists());
}

#[test]
fn a_holder_that_lost_its_slot_shows_as_running_without_one() {
    let Some((env, c)) = setup() else { return };
    let id = "lostshow";
    let holder = hold(&env, c, &["--id", id], "lost");
    // End the holder's session, and take its slot from another session
    // before the holder can come back for it: that session waits in the
    // lock queue, so it gets the slot the moment the old session ends.
    let key = (common::postgres::fnv64(id) >> 20 << 20) | 1;
    let mut thief = c.psql_session("thief");
    {
        use std::io::Write;
        let sql = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'qsem h %' AND query LIKE '%/*qsem {} %';\nSELECT pg_advisory_lock({});\n",
            id.bytes().map(|b| format!("{b:02x}")).collect::<String>(),
            key as i64
        );
        thief
            .stdin
            .as_mut()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
    }
    // The job runs on; --status shows it without a slot, and the thief's
    // lock as the one slot held.
    let shown = || run(qsem(&env, c).args(["--status", "--id", id])).1;
    assert!(
        eventually(SOON, || shown()
            .lines()
            .any(|l| l.starts_with(&format!("{id}  -  ")))),
        "{}",
        shown()
    );
    let out = shown();
    assert!(out.contains(&format!("{id}: 1 held, 0 waiting")), "{out}");
    assert!(out.contains("foreign session"), "{out}");
    let (_, json, _) = run(qsem(&env, c).args(["--status", "--id", id, "--json"]));
    assert!(json.contains("\"slot\":null"), "{json}");
    assert!(json.contains("\"held\":1,"), "{json}");
    // Once the thief lets go, the holder takes a slot again.
    let _ = thief.kill();
    let _ = thief.wait();
    assert!(eventually(SOON, || held(&env, c, id) == 1 && !shown().contains(" -  ")));
    let results = finish(&env, vec![holder]);
    let (code, err) = &results[0];
    assert_eq!(*code, 0, "{err}");
    assert!(
        err.contains("lost slot 1") && err.contains("took slot 1 again"),
        "{err}"
    );
}

/// An nftables table that drops loopback TCP to and from one port; removed on drop.
struct Partition(String);

impl Partition {
    fn cut(port: u16) -> Partition {
        let table = format!("qsem-pg-test-{}", std::process::id());
        let rules = format!(
            "table inet {table} {{ chain input {{ type filter hook input priority -10; policy accept; \
             tcp sport {port} drop; tcp dport {port} drop; }}; }}"
        );
        let out = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(rules.as_bytes())?;
                c.wait_with_output()
            });
        match out {
            Ok(o) if o.status.success() => Partition(table),
            other => panic!(
                "cannot cut the network with nft (root and nftables needed; .ci/postgres.sh installs it): {other:?}"
            ),
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

#[test]
fn a_cut_off_holder_loses_its_slot_within_the_bound() {
    let Some((env, c)) = setup() else { return };
    let bound = Duration::from_secs(4);
    let holder = hold(&env, c, &["--id", "partition", "--lost-after", "4s"], "cut");
    let who = "FROM pg_stat_activity WHERE application_name LIKE 'qsem h %' AND query LIKE '%/*qsem 706172746974696f6e %'";
    let port: u16 = c
        .sql(&format!("SELECT client_port {who}"))
        .parse()
        .expect("the holder's client port");
    let pid = c.sql(&format!("SELECT pid {who}"));
    let cut = Partition::cut(port);
    let t = Instant::now();
    let gone = format!("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = {pid}");
    assert!(
        eventually(bound + Duration::from_secs(4), || c.sql(&gone) == "0"),
        "slot still held {:?} after the cut",
        t.elapsed()
    );
    let freed = t.elapsed();
    eprintln!(
        "partition release: the server freed the slot {freed:?} after the cut (bound {bound:?})"
    );
    // The holder notices, and takes a slot again through a new connection.
    assert!(eventually(bound * 3, || held(&env, c, "partition") == 1));
    drop(cut);
    let results = finish(&env, vec![holder]);
    let (code, err) = &results[0];
    assert_eq!(*code, 0, "{err}");
    assert_eq!(err.matches("lost slot 1").count(), 1, "{err}");
    assert!(err.contains("took slot 1 again"), "{err}");
    assert!(
        freed <= bound + Duration::from_secs(1),
        "freed after {freed:?}"
    );
}

#[test]
fn status_lists_holders_and_waiters() {
    let Some((env, c)) = setup() else { return };
    let a = hold(&env, c, &["--id", "st-one", "-j2"], "a");
    let b = hold(&env, c, &["--id", "st-two"], "b");
    let waiter = qsem(&env, c)
        .args(["--id", "st-two", "--", "true"])
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || {
        let (_, out, _) = run(qsem(&env, c).args(["--status"]));
        out.contains("st-two: 1 held, 1 waiting")
    }));
    let (code, out, err) = run(qsem(&env, c).arg("--status"));
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains("st-one: 1 held, 0 waiting"), "{out}");
    let row = out.lines().find(|l| l.starts_with("st-one ")).expect(&out);
    assert!(
        row.contains("sh -c") && row.split_whitespace().nth(1) == Some("1"),
        "{row}"
    );
    let (_, json, _) = run(qsem(&env, c).args(["--status", "--id", "st-one", "--json"]));
    assert!(
        json.contains("\"id\":\"st-one\",\"held\":1,\"waiting\":0"),
        "{json}"
    );
    assert!(!json.contains("st-two"), "{json}");
    finish(&env, vec![a, b]);
    let mut waiter = waiter;
    assert!(waiter.wait().unwrap().success());
}

/// Both kinds of waiter are named with their pid, host and age: the head of
/// this host's queue (on the server) and the one queued behind it (locally).
#[test]
fn status_names_the_waiters_on_the_server_and_in_the_local_queue() {
    let Some((env, c)) = setup() else { return };
    let h = hold(&env, c, &["--id", "st-named"], "h");
    let mut waiters = Vec::new();
    for i in 0..2 {
        let w = qsem(&env, c)
            .args(["--id", "st-named", "--", "true"])
            .spawn();
        waiters.push(Job(Some(w.unwrap())));
        assert!(eventually(SOON, || {
            let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "st-named"]));
            out.contains(&format!("st-named: 1 held, {} waiting", i + 1))
        }));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (code, json, err) = run(qsem(&env, c).args(["--status", "--id", "st-named", "--json"]));
    assert_eq!((code, err.as_str()), (0, ""));
    for w in &waiters {
        let pid = w.0.as_ref().unwrap().id();
        let named = format!("{{\"pid\":{pid},\"host\":\"{}\",\"since\":", host.trim());
        assert!(json.contains(&named), "{named} in {json}");
    }
    assert!(!json.contains("\"waited\":null"), "{json}");
    finish(&env, vec![h]);
    for mut w in waiters {
        assert!(w.0.take().unwrap().wait().unwrap().success());
    }
}

#[test]
fn wait_expiry_is_silent_and_signals_stop_a_waiter() {
    let Some((env, c)) = setup() else { return };
    let holder = hold(&env, c, &["--id", "expiry"], "h");
    let t = Instant::now();
    let (code, out, err) =
        run(qsem(&env, c).args(["--id", "expiry", "--wait", "300ms", "--", "echo", "ran"]));
    let took = t.elapsed();
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let mut waiter = qsem(&env, c)
        .args(["--id", "expiry", "--", "echo", "ran"])
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || {
        let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "expiry"]));
        out.contains("1 waiting")
    }));
    let t = Instant::now();
    kill(waiter.id(), libc::SIGTERM);
    let status = waiter.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    finish(&env, vec![holder]);
}

#[test]
fn unreachable_server_or_bad_password_is_125() {
    let Some((env, c)) = setup() else { return };
    let port = free_port();
    let (code, out, err) = run(env.qsem().args([
        "--backend",
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        "--",
        "echo",
        "ran",
    ]));
    assert_eq!((code, out.as_str()), (125, ""));
    assert!(
        err.starts_with("qsem: cannot connect to PostgreSQL at 127.0.0.1:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let bad = c.url().replace(PASSWORD, "wrong");
    let (code, _, err) = run(env.qsem().args(["--backend", &bad, "--", "echo", "ran"]));
    assert_eq!(code, 125);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("wrong"), "{err}");
    // The same through QSEM_BACKEND and the PG* variables.
    let (code, out, err) = run(env
        .qsem()
        .env("QSEM_BACKEND", "postgres://")
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", c.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGPASSWORD", PASSWORD)
        .env("PGDATABASE", "postgres")
        .args(["--id", "pgenv", "--", "echo", "ran"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ran\n", ""));
}

#[test]
fn tls_when_asked_with_the_certificate_verified() {
    let Some((env, c)) = setup() else { return };
    let url = format!("{}?sslmode=require", c.url());
    let started = env.path("started");
    let script = format!("touch {}; sleep 1", started.display());
    let mut holder = env
        .qsem()
        .env("PGSSLROOTCERT", &c.ca)
        .args(["--backend", &url, "--id", "tls", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    assert!(wait_for_file(&started, SOON));
    let ssl = c.sql("SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE 'qsem h %' AND a.query LIKE '%/*qsem 746c73 %'");
    assert_eq!(ssl, "t");
    assert!(holder.wait().unwrap().success());
    // A certificate that no trusted root vouches for is refused.
    let (code, out, err) = run(env
        .qsem()
        .env("PGSSLROOTCERT", "/etc/ssl/certs/ca-certificates.crt")
        .args(["--backend", &url, "--id", "tls", "--", "echo", "ran"]));
    assert_eq!((code, out.as_str()), (125, ""), "{err}");
    assert!(
        err.starts_with("qsem: cannot connect to PostgreSQL at 127.0.0.1:"),
        "{err}"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn a_full_backlog_gives_up_at_once() {
    let Some((env, c)) = setup() else { return };
    let holder = hold(&env, c, &["--id", "backlog"], "h");
    let mut waiter = qsem(&env, c)
        .args(["--id", "backlog", "--", "true"])
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || {
        let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "backlog"]));
        out.contains("backlog: 1 held, 1 waiting")
    }));
    // One waits already (on this host): a newcomer with --max-waiting 1
    // gives up at once.
    full_backlog_refuses(|| qsem(&env, c), "backlog");
    // --max-waiting 0: run now or never.
    let args = [
        "--id",
        "backlog",
        "--max-waiting",
        "0",
        "--wait",
        "20s",
        "-E",
        "7",
        "true",
    ];
    let t = Instant::now();
    assert_eq!(run(qsem(&env, c).args(args)).0, 7);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    finish(&env, vec![holder]);
    assert!(waiter.wait().unwrap().success());
}

#[test]
fn the_heads_of_many_hosts_take_turns() {
    let Some((env, c)) = setup() else { return };
    // A database of its own, whose statements (a look is one) the server
    // logs: this test's alone.
    c.sql("DROP DATABASE IF EXISTS qsem_turns");
    c.sql("CREATE DATABASE qsem_turns");
    c.sql("ALTER DATABASE qsem_turns SET log_statement = 'all'");
    let log = c.dir.join("log");
    let statements_since = |at: u64| {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&log).unwrap();
        f.seek(std::io::SeekFrom::Start(at)).unwrap();
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        text.matches("LOG:  statement: ").count()
    };
    let url = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/qsem_turns",
        c.port
    );
    let on = |env: &Env| {
        let mut cmd = env.qsem();
        cmd.args(["--backend", &url, "--id", "turns"]);
        cmd
    };
    let holder = common::postgres::started(
        &env,
        on(&env)
            .args([
                "--",
                "sh",
                "-c",
                &common::postgres::hold_script(&env, "turns"),
            ])
            .spawn()
            .unwrap(),
        "turns",
    );
    // Twenty waiters, each on a host of its own: twenty heads on the server.
    let order = env.path("order");
    let hosts: Vec<Env> = (0..20).map(|_| Env::new()).collect();
    let waiters: Vec<Job> = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let job = format!("echo {i} >> {}", order.display());
            let child = on(host).args(["--", "sh", "-c", &job]).spawn().unwrap();
            // Arrival order on the server is the order of the turns.
            std::thread::sleep(Duration::from_millis(100));
            Job(Some(child))
        })
        .collect();
    assert!(eventually(SOON, || {
        let (_, json, _) = run(on(&env).args(["--status", "--json"]));
        json.contains("\"waiting\":20")
    }));
    // Three seconds idle, then twenty handoffs.
    let before = std::fs::metadata(&log).unwrap().len();
    std::thread::sleep(Duration::from_secs(3));
    let results = finish(&env, vec![holder]);
    assert_eq!(results[0].0, 0, "{}", results[0].1);
    for mut w in waiters {
        assert!(w.0.take().unwrap().wait().unwrap().success());
    }
    let ran: Vec<String> = std::fs::read_to_string(&order)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(ran.len(), 20);
    let looks = statements_since(before);
    // Each head looking every 100 ms, and every release waking every head,
    // made about 1,000 messages here; taking turns, about 150: the fleet's
    // poll every 100 ms, and for each handoff the release, the look of the
    // head whose turn it is, and the new holder's first steps.
    assert!(looks < 400, "{looks} messages");
}

#[test]
fn a_head_that_gives_up_passes_its_turn_on() {
    let Some((env, c)) = setup() else { return };
    let id = "passed";
    let holder = hold(&env, c, &["--id", id], "holder");
    // Twenty-four heads on hosts of their own, which give up after 5 s,
    // and behind them one that waits for as long as it takes.
    let hosts: Vec<Env> = (0..25).map(|_| Env::new()).collect();
    let mut early: Vec<Job> = hosts[..24]
        .iter()
        .map(|host| {
            let child = qsem(host, c)
                .args(["--id", id, "--wait", "5s", "-E", "75", "--", "true"])
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            Job(Some(child))
        })
        .collect();
    let waiting = |n: usize| {
        let (_, json, _) = run(qsem(&env, c).args(["--status", "--id", id, "--json"]));
        json.contains(&format!("\"waiting\":{n}"))
    };
    assert!(eventually(SOON, || waiting(24)));
    let ran = hosts[24].path("ran");
    let mut last = Job(Some(
        qsem(&hosts[24], c)
            .args(["--id", id, "--", "sh", "-c"])
            .arg(format!("date +%s%N > {}", ran.display()))
            .spawn()
            .unwrap(),
    ));
    assert!(eventually(SOON, || waiting(25)));
    for j in &mut early {
        assert_eq!(j.0.take().unwrap().wait().unwrap().code(), Some(75));
    }
    // The last head counted the others as older, and polls only every
    // 2.5 s or so, counting again every 10 s; their NOTIFYs as they gave
    // up moved it up, so the release is its turn at once.
    let released = epoch_ns();
    let results = finish(&env, vec![holder]);
    assert_eq!(results[0].0, 0, "{}", results[0].1);
    assert!(last.0.take().unwrap().wait().unwrap().success());
    let started: u128 = written_ns(&ran);
    let after = Duration::from_nanos((started - released) as u64);
    assert!(
        after < Duration::from_secs(1),
        "ran {after:?} after the release"
    );
}
