//! The lock-file engine: one `flock(2)`ed file per slot, so that the kernel
//! frees a slot the instant its last holder dies, and nothing is ever stale.
//!
//! Layout, under the lock directory:
//!
//! ```text
//! <id>/1 .. <id>/K          slot files: an exclusive flock means "held";
//!                           the content is the holder's record, for --status
//! <id>/queue/lock           the per-id mutex
//! <id>/queue/<t>.<pid>.<N>  one ticket per waiter, exclusively flocked by it;
//!                           t is CLOCK_MONOTONIC at arrival, N its -j
//! <id>/queue/failed         report lines of failed background jobs since the
//!                           last --wait-all, appended under the mutex
//! ```
//!
//! **Safety** comes from the mutex alone: under it, a taker counts the held
//! slots (a shared non-blocking probe of each slot file, which never disturbs
//! another prober) and takes the lowest free one only while fewer than its N
//! are held. So the admission rule holds at every instant, whatever the mix of
//! `-j` values, crashes and signals. The mutex is held for microseconds, never
//! while sleeping.
//!
//! **Waiting** is built so that nobody polls and nobody is woken for nothing.
//! Waiters with the same N form a FIFO chain, ordered by ticket: each one
//! sleeps in a blocking `flock` on its predecessor's ticket (in a small helper
//! thread, so that the main thread can still `poll` its signal pipe and its
//! deadline). Only the head of a chain watches the slots, with inotify: a slot
//! is released exactly when the last descriptor of its holder's writable open
//! file is closed — by exit, crash or `kill -9` — which the kernel reports as
//! `IN_CLOSE_WRITE`. Probes open slot files read-only, so they never wake
//! anyone. The event comes a moment before the kernel drops the lock, so a
//! head that still has to wait after a wake-up looks again a few times
//! shortly after (see [`Relook`]). inotify instances are limited per user
//! (often to 128), which is why only chain heads use one; should none be
//! available, a head falls back to re-checking every [`FALLBACK_POLL`].
//!
//! **Fairness**: a request is admitted only if no older live waiter would also
//! be admitted now (N > held). Within a chain that is plain FIFO; across chains
//! the oldest admissible waiter is always a chain head, and a younger head that
//! defers to it also watches its ticket, so that it re-checks the moment that
//! waiter takes its slot or leaves. A newcomer that finds an older admissible
//! waiter queues behind it instead of overtaking it.
//!
//! **Waiting for all** (`--wait-all`) watches the id directory and the queue
//! the same way, and re-counts held slots and live waiters (under the shared
//! mutex) whenever a slot or a ticket is closed. The failure file lives in
//! `queue/`, not beside the slots, so that writing it never wakes a waiter.
//!
//! **Removal** from outside (`rm -rf`, a tmp cleaner) is the one thing the
//! kernel's locks cannot cover: a lock in a removed file is invisible to
//! takers. So a holder whose command has run for [`GUARD_POLL`] starts a
//! [`Guard`] thread that looks then, and every [`GUARD_POLL`] after, whether
//! its slot file is still there and, if not, re-creates
//! the directories and takes its slot again; a waiter whose queue vanished
//! queues again. A newcomer in the window before the guard's look is admitted
//! beside the job, and the guard then says the limit is exceeded.
//!
//! **Paths**: every file is opened relative to its directory's descriptor with
//! `O_NOFOLLOW` and `O_CLOEXEC`; symlinks, non-regular files and files of other
//! users are refused, except that a setgid, group-writable lock directory is a
//! semaphore shared by its group. Slot files are never deleted: they are as
//! many as the most slots ever held at once, not N.

use super::{Acquired, Holder, IdStatus, Idle, Request, Semaphore, Slot, SlotEvent};
use crate::id::Id;
use crate::report;
use crate::signals::{self, Received, Signals};
use crate::sys::{self, Inotify, Probe};
use anyhow::{Context, Result, anyhow, bail};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a chain head re-checks when no inotify instance can be had.
pub const FALLBACK_POLL: Duration = Duration::from_millis(20);

/// How often a holder checks that its slot file is still there; see [`Guard`].
pub const GUARD_POLL: Duration = Duration::from_millis(500);

const QUEUE: &str = "queue";
const MUTEX: &str = "lock";
const FAILED: &str = "failed";

/// The lock directory, checked and open.
pub struct LockDir {
    path: PathBuf,
    fd: File,
    /// The group of a setgid, group-writable directory: a semaphore shared by it.
    shared_gid: Option<libc::gid_t>,
    euid: libc::uid_t,
}

