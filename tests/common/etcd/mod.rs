//! A throwaway 3-member etcd cluster on 127.0.0.1 for the etcd engine's
//! tests, on ports picked free at start, with its data on tmpfs where there
//! is one. Members die with the test process (PR_SET_PDEATHSIG from a
//! thread that lives as long as it) and when their [`Cluster`] is dropped.
//! `relay.rs`: a TCP relay a test can cut (a holder whose network is gone);
//! `jobs.rs`: qsem runs and jobs that tests share.

mod jobs;
mod relay;
// Every test binary compiles the harness; only the etcd ones use these.
#[allow(unused_imports)]
pub use jobs::*;
#[allow(unused_imports)]
pub use relay::Relay;

use super::skipped;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

pub struct Member {
    pub name: String,
    pub client_port: u16,
    child: Option<Child>,
}

pub struct Cluster {
    pub members: Vec<Member>,
    dir: PathBuf,
    /// With TLS on the client port: the test CA's certificate (PEM).
    pub ca: Option<PathBuf>,
}

/// A port that nothing listens on, below the kernel's range for outgoing
/// connections (so that no client's connection takes it before etcd binds
/// it), and random (so that test binaries starting clusters at once rarely
/// pick the same; [`Cluster::start_with`] checks that they did not).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let _ = SEED.compare_exchange(
        0,
        u64::from(std::process::id()) << 32 | u64::from(nanos),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let x = SEED
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::SeqCst)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let port = 20_000 + (x >> 33) as u16 % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The shared cluster of a test binary, started once; `None` (with a
/// printed reason) if etcd is not installed.
pub fn shared() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            remove_leftovers();
            Cluster::start("shared")
        })
        .as_ref()
}

/// The data of shared clusters of test processes that have ended (a
/// static is never dropped; its members die with the process, their data
/// stays).
fn remove_leftovers() {
    for base in ["/dev/shm".into(), std::env::temp_dir()] {
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("qsem-etcd-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            let gone = pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists());
            if gone {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Runs `f` on a thread that never ends, so that PR_SET_PDEATHSIG (which
/// follows the thread that forked) fires only when the test process ends.
fn on_lasting_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        tx.send(f()).unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap()
}

/// A test CA and a certificate for 127.0.0.1 signed by it, in `dir`:
/// (ca.crt, server.crt, server.key).
fn certificates(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = format!(
        "set -e; cd {d}; ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'; \
         openssl req -x509 $ec -days 2 -subj /CN=qsem-etcd-ca -keyout ca.key -out ca.crt; \
         openssl req $ec -subj /CN=localhost -keyout server.key -out server.csr; \
         printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ext; \
         openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
           -days 2 -extfile ext -out server.crt",
        d = dir.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl: {out:?}");
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

impl Cluster {
    /// Three members, plain HTTP.
    pub fn start(tag: &str) -> Option<Cluster> {
        Cluster::start_with(tag, 3, false)
    }

    /// `count` members, their client ports on HTTPS if `tls`. Started again
    /// on other ports if a member could not bind its own, or if a port
    /// answered for another test's cluster.
    pub fn start_with(tag: &str, count: usize, tls: bool) -> Option<Cluster> {
        for _ in 0..5 {
            let mut c = Cluster::try_start(tag, count, tls)?;
            if c.wait_whole(count) {
                return Some(c);
            }
        }
        panic!("the etcd cluster '{tag}' did not start");
    }

    /// Waits until every member runs, answers, and belongs to this one
    /// cluster; `false` at once if a member has exited (its port was taken).
    fn wait_whole(&mut self, count: usize) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let exited = self.members.iter_mut().any(|m| {
                m.child
                    .as_mut()
                    .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
            });
            if exited {
                return false;
            }
            let (ok, out) = self.etcdctl(&["endpoint", "status", "-w", "json"]);
            let ids: std::collections::HashSet<&str> = out
                .split("\"cluster_id\":")
                .skip(1)
                .map(|rest| rest.split(',').next().unwrap_or(""))
                .collect();
            if ids.len() > 1 {
                // A port answered for another test's cluster.
                return false;
            }
            if ok && ids.len() == 1 && out.matches("\"Endpoint\"").count() == count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn try_start(tag: &str, count: usize, tls: bool) -> Option<Cluster> {
        if Command::new("etcd").arg("--version").output().is_err() {
            skipped("etcd is not installed (run .ci/etcd.sh)");
            return None;
        }
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("qsem-etcd-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let certs = tls.then(|| certificates(&dir));
        let scheme = if tls { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = (0..count).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("n{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let members = (0..count)
            .map(|i| {
                let (client, peer) = ports[i];
                let name = format!("n{i}");
                let mut args: Vec<String> = vec![
                    "--name".into(),
                    name.clone(),
                    "--data-dir".into(),
                    dir.join(&name).display().to_string(),
                    "--listen-client-urls".into(),
                    format!("{scheme}://127.0.0.1:{client}"),
                    "--advertise-client-urls".into(),
                    format!("{scheme}://127.0.0.1:{client}"),
                    "--listen-peer-urls".into(),
                    format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls".into(),
                    format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster".into(),
                    initial.clone(),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--initial-cluster-token".into(),
                    format!("qsem-{tag}"),
                ];
                if let Some((_, cert, key)) = &certs {
                    args.push(format!("--cert-file={}", cert.display()));
                    args.push(format!("--key-file={}", key.display()));
                }
                let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
                let child = on_lasting_thread(move || {
                    let mut cmd = Command::new("etcd");
                    cmd.args(&args).stdout(Stdio::null()).stderr(log);
                    // SAFETY: prctl is async-signal-safe and touches no memory.
                    unsafe {
                        cmd.pre_exec(|| {
                            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                            Ok(())
                        });
                    }
                    cmd.spawn().expect("etcd starts")
                });
                Member {
                    name,
                    client_port: client,
                    child: Some(child),
                }
            })
            .collect();
        Some(Cluster {
            members,
            dir,
            ca: certs.map(|(ca, _, _)| ca),
        })
    }

    /// `etcd://` (or `etcds://`) with every member.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints())
    }

    pub fn endpoints(&self) -> String {
        let e: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        e.join(",")
    }

    /// Runs etcdctl against every member: (success, stdout).
    pub fn etcdctl(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new("etcdctl");
        if let Some(ca) = &self.ca {
            cmd.arg(format!("--cacert={}", ca.display()));
        }
        let out = cmd
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()))
            .arg("--command-timeout=2s")
            .args(args)
            .output()
            .expect("etcdctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The index of the leader, as the members that answer say.
    pub fn leader(&self) -> Option<usize> {
        let (_, out) = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        // One object per member: its endpoint, its id, and the leader's id.
        for member in out.split("{\"Endpoint\":\"").skip(1) {
            let field = |name: &str| {
                let at = member.find(name)? + name.len();
                Some(
                    member[at..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>(),
                )
            };
            if field("\"member_id\":") == field("\"leader\":") {
                let port: u16 = member.split(['"', ':']).nth(1)?.parse().ok()?;
                return self.members.iter().position(|m| m.client_port == port);
            }
        }
        None
    }

    /// Sends `signal` to member `i` (SIGKILL also reaps it).
    pub fn signal(&mut self, i: usize, signal: i32) {
        if let Some(child) = self.members[i].child.as_mut() {
            super::kill(child.id(), signal);
            if signal == libc::SIGKILL {
                let _ = child.wait();
                self.members[i].child = None;
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
