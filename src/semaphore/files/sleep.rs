//! How a waiter sleeps: on inotify (slot files closed, a ticket released),
//! on helper threads blocked in `flock` on the tickets it follows, on the
//! looks scheduled after a wake-up ([`Relook`]), on its signal pipe and its
//! deadline — all through one `Signals::wait`, never in a polling loop.
//!
//! Closing an inotify instance waits for the kernel's fsnotify mark reaper
//! (an SRCU grace period, several milliseconds). So an instance this process
//! waited with is not closed when its slot is released: it is kept
//! ([`Spare`]) for the next wait of the same process (`--each` waits once per
//! item), and closed only when the process exits, after its slot is gone.

use crate::signals::{self, Received, Signals};
use crate::sys::{self, Inotify};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a waiter re-checks when no inotify instance can be had.
pub const FALLBACK_POLL: Duration = Duration::from_millis(20);

/// Why a wait ended.
pub(super) enum Woke {
    /// Something changed: look again.
    Changed,
    /// A scheduled look came due (see [`Relook`]); nothing was heard.
    Due,
    TimedOut,
    Signal(Received),
}

/// Sleeps until one of `fds` is readable, `look_at` comes, a stop signal
/// arrives, or the deadline passes. With `fallback` (nothing to watch could
/// be had), looks again every [`FALLBACK_POLL`] as well.
pub(super) fn sleep_on(
    fds: &[BorrowedFd],
    fallback: bool,
    look_at: Option<Instant>,
    signals: &mut Signals,
    deadline: Option<Instant>,
) -> Result<Woke> {
    let look_at = match fallback {
        true => {
            let at = Instant::now() + FALLBACK_POLL;
            Some(look_at.map_or(at, |l| l.min(at)))
        }
        false => look_at,
    };
    let until = deadline.into_iter().chain(look_at).min();
    Ok(match signals.wait(fds, until)? {
        signals::Wake::Signal(r) => Woke::Signal(r),
        signals::Wake::Ready(_) => Woke::Changed,
        signals::Wake::Timeout if deadline.is_some_and(|d| Instant::now() >= d) => Woke::TimedOut,
        signals::Wake::Timeout => Woke::Due,
    })
}

/// Looks again shortly after each wake-up, because a close event can come
/// before the lock it releases is gone.
///
/// The kernel reports the last close of a file (`IN_CLOSE_WRITE`) a moment
/// *before* it drops the file's `flock`: `__fput` calls `fsnotify_close`
/// before `locks_remove_file`. A waiter woken by the event can look in
/// between, find the slot still held, and sleep; and a release whose event
/// fell just before a watch was set can drop its lock just after the look
/// that followed the watch. Either way no further event comes, and without
/// a second look the waiter would sleep on beside a free slot. (With other
/// inotify watchers on the directory slowing the event's delivery, 19 of
/// 5,000 woken waiters on this machine found the lock still there.) The lock
/// is on its way out in both cases, so after every wake-up and every new
/// watch, a waiter that must still wait looks again after 1, 2, 4 … 2048 ms,
/// and then sleeps until the next event: a few looks in the four seconds
/// after something happened, none while nothing does.
pub(super) struct Relook {
    /// When the next look is due, and how many came before it.
    next: Option<(Instant, u32)>,
}

impl Relook {
    /// Looks after the first this many ms, doubling, this many times.
    const FIRST_MS: u64 = 1;
    const LOOKS: u32 = 12;

    pub fn new() -> Relook {
        let mut r = Relook { next: None };
        r.restart();
        r
    }

    /// How long before look `n` of a series (counting from 0), if there is one.
    fn gap(n: u32) -> Option<Duration> {
        (n < Self::LOOKS).then(|| Duration::from_millis(Self::FIRST_MS << n))
    }

    fn schedule(&mut self, n: u32) {
        self.next = Self::gap(n).map(|gap| (Instant::now() + gap, n));
    }

    /// Something happened: a new series of looks.
    pub fn restart(&mut self) {
        self.schedule(0);
    }

    /// After a wake: a new series if something was heard, the next look of
    /// the series if one came due.
    pub fn after(&mut self, woke: &Woke) {
        match woke {
            Woke::Changed => self.restart(),
            // (Without inotify, the fallback's looks come due too; they
            // do not start a series.)
            Woke::Due => {
                if let Some((_, n)) = self.next {
                    self.schedule(n + 1);
                }
            }
            Woke::TimedOut | Woke::Signal(_) => {}
        }
    }

