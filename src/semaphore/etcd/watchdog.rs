//! With `--on-lost=kill`: a small process apart from qsem that stops the job
//! if qsem stops confirming its lease, so that the job ends before the
//! cluster can give the slot away even when qsem itself cannot act: stopped
//! (SIGSTOP), starved, or killed with `kill -9`.
//!
//! qsem's lease thread sends it, after every confirmed renewal, the instant
//! by which the next must come (CLOCK_MONOTONIC nanoseconds, 8 bytes; 0
//! means "the slot was given back: stand down"). If the instant passes, or
//! the pipe reaches end-of-file without a stand-down (qsem died) and then
//! the instant passes, it sends the job's process group SIGTERM, and SIGKILL
//! [`LOST_GRACE`] later, unless the job has ended (it watches a pidfd of
//! the job, which also keeps a reused pid from being signalled). The
//! instant is one second after the lease thread's own declaration of the
//! loss, so that while qsem is alive the runner's SIGTERM comes first.
//!
//! It is forked twice (so that init reaps it, not qsem) and starts a session
//! of its own (so that signals for qsem's group pass it by); after fork it
//! makes system calls only, allocating nothing, as a child of a threaded
//! process must.

use crate::semaphore::LOST_GRACE;
use anyhow::{Context, Result};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::process::{Pid, PidfdFlags, Signal};
use rustix::time::{ClockId, Timespec, clock_gettime};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long after the lease thread declares a loss the watchdog acts.
pub const LAG: Duration = Duration::from_secs(1);
/// The message that means "stand down".
const STAND_DOWN: i64 = 0;

/// The write end of the watchdog's pipe.
pub struct Watchdog {
    tell: OwnedFd,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `Instant` reads on Linux.
fn now_ns() -> i64 {
    let t = clock_gettime(ClockId::Monotonic);
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

/// An `Instant` (in the past or now) on the watchdog's clock, plus `after`.
pub fn at(instant: Instant, after: Duration) -> i64 {
    now_ns() - instant.elapsed().as_nanos() as i64 + after.as_nanos() as i64
}

impl Watchdog {
    /// Starts a watchdog for the job `pid`, first due at `due` (see [`at`]);
    /// `message` is the one line it writes to stderr if it acts.
    pub fn start(pid: u32, due: i64, message: String) -> Result<Watchdog> {
        let job = Pid::from_raw(pid as i32).context("no job pid for the watchdog")?;
        let pidfd = rustix::process::pidfd_open(job, PidfdFlags::empty())
            .with_context(|| format!("cannot open a pidfd of the job {pid}"))?;
        let (read, tell) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .context("cannot create the watchdog's pipe")?;
        let message = message.into_bytes();
        // SAFETY: fork(2) from a threaded process: the child runs only
        // system calls (rustix's, which do not allocate or lock) and ends in
        // _exit, as POSIX requires of such a child. rustix has no fork that
        // keeps libc's own state consistent, so libc's is used.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()).context("cannot fork the watchdog"),
            0 => {
                // SAFETY: as above; the intermediate child only forks again.
                if unsafe { libc::fork() } == 0 {
                    let _ = rustix::process::setsid();
                    close_others(&[read.as_raw_fd(), pidfd.as_raw_fd()]);
                    watch(&read, &pidfd, job, due, &message);
                }
                // SAFETY: _exit skips atexit handlers and destructors, which
                // belong to qsem.
                unsafe { libc::_exit(0) }
            }
            child => {
                let _ = rustix::process::waitpid(
                    Pid::from_raw(child),
                    rustix::process::WaitOptions::empty(),
                );
                Ok(Watchdog { tell })
            }
        }
    }

    /// The next renewal is due by `due` (see [`at`]).
    pub fn extend(&self, due: i64) {
        let _ = rustix::io::write(&self.tell, &due.to_le_bytes());
    }

    /// The slot is given back: the watchdog ends without acting.
    pub fn stand_down(self) {
        self.extend(STAND_DOWN);
    }
}

/// Closes every descriptor above stderr but `keep`.
fn close_others(keep: &[i32]) {
    let mut from = 3u32;
    let mut keep: [i32; 2] = [keep[0], keep[1]];
    keep.sort_unstable();
    for fd in keep.into_iter().chain([i32::MAX]) {
        let to = fd as u32;
        if to > from {
            // SAFETY: a plain system call; the descriptors closed belong to
            // this new process's copy of the table.
            unsafe { libc::close_range(from, to - 1, 0) };
        }
        from = to.saturating_add(1);
    }
}

/// The watchdog's whole life. No allocation from here on.
fn watch(read: &OwnedFd, pidfd: &OwnedFd, job: Pid, mut due: i64, message: &[u8]) -> ! {
    let mut pipe = Some(read);
    while let Some(ready) = sleep(pidfd, pipe, due) {
        let mut buf = [0u8; 64];
        match rustix::io::read(ready, &mut buf) {
            // qsem is gone: the last instant it sent still holds.
            Ok(0) | Err(_) => pipe = None,
            // Each message is one 8-byte write, which a pipe keeps whole.
            Ok(n) if n >= 8 => {
                let last = &buf[(n / 8 - 1) * 8..n / 8 * 8];
                due = i64::from_le_bytes(last.try_into().unwrap_or([0; 8]));
                if due == STAND_DOWN {
                    exit();
                }
            }
            Ok(_) => {}
        }
    }
    let _ = rustix::io::write(std::io::stderr(), message);
    stop(pidfd, job, Signal::TERM);
    sleep(pidfd, None, now_ns() + LOST_GRACE.as_nanos() as i64);
    stop(pidfd, job, Signal::KILL);
    exit()
}

/// Sleeps until `until` (then `None`) or until `pipe` is readable (then
/// the pipe); ends the watchdog if the job ends meanwhile.
fn sleep<'a>(pidfd: &OwnedFd, pipe: Option<&'a OwnedFd>, until: i64) -> Option<&'a OwnedFd> {
    loop {
        let left = until - now_ns();
        if left <= 0 {
            return None;
        }
        let timeout = Timespec {
            tv_sec: left / 1_000_000_000,
            tv_nsec: left % 1_000_000_000,
        };
        let mut fds = [
            PollFd::new(pidfd, PollFlags::IN),
            PollFd::new(pidfd, PollFlags::IN),
        ];
        let watched = match pipe {
            Some(p) => {
                fds[1] = PollFd::new(p, PollFlags::IN);
                2
            }
            None => 1,
        };
        let _ = poll(&mut fds[..watched], Some(&timeout));
        if !fds[0].revents().is_empty() {
            exit();
        }
        if watched == 2 && !fds[1].revents().is_empty() {
            return pipe;
        }
    }
}

/// Signals the job's process group, or the job alone if it leads none.
fn stop(pidfd: &OwnedFd, job: Pid, signal: Signal) {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let ended = poll(&mut fds, Some(&Timespec::default())).is_ok_and(|n| n > 0);
    if ended {
        return;
    }
    if rustix::process::kill_process_group(job, signal).is_err() {
        let _ = rustix::process::pidfd_send_signal(pidfd.as_fd(), signal);
    }
}

fn exit() -> ! {
    // SAFETY: see `Watchdog::start`.
    unsafe { libc::_exit(0) }
}
