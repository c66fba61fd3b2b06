//! The PostgreSQL backend (SPEC §7), against a real server that these tests
//! start themselves: a throwaway cluster (initdb + pg_ctl in a temporary
//! directory, on a free loopback port, as the `postgres` user when run as
//! root), shared by the tests of this file and stopped when they end.
//!
//! Missing PostgreSQL binaries fail the tests loudly (`.ci/postgres.sh`
//! installs them); set `QSEM_PG_TESTS=skip` to skip them on purpose.
#![cfg(feature = "postgres")]

mod common;
use common::{Env, SOON, eventually, kill, run, wait_for_file};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PASSWORD: &str = "qsem-test-pw";

struct Cluster {
    bin: PathBuf,
    port: u16,
    /// The server's self-signed certificate.
    ca: PathBuf,
}

impl Cluster {
    fn url(&self) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Runs SQL through psql and returns its unaligned output.
    fn sql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "psql {sql}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// The directory with initdb, pg_ctl and psql: PATH first, then Debian's.
fn postgres_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    debian.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    on_path
        .into_iter()
        .chain(debian.into_iter().rev())
        .find(|d| {
            ["initdb", "pg_ctl", "psql"]
                .iter()
                .all(|b| d.join(b).is_file())
        })
}

fn is_root() -> bool {
    // SAFETY: no memory is passed.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as the `postgres` user when we are root (the server refuses root).
fn as_server_user(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The cluster, started once; `None` when skipping on purpose.
fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster).as_ref()
}

fn start_cluster() -> Option<Cluster> {
    if std::env::var("QSEM_PG_TESTS").as_deref() == Ok("skip") {
        eprintln!("QSEM_PG_TESTS=skip: not testing the PostgreSQL backend");
        return None;
    }
    let bin = postgres_bin().expect(
        "PostgreSQL's initdb/pg_ctl/psql not found (PATH, /usr/lib/postgresql/*/bin): \
         run .ci/postgres.sh, or set QSEM_PG_TESTS=skip",
    );
    // As root the server runs as `postgres`, which must reach the directory:
    // /tmp, whatever TMPDIR says.
    let tmp = if is_root() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tmp.join(format!("qsem-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "chown postgres {}", dir.display());
    }
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, PASSWORD).unwrap();
    if is_root() {
        Command::new("chown")
            .arg("postgres")
            .arg(&pwfile)
            .status()
            .unwrap();
    }
    let data = dir.join("data");
    let out = as_server_user(&bin, "initdb")
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output()
        .expect("initdb runs");
    assert!(out.status.success(), "initdb: {out:?}");
    // A test CA and a server certificate for 127.0.0.1 signed by it, for the
    // TLS test (a self-signed CA certificate is no server certificate).
    let script = format!(
        "set -e; cd {data}; ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'; \
         openssl req -x509 $ec -days 2 -subj /CN=qsem-test-ca -keyout ../ca.key -out ../ca.crt; \
         openssl req $ec -subj /CN=localhost -keyout server.key -out ../server.csr; \
         printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ../ext; \
         openssl x509 -req -in ../server.csr -CA ../ca.crt -CAkey ../ca.key -CAcreateserial \
           -days 2 -extfile ../ext -out server.crt",
        data = data.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl: {out:?}");
    if is_root() {
        Command::new("chown")
            .arg("postgres")
            .arg(data.join("server.key"))
            .arg(data.join("server.crt"))
            .status()
            .unwrap();
    }
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=60 -c shared_buffers=16MB -c fsync=off -c ssl=on",
        dir.display()
    );
    let out = as_server_user(&bin, "pg_ctl")
        .arg("-D")
        .arg(&data)
        .args(["-o", &opts, "-l"])
        .arg(dir.join("log"))
        .args(["-w", "-t", "60", "start"])
        .output()
        .expect("pg_ctl runs");
    assert!(out.status.success(), "pg_ctl start: {out:?}");
    // Stop the cluster when this test process ends, however it ends.
    let stopper = format!(
        "while [ -d /proc/{pid} ]; do sleep 1; done; {ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let mut stop = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &stopper]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &stopper]);
        c
    };
    // It outlives this process by design; nobody here waits for it.
    #[allow(clippy::zombie_processes)]
    stop.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cluster stopper starts");
    Some(Cluster {
        bin,
        port,
        ca: dir.join("ca.crt"),
    })
}

