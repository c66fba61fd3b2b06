//! The one way qsem starts a command, and the one way it passes a signal on.
//!
//! Every command, in every mode, is started by std's `Command`: its program
//! found beforehand (`command.rs`), qsem's variables added (`QSEM_ID`,
//! `QSEM_SLOT`, `QSEM_JOBS`, and `QSEM_FENCE` where the engine has one), the
//! slot's descriptor inherited unless `-o`. A signal handler is the parent's
//! code: exec resets caught signals to their default, and std gives the
//! child the default SIGPIPE and an empty signal mask.
//!
//! Where the command runs decides how signals reach it. In a terminal's
//! foreground process group it stays in qsem's group, so that it can read the
//! terminal; a signal the kernel sent to the whole group (Ctrl-C, Ctrl-\,
//! hang-up: `si_code` says so, see `signals.rs`) has then reached it already
//! and is not sent again. Elsewhere (cron, scripts, `--bg`) it gets a process
//! group of its own, and every signal is passed to that whole group, so that
//! what the command started hears it too.

use crate::command::Command;
use crate::config::Config;
use crate::exit::Exit;
use crate::semaphore::Slot;
use crate::signals::Received;
use rustix::process::{Pid, Signal};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

/// Where a started command's signals go.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pid: Pid,
    /// The command leads a process group of its own.
    own_group: bool,
}

impl Target {
    pub fn new(pid: u32, own_group: bool) -> Option<Target> {
        let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
        Some(Target { pid, own_group })
    }

    /// Sends `signo` to the command's group (or to it alone, if it shares
    /// qsem's group, or its group is gone). Errors mean it has ended.
    pub fn send(&self, signo: i32) {
        let Some(sig) = Signal::from_named_raw(signo) else {
            return;
        };
        if !self.own_group || rustix::process::kill_process_group(self.pid, sig).is_err() {
            let _ = rustix::process::kill_process(self.pid, sig);
        }
    }

    /// Passes `r` on unless the command has had it already (see above).
    pub fn pass_on(&self, r: Received) {
        if forwards(r, self.own_group) {
            self.send(r.signo);
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get().unsigned_abs()
    }
}

/// Whether a signal qsem received must be passed to the command. In a
/// terminal's foreground group (not `own_group`), a signal the kernel sent to
/// the whole group has reached the command already.
pub fn forwards(r: Received, own_group: bool) -> bool {
    r.signo != libc::SIGCHLD && (own_group || !r.from_kernel)
}

/// Whether a command started now gets a process group of its own: yes,
/// unless qsem is in the foreground process group of its terminal.
pub fn own_group() -> bool {
    let Ok(tty) = std::fs::File::open("/dev/tty") else {
        return true;
    };
    !rustix::termios::tcgetpgrp(&tty).is_ok_and(|pgrp| pgrp == rustix::process::getpgrp())
}

/// The variables that tell the command its id, slot and limit (and, where
/// the engine has one, its fencing token).
fn job_env(cfg: &Config, slot: Option<&dyn Slot>) -> Vec<(&'static str, OsString)> {
    let mut env = vec![
        ("QSEM_ID", OsStr::from_bytes(cfg.id.as_bytes()).to_owned()),
        (
            "QSEM_SLOT",
            slot.map_or(0, |s| s.number()).to_string().into(),
        ),
        ("QSEM_JOBS", cfg.jobs.to_string().into()),
    ];
    let fence = slot.and_then(|s| s.fence());
    env.extend(fence.map(|f| ("QSEM_FENCE", f.to_string().into())));
    env
}

/// Starts `program` (found by [`Command::resolve`]) with qsem's environment,
/// holding `slot` unless `-o`; `adjust` adds what a caller needs (`--each`:
/// the item and pipes).
///
/// The slot's descriptor is close-on-exec like every other; it is made
/// inheritable for the time of the spawn only. Spawns never overlap (only
/// qsem's main thread starts processes), so no other child can catch it.
pub fn spawn(
    cfg: &Config,
    cmd: &Command,
    program: &Path,
    slot: Option<&dyn Slot>,
    own_group: bool,
    adjust: impl FnOnce(&mut std::process::Command),
) -> io::Result<std::process::Child> {
    let mut child = std::process::Command::new(program);
    child
        .arg0(&cmd.program)
        .args(&cmd.args)
        // A fence inherited from an outer job is not this job's.
        .env_remove("QSEM_FENCE")
        .envs(job_env(cfg, slot));
    adjust(&mut child);
    if own_group {
        child.process_group(0);
    }
    let inherit = slot.filter(|_| !cfg.close).and_then(|s| s.inheritable());
    if let Some(fd) = inherit {
        set_cloexec(fd, false)?;
    }
    let started = child.spawn();
    if let Some(fd) = inherit {
        set_cloexec(fd, true)?;
    }
    started
}

fn set_cloexec(fd: std::os::fd::BorrowedFd, on: bool) -> io::Result<()> {
    let flags = if on {
        rustix::io::FdFlags::CLOEXEC
    } else {
        rustix::io::FdFlags::empty()
    };
    Ok(rustix::io::fcntl_setfd(fd, flags)?)
}

/// The status and the reason for a command that could not be started:
/// 127 if it is gone, 126 for everything else (permissions, a bad format).
pub fn spawn_failure(program: &OsStr, e: &io::Error) -> (Exit, String) {
    let exit = match e.kind() {
        io::ErrorKind::NotFound => Exit::NOT_FOUND,
        _ => Exit::NOT_EXECUTABLE,
    };
    (exit, format!("{}: {e}", program.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_signals_are_not_sent_twice() {
        let r = |signo, from_kernel| Received { signo, from_kernel };
        // In the terminal's foreground group: the terminal reached the command.
        assert!(!forwards(r(libc::SIGINT, true), false));
        assert!(forwards(r(libc::SIGINT, false), false));
        assert!(forwards(r(libc::SIGTERM, false), false));
        // In a group of its own, only qsem can pass signals on.
        assert!(forwards(r(libc::SIGINT, true), true));
        assert!(forwards(r(libc::SIGHUP, false), true));
        assert!(!forwards(r(libc::SIGCHLD, false), true));
    }

    #[test]
    fn spawn_failures() {
        let gone = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(spawn_failure(OsStr::new("x"), &gone).0, Exit::NOT_FOUND);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let (exit, why) = spawn_failure(OsStr::new("x"), &denied);
        assert_eq!(exit, Exit::NOT_EXECUTABLE);
        assert!(why.starts_with("x: "), "{why}");
    }
}
