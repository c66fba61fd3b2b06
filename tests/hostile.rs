//! Hostile input (issue 5): odd ids work and stay inside the lock directory;
//! bad numbers and durations exit 2 with a message naming them; nothing panics.

mod common;
use common::Env;
use std::os::fd::{FromRawFd, OwnedFd};
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
