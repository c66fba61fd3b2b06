//! The etcd engine against a real 3-member cluster that the tests start
//! (`tests/common/etcd/`): the contract of SPEC §1–§7 through
//! `--backend etcd://…`. `etcd_cluster.rs`: what a cluster adds.

mod common;
use common::etcd::*;
use common::{Env, SOON, eventually, full_backlog_refuses, kill, run};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn status_passes_through_and_expiry_is_silent() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "st", "-j1"], "h");
    let w = spawn(&env, &url, &["--id", "st", "-j1"], "w");
    assert!(eventually(SOON, || counts(&env, &url, "st") == (1, 1)));
    // The pid shown is the job's, which runs under qsem (once the job has
    // run a moment: until then, qsem's own).
    let shown = || {
        let (code, out, _) = run(qsem(&env, &url).args(["--status", "--id", "st"]));
        assert_eq!(code, 0);
        let pid = out
            .lines()
            .nth(1)?
            .split_whitespace()
            .nth(2)?
            .parse()
            .ok()?;
        let parent = common::stat_fields(pid)?[1].clone();
        (parent == h.pid().to_string()).then_some(out)
    };
    let mut out = None;
    assert!(eventually(SOON, || {
        out = shown();
        out.is_some()
    }));
    let out = out.unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(out.contains(host.trim()), "{out}");
    assert!(out.contains("sh -c"), "{out}");
    assert!(out.contains("st: 1 held, 1 waiting"), "{out}");
    // An expired wait: the -E status, no output at all, on time.
    let t = Instant::now();
    let (code, out, err) =
        run(qsem(&env, &url).args(["--id", "st", "--wait", "0.5", "-E", "75", "true"]));
    assert_eq!((code, out.as_str(), err.as_str()), (75, "", ""));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let (code, _, err) =
        run(qsem(&env, &url).args(["--id", "st", "--wait", "0", "-E", "3", "true"]));
    assert_eq!((code, err.as_str()), (3, ""));
    stop(&env);
    assert_eq!(h.end(), (0, String::new()));
    assert_eq!(w.end(), (0, String::new()));
    assert_eq!(counts(&env, &url, "st"), (0, 0));
    // A failing job's report line and status pass through.
    let (code, _, err) = run(qsem(&env, &url).args(["--id", "st", "--", "sh", "-c", "exit 3"]));
    assert_eq!(code, 3);
    assert!(
        err.contains("qsem[st]: sh -c 'exit 3' exited with status 3"),
        "{err}"
    );
}

#[test]
fn mixed_jobs_admission() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let a = hold(&env, &url, &["--id", "mix", "-j2"], "a");
    let b = hold(&env, &url, &["--id", "mix", "-j2"], "b");
    // Two held: a -j2 must not start, a -j3 may.
    let (code, _, _) =
        run(qsem(&env, &url).args(["--id", "mix", "-j2", "--wait", "0", "-E", "9", "true"]));
    assert_eq!(code, 9);
    let c3 = hold(&env, &url, &["--id", "mix", "-j3"], "c");
    let slots: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| std::fs::read_to_string(env.path(&format!("{n}.started"))).unwrap())
        .map(|s| s.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(slots, ["1", "2", "3"]);
    let (code, _, _) =
        run(qsem(&env, &url).args(["--id", "mix", "-j3", "--wait", "0", "-E", "9", "true"]));
    assert_eq!(code, 9);
    assert_eq!(counts(&env, &url, "mix"), (3, 0));
    stop(&env);
    for j in [a, b, c3] {
        assert_eq!(j.end().0, 0);
    }
}

#[test]
fn waiters_go_first_come_first_served() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "fifo"], "h");
    let mut waiters = Vec::new();
    for (i, name) in ["w1", "w2", "w3", "w4"].iter().enumerate() {
        // Each job ends at once: the next in line starts after it.
        let child = qsem(&env, &url)
            .args(["--id", "fifo", "--", "sh", "-c"])
            .arg(format!("echo {name} >> {}", env.path("order").display()))
            .spawn()
            .unwrap();
        waiters.push(Job(Some(child)));
        assert!(eventually(SOON, || counts(&env, &url, "fifo").1 == i as u32 + 1));
    }
    stop(&env);
    assert_eq!(h.end().0, 0);
    for w in waiters {
        assert_eq!(w.end().0, 0);
    }
    let order = std::fs::read_to_string(env.path("order")).unwrap();
    assert_eq!(order, "h\nw1\nw2\nw3\nw4\n");
}

#[test]
fn fences_strictly_increase_over_runs_and_handoffs() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let mut fences = Vec::new();
    for _ in 0..3 {
        let (code, out, _) = run(qsem(&env, &url).args([
            "--id",
            "fence",
            "-j2",
            "--",
            "sh",
            "-c",
            "echo $QSEM_FENCE",
        ]));
        assert_eq!(code, 0);
        fences.push(out.trim().parse::<u64>().unwrap());
    }
    // A handoff: the waiter's grant comes after the holder's.
    let h = hold(&env, &url, &["--id", "fence"], "h");
    let w = spawn(&env, &url, &["--id", "fence"], "w");
    assert!(eventually(SOON, || counts(&env, &url, "fence").1 == 1));
    stop(&env);
    assert_eq!(h.end().0, 0);
    assert_eq!(w.end().0, 0);
    for name in ["h", "w"] {
        let s = std::fs::read_to_string(env.path(&format!("{name}.started"))).unwrap();
        fences.push(s.split_whitespace().nth(1).unwrap().parse().unwrap());
    }
    assert!(fences.windows(2).all(|p| p[0] < p[1]), "{fences:?}");
}

