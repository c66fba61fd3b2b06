//! The torture test (issue 5): hundreds of concurrent invocations over several
//! ids with mixed `-j`, random `kill -9` of qsem and of jobs, SIGTERM, SIGINT
//! and SIGHUP at random moments, `--wait` expiring, and `--status` alongside.
//!
//! Each job is this test binary run again in the role of a job
//! ([`torture_job_helper`]). When it starts it checks the semaphore from the
//! outside, with locks the kernel releases when a job dies:
//!
//! - `slot/<id>/<k>`: it locks this exclusively and without waiting; finding it
//!   locked means another live job holds slot k of the id: two holders.
//! - `live/<id>/<inv>.<N>`: its own file, locked for its lifetime; probing the
//!   others counts the live jobs of the id and their limits. The admission rule
//!   implies, for every k, that at most k live jobs have a limit of k or less
//!   (take the last admitted of them: fewer than its limit were held before
//!   it). With one `-j N` per id that is simply "at most N".
//!
//! Afterwards every invocation must have ended with a status that says what
//! happened, no slot may be held, and every id must admit its full limit.
//!
//! `cargo test --release --test torture -- --nocapture` runs the short form
//! (10 s, 32 invocations at once) that CI runs; the long form is the same test with
//! `QSEM_TORTURE_SECS=600 QSEM_TORTURE_PAR=200`. `QSEM_TORTURE_SEED` repeats a
//! mix (not its timing). The figures are printed on stdout.

mod common;
use common::{Env, env_num, eventually, flock, stat_fields};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The ids and the `-j` values their invocations use: one strict, one pool,
/// and the crontab of SPEC §4 (imports -j2, transforms -j5, summaries -j7).
const IDS: [(&str, &[u32]); 3] = [("solo", &[1]), ("pool", &[3]), ("proc", &[2, 5, 7])];

/// The status of an invocation whose wait expired.
const CONFLICT: i32 = 75;

/// xorshift64*: small, seedable, good enough to mix a workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Whether a live process holds an exclusive lock on `path`. A holder that is
/// already exiting does not count: the kernel releases a dying process's
/// locks one file at a time, and may free its qsem slot (rightly) a moment
/// before the marker that this checker looks at.
fn is_locked(path: &Path) -> bool {
    File::open(path).is_ok_and(|f| !flock(&f, libc::LOCK_SH | libc::LOCK_NB) && !holder_exiting(&f))
}

/// Opens a marker without truncating it (another job's pid may be in it).
fn open_marker(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

/// Writes this process's pid into a marker it has locked.
fn mark_pid(f: &File) {
    use std::os::unix::fs::FileExt;
    let pid = std::process::id().to_string();
    let _ = f.set_len(0);
    let _ = f.write_all_at(pid.as_bytes(), 0);
}

/// Whether the process whose pid is in the marker is gone or exiting
/// (`PF_EXITING`, set before a dying process closes any file). An unknown pid
/// (the holder has not written it yet) counts as live.
fn holder_exiting(f: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 32];
    let n = f.read_at(&mut buf, 0).unwrap_or(0);
    let Some(pid) = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return false;
    };
    let Some(fields) = stat_fields(pid) else {
        return true;
    };
    let state = fields.first().map_or("?", String::as_str);
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    const PF_EXITING: u64 = 0x4;
    state == "Z" || state == "X" || flags & PF_EXITING != 0
}

