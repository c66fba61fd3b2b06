//! The PostgreSQL backend behind PgBouncer: a pooler in session mode keeps
//! session locks and works; one in transaction or statement mode does not,
//! and is refused before the command runs, leaving no slot taken.
#![cfg(feature = "postgres")]

mod common;
use common::postgres::{Cluster, Job, PASSWORD, finish, free_port, hold, is_root, shared};
use common::{Env, SOON, eventually, kill, run, wait_for_file};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

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
    let c = shared()?;
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
