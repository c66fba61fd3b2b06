//! Waiting (SPEC §4): in the kernel, woken at once, first come first served,
//! bounded by --wait, stopped by signals with nothing left behind.

mod common;
use common::{
    Env, SOON, eventually, flock, held_and_waiting, holder, kill, release, run, stat_fields,
    wait_for_file,
};
use std::process::Child;
use std::time::{Duration, Instant};

/// CPU time (user + system, in clock ticks) a process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let fields = stat_fields(pid).unwrap_or_default();
    // After the command name: state is field 3, utime 14, stime 15.
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

#[test]
fn fifty_idle_waiters_use_no_cpu_and_all_run_when_the_slot_frees() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "idle"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let log = env.path("log");
    let waiters: Vec<Child> = (0..50)
        .map(|_| {
            env.qsem()
                .args(["--id", "idle", "--", "sh", "-c", "echo x >> \"$1\"", "sh"])
                .arg(&log)
                .spawn()
                .unwrap()
        })
        .collect();
    assert!(eventually(Duration::from_secs(30), || held_and_waiting(
        &env, "idle"
    ) == (1, 50)));
    let before: u64 = waiters.iter().map(|w| cpu_ticks(w.id())).sum();
    std::thread::sleep(Duration::from_secs(2));
    let after: u64 = waiters.iter().map(|w| cpu_ticks(w.id())).sum();
    // A tick is 10 ms: 50 waiters polling every 20 ms would burn hundreds.
    assert!(
        after - before <= 3,
        "idle waiters used {} ticks in 2 s",
        after - before
    );
    release(h);
    for mut w in waiters {
        assert!(w.wait().unwrap().success());
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 50);
    assert_eq!(held_and_waiting(&env, "idle"), (0, 0));
}

#[test]
fn waiters_are_served_in_the_order_they_came() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "fifo"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let log = env.path("order");
    let mut waiters = Vec::new();
    for i in 0..8 {
        let w = env
            .qsem()
            .args(["--id", "fifo", "--", "sh", "-c", "echo $1 >> \"$2\"", "sh"])
            .arg(i.to_string())
            .arg(&log)
            .spawn()
            .unwrap();
        waiters.push(w);
        assert!(eventually(SOON, || held_and_waiting(&env, "fifo").1 == i + 1));
    }
    release(h);
    for mut w in waiters {
        assert!(w.wait().unwrap().success());
    }
    let order = std::fs::read_to_string(&log).unwrap();
    assert_eq!(order, "0\n1\n2\n3\n4\n5\n6\n7\n");
}

/// A waiter that a free slot would not admit (its own limit is reached) does
/// not hold back a younger one with a larger limit.
#[test]
fn a_blocked_small_limit_does_not_hold_back_a_larger_one() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "mix", "-j3"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let r2 = env.path("ready2");
    let h2 = holder(&env, &["--id", "mix", "-j3"], &r2);
    assert!(wait_for_file(&r2, SOON));
    // Two held: a -j2 must wait; a -j3 that comes later goes at once.
    let mut small = env
        .qsem()
        .args(["--id", "mix", "-j2", "true"])
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || held_and_waiting(&env, "mix") == (2, 1)));
    let (code, out, _) = run(env
        .qsem()
        .args(["--id", "mix", "-j3", "--wait", "5s", "echo", "big"]));
    assert_eq!((code, out.as_str()), (0, "big\n"));
    release(h);
    assert!(small.wait().unwrap().success());
    release(h2);
}

#[test]
fn a_chain_of_jobs_hands_over_quickly() {
    let env = Env::new();
    let start = Instant::now();
    let jobs: Vec<Child> = (0..30)
        .map(|_| env.qsem().args(["--id", "chain", "true"]).spawn().unwrap())
        .collect();
    for mut j in jobs {
        assert!(j.wait().unwrap().success());
    }
    // Thirty handovers: milliseconds each on an idle machine; the bound is generous.
    let took = start.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    eprintln!("30 -j1 jobs, started at once, ran one after another in {took:?}");
}

