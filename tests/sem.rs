//! qsem invoked as `sem` (SPEC §8): GNU sem's own test scenarios, in our
//! words, against a `sem` symlink to the real binary.

mod common;
use common::{Env, SOON, kill, run, wait_for_file};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `sem` (a symlink to qsem) in this environment's lock directory.
fn sem(env: &Env) -> Command {
    let link = env.path("sem");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qsem"), &link).unwrap();
    }
    let mut cmd = Command::new(link);
    cmd.env("QSEM_DIR", &env.locks)
        .env_remove("QSEM_BACKEND")
        .current_dir(&env.root);
    cmd
}

/// Runs a background `sem` to its return, its job's output going to `out`
/// and `err` in the scratch directory (a pipe would keep `output()` waiting
/// for the job).
fn sem_bg(env: &Env, args: &[&str]) -> i32 {
    let append = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.path(name))
            .unwrap()
    };
    sem(env)
        .args(args)
        .stdin(Stdio::null())
        .stdout(append("out"))
        .stderr(append("err"))
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

fn read(env: &Env, name: &str) -> String {
    std::fs::read_to_string(env.path(name)).unwrap_or_default()
}

fn mark(env: &Env, name: &str) -> PathBuf {
    env.path(name)
}

#[test]
fn every_exit_code_comes_through_fg() {
    let env = Env::new();
    let mut script = String::from("st=0; for c in $(seq 0 255); do ");
    script.push_str("\"$SEM\" --fg --id codes \"exit $c\" 2>/dev/null; r=$?; ");
    script.push_str("[ $r = $c ] || { echo \"$c gave $r\"; st=1; }; done; exit $st");
    sem(&env); // creates the link
    let (code, out, _) = run(Command::new("sh")
        .args(["-c", &script])
        .env("SEM", env.path("sem"))
        .env("QSEM_DIR", &env.locks));
    assert_eq!((code, out.as_str()), (0, ""));
}

