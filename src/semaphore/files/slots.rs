//! The slot files (`<id>/1 .. <id>/K`): counting the held ones, taking the
//! lowest free one, the holder's record in it, and the held slot as a
//! [`Slot`].
//!
//! A slot is held exactly while its file has an exclusive `flock`; the
//! kernel drops it when the last holder dies, so nothing is ever stale.
//! Counting probes each file with a shared non-blocking lock through a
//! read-only descriptor: probes never disturb one another, and closing a
//! read-only descriptor never produces the `IN_CLOSE_WRITE` that wakes
//! waiters. Slot files are never deleted: they are as many as the most slots
//! ever held at once, not N. A taker that finds no waiter ahead of it may
//! count the slots the census (`census.rs`) marks as held without probing
//! them; a refusal always rests on a probe of every file.
//!
//! **The inode re-check**: a slot file can be removed or replaced from
//! outside between our open and our lock, and a lock on a file no longer in
//! the directory is invisible to every other taker. So after locking, the
//! taker checks that the name still names the inode it locked, and scans
//! again if not.

use super::super::{Holder, Request, Slot, SlotEvent};
use super::census::{Census, Mark};
use super::failures::Running;
use super::guard::Guard;
use super::lockdir::{IdDir, LockDir};
pub(super) use super::record::Record;
use super::sleep::Spare;
use crate::sys::{self, Probe};
use anyhow::{Context, Result};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a scan of the slots found.
pub(super) struct Scan {
    pub held: u32,
    pub lowest_free: u32,
}

