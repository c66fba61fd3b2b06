//! Thin, safe wrappers over the few libc calls that std does not offer:
//! `*at()` file operations relative to a directory descriptor, `poll`,
//! `inotify`, and process-group queries; and the locks, which are std's
//! `File::lock` family (flock(2) on Linux) in the forms qsem needs.
//! Every `unsafe` block in qsem that is not about signals lives here.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{File, TryLockError};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Instant;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `openat(2)`; `O_CLOEXEC` is always added.
pub fn open_at(
    dir: BorrowedFd,
    name: &OsStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    let name = cstr(name)?;
    loop {
        // SAFETY: `name` is a valid C string; the returned descriptor is new and ours.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        match check(fd) {
            // SAFETY: openat returned a fresh descriptor that nobody else owns.
            Ok(fd) => return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) })),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `open(2)` of an absolute or relative path; `O_CLOEXEC` is always added.
pub fn open_path(
    path: &std::path::Path,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let path = cstr(path.as_os_str())?;
    // SAFETY: as in `open_at`.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    // SAFETY: open returned a fresh descriptor that nobody else owns.
    check(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdir_at(dir: BorrowedFd, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: `name` is a valid C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn unlink_at(dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: `name` is a valid C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

pub fn fstat(fd: BorrowedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, fully written by a successful fstat.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstat(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

/// `fstatat(2)` without following a final symlink.
pub fn lstat_at(dir: BorrowedFd, name: &OsStr) -> io::Result<libc::stat> {
    let name = cstr(name)?;
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
    // SAFETY: no memory is passed.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// The names in a directory, without `.` and `..`.
pub fn list_dir(dir: BorrowedFd) -> io::Result<Vec<std::ffi::OsString>> {
    // fdopendir takes ownership of its descriptor, so give it a duplicate that
    // starts at offset 0 (a dup shares the offset, hence the rewind).
    let dup = dir.try_clone_to_owned()?;
    // SAFETY: `dup` is ours to give away; fdopendir owns it from here and
    // closedir closes it. Entries are copied before the next readdir.
    unsafe {
        let raw = std::os::fd::IntoRawFd::into_raw_fd(dup);
        let d = libc::fdopendir(raw);
        if d.is_null() {
            let e = io::Error::last_os_error();
            libc::close(raw);
            return Err(e);
        }
        libc::rewinddir(d);
        let mut names = Vec::new();
        loop {
            *libc::__errno_location() = 0;
            let ent = libc::readdir(d);
            if ent.is_null() {
                let errno = *libc::__errno_location();
                libc::closedir(d);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                return Ok(names);
            }
            let name = CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_os_string());
            }
        }
    }
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
    if fd.as_raw_fd() >= min {
        return fd;
    }
    // SAFETY: no memory is passed; on success the new descriptor is fresh and ours.
    match check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) }) {
        // SAFETY: as above.
        Ok(new) => File::from(unsafe { OwnedFd::from_raw_fd(new) }),
        Err(_) => fd,
    }
}

/// Waits until one of `fds` is readable or `deadline` passes, sleeping in the
/// kernel. Returns the readable indices (empty on timeout). A signal handler's
/// `EINTR` returns early with nothing readable: the caller looks at its signal
/// pipe, which is one of `fds`, on the next round.
pub fn poll_readable(fds: &[RawFd], deadline: Option<Instant>) -> io::Result<Vec<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout = match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            // Round up, so that we never wake a hair early and spin.
            let ms = left.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    };
    // SAFETY: `pfds` is a valid, exclusively borrowed array of `len` pollfds.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    Ok(pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

/// An inotify instance, non-blocking and close-on-exec.
pub struct Inotify(OwnedFd);

impl Inotify {
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: no memory is passed; the descriptor is new and ours.
        let fd = check(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        // SAFETY: as above.
        Ok(Inotify(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn watch(&self, path: &std::path::Path, mask: u32) -> io::Result<i32> {
        let path = cstr(path.as_os_str())?;
        // SAFETY: `path` is a valid C string.
        check(unsafe { libc::inotify_add_watch(self.0.as_raw_fd(), path.as_ptr(), mask) })
    }

    pub fn unwatch(&self, wd: i32) {
        // SAFETY: no memory is passed; a stale `wd` only yields EINVAL.
        unsafe { libc::inotify_rm_watch(self.0.as_raw_fd(), wd) };
    }

    /// Discards queued events: the caller re-examines the state itself.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its length.
        while unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A pipe whose both ends are close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: pipe2 returned two fresh descriptors that nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The host name, or `?` if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; gethostname NUL-terminates on success
    // when the name fits, and we look for the NUL ourselves.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

pub fn euid() -> libc::uid_t {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether `gid` is one of this process's groups (effective or supplementary).
pub fn in_group(gid: libc::gid_t) -> bool {
    // SAFETY: getegid cannot fail; getgroups writes at most `n` entries into `groups`.
    unsafe {
        if libc::getegid() == gid {
            return true;
        }
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return false;
        }
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let n = libc::getgroups(n, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

/// A monotonic timestamp in nanoseconds, comparable across processes of one boot.
pub fn monotonic_nanos() -> u128 {
    // SAFETY: `ts` is fully written by a successful clock_gettime.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
    }
}

/// Takes ownership of a descriptor inherited from the parent (by number, on
/// the command line), after checking that it is open; it becomes close-on-exec.
pub fn adopt_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: no memory is passed; F_GETFD fails with EBADF on a closed descriptor.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: the descriptor is open, was handed to this process to own, and
    // nothing else in qsem refers to it by number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}
