//! What std does not cover, on rustix's safe system calls: `*at()` file
//! operations relative to a directory descriptor, `poll`, `inotify`,
//! descriptor moves, identity queries; and the locks, which are std's
//! `File::lock` family (flock(2) on Linux) in the forms qsem needs.
//!
//! These serve the engines (`semaphore/`), whose code calls them by these
//! names and signatures; [`poll_readable`] is also the one poll under
//! `Signals::wait` and `--each`'s relay thread. Three `unsafe` blocks are left, each where no safe
//! form exists for what the caller hands over: [`fstat`] and [`lstat_at`]
//! return libc's `stat`, which the file engine is written against (rustix's
//! `Stat` is another type); [`poll_readable`] takes raw descriptor numbers;
//! [`adopt_inherited`] takes ownership of a descriptor inherited by number.
//! Elsewhere, `unsafe` is only where no safe form exists, each with its
//! `// SAFETY:` line: the signal handler (`signals.rs`), the `--bg`
//! supervisor's `pre_exec` (`background.rs`), getpwuid_r for a home
//! directory (`config/dir.rs`), sysconf for the online CPUs (`jobs.rs`), the
//! etcd engine's watchdog fork (`semaphore/etcd/watchdog.rs`), and the
//! PostgreSQL engine's removal of a password from the environment at
//! start-up and its registering of the signal pipe with tokio
//! (`semaphore/postgres/{secrets,waiting}.rs`); tests aside.

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::retry_on_intr;
use std::ffi::OsStr;
use std::fs::{File, TryLockError};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

fn flags(flags: libc::c_int) -> OFlags {
    // Open flags are non-negative bit sets; rustix keeps unknown bits as given.
    OFlags::from_bits_retain(flags.unsigned_abs()) | OFlags::CLOEXEC
}

/// `openat(2)`; `O_CLOEXEC` is always added.
pub fn open_at(
    dir: BorrowedFd,
    name: &OsStr,
    flags_: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    let fd =
        retry_on_intr(|| rustix::fs::openat(dir, name, flags(flags_), Mode::from_raw_mode(mode)))?;
    Ok(File::from(fd))
}

/// `open(2)` of an absolute or relative path; `O_CLOEXEC` is always added.
pub fn open_path(
    path: &std::path::Path,
    flags_: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    Ok(retry_on_intr(|| {
        rustix::fs::open(path, flags(flags_), Mode::from_raw_mode(mode))
    })?)
}

pub fn mkdir_at(dir: BorrowedFd, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
}

pub fn unlink_at(dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?)
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub fn fstat(fd: BorrowedFd) -> io::Result<libc::stat> {
    use std::os::fd::AsRawFd;
    // SAFETY: stat is plain data, fully written by a successful fstat.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstat(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

/// `fstatat(2)` without following a final symlink.
pub fn lstat_at(dir: BorrowedFd, name: &OsStr) -> io::Result<libc::stat> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: as in `fstat`; `name` is a valid C string.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

pub fn fchmod(fd: BorrowedFd, mode: libc::mode_t) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

/// The names in a directory, without `.` and `..`.
pub fn list_dir(dir: BorrowedFd) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    // A fresh open of the directory: its own offset, starting at 0.
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}
/// The outcome of a non-blocking lock attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Taken,
    Busy,
}

/// A non-blocking shared lock (`flock(LOCK_SH | LOCK_NB)`): whether an
/// exclusive holder exists, without ever making a concurrent exclusive taker
/// fail, since shared probes do not disturb one another. Released by closing
/// the file.
pub fn probe_shared(file: &File) -> io::Result<Probe> {
    retry(|| file.try_lock_shared())
}

/// A non-blocking exclusive lock (`flock(LOCK_EX | LOCK_NB)`).
pub fn try_lock_exclusive(file: &File) -> io::Result<Probe> {
    retry(|| file.try_lock())
}

