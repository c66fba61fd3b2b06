//! The invariant (SPEC §4) under crashes: dozens of jobs over one id, qsem
//! processes and jobs killed with SIGKILL at random. Every job, as it starts,
//! counts the jobs running under the id — each holds a flock on a marker file
//! of its own, which the kernel releases the instant it dies — and records a
//! violation if there are more than the bound.
//!
//! A job that is already exiting is not counted: the kernel releases a dying
//! process's locks one file at a time, and may free its slot a moment before
//! its marker.
//!
//! The bound a job can check is exact only when all jobs share one limit: with
//! mixed limits, a `-j3` may rightly be admitted between a `-j2`'s admission
//! and its count, so there the bound is the largest limit.
//! (The long torture test, with signals and --status alongside, is torture.rs.)

mod common;
use common::{Env, eventually, held_and_waiting, kill, run};
use std::process::Child;
use std::time::Duration;

/// A small deterministic generator, so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const JOB: &str = r#"
exec 9>"$MARKS/$$"; flock 9
echo $$ > "$PIDS/$$"
live=0
for m in "$MARKS"/*; do
    flock -n -s "$m" true 2>/dev/null && continue
    # Locked, but by a job that is already exiting (PF_EXITING), whose slot the
    # kernel may rightly have freed a moment before this marker: not running.
    flags=$(sed 's/.*) //' "/proc/${m##*/}/stat" 2>/dev/null | cut -d' ' -f7)
    [ -n "$flags" ] && [ $((flags & 4)) -eq 0 ] && live=$((live+1))
done
[ "$live" -le "$BOUND" ] || echo "$live running at the start of a -j$QSEM_JOBS job (bound $BOUND)" >> "$VIOLATIONS"
echo ok >> "$STARTED"
sleep "$1"
"#;

#[test]
fn one_limit_is_never_exceeded_through_random_kills() {
    torture(&["2"], 2, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn mixed_limits_never_exceed_the_largest_through_random_kills() {
    torture(&["1", "2", "3"], 3, 0x2545_f491_4f6c_dd1d);
}

fn torture(limits: &[&str], bound: usize, seed: u64) {
    let env = Env::new();
    let marks = env.path("marks");
    let pids = env.path("pids");
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::create_dir_all(&pids).unwrap();
    let violations = env.path("violations");
    let started = env.path("started");
    let mut rng = Rng(seed);
    let mut qsems: Vec<Child> = Vec::new();
    for i in 0..48 {
        let jobs = limits[rng.next(limits.len() as u64) as usize];
        let secs = format!("0.{:02}", 5 + rng.next(20));
        let q = env
            .qsem()
            .args([
                "--id", "inv", "-j", jobs, "--wait", "30s", "-q", "--", "sh", "-c", JOB, "sh",
                &secs,
            ])
            .env("MARKS", &marks)
            .env("PIDS", &pids)
            .env("VIOLATIONS", &violations)
            .env("STARTED", &started)
            .env("BOUND", bound.to_string())
            .spawn()
            .unwrap();
        qsems.push(q);
        std::thread::sleep(Duration::from_millis(20));
        // Now and then, kill -9 a random qsem (its job keeps the slot) or a
        // random running job (its slot frees at once).
        if i % 4 == 3 {
            let victim = rng.next(qsems.len() as u64) as usize;
            kill(qsems[victim].id(), libc::SIGKILL);
        }
        if i % 5 == 4 {
            let running: Vec<u32> = std::fs::read_dir(&pids)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            if !running.is_empty() {
                kill(
                    running[rng.next(running.len() as u64) as usize],
                    libc::SIGKILL,
                );
            }
        }
    }
    for mut q in qsems {
        q.wait().unwrap();
    }
    // Jobs of SIGKILLed qsems run on; once they end, nothing may stay held.
    assert!(eventually(Duration::from_secs(30), || held_and_waiting(
        &env, "inv"
    ) == (0, 0)));
    let starts = std::fs::read_to_string(&started)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(starts >= 20, "only {starts} jobs started");
    let bad = std::fs::read_to_string(&violations).unwrap_or_default();
    assert_eq!(bad, "", "admission rule violated");
    // And the id is fully usable afterwards.
    let (code, out, _) = run(env
        .qsem()
        .args(["--id", "inv", "-j1", "--wait", "1s", "echo", "free"]));
    assert_eq!((code, out.as_str()), (0, "free\n"));
}

/// SIGSTOP and SIGCONT at random (issue 10): qsem processes stopped while
/// waiting, inside the admission mutex, or while their job runs, each
/// continued a moment later. The limit holds throughout, and every
/// invocation runs its job in the end: a stopped waiter is passed over, and
/// one stopped in the mutex holds the others up only while it is stopped.
#[test]
fn stops_and_continues_never_break_the_limit_nor_wedge_the_id() {
    let env = Env::new();
    let (marks, pids) = (env.path("marks"), env.path("pids"));
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::create_dir_all(&pids).unwrap();
    let (violations, started) = (env.path("violations"), env.path("started"));
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let mut qsems: Vec<Child> = Vec::new();
    let mut stopped: Vec<(u32, std::time::Instant)> = Vec::new();
    let n = 40;
    for i in 0..n {
        let secs = format!("0.{:02}", 5 + rng.next(15));
        let q = env
            .qsem()
            .args([
                "--id", "stop", "-j2", "--wait", "60s", "-q", "--", "sh", "-c", JOB, "sh",
            ])
            .arg(&secs)
            .env("MARKS", &marks)
            .env("PIDS", &pids)
            .env("VIOLATIONS", &violations)
            .env("STARTED", &started)
            .env("BOUND", "2")
            .spawn()
            .unwrap();
        qsems.push(q);
        std::thread::sleep(Duration::from_millis(5 + rng.next(40)));
        if i % 2 == 1 {
            let victim = qsems[rng.next(qsems.len() as u64) as usize].id();
            kill(victim, libc::SIGSTOP);
            let resume = std::time::Instant::now() + Duration::from_millis(200 + rng.next(600));
            stopped.push((victim, resume));
        }
        let now = std::time::Instant::now();
        stopped.retain(|&(pid, at)| {
            let due = now >= at;
            if due {
                kill(pid, libc::SIGCONT);
            }
            !due
        });
    }
    for (pid, at) in stopped {
        std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
        kill(pid, libc::SIGCONT);
    }
    for mut q in qsems {
        let status = q.wait().unwrap();
        assert_eq!(status.code(), Some(0), "an invocation did not run its job");
    }
    let starts = std::fs::read_to_string(&started).unwrap_or_default();
    assert_eq!(starts.lines().count(), n, "every job ran once");
    let bad = std::fs::read_to_string(&violations).unwrap_or_default();
    assert_eq!(bad, "", "admission rule violated");
    assert_eq!(held_and_waiting(&env, "stop"), (0, 0));
}
