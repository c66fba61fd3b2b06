//! Several users (issue 5, SPEC §4): a setgid, group-writable lock directory is
//! a semaphore shared by its group. Two members share its slots, and the files
//! they create are group-readable and -writable; a user outside the group gets
//! one clear line and 125.
//!
//! The test creates what it needs when run as root (as CI does): the group
//! `qsemtg`, its members `qsemta` and `qsemtb`, and the outsider `qsemtc`, all
//! system users without a home or a login shell. It leaves them in place
//! (creating them is idempotent). Not root: it says loudly that it is skipped;
//! root that cannot create them is a failure.

mod common;
use common::{Env, SOON, run, wait_for_file};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const GROUP: &str = "qsemtg";
const MEMBERS: [&str; 2] = ["qsemta", "qsemtb"];
const OUTSIDER: &str = "qsemtc";

fn sh(cmd: &mut Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}

/// Creates the group and the users if missing; false if that cannot be done.
fn ensure_users() -> bool {
    if !sh(Command::new("getent").args(["group", GROUP]))
        && !sh(Command::new("groupadd").args(["--system", GROUP]))
    {
        return false;
    }
    for (user, groups) in [
        (MEMBERS[0], Some(GROUP)),
        (MEMBERS[1], Some(GROUP)),
        (OUTSIDER, None),
    ] {
        if sh(Command::new("id")
            .arg(user)
            .stdout(std::process::Stdio::null()))
        {
            continue;
        }
        let mut add = Command::new("useradd");
        add.args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ]);
        if let Some(g) = groups {
            add.args(["--groups", g]);
        }
        if !sh(add.arg(user)) {
            return false;
        }
    }
    true
}

fn gid_of(group: &str) -> u32 {
    let out = Command::new("getent")
        .args(["group", group])
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    line.split(':').nth(2).unwrap().trim().parse().unwrap()
}

/// `qsem` as `user`, from a copy of the binary that every user can run.
fn qsem_as(user: &str, bin: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--"])
        .arg(bin)
        .arg("--dir")
        .arg(dir)
        .env_remove("QSEM_DIR")
        .env_remove("QSEM_BACKEND");
    cmd
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_group_shares_a_lock_directory() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        common::skipped("several users needs root to create users (CI runs as root)");
        return;
    }
    assert!(
        ensure_users(),
        "root cannot create the test group and users (groupadd, useradd)"
    );
    let env = Env::new();
    chmod(&env.root, 0o755);
    let bin: PathBuf = env.path("qsem");
    std::fs::copy(env!("CARGO_BIN_EXE_qsem"), &bin).unwrap();
    chmod(&bin, 0o755);
    let marks = env.path("marks");
    std::fs::create_dir(&marks).unwrap();
    chmod(&marks, 0o1777);
    // The shared directory: root's, group qsemtg, setgid and group-writable.
    let shared = env.path("shared");
    std::fs::create_dir(&shared).unwrap();
    let gid = gid_of(GROUP);
    std::os::unix::fs::chown(&shared, Some(0), Some(gid)).unwrap();
    chmod(&shared, 0o2770);

    // Member a holds slot 1 of -j2...
    let held = marks.join("a");
    let mut a = qsem_as(MEMBERS[0], &bin, &shared)
        .args(["--id", "team", "-j2", "--", "sh", "-c"])
        .arg(format!("touch {}; sleep 3", held.display()))
        .spawn()
        .unwrap();
    assert!(wait_for_file(&held, SOON));
    // ...member b takes slot 2 beside it, and a -j1 of b finds the id full.
    let (code, out, err) = run(qsem_as(MEMBERS[1], &bin, &shared)
        .args(["--id", "team", "-j2", "--wait", "5s", "--", "sh", "-c"])
        .arg("echo $QSEM_SLOT"));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "2\n", ""));
    let (code, _, err) = run(qsem_as(MEMBERS[1], &bin, &shared)
        .args(["--id", "team", "-j1", "--wait", "0", "-E", "75", "true"]));
    assert_eq!((code, err.as_str()), (75, ""));
    // b sees a's job in --status.
    let (code, out, _) = run(qsem_as(MEMBERS[1], &bin, &shared).args(["--status", "--id", "team"]));
    assert_eq!(code, 0);
    assert!(out.contains("1 held"), "{out}");

    // Files are the group's, readable and writable by it; directories setgid.
    let team = shared.join("team");
    for entry in [team.clone(), team.join("queue")] {
        let m = std::fs::metadata(&entry).unwrap();
        assert_eq!(m.gid(), gid, "{entry:?}");
        assert_eq!(m.mode() & 0o7777, 0o2770, "{entry:?}");
    }
    for entry in [
        team.join("1"),
        team.join("2"),
        team.join("queue/lock"),
        team.join("queue/census"),
    ] {
        let m = std::fs::metadata(&entry).unwrap();
        assert_eq!(m.gid(), gid, "{entry:?}");
        assert_eq!(m.mode() & 0o777, 0o660, "{entry:?}");
    }

    // A user outside the group: one clear line, 125, nothing run.
    let ran = marks.join("c");
    let (code, _, err) = run(qsem_as(OUTSIDER, &bin, &shared)
        .args(["--id", "team", "-j9", "--wait", "0", "--", "touch"])
        .arg(&ran));
    assert_eq!(code, 125, "{err}");
    assert!(
        err.starts_with("qsem: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(err.contains(&shared.display().to_string()), "{err}");
    assert!(!ran.exists());
    assert!(a.wait().unwrap().success());

    // Once a is done, b can take slot 1 of a's file: a member's files are usable.
    let (code, out, err) = run(qsem_as(MEMBERS[1], &bin, &shared)
        .args(["--id", "team", "-j1", "--wait", "5s", "--", "sh", "-c"])
        .arg("echo $QSEM_SLOT"));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "1\n", ""));

    // A failed background job of a is counted by b's --wait-all, whatever
    // a's umask (022) would make of the files qsem creates for it.
    let mut bg = qsem_as(MEMBERS[0], &bin, &shared);
    bg.args(["--id", "team", "--bg", "--", "sh", "-c", "exit 3"]);
    // SAFETY: umask is async-signal-safe; nothing else runs in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut bg, || {
            libc::umask(0o022);
            Ok(())
        });
    }
    let (code, _, err) = run(&mut bg);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(qsem_as(MEMBERS[1], &bin, &shared).args([
        "--id",
        "team",
        "--wait-all",
        "--wait",
        "20s",
    ]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1 background job failed"), "{err}");
}