/// `qsem --backend <cluster>`, or `None` when skipping.
fn setup() -> Option<(Env, &'static Cluster)> {
    let c = cluster()?;
    Some((Env::new(), c))
}

fn qsem(env: &Env, c: &Cluster) -> Command {
    let mut cmd = env.qsem();
    cmd.arg("--backend").arg(c.url());
    cmd
}

/// A background qsem, killed if a test fails before it ends.
struct Job(Option<Child>);

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A holder of one slot whose job waits until `stop` exists, in the background.
fn hold(env: &Env, c: &Cluster, args: &[&str], name: &str) -> Job {
    let started = env.path(&format!("{name}.started"));
    let stop = env.path("stop");
    // The job also ends when the test's directory goes: no process outlives a
    // failing test.
    let script = format!(
        "echo $QSEM_SLOT > {started}; while [ -d {root} ] && [ ! -e {stop} ]; do sleep 0.05; done",
        started = started.display(),
        root = env.root.display(),
        stop = stop.display()
    );
    let child = qsem(env, c)
        .args(args)
        .args(["--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if !wait_for_file(&started, SOON) {
        let mut child = child;
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("{name} did not start: {out:?}");
    }
    Job(Some(child))
}

fn held(env: &Env, c: &Cluster, id: &str) -> usize {
    let (code, out, err) = run(qsem(env, c).args(["--status", "--id", id, "--json"]));
    assert_eq!(code, 0, "{err}");
    let holders = out.split("\"holders\":[").nth(1).unwrap_or("]");
    holders.matches("\"slot\":").count()
}

fn finish(env: &Env, jobs: Vec<Job>) -> Vec<(i32, String)> {
    std::fs::write(env.path("stop"), "").unwrap();
    jobs.into_iter()
        .map(|mut j| {
            let out = j.0.take().unwrap().wait_with_output().unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .collect()
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
    std::thread::sleep(Duration::from_millis(300));
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
fn a_terminated_session_is_reported_and_the_job_runs_on() {
    let Some((env, c)) = setup() else { return };
    let holder = hold(&env, c, &["--id", "terminated"], "warn");
    let n = c.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'qsem h %' AND query LIKE '%/*qsem 7465726d696e61746564 %'");
    assert_eq!(n, "1");
    assert!(eventually(SOON, || held(&env, c, "terminated") == 0));
    std::thread::sleep(Duration::from_millis(300));
    let results = finish(&env, vec![holder]);
    let (code, err) = &results[0];
    assert_eq!(*code, 0, "{err}");
    assert_eq!(err.matches("lost slot 1").count(), 1, "{err}");
    assert!(err.contains("terminating connection"), "{err}");
    assert!(err.contains("runs on"), "{err}");
}

#[test]
fn on_lost_kill_stops_the_job_with_its_own_status() {
    let Some((env, c)) = setup() else { return };
    let marker = env.path("finished");
    let started = env.path("started");
    let script = format!(
        "touch {}; sleep 30; touch {}",
        started.display(),
        marker.display()
    );
    let holder = qsem(&env, c)
        .args([
            "--id",
            "killed",
            "--on-lost=kill",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for_file(&started, SOON));
    assert!(eventually(SOON, || held(&env, c, "killed") == 1));
    let t = Instant::now();
    c.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'qsem h %' AND query LIKE '%/*qsem 6b696c6c6564 %'");
    let out = holder.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(122), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("lost slot 1") && err.contains("stopping the command"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!marker.exists());
}

/// An nftables table that drops loopback TCP to and from one port; removed on drop.
struct Partition(String);

impl Partition {
    fn cut(port: u16) -> Partition {
        let table = format!("qsem_test_{}", std::process::id());
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
    let port: u16 = c
        .sql("SELECT client_port FROM pg_stat_activity WHERE application_name LIKE 'qsem h %' AND query LIKE '%/*qsem 706172746974696f6e %'")
        .parse()
        .expect("the holder's client port");
    let cut = Partition::cut(port);
    let t = Instant::now();
    assert!(
        eventually(bound + Duration::from_secs(4), || held(
            &env,
            c,
            "partition"
        ) == 0),
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
    std::thread::sleep(Duration::from_millis(300));
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
    std::thread::sleep(Duration::from_millis(200));
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
fn a_role_that_may_not_create_tables_uses_the_one_a_dba_made() {
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
    assert_eq!(
        run(&mut q(&["--wait-all"])),
        (0, String::new(), String::new())
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

/// PgBouncer in front of the cluster, started once for this file's tests and
/// stopped when the test process ends: one database name per pool mode
/// (`session`, `transaction`, `statement`), all logging in to the cluster as
/// `postgres`, so a client may connect with any user and no password.
struct Pooler {
    port: u16,
}

impl Pooler {
    fn url(&self, mode: &str) -> String {
        format!("postgres://qsem@127.0.0.1:{}/{mode}", self.port)
    }
}

/// Debian's pgbouncer: PATH first, then /usr/sbin (not on every PATH).
fn pgbouncer_bin() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("pgbouncer"))
        .find(|b| b.is_file())
}

/// The cluster and the pooler, or `None` when skipping: on purpose, or
/// because pgbouncer is not installed (`.ci/postgres.sh` installs it).
fn pooled_setup(test: &str) -> Option<(Env, &'static Cluster, &'static Pooler)> {
    static POOLER: OnceLock<Option<Pooler>> = OnceLock::new();
    let c = cluster()?;
    let Some(p) = POOLER.get_or_init(|| start_pooler(c)).as_ref() else {
        eprintln!(
            "{test}: SKIPPED: pgbouncer not found (PATH, /usr/sbin); .ci/postgres.sh installs it"
        );
        return None;
    };
    Some((Env::new(), c, p))
}

fn start_pooler(c: &Cluster) -> Option<Pooler> {
    let bin = pgbouncer_bin()?;
    let dir = std::env::temp_dir().join(format!("qsem-pgbouncer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let db = |mode: &str| {
        format!(
            "{mode} = host=127.0.0.1 port={} dbname=postgres user=postgres password={PASSWORD} pool_mode={mode}\n",
            c.port
        )
    };
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n{}{}{}[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = any\n",
            db("session"),
            db("transaction"),
            db("statement")
        ),
    )
    .unwrap();
    // PgBouncer refuses to run as root: as root it switches to `postgres`.
    // It ends with this test process, however that ends.
    let script = format!(
        "{bin} {user} {ini} & b=$!; while [ -d /proc/{pid} ] && [ -d /proc/$b ]; do sleep 1; done; \
         kill $b; rm -rf {dir}",
        bin = bin.display(),
        user = if is_root() { "-u postgres" } else { "" },
        ini = ini.display(),
        pid = std::process::id(),
        dir = dir.display(),
    );
    let log = std::fs::File::create(dir.join("log")).unwrap();
    // It outlives this process by design; nobody here waits for it.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("pgbouncer starts");
    let up = eventually(SOON, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        up,
        "pgbouncer did not listen on {port}: {}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    Some(Pooler { port })
}

/// `qsem --backend URL ARGS -- sh -c 'touch MARKER'`, run to its end.
fn run_through(env: &Env, url: &str, args: &[&str], marker: &Path) -> (i32, String, String) {
    run(env
        .qsem()
        .args(["--backend", url])
        .args(args)
        .args(["--", "sh", "-c", "touch \"$1\"", "sh"])
        .arg(marker))
}

/// No slot of `id` is left taken: straight to the server, a `--wait 0` runs.
fn assert_free_on_the_server(env: &Env, c: &Cluster, id: &str, marker: &Path) {
    let args = ["--id", id, "--wait", "0", "-E", "75"];
    let (code, _, err) = run_through(env, &c.url(), &args, marker);
    assert_eq!(code, 0, "a slot of {id} is left taken: {err}");
    assert!(marker.exists());
}

#[test]
fn a_transaction_or_statement_mode_pooler_is_refused_before_the_command_runs() {
    let Some((env, c, p)) = pooled_setup("a_transaction_or_statement_mode_pooler_is_refused")
    else {
        return;
    };
    let marker = env.path("ran");
    // The second time through transaction mode finds no slot left by the first.
    for mode in ["transaction", "statement", "transaction"] {
        let (code, out, err) = run_through(&env, &p.url(mode), &["--id", "txpool"], &marker);
        assert_eq!((code, out.as_str()), (125, ""), "{mode}: {err}");
        assert!(
            err.starts_with(&format!(
                "qsem: PostgreSQL at 127.0.0.1:{}/{mode} does not keep session locks \
                 (a connection pooler in transaction or statement mode?)",
                p.port
            )),
            "{mode}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!marker.exists(), "the command ran through the pooler");
    }
    assert_free_on_the_server(&env, c, "txpool", &marker);
    // One that would wait is refused too, rather than waiting.
    let holder = hold(&env, c, &["--id", "txpool"], "h");
    let t = Instant::now();
    let queued = env.path("queued");
    let (code, _, err) = run_through(&env, &p.url("transaction"), &["--id", "txpool"], &queued);
    assert_eq!(code, 125, "{err}");
    assert!(t.elapsed() < SOON, "{:?}", t.elapsed());
    assert!(!queued.exists());
    finish(&env, vec![holder]);
}

#[test]
fn concurrent_holders_through_a_transaction_mode_pooler_all_fail() {
    let Some((env, c, p)) = pooled_setup("concurrent_holders_through_a_transaction_mode_pooler")
    else {
        return;
    };
    let marker = env.path("ran");
    let url = p.url("transaction");
    // Four at once: in a busy pool, the checks must still see it.
    let jobs: Vec<Job> = (0..4)
        .map(|_| {
            env.qsem()
                .args([
                    "--backend",
                    &url,
                    "--id",
                    "txconc",
                    "--wait",
                    "20",
                    "-E",
                    "75",
                ])
                .args(["--", "sh", "-c", "touch \"$1\"", "sh"])
                .arg(&marker)
                .stderr(Stdio::piped())
                .spawn()
                .map(|child| Job(Some(child)))
                .unwrap()
        })
        .collect();
    for mut job in jobs {
        let out = job.0.take().unwrap().wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains("connection pooler"), "{err}");
    }
    assert!(!marker.exists(), "a command ran through the pooler");
    assert_free_on_the_server(&env, c, "txconc", &marker);
}

#[test]
fn a_session_mode_pooler_keeps_the_limit_and_frees_a_killed_holder() {
    let Some((env, _, p)) = pooled_setup("a_session_mode_pooler_keeps_the_limit") else {
        return;
    };
    let url = p.url("session");
    let marker = env.path("ran");
    let (code, out, err) = run_through(&env, &url, &["--id", "sspool"], &marker);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    assert!(marker.exists());
    // The job ends when the test's directory goes, even if qsem is killed.
    let started = env.path("started");
    let script = format!(
        "touch {}; while [ -d {} ]; do sleep 0.1; done",
        started.display(),
        env.root.display()
    );
    let mut holder = Job(Some(
        env.qsem()
            .args([
                "--backend",
                &url,
                "--id",
                "sspool",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .spawn()
            .unwrap(),
    ));
    assert!(wait_for_file(&started, SOON));
    let second = env.path("second");
    let (code, _, err) = run_through(
        &env,
        &url,
        &["--id", "sspool", "--wait", "0", "-E", "75"],
        &second,
    );
    assert_eq!((code, err.as_str()), (75, ""));
    assert!(!second.exists());
    // The pooler resets a server session (DISCARD ALL) when its client goes,
    // which frees the slot as PostgreSQL would.
    let mut qsem = holder.0.take().unwrap();
    kill(qsem.id(), libc::SIGKILL);
    qsem.wait().unwrap();
    let (code, _, err) = run_through(
        &env,
        &url,
        &["--id", "sspool", "--wait", "10", "-E", "75"],
        &second,
    );
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(second.exists());
}