impl LockDir {
    /// Opens the lock directory, creating it (mode 0700) if `create` and it is
    /// missing, and refuses one that others could tamper with.
    pub fn open(path: &Path, create: bool) -> Result<LockDir> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let fd = match sys::open_path(path, flags, 0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                match std::fs::create_dir(path) {
                    Ok(()) => {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                            .with_context(|| {
                                format!("cannot set the mode of lock directory {}", path.display())
                            })?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot create lock directory {}", path.display())
                        });
                    }
                }
                sys::open_path(path, flags, 0)
            }
            other => other,
        }
        .with_context(|| format!("cannot open lock directory {}", path.display()))?;
        let st = sys::fstat(fd.as_fd())
            .with_context(|| format!("cannot stat lock directory {}", path.display()))?;
        let euid = sys::euid();
        if st.st_uid != euid && st.st_uid != 0 {
            bail!(
                "lock directory {} belongs to uid {}, neither to you (uid {euid}) nor to root",
                path.display(),
                st.st_uid
            );
        }
        if st.st_mode & 0o002 != 0 && st.st_mode & libc::S_ISVTX == 0 {
            bail!(
                "lock directory {} is writable by everyone and lacks the sticky bit (chmod +t or o-w it)",
                path.display()
            );
        }
        let shared = st.st_mode & libc::S_ISGID != 0 && st.st_mode & 0o020 != 0;
        if shared && st.st_uid != euid && !sys::in_group(st.st_gid) {
            bail!(
                "lock directory {} is shared by group {}, and you (uid {euid}) are not in it",
                path.display(),
                st.st_gid
            );
        }
        Ok(LockDir {
            path: path.to_path_buf(),
            fd: fd.into(),
            shared_gid: shared.then_some(st.st_gid),
            euid,
        })
    }

    fn file_mode(&self) -> libc::mode_t {
        if self.shared_gid.is_some() {
            0o660
        } else {
            0o600
        }
    }

    fn dir_mode(&self) -> libc::mode_t {
        if self.shared_gid.is_some() {
            0o2770
        } else {
            0o700
        }
    }

    /// Gives a file of ours the mode it should have: the umask (often 022)
    /// would otherwise leave a shared directory's files not group-writable.
    fn fix_mode(&self, fd: &File, st: &libc::stat, path: &Path) -> Result<()> {
        if st.st_uid == self.euid && st.st_mode & 0o777 != self.file_mode() {
            sys::fchmod(fd.as_fd(), self.file_mode())
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        }
        Ok(())
    }

    /// A file or directory of ours, or of the group that shares the directory.
    fn owns(&self, st: &libc::stat) -> bool {
        st.st_uid == self.euid || self.shared_gid == Some(st.st_gid)
    }

    /// Refuses a file or directory of another user, unless the directory is
    /// shared by a group and the file belongs to that group.
    fn check_owner(&self, st: &libc::stat, path: &Path) -> Result<()> {
        if self.owns(st) {
            return Ok(());
        }
        bail!(
            "{} belongs to another user (uid {}); refusing to use it",
            path.display(),
            st.st_uid
        )
    }

    /// Opens (or creates) a directory inside `parent`, refusing symlinks,
    /// non-directories and directories of others.
    fn open_subdir(
        &self,
        parent: BorrowedFd,
        parent_path: &Path,
        name: &OsStr,
        create: bool,
    ) -> Result<Option<File>> {
        let path = parent_path.join(name);
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let mut created = false;
        loop {
            match sys::open_at(parent, name, flags, 0) {
                Ok(fd) => {
                    let st = sys::fstat(fd.as_fd())
                        .with_context(|| format!("cannot stat {}", path.display()))?;
                    self.check_owner(&st, &path)?;
                    if created && st.st_mode & 0o7777 != self.dir_mode() {
                        sys::fchmod(fd.as_fd(), self.dir_mode()).with_context(|| {
                            format!("cannot set the mode of {}", path.display())
                        })?;
                    }
                    return Ok(Some(fd));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    match sys::mkdir_at(parent, name, self.dir_mode()) {
                        Ok(()) => created = true,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("cannot create {}", path.display()));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    return Err(not_what_it_should_be(parent, name, &path, "a directory"));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            }
        }
    }

    /// The directory of `id`, with its queue; `None` if it does not exist and
    /// `create` is false.
    fn id_dir(&self, id: &Id, create: bool) -> Result<Option<IdDir>> {
        let mut path = self.path.clone();
        let mut fd: Option<File> = None;
        for part in id.components() {
            let parent = fd.as_ref().map_or(self.fd.as_fd(), |f| f.as_fd());
            let Some(next) = self.open_subdir(parent, &path, &part, create)? else {
                return Ok(None);
            };
            path.push(&part);
            fd = Some(next);
        }
        let fd = fd.expect("an id has at least one component");
        let Some(queue) = self.open_subdir(fd.as_fd(), &path, OsStr::new(QUEUE), create)? else {
            return Ok(None);
        };
        Ok(Some(IdDir {
            queue_path: path.join(QUEUE),
            path,
            fd,
            queue,
        }))
    }

    /// Every id that has a directory here.
    fn ids(&self) -> Result<Vec<Id>> {
        let mut ids = Vec::new();
        let mut stack = vec![(
            self.fd
                .try_clone()
                .context("cannot duplicate a descriptor")?,
            Vec::<OsString>::new(),
        )];
        while let Some((fd, prefix)) = stack.pop() {
            let names = sys::list_dir(fd.as_fd())
                .with_context(|| format!("cannot list lock directory {}", self.path.display()))?;
            for name in names {
                let mut parts = prefix.clone();
                parts.push(name.clone());
                if Id::is_long_prefix(&name) {
                    if let Ok(sub) = sys::open_at(
                        fd.as_fd(),
                        &name,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    ) {
                        stack.push((sub, parts));
                    }
                    continue;
                }
                let refs: Vec<&OsStr> = parts.iter().map(|p| p.as_os_str()).collect();
                ids.extend(Id::from_components(&refs));
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// Whether `path` no longer names the directory open as `fd` (removed, or
/// replaced).
fn moved_away(path: &Path, fd: BorrowedFd) -> bool {
    sys::fstat(fd).is_ok_and(|st| gone(path, st.st_dev, st.st_ino))
}

impl LockDir {
    /// Whether the lock directory was removed or replaced since it was opened.
    /// Its path may be a symlink (it is opened following one), so follow it.
    fn vanished(&self) -> bool {
        sys::fstat(self.fd.as_fd())
            .is_ok_and(|st| names_another(std::fs::metadata(&self.path), st.st_dev, st.st_ino))
    }
}

/// Says precisely why `name` is unusable: a symlink, or not a `what`.
fn not_what_it_should_be(
    parent: BorrowedFd,
    name: &OsStr,
    path: &Path,
    what: &str,
) -> anyhow::Error {
    match sys::lstat_at(parent, name) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
            anyhow!(
                "{} is a symbolic link; refusing to follow it",
                path.display()
            )
        }
        _ => anyhow!("{} is not {what}; refusing to use it", path.display()),
    }
}

/// One id's directory, open.
struct IdDir {
    path: PathBuf,
    fd: File,
    queue_path: PathBuf,
    queue: File,
}

/// What a scan of the slots found.
struct Scan {
    held: u32,
    lowest_free: u32,
}

/// A waiter's place in the queue, released (unlinked, then unlocked) on drop.
struct Ticket {
    queue: File,
    name: OsString,
    arrived: u128,
    jobs: u32,
    _fd: File,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so that no prober ever finds the
        // name unlocked; the successor wakes when `_fd` closes right after.
        let _ = sys::unlink_at(self.queue.as_fd(), &self.name);
    }
}

/// A ticket's name, parsed: `<arrived>.<pid>.<jobs>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TicketName {
    arrived: u128,
    jobs: u32,
    name: OsString,
}

