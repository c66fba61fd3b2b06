//! What a waiter watches between admission attempts, and when it looks:
//! its inotify instance (the slot files, the ticket of a waiter it defers
//! to), the tickets it follows, a head's looks after a wake-up
//! ([`Relook`]), a deputy's glances, and when it passes the waiter first in
//! line (see `queue.rs` for the rule, `acquire.rs` for the loop).

use super::lockdir::IdDir;
use super::queue::{GRACE, TicketName, stopped};
use super::sleep::{Followed, Relook, Spare, Woke, sleep_on};
use crate::signals::Signals;
use anyhow::Result;
use std::ffi::OsString;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// The inotify events that wake a waiter: a slot (or ticket) released; a
/// ticket removed (its waiter passed) or its directory.
const CLOSED: u32 = libc::IN_CLOSE_WRITE | libc::IN_DELETE_SELF | libc::IN_ATTRIB;

/// How long after becoming the deputy it first looks whether its head has a
/// free slot: the head has the first go.
pub(super) const DEPUTY_DELAY: Duration = Duration::from_millis(100);

/// When a deputy (second in its chain) looks whether its head has a free slot.
///
/// A deputy watches the slots with inotify as its head does, but does not
/// sleep on it: woken at every release, it would compete with the handoff in
/// progress for the CPU. It glances at its inotify queue every [`GRACE`]
/// instead (one `read` a second) and looks at its head (a scan of the slots)
/// only if a slot was released since. So a head that leaves a slot free is
/// passed within about two [`GRACE`]s, one if it is stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Deputy {
    /// Not a deputy: a head, or further back.
    No,
    LookAt(Instant),
    /// Looked at this instant; glances again a [`GRACE`] later.
    Looked(Instant),
}

/// What a waiter watches between attempts.
pub(super) struct Watching {
    pub spare: Spare,
    slots: Option<i32>,
    ticket: Option<(OsString, i32)>,
    pub followed: Followed,
    /// The waiter first in line for a free slot, and since when it is.
    stalled: Option<(OsString, Instant)>,
    /// No attempt to pass it before this, after one that could not.
    not_before: Option<Instant>,
    /// A chain head's looks after a wake-up.
    pub relook: Relook,
    pub deputy: Deputy,
    /// What the deputy found at its last look at its head.
    pub head_ready: Option<TicketName>,
}

impl Watching {
    pub fn new() -> Watching {
        Watching {
            spare: Spare::default(),
            slots: None,
            ticket: None,
            followed: Followed::default(),
            stalled: None,
            not_before: None,
            relook: Relook::new(),
            deputy: Deputy::No,
            head_ready: None,
        }
    }

    /// When to pass `first`, the waiter first in line for a free slot: at
    /// once if it is stopped, else once it has left the slot for [`GRACE`].
    pub fn pass_at(&mut self, first: Option<&TicketName>) -> Option<Instant> {
        let at = self.stall(first)?;
        let at = match first {
            Some(t) if stopped(t.pid) => Instant::now(),
            _ => at,
        };
        Some(self.not_before.map_or(at, |n| at.max(n)))
    }

    /// Passing could not be done now (the mutex busy, or the waiter no
    /// longer first): look again a little later, not in a loop.
    pub fn passing_failed(&mut self) {
        self.not_before = Some(Instant::now() + DEPUTY_DELAY);
        if self.deputy != Deputy::No {
            self.deputy = Deputy::LookAt(Instant::now() + DEPUTY_DELAY);
        }
    }

    /// Sleeps until something it watches happens, a look it scheduled (or
    /// `pass_at`) comes, a signal, or the deadline.
    pub fn sleep(
        &mut self,
        head: bool,
        pass_at: Option<Instant>,
        signals: &mut Signals,
        deadline: Option<Instant>,
    ) -> Result<Woke> {
        let mut fds: Vec<BorrowedFd> = self.followed.fds().collect();
        // A deputy's inotify only records that something happened to the
        // slots; it glances at it now and then, see `Deputy`.
        fds.extend(self.spare.fd().filter(|_| head));
        let fallback = head && self.spare.fd().is_none();
        let relook_at = if head { self.relook.due() } else { None };
        let deputy_look = match self.deputy {
            Deputy::LookAt(t) => Some(t),
            Deputy::Looked(at) => Some(at + GRACE),
            Deputy::No => None,
        };
        let look_at = relook_at
            .into_iter()
            .chain(pass_at)
            .chain(deputy_look)
            .min();
        let woke = sleep_on(&fds, fallback, look_at, signals, deadline)?;
        if head {
            self.spare.drain();
            self.relook.after(&woke);
        } else if let Deputy::Looked(at) = self.deputy
            && Instant::now() >= at + GRACE
        {
            // A glance: look at the head only if a slot was released since.
            self.deputy = match self.spare.drain() {
                true => Deputy::LookAt(Instant::now()),
                false => Deputy::Looked(Instant::now()),
            };
        }
        Ok(woke)
    }

    /// Watches the slot files: set before looking at them, so that no
    /// release can fall between the look and the sleep.
    pub fn watch_slots(&mut self, dir: &IdDir) {
        if self.slots.is_none() && self.spare.get() {
            self.slots = self.spare.watch(&dir.path, CLOSED);
            self.relook.restart();
        }
    }

    /// Watches the ticket of the waiter this one defers to, instead of any before.
    pub fn watch_ticket(&mut self, dir: &IdDir, name: &OsString) {
        if self.ticket.as_ref().is_some_and(|(n, _)| n == name) {
            return;
        }
        if let Some((_, wd)) = self.ticket.take() {
            self.spare.unwatch(wd);
        }
        if self.spare.get()
            && let Some(wd) = self.spare.watch(&dir.queue_path.join(name), CLOSED)
        {
            self.ticket = Some((name.clone(), wd));
        }
    }

    /// When `first` (if any) is to be passed, should it go on leaving its free slot untaken.
    fn stall(&mut self, first: Option<&TicketName>) -> Option<Instant> {
        let Some(t) = first else {
            self.stalled = None;
            return None;
        };
        match &self.stalled {
            Some((name, since)) if *name == t.name => Some(*since + GRACE),
            _ => {
                let now = Instant::now();
                self.stalled = Some((t.name.clone(), now));
                Some(now + GRACE)
            }
        }
    }
}