#[test]
fn a_killed_holder_frees_its_slot_within_the_ttl() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "k9", "--lost-after", "3s"], "h");
    kill(h.pid(), libc::SIGKILL);
    let t = Instant::now();
    let (code, out, _) =
        run(qsem(&env, &url).args(["--id", "k9", "--wait", "20", "-E", "9", "echo", "ran"]));
    assert_eq!((code, out.as_str()), (0, "ran\n"));
    // The lease's TTL, plus its granularity, plus a slow machine's margin.
    assert!(t.elapsed() < Duration::from_secs(9), "{:?}", t.elapsed());
    stop(&env);
    drop(h);
}

#[test]
fn never_more_than_n_at_once_with_kill_9() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let job = counted(&env, 3, "0.2");
    let mut jobs: Vec<Job> = (0..40)
        .map(|_| {
            let child = qsem(&env, &url)
                .args([
                    "--id",
                    "storm",
                    "-j3",
                    // Short, so that the killed holders' slots free soon;
                    // long enough that a starved machine still renews.
                    "--lost-after",
                    "6s",
                    "--",
                    "sh",
                    "-c",
                    &job,
                ])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            Job(Some(child))
        })
        .collect();
    // Kill every fifth qsem, holders and waiters alike, while they run.
    let mut seed = std::process::id();
    for j in jobs.iter().step_by(5) {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        std::thread::sleep(Duration::from_millis(u64::from(seed % 300)));
        kill(j.pid(), libc::SIGKILL);
    }
    for j in jobs.drain(..) {
        let (code, err) = j.end();
        assert!(code == 0 || code == -1, "exit {code}: {err}");
    }
    assert_eq!(violations(&env), "", "more than 3 jobs at once");
    assert!(eventually(SOON, || counts(&env, &url, "storm") == (0, 0)));
}

#[test]
fn mixed_limits_hold_at_every_instant_under_contention() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let jobs: Vec<Job> = (0..30)
        .map(|i| {
            let n = if i % 2 == 0 { 2 } else { 4 };
            let job = counted(&env, n, "0.1");
            let child = qsem(&env, &url)
                .args([
                    "--id",
                    "mixstorm",
                    &format!("-j{n}"),
                    "--",
                    "sh",
                    "-c",
                    &job,
                ])
                .spawn()
                .unwrap();
            Job(Some(child))
        })
        .collect();
    for j in jobs {
        assert_eq!(j.end().0, 0);
    }
    assert_eq!(violations(&env), "", "a limit was passed");
}

#[test]
fn background_failures_are_kept_for_the_next_wait_all() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    for code in ["3", "0", "4"] {
        let (rc, _, _) = run(qsem(&env, &url)
            .args(["--id", "bg", "-j2", "--bg", "--", "sh", "-c"])
            .arg(format!("sleep 0.3; exit {code}")));
        assert_eq!(rc, 0);
    }
    let (code, _, err) = run(qsem(&env, &url).args(["--id", "bg", "--wait-all"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains('2'), "{err}");
    let (code, _, err) = run(qsem(&env, &url).args(["--id", "bg", "--wait-all"]));
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn a_full_backlog_gives_up_at_once() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "mw", "-j1"], "h");
    let w = spawn(&env, &url, &["--id", "mw", "-j1"], "w");
    assert!(eventually(SOON, || counts(&env, &url, "mw") == (1, 1)));
    // One waits already: a newcomer with --max-waiting 1 gives up at once.
    full_backlog_refuses(|| qsem(&env, &url), "mw");
    // With room in the backlog it queues, and its wait expires as usual.
    let args = [
        "--id",
        "mw",
        "--max-waiting",
        "2",
        "--wait",
        "1s",
        "-E",
        "8",
        "true",
    ];
    let t = Instant::now();
    assert_eq!(run(qsem(&env, &url).args(args)).0, 8);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    stop(&env);
    assert_eq!(h.end(), (0, String::new()));
    assert_eq!(w.end(), (0, String::new()));
}

#[test]
fn a_wait_that_has_run_out_never_queues() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "w0", "-j1"], "h");
    let (_, header) = c.etcdctl(&["get", "qsem/", "-w", "json", "--limit", "1"]);
    let at = header.find("\"revision\":").unwrap() + "\"revision\":".len();
    let revision: String = header[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let (code, _, _) = run(qsem(&env, &url).args(["--id", "w0", "--wait", "0", "-E", "9", "true"]));
    assert_eq!(code, 9);
    // Every change to the id's waiter keys since: none (`qsem/7730/` is "w0").
    let history = std::process::Command::new("timeout")
        .args(["2", "etcdctl", &format!("--endpoints={}", c.endpoints())])
        .args([
            "watch",
            "--prefix",
            "qsem/7730/q/",
            &format!("--rev={revision}"),
        ])
        .output()
        .unwrap();
    let history = String::from_utf8_lossy(&history.stdout);
    assert_eq!(history, "", "a --wait 0 request was queued");
    stop(&env);
    assert_eq!(h.end().0, 0);
}
