//! Hostile input (issue 5): odd ids work and stay inside the lock directory;
//! bad numbers and durations exit 2 with a message naming them; nothing panics.

mod common;
use common::{Env, run};
use std::ffi::OsStr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;

/// A pipe whose reading end is already closed: writing to it fails (EPIPE).
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are fresh and ours.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

#[test]
fn a_closed_stderr_does_not_turn_an_error_into_a_panic() {
    let env = Env::new();
    for args in [
        &["-j", "abc", "true"][..],
        &["--dir", "/proc/qsem-cannot-exist", "true"],
    ] {
        let status = env
            .qsem()
            .args(args)
            .stderr(closed_pipe())
            .status()
            .unwrap();
        let want = if args[0] == "-j" { 2 } else { 125 };
        assert_eq!(status.code(), Some(want), "{args:?}");
    }
}

/// Every directory entry under `dir`, recursively, as paths relative to it.
fn tree(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn odd_but_valid_ids_work_and_stay_inside_the_lock_directory() {
    let env = Env::new();
    let ids: [&[u8]; 9] = [
        b"a/b",
        b"/",
        b"..",
        b".",
        b"../../escape",
        b"a\x01\x1b[2J\nb\tc\x7f",
        b"\xff\xfe\x80not utf-8",
        b"%2F",
        &[b'/'; 255],
    ];
    for id in ids {
        let (code, out, err) = run(env.qsem().arg("--id").arg(OsStr::from_bytes(id)).args([
            "-j2",
            "--wait",
            "5s",
            "--",
            "sh",
            "-c",
            "printf %s \"$QSEM_ID\"",
        ]));
        assert_eq!((code, err.as_str()), (0, ""), "{id:?}");
        assert_eq!(
            out.as_bytes(),
            String::from_utf8_lossy(id).as_bytes(),
            "{id:?}"
        );
    }
    // Nothing was created outside the lock directory...
    let mut outside: Vec<_> = std::fs::read_dir(&env.root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    outside.sort();
    assert_eq!(outside, ["locks"]);
    // ...and inside it, no name is hidden, `.`/`..`-like, or too long.
    for p in tree(&env.locks) {
        // The journals' directory and its previous generation are hidden on
        // purpose; the names of the ids' journals in them are not.
        let p = p
            .strip_prefix(".history")
            .map_or(p.as_path(), |p| p.strip_prefix(".1").unwrap_or(p));
        for c in p.components() {
            let c = c.as_os_str().as_bytes();
            assert!(!c.starts_with(b".") && c.len() <= 255, "{p:?}");
        }
    }
    // --status shows the ids without raw control characters.
    let (code, out, _) = run(env.qsem().arg("--status"));
    assert_eq!(code, 0);
    assert!(
        !out.bytes().any(|b| b == 0x1b || b == 0x01 || b == 0x7f),
        "{out:?}"
    );
}

/// Runs qsem with `args` and asserts exit 2 and a message naming `needle`.
fn assert_usage(env: &Env, args: &[&OsStr], needle: &str) {
    let (code, out, err) = run(env.qsem().args(args).args(["--", "true"]));
    assert_eq!(code, 2, "{args:?}: {err}");
    assert_eq!(out, "", "{args:?}");
    assert!(err.starts_with("qsem: "), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn bad_ids_exit_2() {
    let env = Env::new();
    let long = vec![b'x'; 10_000];
    assert_usage(
        &env,
        &["--id".as_ref(), OsStr::from_bytes(&long)],
        "10000 bytes",
    );
    assert_usage(
        &env,
        &["--id".as_ref(), OsStr::from_bytes(&[b'y'; 256])],
        "256 bytes",
    );
    assert_usage(&env, &["--id".as_ref(), "".as_ref()], "empty");
    assert!(!env.locks.exists() || tree(&env.locks).is_empty());
}

#[test]
fn bad_numbers_exit_2_naming_the_value() {
    let env = Env::new();
    let cases: &[(&str, &str)] = &[
        ("99999999999999999999", "'99999999999999999999'"),
        ("18446744073709551617", "too large"),
        ("4294967297", "more than"),
        ("-99999999999999999999", "too large"),
        ("+99999999999999999999", "too large"),
        ("", "''"),
        (" ", "whole number"),
        ("nan", "'nan'"),
        ("inf", "'inf'"),
        ("-inf", "'-inf'"),
        ("1e400", "'1e400'"),
        ("1e3", "'1e3'"),
        ("0x10", "'0x10'"),
        ("0", "at least 1"),
        ("2.5", "'2.5'"),
        ("1000001", "more than"),
        ("--1", "'--1'"),
        ("١", "whole number"),
    ];
    for (j, needle) in cases {
        assert_usage(&env, &["-j".as_ref(), j.as_ref()], needle);
    }
}

#[test]
fn bad_durations_exit_2_naming_the_value() {
    let env = Env::new();
    let cases: &[(&str, &str)] = &[
        ("99999999999999999999999h", "too large"),
        ("18446744073709551616", "too large"),
        ("5124095576030432h", "too large"),
        ("-1", "negative"),
        ("-0.5s", "negative"),
        ("340282366920938463463374607431.9s", "too large"),
        ("", "empty"),
        ("nan", "'nan'"),
        ("inf", "'inf'"),
        ("-inf", "'-inf'"),
        ("1e400", "'1e400'"),
        ("1e-3", "'1e-3'"),
        ("1s2", "'1s2'"),
        ("1..5", "'1..5'"),
        ("0x10", "'0x10'"),
    ];
    for (w, needle) in cases {
        assert_usage(&env, &["--wait".as_ref(), w.as_ref()], needle);
    }
    for st in ["nan", "-inf", "1e400", ""] {
        assert_usage(&env, &["--st".as_ref(), st.as_ref()], &format!("'{st}'"));
    }
}

#[test]
fn bad_conflict_codes_exit_2_naming_the_value() {
    let env = Env::new();
    for e in [
        "-1",
        "256",
        "",
        "nan",
        "1e400",
        "99999999999999999999",
        "0x1",
    ] {
        assert_usage(
            &env,
            &["-E".as_ref(), e.as_ref(), "--wait".as_ref(), "0".as_ref()],
            &format!("'{e}'"),
        );
    }
}

#[test]
fn extreme_but_valid_values_work() {
    let env = Env::new();
    // The largest wait a Duration holds is, in practice, for ever: the slot is free.
    for w in ["18446744073709551615", "0", "0.0000000001", "1000000h"] {
        let (code, _, err) = run(env.qsem().args(["--wait", w, "--", "true"]));
        assert_eq!((code, err.as_str()), (0, ""), "--wait {w}");
    }
    for j in ["1000000", "-1", "-1000000", "+0", "0%", "100000%"] {
        let (code, _, err) = run(env.qsem().args(["-j", j, "--", "true"]));
        assert_eq!((code, err.as_str()), (0, ""), "-j {j}");
    }
    let (code, _, _) = run(env.qsem().args(["-E", "255", "--", "true"]));
    assert_eq!(code, 0);
}