fn parse_ticket(name: &OsStr) -> Option<TicketName> {
    let s = std::str::from_utf8(name.as_bytes()).ok()?;
    let mut it = s.split('.');
    let arrived = it.next()?.parse().ok()?;
    let _pid: u32 = it.next()?.parse().ok()?;
    let jobs = it.next()?.parse().ok()?;
    it.next().is_none().then(|| TicketName {
        arrived,
        jobs,
        name: name.to_os_string(),
    })
}

/// A slot file's name is its number, written canonically.
fn parse_slot(name: &OsStr) -> Option<u32> {
    // Canonical: digits only, no leading zero (so no "0" either). Allocation-free,
    // since a scan parses every name in the id's directory.
    let b = name.as_bytes();
    if b.first().is_none_or(|&c| c == b'0') || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl IdDir {
    /// Whether this id's directory or its queue was removed or replaced.
    fn vanished(&self) -> bool {
        moved_away(&self.path, self.fd.as_fd()) || moved_away(&self.queue_path, self.queue.as_fd())
    }

    /// Whether slot `k` is free (or has no file). Call under the mutex.
    fn is_free(&self, lock_dir: &LockDir, k: u32) -> Result<bool> {
        match self.open_slot_probe(lock_dir, k)? {
            None => Ok(true),
            Some(fd) => Ok(sys::probe_shared(&fd)? == Probe::Taken),
        }
    }

    /// The per-id mutex, exclusive for takers, shared for `--status`. Held for
    /// microseconds at a time, so a blocking lock is right.
    fn mutex(&self, lock_dir: &LockDir, shared: bool) -> Result<File> {
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
        // Over NFS, flock is emulated with byte-range locks, and an exclusive
        // one needs a descriptor open for writing. Locally any will do, so a
        // file we may not write (another member's, a read-only filesystem)
        // is still locked through a read-only one.
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
        let st = check_regular(lock_dir, &fd, &path)?;
        lock_dir.fix_mode(&fd, &st, &path)?;
        sys::lock_blocking(&fd, shared)
            .with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(fd)
    }

    fn open_error(
        &self,
        e: io::Error,
        dir: BorrowedFd,
        name: &OsStr,
        path: &Path,
    ) -> anyhow::Error {
        if e.raw_os_error() == Some(libc::ELOOP) {
            not_what_it_should_be(dir, name, path, "a regular file")
        } else {
            anyhow::Error::new(e).context(format!("cannot open {}", path.display()))
        }
    }

    fn slot_numbers(&self) -> Result<Vec<u32>> {
        let names = sys::list_dir(self.fd.as_fd())
            .with_context(|| format!("cannot list {}", self.path.display()))?;
        let mut slots: Vec<u32> = names.iter().filter_map(|n| parse_slot(n)).collect();
        slots.sort_unstable();
        Ok(slots)
    }

    /// Opens slot `k` read-only for probing: probes never generate the
    /// `IN_CLOSE_WRITE` that wakes waiters. `None` if it does not exist.
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
                    check_regular(lock_dir, &fd, &self.path.join(&name))?;
                }
                Ok(Some(fd))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.open_error(e, self.fd.as_fd(), &name, &self.path.join(&name))),
        }
    }

    /// Counts the held slots and finds the lowest free one. Call under the mutex.
    fn scan(&self, lock_dir: &LockDir) -> Result<Scan> {
        let slots = self.slot_numbers()?;
        let mut held = 0;
        let mut first_free_file = None;
        for &k in &slots {
            let Some(fd) = self.open_slot_probe(lock_dir, k)? else {
                continue;
            };
            match sys::probe_shared(&fd)
                .with_context(|| format!("cannot probe {}/{k}", self.path.display()))?
            {
                Probe::Busy => held += 1,
                Probe::Taken => {
                    first_free_file.get_or_insert(k);
                }
            }
        }
        // The smallest number without a file is free too.
        let mut missing = 1;
        for &k in &slots {
            if k == missing {
                missing += 1;
            } else if k > missing {
                break;
            }
        }
        let lowest_free = first_free_file.map_or(missing, |f: u32| f.min(missing));
        Ok(Scan { held, lowest_free })
    }

    /// Takes slot `k`, which the scan found free. Call under the mutex. `None`
    /// if it was not free after all (a file replaced from outside): rescan.
    fn take(&self, lock_dir: &LockDir, k: u32, req: &Request) -> Result<Option<SlotFile>> {
        let name = OsString::from(k.to_string());
        let path = self.path.join(&name);
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = sys::open_at(self.fd.as_fd(), &name, flags, lock_dir.file_mode())
            .map_err(|e| self.open_error(e, self.fd.as_fd(), &name, &path))?;
        let st = check_regular(lock_dir, &fd, &path)?;
        #[cfg(test)]
        tests::BETWEEN_OPEN_AND_LOCK.with_borrow_mut(|hook| hook.as_mut().map(|h| h(&path)));
        lock_dir.fix_mode(&fd, &st, &path)?;
        if sys::try_lock_exclusive(&fd)
            .with_context(|| format!("cannot lock {}", path.display()))?
            == Probe::Busy
        {
            return Ok(None);
        }
        // The path must still name the inode we locked.
        match sys::lstat_at(self.fd.as_fd(), &name) {
            Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => {}
            _ => return Ok(None),
        }
        // The command inherits this descriptor. Shell scripts name descriptors
        // 0-9 in redirections (`exec 9>lock; flock 9` is flock(1)'s own idiom),
        // so keep it above them, where a script cannot close it by accident.
        let fd = sys::move_fd_above(fd, 10);
        let mut slot = SlotFile {
            file: fd,
            number: k,
            path,
            lock_path: lock_dir.path.clone(),
            id: req.id.clone(),
            guard: None,
            pending_guard: None,
            record: Record {
                pid: std::process::id(),
                host: sys::hostname(),
                started: SystemTime::now(),
                jobs: req.jobs,
                command: req.command.to_string(),
            },
            _watcher: None,
            len: st.st_size as u64,
        };
        // The record is for --status only: a full disk must not stop the job,
        // which holds its slot all the same.
        let _ = slot.write_record();
        Ok(Some(slot))
    }

    /// Joins the queue. Call under the mutex, so that arrival order is ticket order.
    fn enqueue(&self, lock_dir: &LockDir, jobs: u32) -> Result<Ticket> {
        let arrived = sys::monotonic_nanos();
        let name = OsString::from(format!("{arrived}.{}.{jobs}", std::process::id()));
        let path = self.queue_path.join(&name);
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let fd = sys::open_at(self.queue.as_fd(), &name, flags, lock_dir.file_mode())
            .with_context(|| format!("cannot create {}", path.display()))?;
        let st =
            sys::fstat(fd.as_fd()).with_context(|| format!("cannot stat {}", path.display()))?;
        lock_dir.fix_mode(&fd, &st, &path)?;
        let queue = self
            .queue
            .try_clone()
            .context("cannot duplicate a descriptor")?;
        let ticket = Ticket {
            queue,
            name,
            arrived,
            jobs,
            _fd: fd,
        };
        if sys::try_lock_exclusive(&ticket._fd)
            .with_context(|| format!("cannot lock {}", path.display()))?
            == Probe::Busy
        {
            bail!("{} is locked by someone else", path.display());
        }
        Ok(ticket)
    }

    /// The queue, oldest first, as names (liveness is checked on demand).
    fn tickets(&self) -> Result<Vec<TicketName>> {
        let names = sys::list_dir(self.queue.as_fd())
            .with_context(|| format!("cannot list {}", self.queue_path.display()))?;
        let mut tickets: Vec<TicketName> = names.iter().filter_map(|n| parse_ticket(n)).collect();
        tickets.sort_by_key(|t| t.arrived);
        Ok(tickets)
    }

    /// Opens a ticket if its owner is alive. A dead owner's ticket is removed:
    /// names are never reused, so this cannot remove a live one.
    fn open_live_ticket(&self, t: &TicketName) -> Option<File> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = sys::open_at(self.queue.as_fd(), &t.name, flags, 0).ok()?;
        match sys::probe_shared(&fd) {
            Ok(Probe::Busy) => Some(fd),
            Ok(Probe::Taken) => {
                let _ = sys::unlink_at(self.queue.as_fd(), &t.name);
                None
            }
            Err(_) => None,
        }
    }

    /// The oldest live waiter that arrived before `me` (everyone, for a
    /// newcomer) and would be admitted with `held` slots held.
    fn oldest_admissible(&self, me: Option<&Ticket>, held: u32) -> Result<Option<TicketName>> {
        for t in self.tickets()? {
            if me.is_some_and(|me| t.arrived >= me.arrived) {
                break;
            }
            if t.jobs > held && self.open_live_ticket(&t).is_some() {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// The nearest older live waiter with the same N: the one `me` follows.
    fn predecessor(&self, me: &Ticket) -> Result<Option<File>> {
        let older = self
            .tickets()?
            .into_iter()
            .filter(|t| t.jobs == me.jobs && t.arrived < me.arrived);
        for t in older.rev() {
            if let Some(fd) = self.open_live_ticket(&t) {
                return Ok(Some(fd));
            }
        }
        Ok(None)
    }

    /// Live waiters, for `--status`. Call under the (shared) mutex.
    fn count_waiters(&self) -> Result<u32> {
        Ok(self
            .tickets()?
            .iter()
            .filter(|t| self.open_live_ticket(t).is_some())
            .count() as u32)
    }
}

/// Refuses anything but a regular file of ours (or of our shared group).
fn check_regular(lock_dir: &LockDir, fd: &File, path: &Path) -> Result<libc::stat> {
    let st = sys::fstat(fd.as_fd()).with_context(|| format!("cannot stat {}", path.display()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        bail!(
            "{} is not a regular file; refusing to use it",
            path.display()
        );
    }
    lock_dir.check_owner(&st, path)?;
    Ok(st)
}

/// What the holder of a slot writes into it.
#[derive(Debug, Clone)]
struct Record {
    pid: u32,
    host: String,
    started: SystemTime,
    jobs: u32,
    command: String,
}

impl Record {
    fn render(&self) -> String {
        let started = self.started.duration_since(UNIX_EPOCH).unwrap_or_default();
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        format!(
            "qsem-slot 1\npid {}\nhost {}\nstarted {}.{:03}\njobs {}\ncommand {}\n",
            self.pid,
            one_line(&self.host),
            started.as_secs(),
            started.subsec_millis(),
            self.jobs,
            one_line(&self.command)
        )
    }

    fn parse(text: &str) -> Record {
        let mut r = Record {
            pid: 0,
            host: "?".into(),
            started: UNIX_EPOCH,
            jobs: 0,
            command: "?".into(),
        };
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "pid" => r.pid = value.parse().unwrap_or(0),
                "host" => r.host = value.to_string(),
                "started" => {
                    if let Ok(secs) = value.parse::<f64>() {
                        r.started = UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0));
                    }
                }
                "jobs" => r.jobs = value.parse().unwrap_or(0),
                "command" => r.command = value.to_string(),
                _ => {}
            }
        }
        r
    }
}

