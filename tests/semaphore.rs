//! The semaphore (SPEC §4): admission, slots, the lock directory.

mod common;
use common::{Env, SOON, held_and_waiting, holder, release, run, wait_for_file};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The seed's crontab: one id shared by -j2 imports, -j5 transforms and -j7
/// summaries. Each admits only while fewer than its own N are held in total.
#[test]
fn mixed_limits_on_one_id_follow_gnu_sem() {
    let env = Env::new();
    // One attempt at -j N: the slot the job got, or "" if it was not admitted.
    let slot_for = |jobs: &str| {
        let args = [
            "--id",
            "proc",
            "-j",
            jobs,
            "--wait",
            "0",
            "--",
            "sh",
            "-c",
            "echo $QSEM_SLOT",
        ];
        let (code, out, err) = run(env.qsem().args(args));
        assert_eq!((code, err.as_str()), (0, ""), "-j{jobs}");
        out.trim().to_string()
    };
    let mut holders = Vec::new();
    let mut hold = |jobs: &str, name: String| {
        let ready = env.path(&name);
        holders.push(holder(&env, &["--id", "proc", "-j", jobs], &ready));
        assert!(wait_for_file(&ready, SOON));
    };
    for i in 0..2 {
        hold("7", format!("summary{i}"));
    }
    // Two held: an import (-j2) may not start, silently, even after waiting.
    let (code, out, err) = run(env.qsem().args([
        "--id", "proc", "-j2", "--wait", "1s", "--", "echo", "import",
    ]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    // A transform (-j5) may, in the lowest free slot.
    assert_eq!(slot_for("5"), "3");
    for i in 2..5 {
        hold("5", format!("transform{i}"));
    }
    // Five held: no more transforms, but summaries still (5 < 7).
    assert_eq!(slot_for("5"), "");
    assert_eq!(slot_for("7"), "6");
    assert_eq!(held_and_waiting(&env, "proc"), (5, 0));
    // Free slot 1: the lowest free one is taken next.
    release(holders.remove(0));
    assert_eq!(slot_for("7"), "1");
    holders.into_iter().for_each(release);
    assert_eq!(held_and_waiting(&env, "proc"), (0, 0));
}

#[test]
fn ids_are_independent() {
    let env = Env::new();
    let ready = env.path("a");
    let a = holder(&env, &["--id", "a"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let (_, out, _) = run(env
        .qsem()
        .args(["--id", "b", "--wait", "0", "echo", "b runs"]));
    assert_eq!(out, "b runs\n");
    release(a);
}

#[test]
fn a_million_slots_do_not_make_a_million_files() {
    let env = Env::new();
    let (code, out, _) = run(env.qsem().args([
        "--id",
        "big",
        "-j",
        "1000000",
        "sh",
        "-c",
        "echo $QSEM_SLOT/$QSEM_JOBS",
    ]));
    assert_eq!((code, out.as_str()), (0, "1/1000000\n"));
    let files = std::fs::read_dir(env.locks.join("big")).unwrap().count();
    assert_eq!(files, 2, "slot 1 and the queue directory");
}

#[test]
fn odd_ids_stay_inside_the_lock_directory_and_apart() {
    let env = Env::new();
    for id in ["../x", "a/b", ".", "..", "a%2Fb", "-j", " ", "ü"] {
        let (code, out, err) = run(env.qsem().arg(format!("--id={id}")).args([
            "--",
            "sh",
            "-c",
            "printf %s \"$QSEM_ID\"",
        ]));
        assert_eq!((code, out.as_str()), (0, id), "{id}: {err}");
    }
    let mut names: Vec<String> = std::fs::read_dir(&env.locks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // The journals' directory, hidden on purpose: never an id.
        .filter(|n| n != ".history")
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(
        names.iter().all(|n| !n.starts_with('.') || n == "."),
        "{names:?}"
    );
    assert!(!env.root.join("x").exists());
    let (_, out, _) = run(env.qsem().args(["--status", "--json"]));
    assert_eq!(out, "{\"ids\":[]}\n");
}

#[test]
fn files_are_private() {
    let env = Env::new();
    run(env.qsem().args(["--id", "p", "true"]));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&env.locks), 0o700);
    assert_eq!(mode(&env.locks.join("p")), 0o700);
    assert_eq!(mode(&env.locks.join("p/1")), 0o600);
    assert_eq!(mode(&env.locks.join("p/queue/lock")), 0o600);
}

/// Starts a job under `qsem ARGS` that runs until the returned file exists,
/// then kills qsem with SIGKILL, leaving the job running.
fn kill_qsem_leaving_its_job(env: &Env, args: &[&str]) -> std::path::PathBuf {
    let ready = env.path("ready");
    let go = env.path("go");
    // The job also ends when the test's directory goes, so that a failing
    // test leaves no process behind.
    let script = format!(
        "touch {ready}; while [ -d {root} ] && [ ! -e {go} ]; do sleep 0.05; done",
        ready = ready.display(),
        root = env.root.display(),
        go = go.display()
    );
    let mut qsem = env.qsem().args(args).args(["-c", &script]).spawn().unwrap();
    assert!(wait_for_file(&ready, SOON));
    common::kill(qsem.id(), libc::SIGKILL);
    qsem.wait().unwrap();
    go
}

#[test]
fn a_holder_killed_with_sigkill_keeps_the_slot_until_its_job_ends() {
    let env = Env::new();
    let go = kill_qsem_leaving_its_job(&env, &["--id", "k"]);
    // The job still runs, so its slot is still held.
    let (_, out, _) = run(env
        .qsem()
        .args(["--id", "k", "--wait", "300ms", "echo", "overtook"]));
    assert_eq!(out, "");
    std::fs::write(&go, "").unwrap();
    let (_, out, _) = run(env
        .qsem()
        .args(["--id", "k", "--wait", "10s", "echo", "after"]));
    assert_eq!(out, "after\n");
}

#[test]
fn with_close_the_slot_is_qsems_alone() {
    let env = Env::new();
    let go = kill_qsem_leaving_its_job(&env, &["--id", "o", "-o"]);
    let (_, out, _) = run(env
        .qsem()
        .args(["--id", "o", "--wait", "10s", "echo", "free"]));
    assert_eq!(out, "free\n");
    std::fs::write(&go, "").unwrap();
}

#[test]
fn status_shows_holders_and_waiters() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "st"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let mut waiter = env.qsem().args(["--id", "st", "true"]).spawn().unwrap();
    assert!(common::eventually(SOON, || held_and_waiting(&env, "st") == (1, 1)));
    let (code, out, _) = run(env.qsem().args(["--status"]));
    assert_eq!(code, 0);
    assert!(out.starts_with("ID  SLOT     PID"), "{out}");
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("st  1        ") && row.contains("sh -c 'touch"),
        "{out}"
    );
    let waiter_row = format!("st  waiting  {}", waiter.id());
    assert!(out.lines().any(|l| l.starts_with(&waiter_row)), "{out}");
    assert!(out.ends_with("st: 1 held, 1 waiting\n"), "{out}");
    release(h);
    assert!(waiter.wait().unwrap().success());
}

#[test]
fn a_lock_directory_others_could_tamper_with_is_refused() {
    let env = Env::new();
    let open = env.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = run(env.qsem().arg("--dir").arg(&open).arg("true"));
    assert_eq!(code, 125);
    assert!(
        err.contains("writable by everyone") && err.contains("open"),
        "{err}"
    );
    // With the sticky bit, as /tmp, it is fine.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (code, _, err) = run(env.qsem().arg("--dir").arg(&open).arg("true"));
    assert_eq!(code, 0, "{err}");

    if unsafe { libc::geteuid() } == 0 {
        let theirs = env.path("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let (code, _, err) = run(env.qsem().arg("--dir").arg(&theirs).arg("true"));
        assert_eq!(code, 125);
        assert!(err.contains("belongs to uid 65534"), "{err}");
    }
}

#[test]
fn symlinks_and_strange_files_are_refused() {
    let env = Env::new();
    run(env.qsem().args(["--id", "real", "true"]));
    std::os::unix::fs::symlink(env.locks.join("real"), env.locks.join("link")).unwrap();
    let (code, _, err) = run(env.qsem().args(["--id", "link", "true"]));
    assert_eq!(code, 125);
    assert!(
        err.contains("symbolic link") && err.contains("link"),
        "{err}"
    );

    std::fs::remove_file(env.locks.join("real/1")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", env.locks.join("real/1")).unwrap();
    let (code, _, err) = run(env.qsem().args(["--id", "real", "true"]));
    assert_eq!(code, 125);
    assert!(
        err.contains("real/1") && err.contains("symbolic link"),
        "{err}"
    );

    run(env.qsem().args(["--id", "fifo", "true"]));
    std::fs::remove_file(env.locks.join("fifo/1")).unwrap();
    let path = std::ffi::CString::new(env.locks.join("fifo/1").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let (code, _, err) = run(env.qsem().args(["--id", "fifo", "true"]));
    assert_eq!(code, 125);
    assert!(err.contains("not a regular file"), "{err}");
    assert_eq!(
        std::fs::metadata(env.locks.join("fifo/1")).unwrap().uid(),
        unsafe { libc::geteuid() }
    );
}
