//! Putting a held slot back when its file is removed or replaced from outside
//! (`rm -rf` of the lock directory, a tmp cleaner).
//!
//! A lock in a removed file lives on where no taker can see it, so without
//! this a newcomer would be admitted beside the running job. The kernel has
//! no cheap way to say "this file was unlinked": inotify would, but its
//! instances are limited per user (often to 128), and waiters need them more
//! than holders do — 500 holders cannot each have one. So the guard looks,
//! with one `stat`, on a schedule that backs off: [`FIRST_GAP`] after the
//! slot is taken, then after gaps growing fourfold up to [`LAST_GAP`] (looks
//! at 1, 5, 21 and 51 s, then every 30 s). The trade: an idle holder costs a
//! wake-up every 30 s, not two a second (500 idle holders: 0.03 CPU-s in
//! their first 10 s, nothing measurable once settled, bench/RESULTS.md), and
//! a removal is noticed within 1 s at the start of a job and within 30 s
//! late in a long one, during which a newcomer can be admitted beside the
//! job; the guard then says so.
//!
//! The guard runs in the caller's thread: its timer is the slot's
//! [`Slot::events`](super::super::Slot::events) descriptor, which the runner
//! polls beside its signal pipe; [`Guard::look`] turns what it finds into
//! [`SlotEvent`]s for the runner to print. It cannot act once qsem is killed.

use super::super::{Request, SlotEvent};
use super::lockdir::{LockDir, gone};
use super::slots::SlotFile;
use crate::id::Id;
use anyhow::Result;
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The gap before the first look.
pub(super) const FIRST_GAP: Duration = Duration::from_secs(1);
/// The longest gap between looks.
pub(super) const LAST_GAP: Duration = Duration::from_secs(30);
/// When the mutex is busy (a taker, or a stopped process), the next look.
const BUSY_GAP: Duration = Duration::from_millis(100);

/// The gap before look `n` (from 0).
fn gap(n: u32) -> Duration {
    (FIRST_GAP * (1u32 << (2 * n.min(4)))).min(LAST_GAP)
}

/// What a guard watches, and what it needs to take the slot back.
pub(super) struct Watch {
    pub lock_path: PathBuf,
    pub id: Id,
    pub jobs: u32,
    pub command: String,
    pub started: SystemTime,
    pub number: u32,
    pub path: PathBuf,
    pub dev: libc::dev_t,
    pub ino: libc::ino_t,
}

/// A held slot's guard: a timer and what to look at when it fires.
pub(super) struct Guard {
    timer: OwnedFd,
    looks: u32,
    watch: Watch,
    /// The slot taken back, held until the job ends.
    again: Option<Box<SlotFile>>,
    /// Said already that the slot cannot be put back.
    complained: bool,
}

impl Guard {
    pub fn new(watch: Watch) -> io::Result<Guard> {
        let timer = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        let guard = Guard {
            timer,
            looks: 0,
            watch,
            again: None,
            complained: false,
        };
        guard.arm(gap(0))?;
        Ok(guard)
    }

    fn arm(&self, after: Duration) -> io::Result<()> {
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let due = Itimerspec {
            it_interval: zero,
            it_value: Timespec {
                tv_sec: after.as_secs() as _,
                tv_nsec: after.subsec_nanos() as _,
            },
        };
        rustix::time::timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &due)?;
        Ok(())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.timer.as_fd()
    }

    /// Looks, if the timer fired; `pid` is the job's, for a new record.
    pub fn look(&mut self, pid: u32) -> Vec<SlotEvent> {
        let mut expirations = [0u8; 8];
        if rustix::io::read(&self.timer, &mut expirations).is_err() {
            return Vec::new(); // Not due yet.
        }
        let w = &self.watch;
        let mut events = Vec::new();
        let mut next = gap(self.looks + 1);
        if gone(&w.path, w.dev, w.ino) {
            match self.retake(pid) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => next = BUSY_GAP,
                Err(e) if !self.complained => {
                    self.complained = true;
                    events.push(SlotEvent::lost(format!(
                        "{} was removed while this job held it, and cannot be put back: {e:#}",
                        self.watch.path.display()
                    )));
                }
                Err(_) => {}
            }
        }
        self.looks += 1;
        // Without a timer the slot is simply no longer guarded.
        let _ = self.arm(next);
        events
    }

    /// Takes the watched slot back (its own number if free, else the lowest
    /// free one), re-creating the directories; `None` if the mutex (or the
    /// free slot) is busy: the next look tries again.
    fn retake(&mut self, pid: u32) -> Result<Option<SlotEvent>> {
        let w = &self.watch;
        let dir = LockDir::open(&w.lock_path, true)?;
        let id_dir = dir.id_dir(&w.id, true)?.expect("created");
        let Some(_mutex) = id_dir.try_mutex(&dir, false)? else {
            return Ok(None);
        };
        let req = Request {
            max_waiting: None,
            background: false,
            id: &w.id,
            jobs: w.jobs,
            deadline: None,
            command: &w.command,
        };
        let scan = id_dir.scan(&dir)?;
        let others = scan.held;
        let Some(mut slot) = id_dir.take_lowest(&dir, &req, scan, Some(w.number), None)? else {
            return Ok(None);
        };
        // The record is the job's, as before the removal.
        slot.record.started = w.started;
        slot.record.pid = pid;
        let _ = slot.write_record();
        let msg = if others >= w.jobs {
            format!(
                "{} was removed while this job held slot {}; meanwhile others took \
                 {others} slot{}, so the limit of {} is exceeded until this job ends",
                w.path.display(),
                w.number,
                if others == 1 { "" } else { "s" },
                w.jobs
            )
        } else {
            format!(
                "{} was removed while this job held slot {}; took slot {} again",
                w.path.display(),
                w.number,
                slot.number
            )
        };
        let st = crate::sys::fstat(slot.file.as_fd())?;
        self.watch.number = slot.number;
        self.watch.path.clone_from(&slot.path);
        (self.watch.dev, self.watch.ino) = (st.st_dev, st.st_ino);
        self.again = Some(Box::new(slot));
        self.complained = false;
        Ok(Some(SlotEvent::Regained(msg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_soon_then_backs_off_to_the_longest_gap() {
        let gaps: Vec<u64> = (0..12).map(|n| gap(n).as_millis() as u64).collect();
        assert_eq!(
            gaps,
            [
                1000, 4000, 16000, 30000, 30000, 30000, 30000, 30000, 30000, 30000, 30000, 30000
            ]
        );
    }
}
