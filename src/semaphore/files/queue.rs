//! The queue of waiters (`<id>/queue/<t>.<pid>.<N>`): one ticket per waiter,
//! exclusively flocked by it for as long as it waits; `t` is
//! `CLOCK_MONOTONIC` at arrival (taken under the mutex, so arrival order is
//! ticket order), `N` its `-j`.
//!
//! Who goes first is decided here ([`Older::blocker`]): a waiter defers to
//! the oldest older waiter that is able to run and that either a free slot
//! would admit now, or that has waited longer than [`SENIOR`] (whatever its
//! N: later arrivals of every N then queue behind it, so that a small N is
//! never overtaken for ever by a stream of larger ones). A stopped process
//! (state `T` in `/proc`) is not able to run, and a waiter that leaves a
//! slot free for it unused for [`GRACE`] is taken not to be: either way it
//! is passed — its ticket is removed, and when it runs again it finds its
//! place gone and queues again at the back.
//!
//! A waiter lists the queue once, when it arrives; the tickets older than
//! its own are all it ever needs (newer ones are never ahead of it), and
//! that list only shrinks, so it keeps it ([`Older`]) and re-checks only
//! the few entries it looks at after each wake-up.

use super::lockdir::{IdDir, LockDir};
use crate::semaphore::Waiter;
use crate::sys::{self, Probe};
use anyhow::{Context, Result};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

/// How long a waiter may leave a slot that is free for it, and for which it
/// is first in line, untaken before it loses its turn.
pub const GRACE: Duration = Duration::from_secs(1);

/// How long a waiter waits before later arrivals of any N queue behind it.
pub const SENIOR: Duration = Duration::from_secs(2);

/// A ticket's name, parsed: `<arrived>.<pid>.<jobs>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TicketName {
    pub arrived: u128,
    pub pid: u32,
    pub jobs: u32,
    pub name: OsString,
}

pub(super) fn parse_ticket(name: &OsStr) -> Option<TicketName> {
    let s = std::str::from_utf8(name.as_bytes()).ok()?;
    let mut it = s.split('.');
    let arrived = it.next()?.parse().ok()?;
    let pid = it.next()?.parse().ok()?;
    let jobs = it.next()?.parse().ok()?;
    it.next().is_none().then(|| TicketName {
        arrived,
        pid,
        jobs,
        name: name.to_os_string(),
    })
}

/// A waiter's place in the queue, released (unlinked, then unlocked) on drop.
pub(super) struct Ticket {
    queue: File,
    pub me: TicketName,
    fd: File,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so that no prober ever finds the
        // name unlocked; followers wake when `fd` closes right after.
        let _ = sys::unlink_at(self.queue.as_fd(), &self.me.name);
    }
}

impl Ticket {
    /// Whether another waiter passed this one (removed its ticket).
    pub fn passed(&self) -> bool {
        sys::fstat(self.fd.as_fd()).is_ok_and(|st| st.st_nlink == 0)
    }
}

/// Whether process `pid` is stopped (SIGSTOP, Ctrl-Z, a debugger). A pid
/// this host cannot see (another pid namespace) is taken as running.
pub(super) fn stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let after_name = stat.iter().rposition(|&b| b == b')').map(|i| i + 2);
    after_name
        .and_then(|i| stat.get(i))
        .is_some_and(|&s| s == b'T' || s == b't')
}

/// The waiters older than one, oldest first, as last seen alive.
#[derive(Default)]
pub(super) struct Older(Vec<TicketName>);

/// The waiter a request must let go first, and the stopped ones passed on the way.
#[derive(Default)]
pub(super) struct Verdict {
    pub blocker: Option<TicketName>,
    pub stopped: Vec<TicketName>,
}

impl IdDir {
    /// Joins the queue (under the mutex, so that arrival order is ticket
    /// order); `older` is the queue as listed under the same mutex.
    pub fn enqueue(&self, lock_dir: &LockDir, jobs: u32, older: Older) -> Result<(Ticket, Older)> {
        let arrived = sys::monotonic_nanos();
        let pid = std::process::id();
        let name = OsString::from(format!("{arrived}.{pid}.{jobs}"));
        let fd = lock_dir.create_locked(self, &name)?;
        let queue = self
            .queue
            .try_clone()
            .context("cannot duplicate a descriptor")?;
        let me = TicketName {
            arrived,
            pid,
            jobs,
            name,
        };
        let ticket = Ticket { queue, me, fd };
        Ok((ticket, older))
    }

