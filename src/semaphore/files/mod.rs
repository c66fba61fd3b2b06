//! The lock-file engine: one `flock(2)`ed file per slot, so that the kernel
//! frees a slot the instant its last holder dies, and nothing is ever stale.
//!
//! Layout, under the lock directory (`lockdir.rs`):
//!
//! ```text
//! <id>/1 .. <id>/K          slot files: an exclusive flock means "held";
//!                           the content is the holder's record (record.rs)
//! <id>/queue/lock           the per-id admission mutex (mutex.rs)
//! <id>/queue/census         a byte per slot, 1 while held (census.rs)
//! <id>/queue/<t>.<pid>.<N>  one ticket per waiter, exclusively flocked by it;
//!                           t is CLOCK_MONOTONIC at arrival, N its -j (queue.rs)
//! <id>/queue/run.*, fail.*  background jobs running, and failed (failures.rs)
//! ```
//!
//! **Safety** comes from the mutex alone: under it, a taker counts the held
//! slots (a shared non-blocking probe of each slot file; with nobody waiting
//! ahead of it, the census spares it the probes of slots marked held, which
//! can only raise the count) and takes the lowest free one only while fewer
//! than its N are held, checking after the lock
//! that the file is still the one it locked (the inode re-check, `slots.rs`).
//! So the admission rule holds at every instant, whatever the mix of `-j`
//! values, crashes and signals. The mutex is held for microseconds, never
//! while sleeping; a process stopped while holding it keeps everyone out
//! until it runs again or dies, and liveness then means that the others give
//! up on time and answer signals (`mutex.rs`), not that they barge in.
//! `--status` does not take it.
//!
//! **Waiting** is built so that nobody polls and nobody is woken for nothing
//! (`sleep.rs`, `watching.rs`). Waiters with the same N form a FIFO chain, ordered by
//! ticket: each one sleeps in blocking `flock`s (in small helper threads, so
//! that the main thread still watches its signal pipe and deadline) on its
//! predecessor's ticket and on the one before that. Only the head of a chain
//! and its second (the deputy) watch the slots, with inotify: a slot is
//! released exactly when the last descriptor of its holder's writable open
//! file is closed — by exit, crash or `kill -9` — which the kernel reports as
//! `IN_CLOSE_WRITE`. Probes open slot files read-only, so they never wake
//! anyone. The event comes a moment before the kernel drops the lock, so a
//! waiter that still has to wait after a wake-up looks again a few times
//! shortly after (see `Relook`). inotify instances are limited per user
//! (often to 128), which is why only heads and deputies use one; should none
//! be available, a waiter falls back to re-checking every 20 ms.
//!
//! **Order** (`queue.rs`): a request is admitted only if no older waiter
//! that is able to run would be admitted now (N > held), and none has waited
//! longer than 2 s (`SENIOR`): from then on, later arrivals of every N queue
//! behind it, so a `-j1` waiter is not overtaken for ever by a stream of
//! `-j5` jobs (admission still counts all holders, as GNU sem's does). A
//! younger head that defers to an older waiter watches its ticket, so that
//! it re-checks the moment that waiter takes its slot or leaves.
//!
//! **Liveness before order** — the rule for how long a free slot waits for
//! the waiter first in line: a waiter that is stopped (SIGSTOP, Ctrl-Z, a
//! debugger: state `T` in `/proc`) when a slot is free for it is passed by
//! the next qsem that looks — a newcomer at once, the deputy of its chain
//! within a second; one that runs but leaves a slot that is free for it
//! untaken for 1 s (`GRACE`) is passed then (noticed within 2 s, see
//! `Deputy` in `acquire.rs`). Passing removes its ticket; once it runs
//! again it finds its place gone and queues again at the back. A dead
//! waiter's ticket is unlocked, and anyone who sees that removes it. FIFO
//! order holds among the waiters able to run.
//!
//! **Waiting for all** (`--wait-all`) watches the id directory and the queue
//! the same way, and re-counts held slots and live waiters (under the shared
//! mutex, waited for as a taker does) whenever a slot or a ticket is closed.
//!
//! **Removal** from outside (`rm -rf`, a tmp cleaner) is the one thing the
//! kernel's locks cannot cover: a lock in a removed file is invisible to
//! takers. A holder's guard (`guard.rs`) looks, on a schedule that backs off,
//! whether its slot file is still there and, if not, re-creates the
//! directories and takes its slot again; a waiter whose queue vanished queues
//! again. A newcomer in the window before the guard's look is admitted beside
//! the job, and the guard then says the limit is exceeded.

mod acquire;
mod census;
mod failures;
mod guard;
mod lockdir;
mod mutex;
mod queue;
mod record;
mod sleep;
mod slots;
mod watching;

pub use lockdir::LockDir;

