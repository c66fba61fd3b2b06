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