/// A held slot: the exclusively locked, writable slot file.
struct SlotFile {
    file: File,
    number: u32,
    record: Record,
    path: PathBuf,
    /// Where a background job's failure is recorded (see [`Slot::finish`]).
    lock_path: PathBuf,
    id: Id,
    /// Puts the slot back if its file is removed; `None` for a slot taken
    /// back by a guard, which watches it itself.
    guard: Option<Guard>,
    /// The guard to start once the command has run a while; see [`Upkeep`].
    pending_guard: Option<Upkeep>,
    /// The inotify instance this process waited with, if it was a chain head.
    /// Closing one waits for the kernel's fsnotify mark reaper (an SRCU grace
    /// period, several milliseconds), so it is closed here, after `file` (fields
    /// drop in order): once the job has ended, not between the slot and its start.
    _watcher: Option<Inotify>,
    /// The file's length as last known: a record overwrites the one before
    /// it, and the file is cut only after a longer one (an ftruncate costs a
    /// filesystem transaction, and a job writes its record twice).
    len: u64,
}

impl SlotFile {
    /// Writes the record for --status. A record that cannot be written whole
    /// (a full disk) is cut off rather than left half stale.
    fn write_record(&mut self) -> io::Result<()> {
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
        self.set_child(pid);
    }

    /// Readable once the guard is due to start (see [`Upkeep`]).
    fn events(&self) -> Option<BorrowedFd<'_>> {
        self.pending_guard.as_ref().map(|u| u.timer.as_fd())
    }

    /// Starts the guard once the command has run for one [`GUARD_POLL`]. A
    /// lock file's slot is never lost, so there is no news to tell.
    fn take_events(&mut self) -> Vec<SlotEvent> {
        if self
            .pending_guard
            .as_ref()
            .is_some_and(|u| Instant::now() >= u.at)
            && let Some(upkeep) = self.pending_guard.take()
        {
            self.guard = Guard::start(*upkeep.watch);
            if let Some(guard) = &self.guard {
                guard.child.store(self.record.pid, Ordering::Relaxed);
            }
        }
        Vec::new()
    }

    fn finish(self: Box<Self>, failure: Option<&str>) -> Result<()> {
        let Some(line) = failure else {
            return Ok(());
        };
        let dir = LockDir::open(&self.lock_path, true)?;
        record_failure(&dir, &self.id, line)
    }
}