/// Appends one line in one write, so that concurrent writers never interleave.
fn append(path: &Path, line: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// The job: run by qsem, in this binary, when `QSEM_TORTURE_ROLE=job`.
#[test]
fn torture_job_helper() {
    if std::env::var_os("QSEM_TORTURE_ROLE").is_none() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let work = PathBuf::from(var("TORTURE_DIR"));
    let (id, inv) = (var("QSEM_ID"), var("TORTURE_INV"));
    let slot: u32 = var("QSEM_SLOT").parse().unwrap_or(0);
    let jobs: u32 = var("QSEM_JOBS").parse().unwrap_or(0);
    let violations = work.join("violations");
    let violation = |what: String| append(&violations, &format!("{id} inv {inv}: {what}"));
    if slot == 0 || slot > jobs {
        violation(format!("slot {slot} outside 1..{jobs}"));
    }
    let slot_file = open_marker(&work.join("slot").join(&id).join(slot.to_string()));
    if !flock(&slot_file, libc::LOCK_EX | libc::LOCK_NB) {
        if holder_exiting(&slot_file) {
            // Its last files are being closed: the lock comes in a moment.
            flock(&slot_file, libc::LOCK_EX);
        } else {
            violation(format!("slot {slot} already held by another live job"));
        }
    }
    mark_pid(&slot_file);
    let live_dir = work.join("live").join(&id);
    let mine = live_dir.join(format!("{inv}.{jobs}"));
    let live = open_marker(&mine);
    // Only probes (shared, for microseconds) can be in the way of this lock.
    while !flock(&live, libc::LOCK_EX | libc::LOCK_NB) {
        std::thread::yield_now();
    }
    mark_pid(&live);
    let mut limits = vec![jobs];
    for e in std::fs::read_dir(&live_dir).unwrap().flatten() {
        let path = e.path();
        if path != mine && is_locked(&path) {
            let name = e.file_name().into_string().unwrap();
            limits.push(name.rsplit('.').next().unwrap().parse().unwrap());
        }
    }
    limits.sort_unstable();
    for (i, &n) in limits.iter().enumerate() {
        if n < i as u32 + 1 {
            violation(format!(
                "{} live jobs, limits {limits:?}: {} of them have a limit of {n} or less",
                limits.len(),
                i + 1
            ));
            break;
        }
    }
    let runs = work.join("runs");
    let tmp = runs.join(format!("{inv}.start.tmp"));
    std::fs::write(&tmp, std::process::id().to_string()).unwrap();
    std::fs::rename(&tmp, runs.join(format!("{inv}.start"))).unwrap();
    std::thread::sleep(Duration::from_millis(
        var("TORTURE_SLEEP_MS").parse().unwrap(),
    ));
    std::fs::write(runs.join(format!("{inv}.done")), "").unwrap();
    let _ = std::fs::remove_file(&mine);
    std::process::exit(var("TORTURE_CODE").parse().unwrap());
}

/// What the driver does to an invocation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Plan {
    Leave,
    Signal(libc::c_int),
    KillQsem,
    KillJob,
}

struct Invocation {
    n: u64,
    child: Child,
    plan: Plan,
    /// When the plan is carried out.
    at: Instant,
    done_plan: bool,
    /// The signal went to qsem after its job had started.
    while_running: bool,
    code: i32,
    finite_wait: bool,
}

#[derive(Default, Debug)]
struct Figures {
    invocations: u64,
    ran_ok: u64,
    job_failed_as_asked: u64,
    wait_expired: u64,
    signals_sent: u64,
    signals_while_waiting: u64,
    signals_while_running: u64,
    signals_before_ready: u64,
    kill9_qsem: u64,
    kill9_job: u64,
    status_runs: u64,
    unexplained: Vec<String>,
}