#[test]
fn a_signal_ends_the_job_and_sem_says_so() {
    let env = Env::new();
    let (code, _, err) = run(sem(&env).args(["--fg", "kill -TERM $$"]));
    assert_eq!(code, 143);
    assert!(err.contains("killed by SIGTERM"), "{err}");
    // A SIGTERM to sem --fg reaches its job.
    let started = mark(&env, "started");
    let mut child = sem(&env)
        .args(["--fg", "--id", "sig"])
        .arg(format!("touch {}; sleep 5", started.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for_file(&started, SOON));
    let t = Instant::now();
    kill(child.id(), libc::SIGTERM);
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_waiting_sem_stops_on_sigterm_and_starts_nothing() {
    let env = Env::new();
    assert_eq!(sem_bg(&env, &["--id", "w", "sleep 3"]), 0);
    let ran = mark(&env, "ran");
    let mut waiter = sem(&env)
        .args(["--id", "w"])
        .arg(format!("touch {}", ran.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Its supervisor waits once `--status` counts it.
    assert!(common::eventually(SOON, || common::held_and_waiting(
        &env, "w"
    ) == (1, 1)));
    assert!(waiter.try_wait().unwrap().is_none(), "it should be waiting");
    let t = Instant::now();
    kill(waiter.id(), libc::SIGTERM);
    assert_eq!(waiter.wait().unwrap().code(), Some(143));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(run(sem(&env).args(["--id", "w", "--wait"])).0, 0);
    assert!(!ran.exists(), "a stopped waiter ran its job");
}

#[test]
fn semaphore_timeout_both_ways() {
    let env = Env::new();
    assert_eq!(sem_bg(&env, &["--id", "st", "sleep 3"]), 0);
    // Negative: give up after the time without running, as GNU sem does:
    // status 1 and its warning.
    let gave_up = mark(&env, "gave-up");
    let t = Instant::now();
    let (code, out, err) = run(sem(&env)
        .args(["--id", "st", "--fg", "--st", "-0.5"])
        .arg(format!("touch {}", gave_up.display())));
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "", "sem: Warning: Semaphore timed out. Exiting.\n")
    );
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert!(!gave_up.exists());
    // Positive: run anyway after the time, though the slot is still held.
    let anyway = mark(&env, "anyway");
    let t = Instant::now();
    let (code, _, err) = run(sem(&env)
        .args(["--id", "st", "--fg", "--semaphoretimeout", "0.5"])
        .arg(format!("touch {}", anyway.display())));
    assert_eq!(code, 0);
    assert_eq!(
        err,
        "sem: Warning: Semaphore timed out. Stealing the semaphore.\n"
    );
    assert!(anyway.exists());
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn three_jobs_at_j2_started_half_a_second_apart() {
    let env = Env::new();
    let start = Instant::now();
    for n in 1..=3 {
        let job = format!("sleep 1; echo job{n}");
        assert_eq!(sem_bg(&env, &["--id", "three", "-j2", &job]), 0);
        if n < 3 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // The third could start only when the first ended, at about 1 s.
    let third_started = start.elapsed();
    assert_eq!(run(sem(&env).args(["--id", "three", "--wait"])).0, 0);
    let took = start.elapsed();
    assert_eq!(read(&env, "out"), "job1\njob2\njob3\n");
    assert!(
        third_started >= Duration::from_millis(950),
        "{third_started:?}"
    );
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn five_jobs_of_different_lengths_at_j2() {
    let env = Env::new();
    std::fs::create_dir(env.path("slots")).unwrap();
    let start = Instant::now();
    for secs in ["0.6", "0.2", "0.4", "0.1", "0.3"] {
        // Claim a file named after the slot: a shared slot leaves a trace.
        let job = format!(
            "cd slots && [ $QSEM_SLOT -le 2 ] && (set -C; : > $QSEM_SLOT) && sleep {secs} && rm $QSEM_SLOT && echo {secs} || touch ../overlap"
        );
        assert_eq!(sem_bg(&env, &["--id", "five", "-j2", &job]), 0);
    }
    assert_eq!(run(sem(&env).args(["--id", "five", "--wait"])).0, 0);
    assert!(!env.path("overlap").exists(), "more than two at once");
    let mut done: Vec<String> = read(&env, "out").lines().map(String::from).collect();
    done.sort();
    assert_eq!(done, ["0.1", "0.2", "0.3", "0.4", "0.6"]);
    // 1.6 s of work on two slots takes at least 0.8 s.
    assert!(start.elapsed() >= Duration::from_millis(800));
    assert!(start.elapsed() < SOON);
}

#[test]
fn a_fourth_job_at_jobs_3_waits_for_the_first() {
    let env = Env::new();
    let first = "sleep 1; touch first-done";
    assert_eq!(sem_bg(&env, &["--id", "four", "--jobs", "3", first]), 0);
    assert_eq!(sem_bg(&env, &["--id", "four", "--jobs", "3", "sleep 2"]), 0);
    assert_eq!(sem_bg(&env, &["--id", "four", "--jobs", "3", "sleep 2"]), 0);
    let t = Instant::now();
    let fourth = "[ -e first-done ] && echo after || echo before";
    assert_eq!(sem_bg(&env, &["--id", "four", "--jobs", "3", fourth]), 0);
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(run(sem(&env).args(["--id", "four", "--wait"])).0, 0);
    assert_eq!(read(&env, "out"), "after\n");
}

#[test]
fn stdin_reaches_the_job() {
    let env = Env::new();
    let feed = |args: &[&str], input: &str| {
        let mut child = sem(&env)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(
        feed(&["--fg", "cat"], "to fg\n"),
        (Some(0), "to fg\n".into())
    );
    // In the background too, as GNU sem does.
    let out = env.path("bg-out");
    let job = format!("cat > {}", out.display());
    assert_eq!(feed(&["--id", "in", &job], "to bg\n").0, Some(0));
    assert_eq!(run(sem(&env).args(["--id", "in", "--wait"])).0, 0);
    assert_eq!(std::fs::read_to_string(out).unwrap(), "to bg\n");
}

#[test]
fn words_are_joined_and_run_by_sh() {
    let env = Env::new();
    let (code, out, _) =
        run(sem(&env).args(["--fg", "echo", "a  b", "$((1+2))", "|", "tr", "a", "x"]));
    assert_eq!((code, out.as_str()), (0, "x b 3\n"));
}

#[test]
fn a_failed_background_job_is_never_lost() {
    let env = Env::new();
    assert_eq!(sem_bg(&env, &["--id", "lost", "exit 3"]), 0);
    assert_eq!(sem_bg(&env, &["--id", "lost", "true"]), 0);
    let (code, _, err) = run(sem(&env).args(["--id", "lost", "--wait"]));
    assert_eq!(code, 1);
    assert!(err.contains("1 background job failed"), "{err}");
    assert!(read(&env, "err").contains("exited with status 3"));
}

#[test]
fn bad_usage_is_reported_as_sem() {
    let env = Env::new();
    let (code, _, err) = run(sem(&env).args(["-j", "x", "true"]));
    assert_eq!(code, 2);
    assert!(err.starts_with("sem: invalid number of jobs 'x'"), "{err}");
    let (code, _, _) = run(sem(&env).args(["--wait", "true"]));
    assert_eq!(code, 2);
}