impl SlotFile {
    /// Records the command's pid for --status (and for a guard's record).
    fn set_child(&mut self, pid: u32) {
        self.record.pid = pid;
        if let Some(guard) = &self.guard {
            guard.child.store(pid, Ordering::Relaxed);
        }
        // The record is informational: a failure to update it changes nothing.
        let _ = self.write_record();
    }
}

/// A guard due to start once the command has run for one [`GUARD_POLL`]: its
/// first look would come no sooner, and a thread made at once would delay
/// every job's start (a clone and a malloc arena) for nothing. The timer is
/// the slot's event descriptor, so that the runner, which polls it, calls
/// [`Slot::take_events`] when it is time.
struct Upkeep {
    at: Instant,
    timer: OwnedFd,
    watch: Box<Watch>,
}

impl Upkeep {
    fn new(watch: Watch) -> io::Result<Upkeep> {
        use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
        let timer = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        let due = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: GUARD_POLL.as_secs() as _,
                tv_nsec: GUARD_POLL.subsec_nanos() as _,
            },
        };
        rustix::time::timerfd_settime(&timer, TimerfdTimerFlags::empty(), &due)?;
        Ok(Upkeep {
            at: Instant::now() + GUARD_POLL,
            timer,
            watch: Box::new(watch),
        })
    }
}

/// Puts a held slot back when its file is removed or replaced from outside
/// (`rm -rf` of the lock directory, a tmp cleaner). The lock lives on in the
/// removed file, where no taker can see it, so without this a newcomer would
/// be admitted beside the running job. A thread that looks every
/// [`GUARD_POLL`] (two `stat`s; no inotify instance, which waiters need more),
/// stopped and joined when the slot is released. It cannot close the window
/// between the removal and its next look, nor act once qsem is killed.
struct Guard {
    /// Closing it stops the thread.
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The child's pid, for the record of a slot taken back.
    child: Arc<AtomicU32>,
}

/// What a guard watches, and what it needs to take the slot back.
struct Watch {
    lock_path: PathBuf,
    id: Id,
    jobs: u32,
    command: String,
    started: SystemTime,
    number: u32,
    path: PathBuf,
    dev: libc::dev_t,
    ino: libc::ino_t,
}

