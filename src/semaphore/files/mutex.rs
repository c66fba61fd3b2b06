//! The per-id admission mutex (`<id>/queue/lock`): exclusive for a taker
//! counting and taking slots, shared for `--wait-all` counting them.
//!
//! It is held for microseconds, never while sleeping, but its holder can be
//! stopped (SIGSTOP, Ctrl-Z, a debugger) or stall inside it. Safety still
//! rests on it: while a stopped process holds it, nobody is admitted. What
//! must not follow is a hang, so nobody ever blocks on it unboundedly in the
//! thread that watches signals and deadlines: a taker first tries without
//! blocking, and only if that fails hands a blocking `flock` to a helper
//! thread while it waits on its signal pipe and deadline as everywhere else.
//! A waiter that gives up leaves the helper behind; should the lock come to
//! it later, it finds nobody to hand it to and releases it at once.
//! `--status` never waits for it at all (see `Files::status`).

use super::lockdir::{IdDir, LockDir};
use crate::signals::{self, Received, Signals};
use crate::sys::{self, Probe};
use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

const MUTEX: &str = "lock";

/// The mutex is waited for this long past the caller's deadline: another
/// taker holds it for microseconds (more on a loaded machine), and `--wait
/// 0` means one real attempt, not giving up because someone else was making
/// one; yet a deadline is still honoured to within 100 ms whoever holds it.
const SLACK: Duration = Duration::from_millis(90);

/// How a wait for the mutex ended.
pub(super) enum Locked {
    Got(File),
    TimedOut,
    Signal(Received),
}

impl IdDir {
    /// Opens the mutex file. Over NFS, flock is emulated with byte-range
    /// locks, and an exclusive one needs a descriptor open for writing.
    /// Locally any will do, so a file we may not write (another member's, a
    /// read-only filesystem) is still locked through a read-only one.
    fn open_mutex(&self, lock_dir: &LockDir, shared: bool) -> Result<File> {
        let path = self.queue_path.join(MUTEX);
        let open = |access| {
            let flags = access | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
            sys::open_at(
                self.queue.as_fd(),
                OsStr::new(MUTEX),
                flags,
                lock_dir.file_mode(),
            )
        };
        let fd = if shared {
            open(libc::O_RDONLY)
        } else {
            match open(libc::O_RDWR) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS)) => {
                    open(libc::O_RDONLY)
                }
                other => other,
            }
        }
        .map_err(|e| self.open_error(e, self.queue.as_fd(), OsStr::new(MUTEX), &path))?;
        let st = lock_dir.check_regular(&fd, &path)?;
        lock_dir.fix_mode(&fd, &st, &path)?;
        Ok(fd)
    }

    /// The mutex, if it can be had at once.
    pub fn try_mutex(&self, lock_dir: &LockDir, shared: bool) -> Result<Option<File>> {
        let fd = self.open_mutex(lock_dir, shared)?;
        let got = if shared {
            sys::probe_shared(&fd)
        } else {
            sys::try_lock_exclusive(&fd)
        };
        let path = || format!("cannot lock {}", self.queue_path.join(MUTEX).display());
        Ok((got.with_context(path)? == Probe::Taken).then_some(fd))
    }

    /// The mutex, waiting for it until [`SLACK`] past `deadline`, or a signal.
    pub fn mutex(
        &self,
        lock_dir: &LockDir,
        shared: bool,
        signals: &mut Signals,
        deadline: Option<Instant>,
    ) -> Result<Locked> {
        if let Some(fd) = self.try_mutex(lock_dir, shared)? {
            return Ok(Locked::Got(fd));
        }
        let fd = self.open_mutex(lock_dir, shared)?;
        let (read, write) = sys::pipe().context("cannot create a pipe")?;
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                // Nobody to hand it to (the waiter gave up): dropping it, in
                // the send's error, releases it.
                let _ = send.send(sys::lock_blocking(&fd, shared).map(|()| fd));
                let _ = std::io::Write::write(&mut File::from(write), b"x");
            })
            .context("cannot start a thread")?;
        let until = deadline.map(|d| d.max(Instant::now()) + SLACK);
        Ok(match signals.wait(&[read.as_fd()], until)? {
            signals::Wake::Signal(r) => Locked::Signal(r),
            signals::Wake::Timeout => Locked::TimedOut,
            signals::Wake::Ready(_) => {
                let got = receive
                    .recv()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the locking thread ended")));
                Locked::Got(got.with_context(|| {
                    format!("cannot lock {}", self.queue_path.join(MUTEX).display())
                })?)
            }
        })
    }
}