/// A blocking lock, shared or exclusive.
pub fn lock_blocking(file: &File, shared: bool) -> io::Result<()> {
    loop {
        let locked = if shared {
            file.lock_shared()
        } else {
            file.lock()
        };
        match locked {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// std's `try_lock*` as a [`Probe`]; `EINTR` from a signal handler is retried.
fn retry(mut attempt: impl FnMut() -> Result<(), TryLockError>) -> io::Result<Probe> {
    loop {
        match attempt() {
            Ok(()) => return Ok(Probe::Taken),
            Err(TryLockError::WouldBlock) => return Ok(Probe::Busy),
            Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Moves a descriptor to the lowest free number at or above `min` (keeping
/// `FD_CLOEXEC`), closing the original. Where that cannot be done (a
/// descriptor limit at or below `min`, or none free above it), the descriptor
/// stays where it is: the move is a precaution, not a need.
pub fn move_fd_above(fd: File, min: RawFd) -> File {
    use std::os::fd::AsRawFd;
    if fd.as_raw_fd() >= min {
        return fd;
    }
    match rustix::io::fcntl_dupfd_cloexec(&fd, min) {
        Ok(new) => File::from(new),
        Err(_) => fd,
    }
}

/// Waits until one of `fds` is readable or `deadline` passes, sleeping in the
/// kernel. Returns the readable indices (empty on timeout). A signal handler's
/// `EINTR` returns early with nothing readable: the caller looks at its signal
/// pipe, which is one of `fds`, on the next round.
pub fn poll_readable(fds: &[RawFd], deadline: Option<Instant>) -> io::Result<Vec<usize>> {
    use rustix::event::{PollFd, PollFlags};
    // SAFETY: the caller's descriptors are open for the length of the call.
    let borrowed: Vec<BorrowedFd> = fds
        .iter()
        .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
        .collect();
    let mut pfds: Vec<PollFd> = borrowed
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let timeout = deadline.map(|d| {
        // Round up to whole milliseconds: never wake a hair early and spin.
        let left = d.saturating_duration_since(Instant::now());
        let ms = u64::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        rustix::time::Timespec::try_from(std::time::Duration::from_millis(ms)).unwrap_or(
            rustix::time::Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            },
        )
    });
    match rustix::event::poll(&mut pfds, timeout.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    }
    Ok(pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.revents().is_empty())
        .map(|(i, _)| i)
        .collect())
}

/// An inotify instance, non-blocking and close-on-exec.
pub struct Inotify(OwnedFd);

impl Inotify {
    pub fn new() -> io::Result<Inotify> {
        use rustix::fs::inotify::CreateFlags;
        Ok(Inotify(rustix::fs::inotify::init(
            CreateFlags::NONBLOCK | CreateFlags::CLOEXEC,
        )?))
    }

    pub fn watch(&self, path: &std::path::Path, mask: u32) -> io::Result<i32> {
        let mask = rustix::fs::inotify::WatchFlags::from_bits_retain(mask);
        Ok(rustix::fs::inotify::add_watch(&self.0, path, mask)?)
    }

    pub fn unwatch(&self, wd: i32) {
        // A stale `wd` only yields EINVAL.
        let _ = rustix::fs::inotify::remove_watch(&self.0, wd);
    }

    /// Discards queued events: the caller re-examines the state itself.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        while rustix::io::read(&self.0, &mut buf).is_ok_and(|n| n > 0) {}
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A pipe whose both ends are close-on-exec and non-blocking.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pipe::PipeFlags;
    Ok(rustix::pipe::pipe_with(
        PipeFlags::CLOEXEC | PipeFlags::NONBLOCK,
    )?)
}

/// The host name, or `?` if it cannot be read.
pub fn hostname() -> String {
    let name = rustix::system::uname();
    let name = name.nodename().to_string_lossy();
    if name.is_empty() {
        "?".into()
    } else {
        name.into_owned()
    }
}

pub fn euid() -> libc::uid_t {
    rustix::process::geteuid().as_raw()
}

/// Whether `gid` is one of this process's groups (effective or supplementary).
pub fn in_group(gid: libc::gid_t) -> bool {
    rustix::process::getegid().as_raw() == gid
        || rustix::process::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

/// A monotonic timestamp in nanoseconds, comparable across processes of one boot.
pub fn monotonic_nanos() -> u128 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Takes ownership of a descriptor inherited from the parent (by number, on
/// the command line), after checking that it is open; it becomes close-on-exec.
pub fn adopt_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: only for the check that follows, which fails with EBADF on a
    // closed descriptor; nothing is kept.
    rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) })?;
    // SAFETY: the descriptor is open, was handed to this process to own, and
    // nothing else in qsem refers to it by number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}
