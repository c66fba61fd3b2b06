//! A real PostgreSQL server for the backend's tests: a throwaway cluster
//! (initdb + pg_ctl in a temporary directory, on a free port, as the
//! `postgres` user when run as root). [`shared`] is one per test binary,
//! stopped when the binary ends however it ends; [`Cluster::start`] gives a
//! test its own (for restarts, a small `max_connections`, or the address of
//! a [`super::netns::Fleet`]), stopped on drop.
//!
//! Missing PostgreSQL binaries fail the tests loudly (`.ci/postgres.sh`
//! installs them); set `QSEM_PG_TESTS=skip` to skip them on purpose.

use super::{Env, SOON, wait_for_file};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const PASSWORD: &str = "qsem-test-pw";

/// How long after a server start qsem admits newcomers (the engine's
/// `RECLAIM_GRACE`, plus a margin).
pub const GRACE: Duration = Duration::from_millis(6500);

/// What a cluster of one's own should look like.
#[derive(Default)]
pub struct Options {
    pub max_connections: Option<u32>,
    /// Also listen on this address, and let this subnet in.
    pub also_listen: Option<(String, String)>,
}

pub struct Cluster {
    pub bin: PathBuf,
    pub port: u16,
    /// The test CA that signed the server's certificate.
    pub ca: PathBuf,
    pub dir: PathBuf,
    data: PathBuf,
    /// Stopped on drop (not the shared one, which outlives the tests).
    owned: bool,
}

impl Cluster {
    pub fn url(&self) -> String {
        self.url_at("127.0.0.1")
    }

    pub fn url_at(&self, host: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{host}:{}/postgres",
            self.port
        )
    }

    /// Runs SQL through psql and returns its unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.psql(sql);
        assert!(out.status.success(), "psql {sql}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn psql(&self, sql: &str) -> std::process::Output {
        Command::new(self.bin.join("psql"))
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
            .expect("psql runs")
    }

    /// A psql session kept open, reading SQL from its stdin.
    pub fn psql_session(&self, app: &str) -> Child {
        Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Aq"])
            .arg("-p")
            .arg(self.port.to_string())
            .env("PGPASSWORD", PASSWORD)
            .env("PGAPPNAME", app)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("psql runs")
    }

    /// `pg_ctl ACTION` (restart, stop, start), waiting for it.
    pub fn ctl(&self, action: &str, opts: &[&str]) {
        // The server's output goes to its log, never to a pipe of ours that
        // it would keep open.
        let out = as_server_user(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(opts)
            .args(["-w", "-t", "60", action])
            .output()
            .expect("pg_ctl runs");
        assert!(out.status.success(), "pg_ctl {action}: {out:?}");
    }

    /// Starts a cluster of one's own.
    pub fn start(opts: &Options) -> Option<Cluster> {
        if std::env::var("QSEM_PG_TESTS").as_deref() == Ok("skip") {
            eprintln!("QSEM_PG_TESTS=skip: not testing the PostgreSQL backend");
            return None;
        }
        Some(start_cluster(opts, true))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            let _ = as_server_user(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "stop"])
                .output();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
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

pub fn is_root() -> bool {
    // SAFETY: no memory is passed.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as the `postgres` user when we are root (the server refuses root).
pub fn as_server_user(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The binary's shared cluster, started once; `None` when skipping on purpose.
pub fn shared() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            if std::env::var("QSEM_PG_TESTS").as_deref() == Ok("skip") {
                eprintln!("QSEM_PG_TESTS=skip: not testing the PostgreSQL backend");
                return None;
            }
            Some(start_cluster(&Options::default(), false))
        })
        .as_ref()
}

fn chown(paths: &[&Path]) {
    if is_root() {
        let ok = Command::new("chown")
            .arg("postgres:postgres")
            .args(paths)
            .status()
            .unwrap();
        assert!(ok.success(), "chown postgres {paths:?}");
    }
}

