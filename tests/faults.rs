//! Faults (issue 5): each has a defined outcome, correct operation or one clear
//! line and status 125, and never two holders of a slot, a job run without
//! its slot, a hang or a panic. Tests that mount a filesystem need root (CI
//! runs as root); elsewhere they say loudly that they are skipped.

mod common;
use common::{Env, SOON, eventually, run, wait_for_file};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// `None` (with a loud message) when not root.
    fn mount(env: &Env, name: &str, options: &str) -> Option<Tmpfs> {
        if !is_root() {
            common::skipped(&format!(
                "{name} needs root to mount a tmpfs (CI runs as root)"
            ));
            return None;
        }
        let path = env.path(name);
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        // As root, a tmpfs that cannot be mounted is a broken test machine.
        assert!(
            ok,
            "{name}: root cannot mount a tmpfs at {}",
            path.display()
        );
        Some(Tmpfs { path })
    }

    /// A read-only view of the same filesystem (a bind mount), so that files
    /// open for writing elsewhere do not prevent it.
    fn read_only_view(&self, at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        for args in [&["--bind"][..], &["-o", "remount,bind,ro"]] {
            let ok = Command::new("mount")
                .args(args)
                .arg(&self.path)
                .arg(at)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount {args:?}");
        }
        Tmpfs {
            path: at.to_path_buf(),
        }
    }

    /// Fills the filesystem: no block is left.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Runs qsem with a bound: a hang is a failure, not a stuck test.