    /// The queue's tickets that arrived before `t`, oldest first.
    pub fn older_than(&self, t: u128) -> Result<Older> {
        let names = sys::list_dir(self.queue.as_fd())
            .with_context(|| format!("cannot list {}", self.queue_path.display()))?;
        let mut tickets: Vec<TicketName> = names
            .iter()
            .filter_map(|n| parse_ticket(n))
            .filter(|n| n.arrived < t)
            .collect();
        tickets.sort_by_key(|t| t.arrived);
        Ok(Older(tickets))
    }

    /// Opens a ticket if its owner is alive. A dead owner's ticket is removed:
    /// names are never reused, so this cannot remove a live one.
    pub fn open_live_ticket(&self, name: &OsStr) -> Option<File> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = sys::open_at(self.queue.as_fd(), name, flags, 0).ok()?;
        match sys::probe_shared(&fd) {
            Ok(Probe::Busy) => Some(fd),
            Ok(Probe::Taken) => {
                let _ = sys::unlink_at(self.queue.as_fd(), name);
                None
            }
            Err(_) => None,
        }
    }

    /// Removes a waiter's ticket: it lost its turn. Call under the mutex,
    /// having checked that it still should.
    pub fn pass(&self, t: &TicketName) {
        let _ = sys::unlink_at(self.queue.as_fd(), &t.name);
    }

    /// Live waiters, for `--max-waiting`.
    pub fn count_waiters(&self) -> Result<u32> {
        Ok(self.live_tickets()?.len() as u32)
    }

    /// Live waiters, oldest first, for `--status`: the pid and arrival in
    /// each ticket's name; the host is this one (the lock directory is
    /// local, as its `CLOCK_MONOTONIC` arrival times are).
    pub fn waiters(&self) -> Result<Vec<Waiter>> {
        let host = sys::hostname();
        let (now, mono) = (SystemTime::now(), sys::monotonic_nanos());
        Ok(self
            .live_tickets()?
            .into_iter()
            .map(|t| Waiter {
                pid: t.pid,
                host: host.clone(),
                since: u64::try_from(mono.saturating_sub(t.arrived))
                    .ok()
                    .and_then(|ago| now.checked_sub(Duration::from_nanos(ago))),
            })
            .collect())
    }

    fn live_tickets(&self) -> Result<Vec<TicketName>> {
        let Older(all) = self.older_than(u128::MAX)?;
        Ok(all
            .into_iter()
            .filter(|t| self.open_live_ticket(&t.name).is_some())
            .collect())
    }
}

impl Older {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The nearest older live waiter with `jobs` that arrived before
    /// `before`, opened: the one a waiter of that N follows. The dead found
    /// on the way are forgotten.
    pub fn nearest(&mut self, dir: &IdDir, jobs: u32, before: u128) -> Option<(TicketName, File)> {
        while let Some(i) = self
            .0
            .iter()
            .rposition(|t| t.jobs == jobs && t.arrived < before)
        {
            if let Some(fd) = dir.open_live_ticket(&self.0[i].name) {
                return Some((self.0[i].clone(), fd));
            }
            self.0.remove(i);
        }
        None
    }

    /// Whom a request of `jobs` (that arrived at `before`; `u128::MAX` for
    /// a newcomer) must let go first with `held` slots held, at monotonic
    /// instant `now`: see the module's opening.
    pub fn blocker(&mut self, dir: &IdDir, before: u128, held: u32, now: u128) -> Verdict {
        let mut verdict = Verdict {
            blocker: None,
            stopped: Vec::new(),
        };
        let mut i = 0;
        while i < self.0.len() && self.0[i].arrived < before {
            let t = &self.0[i];
            let admissible = t.jobs > held;
            let senior = now.saturating_sub(t.arrived) > SENIOR.as_nanos();
            if !admissible && !senior {
                i += 1;
                continue;
            }
            if dir.open_live_ticket(&t.name).is_none() {
                self.0.remove(i);
                continue;
            }
            if stopped(t.pid) {
                if admissible {
                    verdict.stopped.push(t.clone());
                }
                i += 1;
                continue;
            }
            verdict.blocker = Some(t.clone());
            break;
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_names() {
        let t = parse_ticket(OsStr::new("123.45.6")).unwrap();
        assert_eq!((t.arrived, t.pid, t.jobs), (123, 45, 6));
        for bad in [
            "lock", "1.2", "1.2.3.4", "a.2.3", ".tmp", "run.1.2", "fail.1.2",
        ] {
            assert_eq!(parse_ticket(OsStr::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn this_process_is_not_stopped_and_a_stopped_one_is() {
        assert!(!stopped(std::process::id()));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // SAFETY: no memory is passed.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGSTOP) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !stopped(child.id()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stopped(child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
