//! Liveness (issue 10): no process that is stopped, stalled or dead keeps
//! others from a free slot, from their `--wait` deadline, from a signal, or
//! keeps `--status` from answering; no waiter of a small N starves behind a
//! stream of larger ones; and no background failure goes uncounted. Stopped
//! processes are real SIGSTOPs; time bounds are generous, outcomes exact.

mod common;
use common::{Env, SOON, eventually, held_and_waiting, holder, kill, release, run, stat_fields};
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Holds `<id>/queue/lock` as a stopped qsem caught inside the mutex would.
fn hold_mutex(env: &Env, id: &str) -> File {
    // Creates the id's directories.
    assert_eq!(run(env.qsem().args(["--id", id, "-j9", "true"])).0, 0);
    let lock = File::open(env.locks.join(id).join("queue/lock")).unwrap();
    assert!(common::flock(&lock, libc::LOCK_EX));
    lock
}

/// Waits for `child` at most `limit`; its exit code and how long it took.
fn finish_within(child: &mut Child, limit: Duration) -> (i32, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_waiter_gives_up_on_time_while_another_holds_the_mutex() {
    let env = Env::new();
    let _lock = hold_mutex(&env, "m");
    let start = Instant::now();
    let (code, _, err) = run(env
        .qsem()
        .args(["--id", "m", "--wait", "1s", "-E", "9", "--", "true"]));
    let took = start.elapsed();
    assert_eq!((code, err.as_str()), (9, ""));
    // Honoured to within 100 ms; the bound allows for a loaded machine.
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // --wait-all gives up on time too.
    let (code, _, _) = run(env
        .qsem()
        .args(["--id", "m", "--wait-all", "--wait", "1s", "-E", "9"]));
    assert_eq!(code, 9);
}

#[test]
fn a_signal_stops_a_waiter_held_up_by_the_mutex() {
    let env = Env::new();
    let _lock = hold_mutex(&env, "m");
    let mut waiter = env
        .qsem()
        .args(["--id", "m", "--", "true"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    kill(waiter.id(), libc::SIGTERM);
    let (code, took) = finish_within(&mut waiter, SOON);
    assert_eq!(code, 128 + libc::SIGTERM);
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn status_answers_whoever_holds_the_mutex() {
    let env = Env::new();
    let ready = env.path("ready");
    let job = holder(&env, &["--id", "m", "-j2"], &ready);
    assert!(common::wait_for_file(&ready, SOON));
    let _lock = hold_mutex(&env, "m");
    for args in [&["--status"][..], &["--status", "--id", "m", "--json"]] {
        let mut status = env
            .qsem()
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (code, _) = finish_within(&mut status, Duration::from_secs(5));
        assert_eq!(code, 0);
    }
    assert_eq!(held_and_waiting(&env, "m"), (1, 0));
    release(job);
}

/// A waiter of `id`, queued behind a holder, then stopped — outside the
/// id's mutex: a waiter looks again a few times after it queues, each look
/// under the mutex for a moment, and one stopped inside keeps everyone out
/// until it runs again (tested apart, with the mutex held by hand).
fn stopped_waiter(env: &Env, id: &str, jobs: &str, waiting: u32) -> Child {
    let waiter = env
        .qsem()
        .args(["--id", id, "-j", jobs, "--", "true"])
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || held_and_waiting(env, id).1 == waiting));
    let mutex = std::fs::File::open(env.locks.join(id).join("queue/lock")).unwrap();
    assert!(eventually(SOON, || {
        kill(waiter.id(), libc::SIGSTOP);
        assert!(eventually(SOON, || {
            stat_fields(waiter.id()).is_some_and(|f| f[0] == "T")
        }));
        if common::flock(&mutex, libc::LOCK_EX | libc::LOCK_NB) {
            common::flock(&mutex, libc::LOCK_UN);
            return true;
        }
        kill(waiter.id(), libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(5));
        false
    }));
    waiter
}

#[test]
fn a_stopped_waiter_does_not_keep_newcomers_from_a_free_slot() {
    let env = Env::new();
    let ready = env.path("ready");
    let job = holder(&env, &["--id", "s"], &ready);
    assert!(common::wait_for_file(&ready, SOON));
    let mut stopped = stopped_waiter(&env, "s", "1", 1);
    release(job);
    assert_eq!(held_and_waiting(&env, "s"), (0, 1));
    // A newcomer runs at once, even one that tries only once.
    for wait in ["0", "5s"] {
        let start = Instant::now();
        let (code, _, err) = run(env
            .qsem()
            .args(["--id", "s", "--wait", wait, "-E", "9", "--", "true"]));
        assert_eq!((code, err.as_str()), (0, ""), "--wait {wait}");
        assert!(start.elapsed() < Duration::from_secs(3), "--wait {wait}");
    }
    // The stopped waiter, once it runs again, queues again and runs.
    kill(stopped.id(), libc::SIGCONT);
    assert_eq!(finish_within(&mut stopped, SOON).0, 0);
}

#[test]
fn a_stopped_head_does_not_keep_the_waiters_behind_it_from_a_free_slot() {
    let env = Env::new();
    let ready = env.path("ready");
    let job = holder(&env, &["--id", "q"], &ready);
    assert!(common::wait_for_file(&ready, SOON));
    let mut stopped = stopped_waiter(&env, "q", "1", 1);
    // A live waiter behind it, of the same N: no newcomer will come to help.
    let ran = env.path("ran");
    let mut behind = env
        .qsem()
        .args(["--id", "q", "--wait", "20s", "-E", "9", "--", "touch"])
        .arg(&ran)
        .spawn()
        .unwrap();
    assert!(eventually(SOON, || held_and_waiting(&env, "q").1 == 2));
    release(job);
    let (code, took) = finish_within(&mut behind, Duration::from_secs(20));
    assert_eq!(code, 0);
    assert!(ran.exists());
    assert!(took < Duration::from_secs(8), "took {took:?}");
    kill(stopped.id(), libc::SIGCONT);
    assert_eq!(finish_within(&mut stopped, SOON).0, 0);
}

#[test]
fn a_small_n_is_not_starved_by_a_stream_of_larger_ones() {
    let env = Env::new();
    // A steady stream of -j5 jobs of 0.5 s, about five at a time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (stop, qsem) = (stop.clone(), env.qsem());
        let prog = qsem.get_program().to_owned();
        let envs: Vec<_> = qsem
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
            .collect();
        std::thread::spawn(move || {
            let mut jobs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut c = Command::new(&prog);
                for (k, v) in &envs {
                    match v {
                        Some(v) => c.env(k, v),
                        None => c.env_remove(k),
                    };
                }
                jobs.push(
                    c.args(["--id", "mix", "-j5", "--", "sleep", "0.5"])
                        .spawn()
                        .unwrap(),
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            for mut j in jobs {
                let _ = j.wait();
            }
        })
    };
    assert!(eventually(SOON, || held_and_waiting(&env, "mix").0 >= 4));
    let start = Instant::now();
    let (code, _, err) = run(env.qsem().args([
        "--id", "mix", "-j1", "--wait", "15s", "-E", "9", "--", "true",
    ]));
    let took = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    stream.join().unwrap();
    assert_eq!((code, err.as_str()), (0, ""), "starved for {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_background_job_whose_supervisor_was_killed_counts_as_failed() {
    let env = Env::new();
    let started = env.path("started");
    // (Not `run`: the job keeps the launcher's stdout and stderr open.)
    let launched = env
        .qsem()
        .args(["--id", "k", "--bg", "--", "sh", "-c"])
        .arg(format!("touch '{}'; sleep 2; exit 4", started.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(launched.success());
    assert!(common::wait_for_file(&started, SOON));
    // The job's parent is its supervisor.
    let out = run(env.qsem().args(["--status", "--json", "--id", "k"])).1;
    let at = out.find("\"pid\":").expect("a holder") + 6;
    let job: u32 = out[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap();
    let supervisor: u32 = stat_fields(job).unwrap()[1].parse().unwrap();
    kill(supervisor, libc::SIGKILL);
    let (code, _, err) = run(env
        .qsem()
        .args(["--id", "k", "--wait-all", "--wait", "20s"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1 background job failed"), "{err}");
    // Counted once.
    assert_eq!(run(env.qsem().args(["--id", "k", "--wait-all"])).0, 0);
}

#[test]
fn what_is_not_qsems_in_the_lock_directory_is_ignored() {
    let env = Env::new();
    assert_eq!(run(env.qsem().args(["--id", "a", "true"])).0, 0);
    std::fs::write(env.locks.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir_all(env.locks.join(".cache/a")).unwrap();
    std::fs::write(env.locks.join(".hidden"), "").unwrap();
    let ready = env.path("ready");
    let job = holder(&env, &["--id", "a"], &ready);
    assert!(common::wait_for_file(&ready, SOON));
    let (code, out, err) = run(env.qsem().arg("--status"));
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.contains("1 held") && !out.contains("history"), "{out}");
    let (code, out, _) = run(env.qsem().args(["--status", "--json"]));
    assert_eq!(code, 0);
    assert!(!out.contains("notes") && !out.contains("hidden"), "{out}");
    release(job);
}

#[test]
fn parents_of_the_lock_directory_are_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let dir = env.path("x/a/b/c");
    let mut cmd = env.qsem();
    cmd.arg("--dir").arg(&dir).args(["--", "true"]);
    // SAFETY: umask is async-signal-safe; nothing else runs in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0);
            Ok(())
        });
    }
    assert_eq!(run(&mut cmd).0, 0);
    for p in ["x", "x/a", "x/a/b", "x/a/b/c"] {
        let mode = std::fs::metadata(env.path(p)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{p}");
    }
    // The default's ~/.local/state: the same.
    let home = env.path("home");
    std::fs::create_dir(&home).unwrap();
    let mut cmd = env.qsem();
    cmd.env_remove("QSEM_DIR")
        .env_remove("XDG_STATE_HOME")
        .env("HOME", &home)
        .args(["--", "true"]);
    // SAFETY: as above.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0);
            Ok(())
        });
    }
    assert_eq!(run(&mut cmd).0, 0);
    for p in [".local", ".local/state", ".local/state/qsem"] {
        let mode = std::fs::metadata(home.join(p))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{p}");
    }
}