#[test]
fn torture() {
    let secs = env_num("QSEM_TORTURE_SECS", 10);
    let par = env_num("QSEM_TORTURE_PAR", 32) as usize;
    let seed = env_num("QSEM_TORTURE_SEED", common::epoch_ns() as u64 | 1);
    let env = Env::new();
    let work = env.path("work");
    for (id, _) in IDS {
        for sub in ["slot", "live"] {
            std::fs::create_dir_all(work.join(sub).join(id)).unwrap();
        }
    }
    std::fs::create_dir_all(work.join("runs")).unwrap();
    let me = std::env::current_exe().unwrap();
    let mut rng = Rng(seed);
    let mut figures = Figures::default();

    // --status alongside, all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let status_runs = Arc::new(AtomicU64::new(0));
    let status_thread = {
        let (stop, runs) = (stop.clone(), status_runs.clone());
        let mut status = env.qsem();
        status.arg("--status");
        let mut json = env.qsem();
        json.args(["--status", "--json"]);
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for cmd in [&mut status, &mut json] {
                    let out = cmd.output().unwrap();
                    if !out.status.success() || !out.stderr.is_empty() {
                        errors.push(format!(
                            "--status: {:?} {}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                    runs.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            errors
        })
    };

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut alive: Vec<Invocation> = Vec::new();
    let mut next = 0u64;
    while Instant::now() < end || !alive.is_empty() {
        while Instant::now() < end && alive.len() < par {
            let (id, limits) = IDS[rng.below(IDS.len() as u64) as usize];
            let jobs = limits[rng.below(limits.len() as u64) as usize];
            let code = if rng.below(10) == 0 { 3 } else { 0 };
            let finite_wait = rng.below(3) == 0;
            let plan = match rng.below(100) {
                0..=59 => Plan::Leave,
                60..=66 => Plan::Signal(libc::SIGTERM),
                67..=73 => Plan::Signal(libc::SIGINT),
                74..=80 => Plan::Signal(libc::SIGHUP),
                81..=90 => Plan::KillQsem,
                _ => Plan::KillJob,
            };
            let mut cmd = env.qsem();
            cmd.args(["--id", id, "-j", &jobs.to_string()]);
            if finite_wait {
                let wait = rng.below(300);
                cmd.args(["--wait", &format!("{wait}ms"), "-E", &CONFLICT.to_string()]);
            }
            let err = File::create(work.join("runs").join(format!("{next}.err"))).unwrap();
            cmd.arg("--")
                .arg(&me)
                .args(["--exact", "torture_job_helper", "--nocapture", "-q"])
                .args(["--test-threads", "1"])
                .env("QSEM_TORTURE_ROLE", "job")
                .env("TORTURE_DIR", &work)
                .env("TORTURE_INV", next.to_string())
                .env("TORTURE_SLEEP_MS", (5 + rng.below(150)).to_string())
                .env("TORTURE_CODE", code.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(err);
            let child = cmd.spawn().unwrap();
            alive.push(Invocation {
                n: next,
                child,
                plan,
                at: Instant::now() + Duration::from_millis(rng.below(400)),
                done_plan: false,
                while_running: false,
                code,
                finite_wait,
            });
            next += 1;
        }
        let now = Instant::now();
        let runs = work.join("runs");
        let mut i = 0;
        while i < alive.len() {
            let inv = &mut alive[i];
            let started = runs.join(format!("{}.start", inv.n));
            if !inv.done_plan && now >= inv.at {
                let pid = inv.child.id() as libc::pid_t;
                match inv.plan {
                    Plan::Leave => inv.done_plan = true,
                    Plan::Signal(sig) => {
                        inv.while_running = started.exists();
                        // SAFETY: no memory is passed; qsem is our unreaped child.
                        unsafe { libc::kill(pid, sig) };
                        figures.signals_sent += 1;
                        if inv.while_running {
                            figures.signals_while_running += 1;
                        } else {
                            figures.signals_while_waiting += 1;
                        }
                        inv.done_plan = true;
                    }
                    Plan::KillQsem => {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        figures.kill9_qsem += 1;
                        inv.done_plan = true;
                    }
                    Plan::KillJob => {
                        // Once the job runs, and only while qsem (its parent)
                        // has not been reaped, so its pid cannot be reused.
                        let done = runs.join(format!("{}.done", inv.n));
                        if let Ok(pid) = std::fs::read_to_string(&started)
                            && !done.exists()
                        {
                            // SAFETY: as above.
                            unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
                            figures.kill9_job += 1;
                            inv.done_plan = true;
                        }
                    }
                }
            }
            match inv.child.try_wait().unwrap() {
                None => i += 1,
                Some(status) => {
                    let inv = alive.swap_remove(i);
                    figures.invocations += 1;
                    judge(&work, &inv, status, &mut figures);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();

    // Jobs whose qsem was killed run on, holding their slots: wait for them.
    let live_jobs = || {
        IDS.iter()
            .flat_map(|(id, _)| std::fs::read_dir(work.join("live").join(id)).unwrap())
            .filter(|e| is_locked(&e.as_ref().unwrap().path()))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(20), || live_jobs() == 0),
        "jobs still running long after the end"
    );
    stop.store(true, Ordering::Relaxed);
    let status_errors = status_thread.join().unwrap();
    figures.status_runs = status_runs.load(Ordering::Relaxed);

    // No slot is held: neither by the kernel's account nor by --status.
    let mut held = Vec::new();
    let mut stale_tickets = 0;
    for (id, _) in IDS {
        let dir = env.locks.join(id);
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.file_type().unwrap().is_file() && is_locked(&e.path()) {
                held.push(e.path());
            }
        }
        for e in std::fs::read_dir(dir.join("queue")).unwrap().flatten() {
            if e.file_name() != "lock" {
                if is_locked(&e.path()) {
                    held.push(e.path());
                } else {
                    stale_tickets += 1;
                }
            }
        }
    }
    let out = env.qsem().args(["--status", "--json"]).output().unwrap();
    let json = String::from_utf8_lossy(&out.stdout);
    // And none has leaked: every id admits its full limit at once.
    let mut leaked = 0;
    for (id, limits) in IDS {
        let max = *limits.iter().max().unwrap();
        let holders: Vec<Child> = (0..max)
            .map(|_| {
                env.qsem()
                    .args(["--id", id, "-j", &max.to_string(), "--wait", "0", "-E"])
                    .arg(CONFLICT.to_string())
                    .args(["--", "sleep", "1"])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut h in holders {
            if h.wait().unwrap().code() != Some(0) {
                leaked += 1;
            }
        }
    }
    let violations = std::fs::read_to_string(work.join("violations")).unwrap_or_default();

    println!(
        "qsem torture: seed {seed}, {par} at once, {:.1}s",
        elapsed.as_secs_f64()
    );
    println!("  invocations        {}", figures.invocations);
    println!(
        "  ran, status passed {} (of which exit 3 as asked: {})",
        figures.ran_ok, figures.job_failed_as_asked
    );
    println!("  --wait expired     {}", figures.wait_expired);
    println!(
        "  signals            {} (TERM/INT/HUP; {} while waiting, {} while running)",
        figures.signals_sent, figures.signals_while_waiting, figures.signals_while_running
    );
    println!(
        "                     ({} reached qsem before its handlers: it died of the signal, nothing taken)",
        figures.signals_before_ready
    );
    println!("  kill -9 of qsem    {}", figures.kill9_qsem);
    println!("  kill -9 of jobs    {}", figures.kill9_job);
    println!("  --status runs      {}", figures.status_runs);
    println!("  violations         {}", violations.lines().count());
    println!("  unexplained ends   {}", figures.unexplained.len());
    println!("  held afterwards    {}", held.len());
    println!("  leaked slots       {leaked}");
    println!(
        "  stale tickets      {stale_tickets} (unlocked files of kill -9ed waiters; the next waiter removes them)"
    );

    let first: Vec<&str> = violations.lines().take(20).collect();
    assert!(first.is_empty(), "admission rule broken: {first:#?}");
    assert!(figures.unexplained.is_empty(), "{:#?}", figures.unexplained);
    assert!(status_errors.is_empty(), "{status_errors:#?}");
    assert!(held.is_empty(), "held after the end: {held:?}");
    assert!(!json.contains("\"pid\""), "--status shows holders: {json}");
    assert_eq!(leaked, 0, "slots leaked");
    assert!(
        figures.invocations >= 100,
        "too few invocations to mean anything"
    );
}

fn signame(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "SIGKILL",
    }
}

/// Checks that an invocation's end says what happened to it.
fn judge(work: &Path, inv: &Invocation, status: std::process::ExitStatus, f: &mut Figures) {
    let runs = work.join("runs");
    let started = runs.join(format!("{}.start", inv.n)).exists();
    let done = runs.join(format!("{}.done", inv.n)).exists();
    let err = std::fs::read_to_string(runs.join(format!("{}.err", inv.n))).unwrap_or_default();
    let code = status.code();
    let acted = inv.done_plan;
    let ok = match (inv.plan, code) {
        // The job ran to its end, and its status came through.
        (_, Some(c)) if c == inv.code && started && done => {
            f.ran_ok += 1;
            if c == 3 {
                f.job_failed_as_asked += 1;
                err.contains("exited with status 3")
            } else {
                err.is_empty()
            }
        }
        (_, Some(CONFLICT)) if inv.finite_wait && !started && err.is_empty() => {
            f.wait_expired += 1;
            true
        }
        // Stopped while waiting (nothing started, nothing said), or its job
        // was stopped by the forwarded signal (and a line says so).
        (Plan::Signal(sig), Some(c)) if acted && c == 128 + sig => {
            let killed = err.contains(&format!("killed by {}", signame(sig)));
            // The signal may have reached the job before it could say it
            // started, or after it said it was done but before it exited.
            killed || (!started && !done && err.is_empty())
        }
        // Killed before its handlers were in place: as good as 128+N to a
        // shell, and nothing had been taken yet.
        (Plan::Signal(sig), None) if acted && status.signal() == Some(sig) && !started => {
            f.signals_before_ready += 1;
            true
        }
        (Plan::KillJob, Some(137)) if acted && started => err.contains("SIGKILL"),
        (Plan::KillQsem, None) if acted && status.signal() == Some(libc::SIGKILL) => true,
        _ => false,
    };
    if !ok {
        f.unexplained.push(format!(
            "inv {} plan {:?} acted {acted} wait {} -> {status:?}, started {started} done {done}, stderr {err:?}",
            inv.n, inv.plan, inv.finite_wait
        ));
    }
}