/// A slot file's name is its number, written canonically.
pub(super) fn parse_slot(name: &OsStr) -> Option<u32> {
    // Canonical: digits only, no leading zero (so no "0" either). Allocation-free,
    // since a scan parses every name in the id's directory.
    let b = name.as_bytes();
    if b.first().is_none_or(|&c| c == b'0') || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl IdDir {
    /// Whether slot `k` is free (or has no file). Call under the mutex.
    fn is_free(&self, lock_dir: &LockDir, k: u32) -> Result<bool> {
        match self.open_slot_probe(lock_dir, k)? {
            None => Ok(true),
            Some(fd) => Ok(sys::probe_shared(&fd)? == Probe::Taken),
        }
    }

    fn slot_numbers(&self) -> Result<Vec<u32>> {
        let names = sys::list_dir(self.fd.as_fd())
            .with_context(|| format!("cannot list {}", self.path.display()))?;
        let mut slots: Vec<u32> = names.iter().filter_map(|n| parse_slot(n)).collect();
        slots.sort_unstable();
        Ok(slots)
    }

    /// Opens slot `k` read-only for probing. `None` if it does not exist.
    fn open_slot_probe(&self, lock_dir: &LockDir, k: u32) -> Result<Option<File>> {
        let name = OsString::from(k.to_string());
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        match sys::open_at(self.fd.as_fd(), &name, flags, 0) {
            Ok(fd) => {
                // A scan probes every slot file: build the path only for an error.
                let fine = sys::fstat(fd.as_fd()).is_ok_and(|st| {
                    st.st_mode & libc::S_IFMT == libc::S_IFREG && lock_dir.owns(&st)
                });
                if !fine {
                    lock_dir.check_regular(&fd, &self.path.join(&name))?;
                }
                Ok(Some(fd))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.open_error(e, self.fd.as_fd(), &name, &self.path.join(&name))),
        }
    }

    /// Counts the held slots and finds the lowest free one, probing every
    /// slot file. Under the mutex for a decision; outside it, a moment's
    /// snapshot.
    pub fn scan(&self, lock_dir: &LockDir) -> Result<Scan> {
        Ok(self.count(lock_dir)?.0)
    }

    /// As [`scan`](Self::scan), but counting the slots the census marks as
    /// held without probing them: a count never below the truth, good for
    /// admitting and never for refusing (see `census.rs`). Under the mutex.
    pub fn scan_marked(&self, lock_dir: &LockDir, census: &Census) -> Result<Scan> {
        let slots = self.slot_numbers()?;
        let marks = census.read(slots.last().copied().unwrap_or(0));
        Ok(self.count_among(lock_dir, &slots, &marks)?.0)
    }

    /// An exact count, under the mutex, that also clears the census's marks
    /// of the slots it finds free.
    pub fn scan_fixing(&self, lock_dir: &LockDir, census: Option<&Census>) -> Result<Scan> {
        let (scan, free) = self.count(lock_dir)?;
        if let Some(census) = census {
            let marks = census.read(free.last().copied().unwrap_or(0));
            for k in free {
                if marks[k as usize - 1] != 0 {
                    census.set(k, false);
                }
            }
        }
        Ok(scan)
    }

    /// The exact count, and the numbers of the slot files found free.
    fn count(&self, lock_dir: &LockDir) -> Result<(Scan, Vec<u32>)> {
        self.count_among(lock_dir, &self.slot_numbers()?, &[])
    }

    /// Counts among slot files `slots` (sorted); slot `k` is taken as held
    /// unprobed if `marks[k - 1]` is set.
    fn count_among(
        &self,
        lock_dir: &LockDir,
        slots: &[u32],
        marks: &[u8],
    ) -> Result<(Scan, Vec<u32>)> {
        let mut held = 0;
        let mut free = Vec::new();
        for &k in slots {
            if marks.get(k as usize - 1).is_some_and(|&m| m != 0) {
                held += 1;
                continue;
            }
            let Some(fd) = self.open_slot_probe(lock_dir, k)? else {
                continue;
            };
            match sys::probe_shared(&fd)
                .with_context(|| format!("cannot probe {}/{k}", self.path.display()))?
            {
                Probe::Busy => held += 1,
                Probe::Taken => free.push(k),
            }
        }
        // The smallest number without a file is free too.
        let mut missing = 1;
        for &k in slots {
            if k == missing {
                missing += 1;
            } else if k > missing {
                break;
            }
        }
        let lowest_free = free.first().map_or(missing, |&f| f.min(missing));
        Ok((Scan { held, lowest_free }, free))
    }

    /// The held slots and their records, for `--status`; no lock needed.
    pub fn holders(&self, lock_dir: &LockDir) -> Result<Vec<Holder>> {
        let mut holders = Vec::new();
        for k in self.slot_numbers()? {
            let Some(fd) = self.open_slot_probe(lock_dir, k)? else {
                continue;
            };
            if sys::probe_shared(&fd)? == Probe::Taken {
                continue;
            }
            let mut buf = vec![0u8; 8192];
            let n = fd.read_at(&mut buf, 0).unwrap_or(0);
            let r = Record::parse(&String::from_utf8_lossy(&buf[..n]));
            holders.push(Holder {
                slot: k,
                pid: r.pid,
                host: r.host,
                started: (r.started != UNIX_EPOCH).then_some(r.started),
                jobs: r.jobs,
                command: r.command,
            });
        }
        Ok(holders)
    }

    /// Takes `prefer` if it is free, else the lowest free slot, which `scan`
    /// found; scans again while slot files are replaced from outside. Call
    /// under the mutex, with the admission decided. `None`: the free slot
    /// stayed locked by a prober (`--status` and deputies probe without the
    /// mutex; one stopped while probing would keep it so): try again later.
    /// The slot is marked in `census`, if given.
    pub fn take_lowest(
        &self,
        lock_dir: &LockDir,
        req: &Request,
        mut scan: Scan,
        prefer: Option<u32>,
        census: Option<Census>,
    ) -> Result<Option<SlotFile>> {
        for _ in 0..100 {
            let k = match prefer {
                Some(k) if self.is_free(lock_dir, k)? => k,
                _ => scan.lowest_free,
            };
            match self.take(lock_dir, k, req)? {
                Take::Took(mut slot) => {
                    slot.mark = census.map(|c| Mark::new(c, slot.number));
                    return Ok(Some(*slot));
                }
                Take::Probed => return Ok(None),
                Take::Replaced => scan = self.scan(lock_dir)?,
            }
        }
        anyhow::bail!(
            "slot files in {} keep changing under qsem; is something else writing there?",
            self.path.display()
        )
    }

    /// Takes slot `k`, which the scan found free.
    fn take(&self, lock_dir: &LockDir, k: u32, req: &Request) -> Result<Take> {
        let name = OsString::from(k.to_string());
        let path = self.path.join(&name);
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = sys::open_at(self.fd.as_fd(), &name, flags, lock_dir.file_mode())
            .map_err(|e| self.open_error(e, self.fd.as_fd(), &name, &path))?;
        let st = lock_dir.check_regular(&fd, &path)?;
        #[cfg(test)]
        super::tests::BETWEEN_OPEN_AND_LOCK.with_borrow_mut(|hook| hook.as_mut().map(|h| h(&path)));
        lock_dir.fix_mode(&fd, &st, &path)?;
        // Free under the mutex, so only a prober's shared lock, held for a
        // moment, can be in the way: a few short tries.
        let mut pause = Duration::from_micros(500);
        while sys::try_lock_exclusive(&fd)
            .with_context(|| format!("cannot lock {}", path.display()))?
            == Probe::Busy
        {
            if pause > Duration::from_millis(8) {
                return Ok(Take::Probed);
            }
            std::thread::sleep(pause);
            pause *= 2;
        }
        // The inode re-check: the path must still name the inode we locked.
        match sys::lstat_at(self.fd.as_fd(), &name) {
            Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => {}
            _ => return Ok(Take::Replaced),
        }
        // A --bg job is recorded as running from the moment it holds a slot.
        let running = if req.background {
            Some(Running::create(lock_dir, self)?)
        } else {
            None
        };
        // The command inherits this descriptor. Shell scripts name descriptors
        // 0-9 in redirections (`exec 9>lock; flock 9` is flock(1)'s own idiom),
        // so keep it above them, where a script cannot close it by accident.
        let fd = sys::move_fd_above(fd, 10);
        let mut slot = SlotFile {
            file: fd,
            number: k,
            path,
            record: Record {
                pid: std::process::id(),
                host: sys::hostname(),
                started: SystemTime::now(),
                jobs: req.jobs,
                command: req.command.to_string(),
            },
            len: st.st_size as u64,
            mark: None,
            guard: None,
            running,
            watcher: Spare::default(),
        };
        // The record is for --status only: a full disk must not stop the job,
        // which holds its slot all the same.
        let _ = slot.write_record();
        Ok(Take::Took(Box::new(slot)))
    }
}

/// How taking one slot file went.
enum Take {
    Took(Box<SlotFile>),
    /// Locked by a prober all along.
    Probed,
    /// Replaced or removed from outside between open and lock: scan again.
    Replaced,
}

/// A held slot: the exclusively locked, writable slot file.
pub(super) struct SlotFile {
    pub file: File,
    pub number: u32,
    pub record: Record,
    pub path: PathBuf,
    /// The file's length as last known: a record overwrites the one before
    /// it, and the file is cut only after a longer one (an ftruncate costs a
    /// filesystem transaction, and a job writes its record twice).
    len: u64,
    /// The slot's byte in the census, cleared once `file` is closed (fields
    /// drop in order).
    pub mark: Option<Mark>,
    /// Puts the slot back if its file is removed; see [`Guard`].
    pub guard: Option<Guard>,
    /// A background job's running record; see [`Running`].
    pub running: Option<Running>,
    /// The inotify instance this process waited with, if any: dropped after
    /// `file` (fields drop in order), and then kept for the next wait of
    /// this process rather than closed (see [`Spare`]).
    pub watcher: Spare,
}

impl SlotFile {
    /// Writes the record for --status. A record that cannot be written whole
    /// (a full disk) is cut off rather than left half stale.
    pub fn write_record(&mut self) -> io::Result<()> {
        let text = self.record.render();
        let len = text.len() as u64;
        let mut written = self.file.write_all_at(text.as_bytes(), 0);
        if written.is_ok() && self.len > len {
            written = self.file.set_len(len);
        }
        self.len = match written {
            Ok(()) => len,
            // Unknown if even this fails: cut the next record to size.
            Err(_) => self.file.set_len(0).map_or(u64::MAX, |()| 0),
        };
        written
    }
}

impl Slot for SlotFile {
    fn number(&self) -> u32 {
        self.number
    }

    fn inheritable(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn fence(&self) -> Option<u64> {
        None
    }

    fn started(&mut self, pid: u32) {
        self.record.pid = pid;
        // The record is informational: a failure to update it changes nothing.
        let _ = self.write_record();
    }

    /// Readable when the guard is due to look (see [`Guard`]).
    fn events(&self) -> Option<BorrowedFd<'_>> {
        self.guard.as_ref().map(Guard::fd)
    }

    /// The guard's look, if it is due: news only if the file was removed.
    fn take_events(&mut self) -> Vec<SlotEvent> {
        let pid = self.record.pid;
        match &mut self.guard {
            Some(guard) => guard.look(pid),
            None => Vec::new(),
        }
    }

    fn finish(mut self: Box<Self>, failure: Option<&str>) -> Result<()> {
        match self.running.take() {
            Some(running) => running.finish(failure),
            None => Ok(()),
        }
    }
}