fn run_bounded(cmd: &mut Command) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > SOON {
            let _ = child.kill();
            panic!("qsem hung: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` with at most `limit` open file descriptors (`ulimit -n`).
fn with_fd_limit(cmd: &mut Command, limit: u64) {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
}

/// Asserts qsem's own failure: 125, one line naming `what`, the job not run.
/// Whether qsem's stderr says nothing but, at most once, that the journal
/// cannot be written (which never fails a job).
fn only_history(err: &str) -> bool {
    err.lines().count() <= 1 && err.lines().all(|l| l.contains(": cannot write history: "))
}

fn assert_own_failure(result: (i32, String, String), ran: &Path, what: &str) {
    let (code, _, err) = result;
    assert_eq!(code, 125, "{err}");
    assert!(err.starts_with("qsem: ") && err.contains(what), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!ran.exists(), "the job ran without its slot");
}

/// A job that leaves a marker, then sleeps.
fn job(marker: &Path, secs: &str) -> Vec<String> {
    vec![
        "--".into(),
        "sh".into(),
        "-c".into(),
        format!("touch '{}'; sleep {secs}", marker.display()),
    ]
}

fn holder(env: &Env, dir: &Path, id: &str, jobs: &str, marker: &Path) -> Child {
    let child = env
        .qsem()
        .arg("--dir")
        .arg(dir)
        .args(["--id", id, "-j", jobs])
        .args(job(marker, "30"))
        .spawn()
        .unwrap();
    assert!(wait_for_file(marker, SOON));
    child
}

#[test]
fn full_filesystem() {
    let env = Env::new();
    let Some(fs) = Tmpfs::mount(&env, "full", "size=64k,nr_inodes=64") else {
        return;
    };
    let locks = fs.path.join("locks");
    let ran = env.path("ran");
    let q = |id: &str| {
        let mut c = env.qsem();
        c.arg("--dir")
            .arg(&locks)
            .args(["--id", id, "-j2", "--wait", "2s"]);
        c
    };
    // An id used before the disk filled up keeps working: its files exist.
    assert_eq!(run(q("old").args(job(&ran, "0"))).0, 0);
    std::fs::remove_file(&ran).unwrap();
    fs.fill();
    assert_eq!(run_bounded(q("old").args(job(&ran, "0"))).0, 0);
    assert!(ran.exists());
    std::fs::remove_file(&ran).unwrap();
    // A new id needs a block for its slot record: the job runs all the same,
    // the record being only for --status.
    // The journal cannot be written either, which is said once.
    let (code, _, err) = run_bounded(q("new").args(job(&ran, "0")));
    assert_eq!((code, only_history(&err)), (0, true), "{err}");
    assert!(ran.exists());
    // --status still answers.
    let (code, _, err) = run_bounded(env.qsem().arg("--dir").arg(&locks).arg("--status"));
    assert_eq!((code, err.as_str()), (0, ""));
    // No inode left: a waiter cannot queue, and says so.
    let _ = std::fs::remove_file(&ran);
    let marker = env.path("holding");
    let mut first = holder(&env, &locks, "old", "2", &marker);
    let mut second = holder(&env, &locks, "old", "2", &env.path("holding2"));
    let mut i = 0;
    while std::fs::File::create(fs.path.join(format!("f{i}"))).is_ok() {
        i += 1;
    }
    let result = run_bounded(q("old").args(job(&ran, "0")));
    assert_own_failure(result, &ran, "No space left on device");
    for c in [&mut first, &mut second] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

#[test]
fn read_only_filesystem() {
    let env = Env::new();
    let Some(fs) = Tmpfs::mount(&env, "rw", "size=1m") else {
        return;
    };
    let ran = env.path("ran");
    let marker = env.path("holding");
    let mut held = holder(&env, &fs.path.join("locks"), "a", "1", &marker);
    let ro = fs.read_only_view(&env.path("ro"));
    let q_wait = |dir: &str, id: &str, jobs: &str, wait: &str| {
        let mut c = env.qsem();
        c.arg("--dir")
            .arg(ro.path.join(dir))
            .args(["--id", id, "-j", jobs, "--wait", wait, "-E", "75"]);
        c
    };
    let q = |dir: &str, id: &str, jobs: &str| q_wait(dir, id, jobs, "0");
    for (dir, id, jobs) in [
        ("missing", "a", "1"),
        ("locks", "new", "1"),
        ("locks", "a", "2"),
    ] {
        let result = run_bounded(q(dir, id, jobs).args(job(&ran, "0")));
        assert_own_failure(result, &ran, "Read-only file system");
    }
    // A full id: one try (--wait 0) needs no writing and finds it busy; a
    // waiter cannot queue on a read-only filesystem, and says so.
    let (code, _, err) = run_bounded(q("locks", "a", "1").args(job(&ran, "0")));
    assert_eq!((code, only_history(&err)), (75, true), "{err}");
    let result = run_bounded(q_wait("locks", "a", "1", "1s").args(job(&ran, "0")));
    assert_own_failure(result, &ran, "Read-only file system");
    // --status needs no writing.
    let (code, out, err) = run_bounded(
        env.qsem()
            .arg("--dir")
            .arg(ro.path.join("locks"))
            .arg("--status"),
    );
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.contains("1 held"), "{out}");
    held.kill().unwrap();
    held.wait().unwrap();
    drop(ro);
}

#[test]
fn out_of_file_descriptors() {
    let env = Env::new();
    let ran = env.path("ran");
    // Every limit from "nothing works" to "enough": a clear 125 or a clean run.
    // (Below 4 the dynamic loader itself fails, before qsem runs.)
    for limit in 4..=24u64 {
        let _ = std::fs::remove_file(&ran);
        let mut cmd = env.qsem();
        cmd.args(["--id", "fd", "-j1"]).args(job(&ran, "0"));
        with_fd_limit(&mut cmd, limit);
        let (code, _, err) = run_bounded(&mut cmd);
        match code {
            0 => assert!(ran.exists(), "limit {limit}"),
            125 => assert_own_failure((code, String::new(), err), &ran, "Too many open files"),
            _ => panic!("limit {limit}: status {code}: {err}"),
        }
    }
    // While waiting, too: the waiter needs descriptors for its queue ticket.
    let marker = env.path("holding");
    let mut held = holder(&env, &env.locks, "fd", "1", &marker);
    for limit in 6..=16u64 {
        let mut cmd = env.qsem();
        cmd.args(["--id", "fd", "-j1", "--wait", "300ms", "-E", "75"])
            .args(job(&ran, "0"));
        with_fd_limit(&mut cmd, limit);
        let _ = std::fs::remove_file(&ran);
        let (code, _, err) = run_bounded(&mut cmd);
        match code {
            75 => assert!(err.is_empty() && !ran.exists(), "limit {limit}: {err}"),
            125 => assert_own_failure((code, String::new(), err), &ran, "Too many open files"),
            _ => panic!("limit {limit}: status {code}: {err}"),
        }
    }
    held.kill().unwrap();
    held.wait().unwrap();
}

#[test]
fn lock_directory_removed_while_idle() {
    let env = Env::new();
    let ran = env.path("ran");
    assert_eq!(
        run(env.qsem().args(["--id", "x"]).args(job(&ran, "0"))).0,
        0
    );
    std::fs::remove_dir_all(&env.locks).unwrap();
    std::fs::remove_file(&ran).unwrap();
    let (code, _, err) = run(env.qsem().args(["--id", "x"]).args(job(&ran, "0")));
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(ran.exists());
    // Only the id directory, then only its queue.
    for part in ["x", "x/queue"] {
        std::fs::remove_dir_all(env.locks.join(part)).unwrap();
        let (code, _, err) = run(env.qsem().args(["--id", "x"]).args(job(&ran, "0")));
        assert_eq!((code, err.as_str()), (0, ""), "{part}");
    }
}

/// A FIFO, a symlink, a directory or a device where a slot file, the mutex or
/// an id directory should be: refused at once, never followed, never a hang.
#[test]
fn odd_files_where_slot_files_should_be() {
    let env = Env::new();
    let ran = env.path("ran");
    let target = env.path("target");
    std::fs::write(&target, "precious").unwrap();
    let mkfifo = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    type Plant<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Plant, &str)> = vec![
        ("1", Box::new(mkfifo), "not a regular file"),
        ("2", Box::new(mkfifo), "not a regular file"),
        ("queue/lock", Box::new(mkfifo), "not a regular file"),
        (
            "1",
            Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
            "symbolic link",
        ),
        (
            "1",
            Box::new(|p: &Path| std::os::unix::fs::symlink(env.path("target"), p).unwrap()),
            "symbolic link",
        ),
        (
            "queue/lock",
            Box::new(|p: &Path| std::os::unix::fs::symlink(env.path("target"), p).unwrap()),
            "symbolic link",
        ),
        (
            "1",
            Box::new(|p: &Path| std::fs::create_dir(p).unwrap()),
            "not a regular file",
        ),
    ];
    for (n, (name, plant, what)) in cases.iter().enumerate() {
        let id = format!("odd{n}");
        // A taker probes every slot file, so even slot 2 is looked at.
        std::fs::create_dir_all(env.locks.join(&id).join("queue")).unwrap();
        let path = env.locks.join(&id).join(name);
        plant(&path);
        let mut cmd = env.qsem();
        cmd.args(["--id", &id, "-j2", "--wait", "1s"])
            .args(job(&ran, "0"));
        let (code, _, err) = run_bounded(&mut cmd);
        assert_own_failure((code, String::new(), err.clone()), &ran, what);
        assert!(err.contains(&path.display().to_string()), "{err}");
        // --status refuses it as well, without hanging.
        let (code, _, err) = run_bounded(env.qsem().args(["--status", "--id", &id]));
        assert!(code == 125 || code == 0, "{err}");
        if std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_fifo()
        {
            assert!(
                std::fs::symlink_metadata(&path)
                    .unwrap()
                    .file_type()
                    .is_fifo()
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    // An id directory that is a symlink to elsewhere.
    std::os::unix::fs::symlink(env.path("elsewhere"), env.locks.join("linked")).unwrap();
    std::fs::create_dir(env.path("elsewhere")).unwrap();
    let result = run_bounded(env.qsem().args(["--id", "linked"]).args(job(&ran, "0")));
    assert_own_failure(result, &ran, "symbolic link");
    assert!(eventually(SOON, || std::fs::read_dir(
        env.path("elsewhere")
    )
    .unwrap()
    .next()
    .is_none()));
}

/// The lock directory removed (rm -rf, a tmp cleaner) while a job holds a slot
/// and another waits. The holder's lock lives on in the removed file, where
/// nobody can see it; so the holder puts its slot back within about a second,
/// and the waiter queues again in the new directory. Only a newcomer in that
/// first second can be admitted beside the running job (see the manual).
#[test]
fn lock_directory_removed_while_a_job_holds_a_slot() {
    let env = Env::new();
    let (held, waited) = (env.path("held"), env.path("waited"));
    let holder = env
        .qsem()
        .args(["--id", "x", "-j1", "--", "sh", "-c"])
        .arg(format!(
            "touch '{}'; sleep 4; touch '{}.done'",
            held.display(),
            held.display()
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_for_file(&held, SOON));
    let waiter = env
        .qsem()
        .args(["--id", "x", "-j1", "--wait", "30s", "--", "sh", "-c"])
        .arg(format!(
            "test -e '{}.done' && touch '{}'",
            held.display(),
            waited.display()
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = || {
        let (_, out, _) = run(env.qsem().args(["--status", "--id", "x"]));
        out.contains("1 waiting")
    };
    assert!(eventually(SOON, waiting));
    std::fs::remove_dir_all(&env.locks).unwrap();
    // The slot comes back (the holder's guard re-creates it): wait for that
    // state, then a newcomer finds it held.
    let held_again = || {
        let (_, out, _) = run(env.qsem().args(["--status", "--id", "x"]));
        out.contains("1 held")
    };
    assert!(eventually(SOON, held_again));
    let (code, _, err) = run(env
        .qsem()
        .args(["--id", "x", "-j1", "--wait", "0", "-E", "75", "true"]));
    assert_eq!((code, err.as_str()), (75, ""));
    // The waiter runs only after the holder's job has ended.
    let out = holder.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("removed") && err.lines().count() == 1, "{err}");
    let out = waiter.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(waited.exists(), "the waiter ran beside the holder");
    // And nothing is left held.
    let (code, _, _) = run(env
        .qsem()
        .args(["--id", "x", "--wait", "0", "-E", "75", "true"]));
    assert_eq!(code, 0);
}

/// A lock directory given through a symlink (~/.local/state on another disk)
/// works, and errors inside it are reported as themselves.
#[test]
fn a_lock_directory_reached_through_a_symlink() {
    let env = Env::new();
    let real = env.path("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let link = env.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let q = |id: &str| {
        let mut c = env.qsem();
        c.arg("--dir")
            .arg(&link)
            .args(["--id", id, "--wait", "1s", "true"]);
        c
    };
    assert_eq!(
        run_bounded(&mut q("fine")),
        (0, String::new(), String::new())
    );
    std::os::unix::fs::symlink("/etc", real.join("evil")).unwrap();
    let (code, _, err) = run_bounded(&mut q("evil"));
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
}

/// A background job that fails on a full disk is still counted by the next
/// --wait-all (issue 10): its outcome is recorded by a rename, which needs
/// no free block.
#[test]
fn a_background_failure_on_a_full_disk_is_counted() {
    let env = Env::new();
    let Some(fs) = Tmpfs::mount(&env, "fullbg", "size=64k") else {
        return;
    };
    let locks = fs.path.join("locks");
    let q = || {
        let mut c = env.qsem();
        c.arg("--dir").arg(&locks).args(["--id", "bg"]);
        c
    };
    // The id's directories exist before the disk fills up.
    assert_eq!(run(q().arg("true")).0, 0);
    fs.fill();
    let started = env.path("started");
    let launched = q()
        .args(["--bg", "--", "sh", "-c"])
        .arg(format!("touch '{}'; exit 3", started.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(launched.success());
    assert!(wait_for_file(&started, SOON));
    let (code, _, err) = run_bounded(q().args(["--wait-all", "--wait", "20s"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1 background job failed"), "{err}");
}