fn start_cluster(opts: &Options, owned: bool) -> Cluster {
    static NEXT: AtomicU32 = AtomicU32::new(0);
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
    let dir = tmp.join(format!(
        "qsem-pg-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    chown(&[&dir]);
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, PASSWORD).unwrap();
    chown(&[&pwfile]);
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
    make_certificates(&data);
    let mut listen = "127.0.0.1".to_string();
    if let Some((addr, subnet)) = &opts.also_listen {
        listen = format!("{listen},{addr}");
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str(&format!("host all all {subnet} scram-sha-256\n"));
        std::fs::write(&hba, text).unwrap();
    }
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses={listen} -c max_connections={} \
         -c shared_buffers=16MB -c fsync=off -c ssl=on",
        dir.display(),
        opts.max_connections.unwrap_or(60)
    );
    let c = Cluster {
        bin,
        port,
        ca: dir.join("ca.crt"),
        dir: dir.clone(),
        data,
        owned,
    };
    c.ctl("start", &["-o", &opts]);
    // An owned cluster is stopped on drop, or by this if the test process
    // is killed first.
    stop_with_this_process(&c);
    wait_out_the_grace(&c);
    c
}

/// After a server start qsem admits newcomers only once its grace for
/// running holders has passed: the tests start after it.
pub fn wait_out_the_grace(c: &Cluster) {
    let up: f64 = c
        .sql("SELECT extract(epoch FROM clock_timestamp() - pg_postmaster_start_time())")
        .parse()
        .unwrap();
    std::thread::sleep(GRACE.saturating_sub(Duration::from_secs_f64(up)));
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, for the
/// TLS test (a self-signed CA certificate is no server certificate).
fn make_certificates(data: &Path) {
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
    chown(&[&data.join("server.key"), &data.join("server.crt")]);
}

/// Stops a cluster when this test process ends, however it ends.
fn stop_with_this_process(c: &Cluster) {
    let stopper = format!(
        "while [ -d /proc/{pid} ]; do sleep 1; done; {ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        ctl = c.bin.join("pg_ctl").display(),
        data = c.data.display(),
        dir = c.dir.display(),
    );
    let mut stop = if is_root() {
        let mut s = Command::new("runuser");
        s.args(["-u", "postgres", "--", "sh", "-c", &stopper]);
        s
    } else {
        let mut s = Command::new("sh");
        s.args(["-c", &stopper]);
        s
    };
    // It outlives this process by design; nobody here waits for it.
    #[allow(clippy::zombie_processes)]
    stop.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cluster stopper starts");
}

/// FNV-1a, 64 bits: the engine's key of an id is its top 44 bits.
pub fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The id's key as qsem writes it in session names (`qsem w <hex> …`).
pub fn key_hex(id: &str) -> String {
    format!("{:011x}", fnv64(id) >> 20)
}

/// `qsem --backend <cluster>`.
pub fn qsem(env: &Env, c: &Cluster) -> Command {
    let mut cmd = env.qsem();
    cmd.arg("--backend").arg(c.url());
    cmd
}

/// A background qsem, killed if a test fails before it ends.
pub struct Job(pub Option<Child>);

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The job script of [`hold`]: marks itself started with its slot, and runs
/// until `stop` exists or the test's directory goes (so no job outlives a
/// failing test).
pub fn hold_script(env: &Env, name: &str) -> String {
    format!(
        "echo $QSEM_SLOT > {started}; while [ -d {root} ] && [ ! -e {stop} ]; do sleep 0.05; done",
        started = env.path(&format!("{name}.started")).display(),
        root = env.root.display(),
        stop = env.path("stop").display()
    )
}

/// Waits for the job of `child` (started with [`hold_script`]) to start.
pub fn started(env: &Env, child: Child, name: &str) -> Job {
    if !wait_for_file(&env.path(&format!("{name}.started")), SOON) {
        let mut child = child;
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("{name} did not start: {out:?}");
    }
    Job(Some(child))
}

/// A holder of one slot whose job waits until `stop` exists, in the background.
pub fn hold(env: &Env, c: &Cluster, args: &[&str], name: &str) -> Job {
    let child = qsem(env, c)
        .args(args)
        .args(["--", "sh", "-c", &hold_script(env, name)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    started(env, child, name)
}

/// How many slots of `id` `--status --json` shows held.
pub fn held(env: &Env, c: &Cluster, id: &str) -> usize {
    let (code, out, err) = super::run(qsem(env, c).args(["--status", "--id", id, "--json"]));
    assert_eq!(code, 0, "{err}");
    let holders = out.split("\"holders\":[").nth(1).unwrap_or("]");
    // A holder without a slot (`"slot":null`) holds none.
    holders.matches("\"slot\":").count() - holders.matches("\"slot\":null").count()
}

/// Ends every [`hold`] job and returns each qsem's status and stderr.
pub fn finish(env: &Env, jobs: Vec<Job>) -> Vec<(i32, String)> {
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