#[test]
fn a_waiter_wakes_at_once_when_the_holders_job_is_killed() {
    let env = Env::new();
    let pidfile = env.path("pid");
    let mut h = env
        .qsem()
        .args([
            "--id",
            "k9",
            "--",
            "sh",
            "-c",
            "echo $$ > \"$1\"; exec sleep 60",
            "sh",
        ])
        .arg(&pidfile)
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || std::fs::read_to_string(&pidfile)
        .is_ok_and(|s| s.ends_with('\n'))));
    let done = env.path("done");
    let mut w = env
        .qsem()
        .args(["--id", "k9", "touch"])
        .arg(&done)
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || held_and_waiting(&env, "k9") == (1, 1)));
    // kill -9 of the whole holder: qsem first, then its job.
    kill(h.id(), libc::SIGKILL);
    h.wait().unwrap();
    let job: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let killed = Instant::now();
    kill(job, libc::SIGKILL);
    assert!(w.wait().unwrap().success());
    assert!(done.exists());
    assert!(killed.elapsed() < SOON);
    eprintln!(
        "waiter ran {:?} after kill -9 of the holding job",
        killed.elapsed()
    );
}

#[test]
fn an_expired_wait_is_silent_and_exits_with_the_conflict_code() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "busy"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let start = Instant::now();
    let (code, out, err) = run(env
        .qsem()
        .args(["--id", "busy", "--wait", "300ms", "echo", "ran"]));
    let took = start.elapsed();
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    assert!(
        took >= Duration::from_millis(300) && took < SOON,
        "{took:?}"
    );
    let (code, out, err) = run(env
        .qsem()
        .args(["--id", "busy", "-w", "0", "-E", "75", "echo", "ran"]));
    assert_eq!((code, out.as_str(), err.as_str()), (75, "", ""));
    // GNU sem's positive --st: run anyway, without a slot.
    let (code, out, _) = run(env.qsem().args([
        "--id",
        "busy",
        "--st",
        "0.2",
        "sh",
        "-c",
        "echo slot=$QSEM_SLOT",
    ]));
    assert_eq!((code, out.as_str()), (0, "slot=0\n"));
    // Nothing was left in the queue by those who gave up.
    let queue: Vec<_> = std::fs::read_dir(env.locks.join("busy/queue"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        queue
            .iter()
            .all(|n| n == "lock" || n == "census" || n == "failed"),
        "{queue:?}"
    );
    release(h);
}

#[test]
fn a_signalled_waiter_stops_at_once_starting_nothing() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "sig"], &ready);
    assert!(wait_for_file(&ready, SOON));
    for (signal, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let marker = env.path("started");
        let mut w = env
            .qsem()
            .args(["--id", "sig", "touch"])
            .arg(&marker)
            .spawn()
            .unwrap();
        assert!(eventually(SOON, || held_and_waiting(&env, "sig") == (1, 1)));
        let sent = Instant::now();
        kill(w.id(), signal);
        let status = w.wait().unwrap();
        assert_eq!(status.code(), Some(code));
        assert!(sent.elapsed() < SOON);
        assert!(!marker.exists());
        assert_eq!(held_and_waiting(&env, "sig"), (1, 0));
    }
    release(h);
}

/// Slot 1 of `id`, held by the test itself through a descriptor of its own,
/// after one real run has made the id's directories as qsem makes them.
fn hold_slot_by_hand(env: &Env, id: &str) -> std::fs::File {
    assert_eq!(run(env.qsem().args(["--id", id, "true"])).0, 0);
    let slot = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.locks.join(id).join("1"))
        .unwrap();
    assert!(flock(&slot, libc::LOCK_EX | libc::LOCK_NB));
    slot
}

/// Makes the event the kernel sends when the last descriptor of a file open
/// for writing is closed, without touching the lock the test holds on it.
fn close_event(env: &Env, id: &str) {
    let path = env.locks.join(id).join("1");
    drop(std::fs::OpenOptions::new().write(true).open(path).unwrap());
}

