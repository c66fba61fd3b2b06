//! The lock directory and the id directories in it: who may use them, how
//! they are created, and how a file in them is opened without being fooled.
//!
//! Every file is opened relative to its directory's descriptor with
//! `O_NOFOLLOW` and `O_CLOEXEC`; symlinks, non-regular files and files of
//! other users are refused, except that a setgid, group-writable lock
//! directory is a semaphore shared by its group, whose files qsem makes
//! group-writable whatever the umask. Directories qsem creates, the lock
//! directory's missing parents included, are 0700 whatever the umask.
//!
//! What is not qsem's is ignored, never refused, by the listing of ids: a
//! stray file (`notes.txt`) and hidden entries (names starting with `.`,
//! which no encoded id has; `.history` lives there).

use super::QUEUE;
use crate::id::Id;
use crate::sys;
use anyhow::{Context, Result, anyhow, bail};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The prefix of a queue file being created (see [`LockDir::create_locked`]);
/// one found unlocked was abandoned by a process that died creating it.
pub(super) const CREATING: &str = "new.";

/// The lock directory, checked and open.
pub struct LockDir {
    pub(super) path: PathBuf,
    fd: File,
    /// The group of a setgid, group-writable directory: a semaphore shared by it.
    shared_gid: Option<libc::gid_t>,
    euid: libc::uid_t,
}

/// One id's directory, open, with its queue directory.
pub(super) struct IdDir {
    pub path: PathBuf,
    pub fd: File,
    pub queue_path: PathBuf,
    pub queue: File,
}

/// Creates the missing directories of `path` (itself included), each 0700
/// whatever the umask; ones that exist are left as they are.
fn create_dirs(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if path.as_os_str().is_empty() || path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dirs(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        // The umask can only have taken bits away: put them back.
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

impl LockDir {
    /// Opens the lock directory, creating it and its missing parents (0700)
    /// if `create` and it is missing, and refuses one that others could
    /// tamper with.
    pub fn open(path: &Path, create: bool) -> Result<LockDir> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let fd = match sys::open_path(path, flags, 0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                create_dirs(path)
                    .with_context(|| format!("cannot create lock directory {}", path.display()))?;
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

    pub(super) fn file_mode(&self) -> libc::mode_t {
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
    pub(super) fn fix_mode(&self, fd: &File, st: &libc::stat, path: &Path) -> Result<()> {
        if st.st_uid == self.euid && st.st_mode & 0o777 != self.file_mode() {
            sys::fchmod(fd.as_fd(), self.file_mode())
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        }
        Ok(())
    }

    /// A file or directory of ours, or of the group that shares the directory.
    pub(super) fn owns(&self, st: &libc::stat) -> bool {
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

    /// Refuses anything but a regular file of ours (or of our shared group).
    pub(super) fn check_regular(&self, fd: &File, path: &Path) -> Result<libc::stat> {
        let st =
            sys::fstat(fd.as_fd()).with_context(|| format!("cannot stat {}", path.display()))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!(
                "{} is not a regular file; refusing to use it",
                path.display()
            );
        }
        self.check_owner(&st, path)?;
        Ok(st)
    }

    /// Creates `name` in `dir` (which must not exist), with our file mode.
    pub(super) fn create_file(&self, dir: BorrowedFd, name: &OsStr, path: &Path) -> Result<File> {
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let fd = sys::open_at(dir, name, flags, self.file_mode())
            .with_context(|| format!("cannot create {}", path.display()))?;
        let st =
            sys::fstat(fd.as_fd()).with_context(|| format!("cannot stat {}", path.display()))?;
        self.fix_mode(&fd, &st, path)?;
        Ok(fd)
    }

    /// Creates `name` in `dir`'s queue, exclusively locked, as nq does: under
    /// a temporary name ([`CREATING`]), locked, then renamed into place, so
    /// that nobody who lists the queue (a waiter, `--status`, which takes no
    /// mutex) ever finds it unlocked and takes its owner for dead.
    pub(super) fn create_locked(&self, dir: &IdDir, name: &OsStr) -> Result<File> {
        let tmp = OsString::from(format!(
            "{CREATING}{}.{}",
            std::process::id(),
            sys::monotonic_nanos()
        ));
        let path = dir.queue_path.join(&tmp);
        let fd = self.create_file(dir.queue.as_fd(), &tmp, &path)?;
        let to = dir.queue_path.join(name);
        let locked = sys::try_lock_exclusive(&fd)
            .with_context(|| format!("cannot lock {}", path.display()))
            .and_then(|got| match got {
                sys::Probe::Taken => std::fs::rename(&path, &to)
                    .with_context(|| format!("cannot create {}", to.display())),
                sys::Probe::Busy => Err(anyhow!("{} is locked by someone else", path.display())),
            });
        if let Err(e) = locked {
            let _ = sys::unlink_at(dir.queue.as_fd(), &tmp);
            return Err(e);
        }
        Ok(fd)
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
    pub(super) fn id_dir(&self, id: &Id, create: bool) -> Result<Option<IdDir>> {
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

    /// Every id that has a directory here. Hidden entries and anything that
    /// is not a directory are not qsem's ids, and are passed over.
    pub(super) fn ids(&self) -> Result<Vec<Id>> {
        let mut ids = Vec::new();
        let mut stack = vec![(
            self.fd
                .try_clone()
                .context("cannot duplicate a descriptor")?,
            Vec::<OsString>::new(),
        )];
        let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        while let Some((fd, prefix)) = stack.pop() {
            let names = sys::list_dir(fd.as_fd())
                .with_context(|| format!("cannot list lock directory {}", self.path.display()))?;
            for name in names {
                if name.as_bytes().starts_with(b".")
                    || !sys::lstat_at(fd.as_fd(), &name)
                        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                {
                    continue;
                }
                let mut parts = prefix.clone();
                parts.push(name.clone());
                if Id::is_long_prefix(&name) {
                    if let Ok(sub) = sys::open_at(fd.as_fd(), &name, dir_flags, 0) {
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

    /// Whether the lock directory was removed or replaced since it was opened.
    /// Its path may be a symlink (it is opened following one), so follow it.
    pub(super) fn vanished(&self) -> bool {
        sys::fstat(self.fd.as_fd())
            .is_ok_and(|st| names_another(std::fs::metadata(&self.path), st.st_dev, st.st_ino))
    }
}

impl IdDir {
    /// Whether this id's directory or its queue was removed or replaced.
    pub fn vanished(&self) -> bool {
        moved_away(&self.path, self.fd.as_fd()) || moved_away(&self.queue_path, self.queue.as_fd())
    }

    /// The error for a failed open of `name` in `dir`: precise for a symlink.
    pub fn open_error(
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
}

/// Whether `path` no longer names the directory open as `fd` (removed, or
/// replaced).
fn moved_away(path: &Path, fd: BorrowedFd) -> bool {
    sys::fstat(fd).is_ok_and(|st| gone(path, st.st_dev, st.st_ino))
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

/// Whether `path` no longer names the file (dev, ino). Errors other than
/// "not there" are no evidence: false.
pub(super) fn gone(path: &Path, dev: libc::dev_t, ino: libc::ino_t) -> bool {
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
