//! The harness every integration test uses: the real `qsem` binary, run with
//! its own temporary lock directory, plus a few helpers for waiting on
//! outcomes with generous bounds (a slow CI machine must not make a test flaky).
#![allow(dead_code)]

pub mod etcd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub mod netns;
pub mod postgres;

/// A scratch directory with a lock directory inside, removed on drop.
pub struct Env {
    pub root: PathBuf,
    pub locks: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        watchdog();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "qsem-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let locks = root.join("locks");
        Env { root, locks }
    }

    /// `qsem` with this environment's lock directory and nothing else set.
    pub fn qsem(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qsem"));
        cmd.env("QSEM_DIR", &self.locks).env_remove("QSEM_BACKEND");
        cmd
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Runs to completion and returns (status code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out: Output = cmd.output().expect("qsem runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With one waiter of `id` queued already, a newcomer with `--max-waiting 1`
/// (`qsem` makes its command line, backend and all) gives up at once,
/// silently, with its `-E` status, although it would wait 20 s.
pub fn full_backlog_refuses(mut qsem: impl FnMut() -> Command, id: &str) {
    let t = Instant::now();
    let args = [
        "--id",
        id,
        "--max-waiting",
        "1",
        "--wait",
        "20s",
        "-E",
        "9",
        "true",
    ];
    let (code, out, err) = run(qsem().args(args));
    assert_eq!((code, out.as_str(), err.as_str()), (9, "", ""));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Waits for a file to exist (a job's "I started" marker).
pub fn wait_for_file(path: &Path, limit: Duration) -> bool {
    eventually(limit, || path.exists())
}

/// The clock now, in ns since the epoch: what `date +%s%N` in a job writes.
pub fn epoch_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The time a job wrote with `date +%s%N > path`.
pub fn written_ns(path: &Path) -> u128 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Sends a signal to a process.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: no memory is passed.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// A generous bound for anything that should take milliseconds.
pub const SOON: Duration = Duration::from_secs(10);

/// A job that marks itself started (touches `ready`) and then runs until
/// signalled: `qsem ARGS -- sh -c '...'`.
pub fn holder(env: &Env, args: &[&str], ready: &Path) -> std::process::Child {
    env.qsem()
        .args(args)
        .args(["--", "sh", "-c", "touch \"$1\"; exec sleep 60", "sh"])
        .arg(ready)
        .spawn()
        .expect("qsem starts")
}

/// `qsem --status --json` for one id: (held, waiting).
pub fn held_and_waiting(env: &Env, id: &str) -> (u32, u32) {
    let (_, out, _) = run(env.qsem().args(["--status", "--json", "--id", id]));
    let num = |key: &str| -> u32 {
        let at = out.find(key).unwrap_or_else(|| panic!("{key} in {out}")) + key.len();
        out[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    (num("\"held\":"), num("\"waiting\":"))
}

/// Ends a holder started by [`holder`]: qsem passes SIGTERM to the job.
pub fn release(mut child: std::process::Child) {
    kill(child.id(), libc::SIGTERM);
    child.wait().unwrap();
}

/// flock(2) on `file`; whether it succeeded.
pub fn flock(file: &std::fs::File, op: i32) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

/// A number from the environment, or `default` if it is unset or not one.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The fields of `/proc/PID/stat` after the command name (the state first,
/// then the parent's pid, …), or `None` if the process is gone.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// How long a test binary may run before it is taken to be stuck: far more
/// than the slowest takes on a slow machine (about 20 s), plus the length of
/// a long torture run if one was asked for.
fn stuck_after() -> Duration {
    Duration::from_secs(600 + env_num("QSEM_TORTURE_SECS", 0))
}

/// Ends a stuck test binary, after writing what its processes were doing,
/// rather than letting it hang CI until its time runs out with nothing
/// learned. Started by the first [`Env`].
fn watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            let limit = stuck_after();
            std::thread::sleep(limit);
            use std::io::Write;
            let mut report = format!(
                "\nSTUCK: this test binary has run for {} s; its processes:\n",
                limit.as_secs()
            );
            report.push_str(&process_tree(std::process::id()));
            let _ = std::io::stderr().write_all(report.as_bytes());
            std::process::exit(101);
        });
    });
}

/// Every descendant of `root`, with its state, the kernel function it sleeps
/// in, and (where readable) its kernel stack.
fn process_tree(root: u32) -> String {
    let read = |pid: &str, file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
    };
    let mut parent = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let ppid = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let descends = |mut pid: u32| {
        while let Some(&p) = parent.get(&pid) {
            if p == root {
                return true;
            }
            pid = p;
        }
        false
    };
    let mut out = String::new();
    let mut pids: Vec<u32> = parent.keys().copied().filter(|&p| descends(p)).collect();
    pids.sort_unstable();
    for pid in pids {
        let state = stat_fields(pid).and_then(|f| f.into_iter().next());
        let pid = pid.to_string();
        let cmdline = read(&pid, "cmdline").replace('\0', " ");
        out.push_str(&format!(
            "{pid} [{}] {} wchan={}\n{}",
            state.as_deref().unwrap_or("?"),
            cmdline.trim(),
            read(&pid, "wchan"),
            read(&pid, "stack")
        ));
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                if let Ok(to) = std::fs::read_link(fd.path()) {
                    out.push_str(&format!(
                        "    fd {} -> {}\n",
                        fd.file_name().to_string_lossy(),
                        to.display()
                    ));
                }
            }
        }
    }
    out.push_str(&std::fs::read_to_string("/proc/locks").unwrap_or_default());
    out
}

/// Says that a test is skipped, straight to stderr: the test harness captures
/// `eprintln!` of passing tests, and a skip must not go unseen.
pub fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}