/// Plays the kernel, slowly: once the waiter has settled past the looks that
/// follow its own watch (4 s), a close event while the test still holds slot
/// 1, and then the lock dropped with LOCK_UN, which makes no event at all.
fn event_then_silent_release(env: &Env, id: &str, held: &std::fs::File) {
    std::thread::sleep(Duration::from_secs(5));
    close_event(env, id);
    std::thread::sleep(Duration::from_millis(100));
    assert!(flock(held, libc::LOCK_UN));
}

/// The kernel reports the last close of a file (IN_CLOSE_WRITE) a moment
/// before it drops the file's flock, so a waiter woken by the event can find
/// the slot still held, and no second event comes.
#[test]
fn a_waiter_woken_before_the_lock_is_dropped_still_takes_the_slot() {
    let env = Env::new();
    let held = hold_slot_by_hand(&env, "early");
    let ran = env.path("ran");
    let mut w = env
        .qsem()
        .args(["--id", "early", "--wait", "120s", "-E", "99", "touch"])
        .arg(&ran)
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || held_and_waiting(&env, "early") == (1, 1)));
    event_then_silent_release(&env, "early", &held);
    assert!(
        wait_for_file(&ran, Duration::from_secs(30)),
        "the waiter slept on beside a free slot"
    );
    assert_eq!(w.wait().unwrap().code(), Some(0));
}

/// The other half of the same race: a release whose event came just before
/// the waiter's watch was set, and whose lock went just after the waiter's
/// first look. The test drops its lock silently right after the waiter queued.
#[test]
fn a_release_between_the_waiters_watch_and_its_look_is_not_missed() {
    let env = Env::new();
    let held = hold_slot_by_hand(&env, "between");
    let ran = env.path("ran");
    let mut w = env
        .qsem()
        .args(["--id", "between", "--wait", "120s", "-E", "99", "touch"])
        .arg(&ran)
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || held_and_waiting(&env, "between") == (1, 1)));
    assert!(flock(&held, libc::LOCK_UN));
    assert!(
        wait_for_file(&ran, Duration::from_secs(30)),
        "the waiter slept on beside a free slot"
    );
    assert_eq!(w.wait().unwrap().code(), Some(0));
}

/// `--wait-all` sleeps on the same events, and must not miss the same release.
#[test]
fn wait_all_woken_before_the_lock_is_dropped_still_returns() {
    let env = Env::new();
    let held = hold_slot_by_hand(&env, "drain");
    let mut w = env
        .qsem()
        .args(["--id", "drain", "--wait-all", "--wait", "120s", "-E", "99"])
        .spawn()
        .unwrap();
    event_then_silent_release(&env, "drain", &held);
    assert!(
        eventually(Duration::from_secs(30), || w.try_wait().unwrap().is_some()),
        "--wait-all slept on after the last slot was freed"
    );
    assert_eq!(w.wait().unwrap().code(), Some(0));
}

/// `--status` names each waiter, oldest first, with its pid, host and age.
#[test]
fn status_lists_each_waiter_with_its_pid_host_and_age() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "named"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let mut waiters = Vec::new();
    for i in 0..2 {
        waiters.push(
            env.qsem()
                .args(["--id", "named", "--", "true"])
                .spawn()
                .unwrap(),
        );
        assert!(eventually(SOON, || held_and_waiting(&env, "named").1 == i + 1));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (_, out, _) = run(env.qsem().args(["--status", "--json", "--id", "named"]));
    let listed: Vec<String> = waiters
        .iter()
        .map(|w| {
            format!(
                "{{\"pid\":{},\"host\":\"{}\",\"since\":",
                w.id(),
                host.trim()
            )
        })
        .collect();
    let at: Vec<usize> = listed
        .iter()
        .map(|l| {
            out.find(l.as_str())
                .unwrap_or_else(|| panic!("{l} in {out}"))
        })
        .collect();
    assert!(at[0] < at[1], "oldest first: {out}");
    assert!(!out.contains("\"waited\":null"), "{out}");
    let (_, table, _) = run(env.qsem().args(["--status", "--id", "named"]));
    for w in &waiters {
        assert!(
            table.contains(&format!("named  waiting  {}", w.id())),
            "{table}"
        );
    }
    release(h);
    for mut w in waiters {
        assert!(w.wait().unwrap().success());
    }
}