use super::{Acquired, IdStatus, Idle, Request, Semaphore};
use crate::id::Id;
use crate::report;
use crate::signals::Signals;
use acquire::Outcome;
use anyhow::{Result, bail};
use mutex::Locked;
use sleep::{Relook, Spare, Woke, sleep_on};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

const QUEUE: &str = "queue";

/// How long a waiter whose directories were removed waits before queueing
/// again, so that the holders' guards can put their slots back first.
const SETTLE: Duration = Duration::from_secs(1);

/// The lock-file engine.
pub struct Files {
    dir: LockDir,
    verbose: bool,
}

impl Files {
    pub fn new(dir: LockDir, verbose: bool) -> Files {
        Files { dir, verbose }
    }

    fn say(&self, req: &Request, msg: &str) {
        if self.verbose {
            report::line(req.id, msg);
        }
    }
}

impl Semaphore for Files {
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired> {
        for _ in 0..100 {
            if let Outcome::Done(done) = self.acquire_here(req, signals)? {
                return Ok(done);
            }
            // Removed while we waited (rm -rf, a tmp cleaner): our queue is
            // gone with it, so queue again in new directories — but only once
            // the holders' guards have had time to put their slots back, or we
            // would take a slot whose job still runs.
            self.say(req, "the lock directory was removed; queueing again");
            let settle = Instant::now() + SETTLE;
            let until = Some(req.deadline.map_or(settle, |d| d.min(settle)));
            match sleep_on(&[], false, None, signals, until)? {
                Woke::Signal(signo) => return Ok(Acquired::Interrupted(signo)),
                _ if req.deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Ok(Acquired::TimedOut);
                }
                _ => {}
            }
            self.dir = LockDir::open(&self.dir.path, true)?;
        }
        bail!(
            "lock directory {} keeps disappearing; is something removing it?",
            self.dir.path.display()
        )
    }

    /// Never waits for the mutex, which a stopped process may hold: without
    /// it, a moment's snapshot, as `ps` gives.
    fn status(&mut self, only: Option<&Id>) -> Result<Vec<IdStatus>> {
        let ids = match only {
            Some(id) => vec![id.clone()],
            None => self.dir.ids()?,
        };
        let mut out = Vec::new();
        for id in ids {
            let Some(dir) = self.dir.id_dir(&id, false)? else {
                if only.is_some() {
                    out.push(IdStatus {
                        id,
                        holders: Vec::new(),
                        waiting: 0,
                        waiters: Vec::new(),
                    });
                }
                continue;
            };
            // Under the shared mutex if it can be had at once, so that no
            // probe gets in a taker's way; else without it.
            let _mutex = dir.try_mutex(&self.dir, true).ok().flatten();
            let holders = dir.holders(&self.dir)?;
            let waiters = dir.waiters()?;
            if only.is_some() || !holders.is_empty() || !waiters.is_empty() {
                out.push(IdStatus {
                    id,
                    holders,
                    waiting: waiters.len() as u32,
                    waiters,
                });
            }
        }
        Ok(out)
    }

    fn wait_idle(
        &mut self,
        id: &Id,
        deadline: Option<Instant>,
        signals: &mut Signals,
    ) -> Result<Idle> {
        let Some(dir) = self.dir.id_dir(id, false)? else {
            return Ok(Idle::Reached);
        };
        // Watch before looking, so that no release falls between the two.
        let mut watcher = Spare::default();
        let watching = watcher.get()
            && watcher
                .watch(&dir.path, libc::IN_CLOSE_WRITE | libc::IN_DELETE_SELF)
                .is_some()
            && watcher
                .watch(&dir.queue_path, libc::IN_CLOSE_WRITE)
                .is_some();
        let mut relook = Relook::new();
        loop {
            let (held, waiting) = match dir.mutex(&self.dir, true, signals, deadline)? {
                Locked::Got(_mutex) => (dir.scan(&self.dir)?.held, dir.count_waiters()?),
                Locked::TimedOut => return Ok(Idle::TimedOut),
                Locked::Signal(r) => return Ok(Idle::Interrupted(r)),
            };
            if held == 0 && waiting == 0 {
                return Ok(Idle::Reached);
            }
            if self.verbose {
                report::line(
                    id,
                    &format!("waiting for {held} held slot(s) and {waiting} waiter(s)"),
                );
            }
            let fds: Vec<BorrowedFd> = watcher.fd().into_iter().collect();
            let woke = sleep_on(&fds, !watching, relook.due(), signals, deadline)?;
            watcher.drain();
            relook.after(&woke);
            match woke {
                Woke::Changed | Woke::Due => {}
                Woke::TimedOut => return Ok(Idle::TimedOut),
                Woke::Signal(signo) => return Ok(Idle::Interrupted(signo)),
            }
        }
    }

    fn take_failures(&mut self, id: &Id) -> Result<u32> {
        match self.dir.id_dir(id, false)? {
            Some(dir) => failures::take_failures(&dir),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::slots::{Record, SlotFile, parse_slot};
    use super::*;
    use crate::sys;
    use std::cell::RefCell;
    use std::ffi::OsStr;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};
    use std::time::UNIX_EPOCH;

    type Hook = Box<dyn FnMut(&Path)>;

    thread_local! {
        /// Runs in `take` between the open and the lock of a slot file: the
        /// moment a file replaced from outside must be caught.
        pub static BETWEEN_OPEN_AND_LOCK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// A scratch lock directory, removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Takes a slot of a fresh id while `hook` runs between open and lock.
    fn take_with(name: &str, hook: impl FnMut(&Path) + 'static) -> (Scratch, Result<SlotFile>) {
        let root = std::env::temp_dir().join(format!("qsem-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let scratch = Scratch(root.clone());
        let lock_dir = LockDir::open(&root, true).unwrap();
        let id = Id::new(OsStr::new("x")).unwrap();
        let dir = lock_dir.id_dir(&id, true).unwrap().unwrap();
        // Slot 1 exists, so that there is something to replace.
        std::fs::write(root.join("x/1"), "").unwrap();
        let req = Request {
            max_waiting: None,
            background: false,
            id: &id,
            jobs: 1,
            deadline: None,
            command: "test",
        };
        BETWEEN_OPEN_AND_LOCK.set(Some(Box::new(hook)));
        let _mutex = dir.try_mutex(&lock_dir, false).unwrap().unwrap();
        let scan = dir.scan(&lock_dir).unwrap();
        assert_eq!(scan.held, 0);
        let got = dir
            .take_lowest(&lock_dir, &req, scan, None, None)
            .map(|slot| slot.expect("nobody probes"));
        BETWEEN_OPEN_AND_LOCK.set(None);
        (scratch, got)
    }

    /// Replaces the file at `path` once, by `make` on a temporary name, then rename.
    fn replace_once(make: impl Fn(&Path) + 'static) -> impl FnMut(&Path) {
        let mut done = false;
        move |path: &Path| {
            if !done {
                done = true;
                let tmp = path.with_extension("new");
                make(&tmp);
                std::fs::rename(&tmp, path).unwrap();
            }
        }
    }

    fn inode(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn a_slot_file_replaced_between_open_and_lock_is_caught() {
        // By a regular file: the lock taken is the new file's, never the old one's.
        let (s, got) = take_with("regular", replace_once(|p| std::fs::write(p, "").unwrap()));
        let slot = got.unwrap();
        let st = sys::fstat(slot.file.as_fd()).unwrap();
        assert_eq!((st.st_dev, st.st_ino), inode(&s.0.join("x/1")));
        // Removed: a new file is made and locked.
        let (s, got) = take_with("removed", {
            let mut done = false;
            move |p: &Path| {
                if !done {
                    done = true;
                    std::fs::remove_file(p).unwrap();
                }
            }
        });
        let slot = got.unwrap();
        let st = sys::fstat(slot.file.as_fd()).unwrap();
        assert_eq!((st.st_dev, st.st_ino), inode(&s.0.join("x/1")));
    }

    #[test]
    fn a_slot_file_replaced_by_a_fifo_or_symlink_is_refused_without_hanging() {
        let fifo = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: `c` is a valid C string.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        };
        let (_s, got) = take_with("fifo", replace_once(fifo));
        let err = format!("{:#}", got.err().expect("refused"));
        assert!(err.contains("not a regular file"), "{err}");
        let link = |p: &Path| std::os::unix::fs::symlink("/etc/passwd", p).unwrap();
        let (_s, got) = take_with("symlink", replace_once(link));
        let err = format!("{:#}", got.err().expect("refused"));
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_slot_file_replaced_every_time_ends_in_a_clear_error() {
        let always = |p: &Path| {
            let tmp = p.with_extension("new");
            std::fs::write(&tmp, "").unwrap();
            std::fs::rename(&tmp, p).unwrap();
        };
        let (_s, got) = take_with("always", always);
        let err = format!("{:#}", got.err().expect("gives up"));
        assert!(err.contains("keep changing"), "{err}");
    }

    #[test]
    fn slot_names() {
        assert_eq!(parse_slot(OsStr::new("7")), Some(7));
        for bad in ["0", "07", "queue", "-1", "1a", ""] {
            assert_eq!(parse_slot(OsStr::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            pid: 42,
            host: "web1".into(),
            started: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            jobs: 3,
            command: "ImportProcess --all\nx".into(),
        };
        let back = Record::parse(&r.render());
        assert_eq!((back.pid, back.jobs), (42, 3));
        assert_eq!(back.host, "web1");
        assert_eq!(back.command, "ImportProcess --all x");
        let ms = back.started.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!((1_700_000_000_122..=1_700_000_000_124).contains(&ms));
    }
}