impl Guard {
    /// `None` if no thread can be had: the slot is then simply unguarded.
    fn start(watch: Watch) -> Option<Guard> {
        let (read, write) = sys::pipe().ok()?;
        let child = Arc::new(AtomicU32::new(0));
        let pid = child.clone();
        let thread = std::thread::Builder::new()
            .name("qsem-guard".into())
            .stack_size(64 * 1024)
            .spawn(move || guard(watch, read, &pid))
            .ok()?;
        Some(Guard {
            stop: Some(write),
            thread: Some(thread),
            child,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The thread's poll sees the pipe hang up, and it releases what it holds.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn guard(mut w: Watch, stop: OwnedFd, child: &AtomicU32) {
    // The slot taken back, held until the job ends.
    let mut _again: Option<SlotFile> = None;
    let mut complained = false;
    // Started one period after the slot was taken: the first look is at once.
    let mut first = true;
    loop {
        if !first {
            let until = Instant::now() + GUARD_POLL;
            match sys::poll_readable(&[stop.as_raw_fd()], Some(until)) {
                Ok(ready) if ready.is_empty() => {}
                _ => return,
            }
        }
        first = false;
        if !gone(&w.path, w.dev, w.ino) {
            continue;
        }
        match retake(&w) {
            Ok((mut slot, others)) => {
                // The record is the job's, as before the removal.
                slot.record.started = w.started;
                match child.load(Ordering::Relaxed) {
                    0 => {
                        let _ = slot.write_record();
                    }
                    pid => slot.set_child(pid),
                }
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
                report::line(&w.id, &msg);
                let Ok(st) = sys::fstat(slot.file.as_fd()) else {
                    return;
                };
                (w.number, w.dev, w.ino) = (slot.number, st.st_dev, st.st_ino);
                w.path.clone_from(&slot.path);
                _again = Some(slot);
                complained = false;
            }
            Err(e) if !complained => {
                report::line(
                    &w.id,
                    &format!(
                        "{} was removed while this job held it, and cannot be put back: {e:#}",
                        w.path.display()
                    ),
                );
                complained = true;
            }
            Err(_) => {}
        }
    }
}

/// Whether `path` no longer names the file (dev, ino). Errors other than
/// "not there" are no evidence: false.
fn gone(path: &Path, dev: libc::dev_t, ino: libc::ino_t) -> bool {
    names_another(std::fs::symlink_metadata(path), dev, ino)
}

/// Whether a path's metadata shows that it no longer names the file
/// `(dev, ino)`: another file is there, or nothing is.
fn names_another(meta: io::Result<std::fs::Metadata>, dev: libc::dev_t, ino: libc::ino_t) -> bool {
    use std::os::unix::fs::MetadataExt;
    match meta {
        Ok(m) => m.dev() != dev || m.ino() != ino,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
        ),
    }
}

/// Takes the watched slot back (its own number if free, else the lowest free
/// one), re-creating the directories; also says how many others hold slots.
fn retake(w: &Watch) -> Result<(SlotFile, u32)> {
    let dir = LockDir::open(&w.lock_path, true)?;
    let id_dir = dir.id_dir(&w.id, true)?.expect("created");
    let _mutex = id_dir.mutex(&dir, false)?;
    let req = Request {
        max_waiting: None,
        background: false,
        id: &w.id,
        jobs: w.jobs,
        deadline: None,
        command: &w.command,
    };
    for _ in 0..100 {
        let scan = id_dir.scan(&dir)?;
        let k = if id_dir.is_free(&dir, w.number)? {
            w.number
        } else {
            scan.lowest_free
        };
        if let Some(slot) = id_dir.take(&dir, k, &req)? {
            return Ok((slot, scan.held));
        }
    }
    bail!("slot files in {} keep changing", id_dir.path.display())
}

/// Appends a failed background job's report line to the id's failure file,
/// for the next --wait-all.
fn record_failure(lock_dir: &LockDir, id: &Id, line: &str) -> Result<()> {
    let dir = lock_dir.id_dir(id, true)?.expect("created");
    let _mutex = dir.mutex(lock_dir, false)?;
    let path = dir.queue_path.join(FAILED);
    let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW;
    let fd = sys::open_at(
        dir.queue.as_fd(),
        OsStr::new(FAILED),
        flags,
        lock_dir.file_mode(),
    )
    .map_err(|e| dir.open_error(e, dir.queue.as_fd(), OsStr::new(FAILED), &path))?;
    check_regular(lock_dir, &fd, &path)?;
    let text = format!("{}\n", line.replace(['\n', '\r'], " "));
    io::Write::write_all(&mut &fd, text.as_bytes())
        .with_context(|| format!("cannot write to {}", path.display()))
}

/// The lock-file engine.
pub struct Files {
    dir: LockDir,
    verbose: bool,
}

impl Files {
    pub fn new(dir: LockDir, verbose: bool) -> Files {
        Files { dir, verbose }
    }
}

/// What a chain head decided under the mutex.
enum Decision {
    Took(SlotFile),
    /// A newcomer found `--max-waiting` invocations waiting already.
    Crowded,
    Wait {
        held: u32,
        defer_to: Option<TicketName>,
    },
}

impl Files {
    /// One admission attempt under the mutex. A newcomer (`me` is `None`) that
    /// is not admitted joins the queue in the same critical section.
    fn attempt(
        &self,
        dir: &IdDir,
        req: &Request,
        me: Option<&Ticket>,
    ) -> Result<(Decision, Option<Ticket>)> {
        let _mutex = dir.mutex(&self.dir, false)?;
        for _ in 0..100 {
            let scan = dir.scan(&self.dir)?;
            let defer_to = if scan.held < req.jobs {
                dir.oldest_admissible(me, scan.held)?
            } else {
                None
            };
            if scan.held >= req.jobs || defer_to.is_some() {
                if me.is_none()
                    && req
                        .max_waiting
                        .is_some_and(|k| dir.count_waiters().is_ok_and(|n| n >= k))
                {
                    return Ok((Decision::Crowded, None));
                }
                let ticket = match me {
                    None if req.deadline.is_none_or(|d| d > Instant::now()) => {
                        Some(dir.enqueue(&self.dir, req.jobs)?)
                    }
                    _ => None,
                };
                return Ok((
                    Decision::Wait {
                        held: scan.held,
                        defer_to,
                    },
                    ticket,
                ));
            }
            if let Some(slot) = dir.take(&self.dir, scan.lowest_free, req)? {
                return Ok((Decision::Took(slot), None));
            }
        }
        bail!(
            "slot files in {} keep changing under qsem; is something else writing there?",
            dir.path.display()
        )
    }

    fn say(&self, req: &Request, msg: &str) {
        if self.verbose {
            report::line(req.id, msg);
        }
    }
}

/// Why a wait ended.
enum Woke {
    /// Something changed: look again.
    Changed,
    /// A scheduled look came due (see [`Relook`]); nothing was heard.
    Due,
    TimedOut,
    Signal(Received),
}

/// What, besides a stop signal and the deadline, ends a sleep.
#[derive(Clone, Copy)]
enum Wake<'a> {
    /// A descriptor becoming readable (inotify, a helper thread's pipe).
    On(BorrowedFd<'a>),
    /// Nothing to watch (no inotify could be had): look again every
    /// [`FALLBACK_POLL`].
    Fallback,
    /// Nothing: only a signal or the deadline.
    Never,
}

impl<'a> Wake<'a> {
    /// A chain head's watcher, or the fallback when no inotify could be had.
    fn watcher(fd: Option<BorrowedFd<'a>>) -> Wake<'a> {
        fd.map_or(Wake::Fallback, Wake::On)
    }
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
struct Relook {
    /// When the next look is due, and how many came before it.
    next: Option<(Instant, u32)>,
}

impl Relook {
    /// Looks after the first this many ms, doubling, this many times.
    const FIRST_MS: u64 = 1;
    const LOOKS: u32 = 12;

    fn new() -> Relook {
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
    fn restart(&mut self) {
        self.schedule(0);
    }

    /// After a wake: a new series if something was heard, the next look of
    /// the series if one came due.
    fn after(&mut self, woke: &Woke) {
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

    fn due(&self) -> Option<Instant> {
        self.next.map(|(at, _)| at)
    }
}

/// Sleeps until `wake` says so, `look_at` comes, a stop signal arrives, or the
/// deadline passes.
fn sleep_on(
    wake: Wake,
    look_at: Option<Instant>,
    signals: &mut Signals,
    deadline: Option<Instant>,
) -> Result<Woke> {
    let (fds, look_at) = match wake {
        Wake::On(fd) => (vec![fd], look_at),
        Wake::Fallback => {
            let at = Instant::now() + FALLBACK_POLL;
            (Vec::new(), Some(look_at.map_or(at, |l| l.min(at))))
        }
        Wake::Never => (Vec::new(), look_at),
    };
    let until = deadline.into_iter().chain(look_at).min();
    Ok(match signals.wait(&fds, until)? {
        signals::Wake::Signal(r) => Woke::Signal(r),
        signals::Wake::Ready(_) => Woke::Changed,
        signals::Wake::Timeout if deadline.is_some_and(|d| Instant::now() >= d) => Woke::TimedOut,
        signals::Wake::Timeout => Woke::Due,
    })
}

/// Sleeps until the predecessor's ticket is released: a helper thread blocks in
/// `flock` on it while this thread polls the signal pipe and the deadline.
fn follow(pred: File, signals: &mut Signals, deadline: Option<Instant>) -> Result<Woke> {
    let (read, write) = sys::pipe().context("cannot create a pipe")?;
    std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = sys::lock_blocking(&pred, true);
            drop(pred);
            // The pipe only needs to become readable; a full or closed pipe is fine.
            let _ = std::io::Write::write(&mut File::from(write), b"x");
        })
        .context("cannot start a thread")?;
    sleep_on(Wake::On(read.as_fd()), None, signals, deadline)
}

/// `Ok(None)` for an error explained by the directories having vanished.
fn unless_vanished<T>(dir: &IdDir, r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(_) if dir.vanished() => Ok(None),
        Err(e) => Err(e),
    }
}

impl Files {
    /// A taken slot, with a guard that puts it back should its file be removed.
    /// The guard starts when the command has run for [`GUARD_POLL`] (see
    /// [`Upkeep`]).
    fn guarded(&self, mut slot: SlotFile, req: &Request) -> Acquired {
        if let Ok(st) = sys::fstat(slot.file.as_fd()) {
            slot.pending_guard = Upkeep::new(Watch {
                lock_path: self.dir.path.clone(),
                id: req.id.clone(),
                jobs: req.jobs,
                command: req.command.to_string(),
                started: slot.record.started,
                number: slot.number,
                path: slot.path.clone(),
                dev: st.st_dev,
                ino: st.st_ino,
            })
            .ok();
        }
        Acquired::Slot(Box::new(slot))
    }

    /// One acquisition in the current directories; `None` if they were
    /// removed meanwhile (the caller starts again in new ones).
    fn acquire_here(&mut self, req: &Request, signals: &mut Signals) -> Result<Option<Acquired>> {
        let dir = match self.dir.id_dir(req.id, true) {
            Ok(dir) => dir.expect("created"),
            Err(_) if self.dir.vanished() => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some((decision, ticket)) = unless_vanished(&dir, self.attempt(&dir, req, None))? else {
            return Ok(None);
        };
        let (held, mut defer_to) = match decision {
            Decision::Took(slot) => return Ok(Some(self.guarded(slot, req))),
            Decision::Crowded => return Ok(Some(Acquired::Crowded)),
            Decision::Wait { held, defer_to } => (held, defer_to),
        };
        let Some(ticket) = ticket else {
            self.say(req, "no free slot; giving up at once");
            return Ok(Some(Acquired::TimedOut));
        };
        self.say(
            req,
            &format!("waiting for a slot ({held} held, limit {})", req.jobs),
        );
        let since = Instant::now();
        let mut watcher: Option<(Inotify, i32)> = None;
        let mut deferred_wd = None;
        let mut relook = Relook::new();
        loop {
            if dir.vanished() {
                return Ok(None);
            }
            let Some(pred) = unless_vanished(&dir, dir.predecessor(&ticket))? else {
                return Ok(None);
            };
            let woke = if let Some(pred) = pred {
                follow(pred, signals, req.deadline)?
            } else {
                // A chain head: watch the slots before looking at them, so that
                // no release can fall between the look and the sleep.
                if watcher.is_none() {
                    watcher = Inotify::new()
                        .and_then(|ino| {
                            ino.watch(&dir.path, libc::IN_CLOSE_WRITE | libc::IN_DELETE_SELF)
                                .map(|wd| (ino, wd))
                        })
                        .ok();
                }
                if let (Some(old), Some((ino, _))) = (deferred_wd.take(), &watcher) {
                    ino.unwatch(old);
                }
                if let Some(blocker) = defer_to.take() {
                    if let Some((ino, _)) = &watcher {
                        let path = dir.queue_path.join(&blocker.name);
                        deferred_wd = ino
                            .watch(&path, libc::IN_CLOSE_WRITE | libc::IN_DELETE_SELF)
                            .ok();
                    }
                    // It may have left before the watch was set: look again at once.
                    if dir.open_live_ticket(&blocker).is_none() {
                        continue;
                    }
                    relook.restart();
                } else {
                    let attempt = self.attempt(&dir, req, Some(&ticket));
                    let Some((decision, _)) = unless_vanished(&dir, attempt)? else {
                        return Ok(None);
                    };
                    match decision {
                        Decision::Took(mut slot) => {
                            drop(ticket);
                            slot._watcher = watcher.take().map(|(ino, _)| ino);
                            return Ok(Some(self.guarded(slot, req)));
                        }
                        Decision::Wait {
                            defer_to: Some(blocker),
                            ..
                        } => {
                            defer_to = Some(blocker);
                            continue;
                        }
                        // A queued waiter is never turned away for the backlog.
                        Decision::Wait { defer_to: None, .. } | Decision::Crowded => {}
                    }
                }
                sleep_on(
                    Wake::watcher(watcher.as_ref().map(|(ino, _)| ino.as_fd())),
                    relook.due(),
                    signals,
                    req.deadline,
                )?
            };
            if let Some((ino, _)) = &watcher {
                ino.drain();
            }
            relook.after(&woke);
            match woke {
                Woke::Changed | Woke::Due => {}
                Woke::TimedOut => {
                    self.say(
                        req,
                        &format!(
                            "no slot within {:.3}s; giving up",
                            since.elapsed().as_secs_f64()
                        ),
                    );
                    return Ok(Some(Acquired::TimedOut));
                }
                Woke::Signal(signo) => return Ok(Some(Acquired::Interrupted(signo))),
            }
        }
    }
}

impl Semaphore for Files {
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired> {
        for _ in 0..100 {
            if let Some(done) = self.acquire_here(req, signals)? {
                return Ok(done);
            }
            // Removed while we waited (rm -rf, a tmp cleaner): our queue is
            // gone with it, so queue again in new directories — but only once
            // the holders' guards have had time to put their slots back, or we
            // would take a slot whose job still runs.
            self.say(req, "the lock directory was removed; queueing again");
            let settle = Instant::now() + 2 * GUARD_POLL;
            match sleep_on(
                Wake::Never,
                None,
                signals,
                Some(req.deadline.map_or(settle, |d| d.min(settle))),
            )? {
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
                    });
                }
                continue;
            };
            let _mutex = dir.mutex(&self.dir, true)?;
            let mut holders = Vec::new();
            for k in dir.slot_numbers()? {
                let Some(fd) = dir.open_slot_probe(&self.dir, k)? else {
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
            let waiting = dir.count_waiters()?;
            if only.is_some() || !holders.is_empty() || waiting > 0 {
                out.push(IdStatus {
                    id,
                    holders,
                    waiting,
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
        let watcher = Inotify::new().ok().filter(|ino| {
            ino.watch(&dir.path, libc::IN_CLOSE_WRITE | libc::IN_DELETE_SELF)
                .is_ok()
                && ino.watch(&dir.queue_path, libc::IN_CLOSE_WRITE).is_ok()
        });
        let mut relook = Relook::new();
        loop {
            let (held, waiting) = {
                let _mutex = dir.mutex(&self.dir, true)?;
                (dir.scan(&self.dir)?.held, dir.count_waiters()?)
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
            let woke = sleep_on(
                Wake::watcher(watcher.as_ref().map(Inotify::as_fd)),
                relook.due(),
                signals,
                deadline,
            )?;
            if let Some(ino) = &watcher {
                ino.drain();
            }
            relook.after(&woke);
            match woke {
                Woke::Changed | Woke::Due => {}
                Woke::TimedOut => return Ok(Idle::TimedOut),
                Woke::Signal(signo) => return Ok(Idle::Interrupted(signo)),
            }
        }
    }

    fn take_failures(&mut self, id: &Id) -> Result<u32> {
        let Some(dir) = self.dir.id_dir(id, false)? else {
            return Ok(0);
        };
        let _mutex = dir.mutex(&self.dir, false)?;
        let path = dir.queue_path.join(FAILED);
        let flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = match sys::open_at(dir.queue.as_fd(), OsStr::new(FAILED), flags, 0) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(dir.open_error(e, dir.queue.as_fd(), OsStr::new(FAILED), &path));
            }
        };
        check_regular(&self.dir, &fd, &path)?;
        let mut file = fd;
        let mut text = Vec::new();
        io::Read::read_to_end(&mut file, &mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        file.set_len(0)
            .with_context(|| format!("cannot empty {}", path.display()))?;
        Ok(text.iter().filter(|&&b| b == b'\n').count() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

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
        let files = Files::new(LockDir::open(&root, true).unwrap(), false);
        let id = Id::new(OsStr::new("x")).unwrap();
        let dir = files.dir.id_dir(&id, true).unwrap().unwrap();
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
        let got = files.attempt(&dir, &req, None);
        BETWEEN_OPEN_AND_LOCK.set(None);
        let got = got.map(|(decision, _)| match decision {
            Decision::Took(slot) => slot,
            Decision::Wait { .. } | Decision::Crowded => panic!("a free slot was not taken"),
        });
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
    fn ticket_names() {
        let t = parse_ticket(OsStr::new("123.45.6")).unwrap();
        assert_eq!((t.arrived, t.jobs), (123, 6));
        for bad in ["lock", "1.2", "1.2.3.4", "a.2.3", ".tmp"] {
            assert_eq!(parse_ticket(OsStr::new(bad)), None, "{bad}");
        }
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