    pub fn due(&self) -> Option<Instant> {
        self.next.map(|(at, _)| at)
    }
}

/// The tickets a waiter follows, each by a helper thread blocked in a
/// shared `flock` on it, which writes to its pipe once the ticket's owner
/// has let go (taken a slot, given up, died). A thread for a ticket no
/// longer followed is left to end on its own when that ticket is released.
#[derive(Default)]
pub(super) struct Followed {
    threads: HashMap<OsString, OwnedFd>,
}

impl Followed {
    /// Follows exactly `tickets` (name, open ticket) from now on.
    pub fn set(&mut self, tickets: Vec<(OsString, File)>) -> Result<()> {
        let keep: Vec<&OsString> = tickets.iter().map(|(n, _)| n).collect();
        self.threads.retain(|name, _| keep.contains(&name));
        for (name, fd) in tickets {
            if self.threads.contains_key(&name) {
                continue;
            }
            let (read, write) = sys::pipe().context("cannot create a pipe")?;
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let _ = sys::lock_blocking(&fd, true);
                    drop(fd);
                    // The pipe only needs to become readable; a full or closed pipe is fine.
                    let _ = std::io::Write::write(&mut File::from(write), b"x");
                })
                .context("cannot start a thread")?;
            self.threads.insert(name, read);
        }
        Ok(())
    }

    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.threads.values().map(|fd| fd.as_fd())
    }
}

/// This process's spare inotify instance, see the module's opening.
static SPARE: Mutex<Option<Inotify>> = Mutex::new(None);

/// An inotify instance with the watches this waiter set on it, put back as
/// this process's spare when dropped.
#[derive(Default)]
pub(super) struct Spare {
    held: Option<(Inotify, Vec<i32>)>,
}

impl Spare {
    /// The spare instance, or a new one; `false` if none can be had.
    pub fn get(&mut self) -> bool {
        if self.held.is_none() {
            let spare = SPARE.lock().map(|mut s| s.take()).unwrap_or(None);
            self.held = spare
                .or_else(|| Inotify::new().ok())
                .map(|i| (i, Vec::new()));
        }
        self.held.is_some()
    }

    /// Watches `path` for `mask`; the watch descriptor, if set.
    pub fn watch(&mut self, path: &std::path::Path, mask: u32) -> Option<i32> {
        let (ino, wds) = self.held.as_mut()?;
        let wd = ino.watch(path, mask).ok()?;
        wds.push(wd);
        Some(wd)
    }

    pub fn unwatch(&mut self, wd: i32) {
        if let Some((ino, wds)) = &mut self.held {
            ino.unwatch(wd);
            wds.retain(|&w| w != wd);
        }
    }

    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.held.as_ref().map(|(ino, _)| ino.as_fd())
    }

    /// Discards queued events; whether there were any.
    pub fn drain(&self) -> bool {
        let Some((ino, _)) = &self.held else {
            return false;
        };
        let mut buf = [0u8; 4096];
        let mut heard = false;
        while rustix::io::read(ino.as_fd(), &mut buf).is_ok_and(|n| n > 0) {
            heard = true;
        }
        heard
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        let Some((ino, wds)) = self.held.take() else {
            return;
        };
        // Removing a watch is cheap (its mark is reaped later, by a worker).
        for wd in wds {
            ino.unwatch(wd);
        }
        ino.drain();
        if let Ok(mut spare) = SPARE.lock()
            && spare.is_none()
        {
            *spare = Some(ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relooks_double_then_stop_and_start_again_on_an_event() {
        let gaps: Vec<u128> = (0..)
            .map_while(Relook::gap)
            .map(|g| g.as_millis())
            .collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]);
        let mut r = Relook::new();
        let mut looks = 0;
        while r.due().is_some() {
            r.after(&Woke::Due);
            looks += 1;
        }
        assert_eq!(looks, gaps.len());
        r.after(&Woke::TimedOut);
        assert!(r.due().is_none());
        r.after(&Woke::Changed);
        assert_eq!(r.next.map(|(_, n)| n), Some(0));
    }
}
