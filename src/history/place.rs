//! Where the journals live, `DIR/.history`, and the checks every file and
//! directory in it passes: opened `O_NOFOLLOW | O_CLOEXEC` (and
//! `O_NONBLOCK`, so that a FIFO put in a file's place cannot hang a job),
//! refused if it is not what it should be or belongs to someone else, and
//! created with the lock directory's modes (0600 and 0700, or group
//! read-write in a setgid group-shared lock directory).

use crate::id::Id;
use crate::sys;
use anyhow::{Context, Result, bail};
use rustix::fs::{FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The journals' directory inside the lock directory.
const HISTORY: &str = ".history";
/// Taken shared by readers and exclusively by a rotator, so that a reading
/// never sees a generation both in the carry and in the files.
const LOCK: &str = ".lock";

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// The flags every journal file is opened with, besides the access mode.
pub const FILE_FLAGS: OFlags = OFlags::NOFOLLOW
    .union(OFlags::CLOEXEC)
    .union(OFlags::NONBLOCK);

/// A directory of the journals, open, with its path for messages.
pub struct Dir {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

/// The journals' directory, open, and how files in it are made.
pub struct Place {
    pub root: Dir,
    /// The group of a setgid, group-writable lock directory, which shares it.
    shared_gid: Option<u32>,
    euid: u32,
}

impl Place {
    /// Opens `DIR/.history`, creating both if `create`; `None` if missing.
    pub fn open(lock_dir: &Path, create: bool) -> Result<Option<Place>> {
        let shown = lock_dir.display();
        // The lock directory itself may be reached through a symlink (as for
        // the lock files); what is inside it may not.
        let flags = DIR_FLAGS.difference(OFlags::NOFOLLOW);
        let fd = match rustix::fs::open(lock_dir, flags, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(lock_dir)
                    .with_context(|| format!("cannot create lock directory {shown}"))?;
                rustix::fs::open(lock_dir, flags, Mode::empty())
            }
            Err(Errno::NOENT) => return Ok(None),
            other => other,
        }
        .with_context(|| format!("cannot open lock directory {shown}"))?;
        let st = stat(fd.as_fd(), lock_dir)?;
        let euid = sys::euid();
        if st.st_uid != euid && st.st_uid != 0 {
            bail!("lock directory {shown} belongs to uid {}", st.st_uid);
        }
        let mode = st.st_mode;
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            bail!("lock directory {shown} is writable by everyone and lacks the sticky bit");
        }
        let shared = mode & 0o2000 != 0 && mode & 0o020 != 0;
        let mut place = Place {
            root: Dir {
                fd,
                path: lock_dir.to_path_buf(),
            },
            shared_gid: shared.then_some(st.st_gid),
            euid,
        };
        match place.subdir(&place.root, OsStr::new(HISTORY), create)? {
            Some(history) => {
                place.root = history;
                Ok(Some(place))
            }
            None => Ok(None),
        }
    }

    pub fn file_mode(&self) -> Mode {
        Mode::from_raw_mode(if self.shared_gid.is_some() {
            0o660
        } else {
            0o600
        })
    }

    fn dir_mode(&self) -> Mode {
        Mode::from_raw_mode(if self.shared_gid.is_some() {
            0o2770
        } else {
            0o700
        })
    }

    /// Refuses what is not ours (or the sharing group's), or not of `kind`,
    /// and gives what is ours the mode it should have (the umask may have
    /// narrowed it).
    fn check(&self, fd: BorrowedFd, path: &Path, kind: FileType, want: Mode) -> Result<Stat> {
        let st = stat(fd, path)?;
        if FileType::from_raw_mode(st.st_mode) != kind {
            let what = match kind {
                FileType::Directory => "directory",
                _ => "regular file",
            };
            bail!("{} is not a {what}", path.display());
        }
        if st.st_uid != self.euid && self.shared_gid != Some(st.st_gid) {
            let uid = st.st_uid;
            bail!("{} belongs to another user (uid {uid})", path.display());
        }
        if st.st_uid == self.euid && st.st_mode & 0o7777 != want.as_raw_mode() {
            rustix::fs::fchmod(fd, want)
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        }
        Ok(st)
    }

    /// Opens the directory `name` in `parent`, creating it if `create`.
    pub fn subdir(&self, parent: &Dir, name: &OsStr, create: bool) -> Result<Option<Dir>> {
        let path = parent.path.join(name);
        loop {
            match rustix::fs::openat(&parent.fd, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => {
                    self.check(fd.as_fd(), &path, FileType::Directory, self.dir_mode())?;
                    return Ok(Some(Dir { fd, path }));
                }
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&parent.fd, name, self.dir_mode()) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("cannot create {}", path.display()));
                        }
                    }
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    return Err(e)
                        .with_context(|| format!("{} is not a directory", path.display()));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            }
        }
    }

    /// The directory that holds `id`'s file in the directory `area` of the
    /// journals' directory (`""` for the current journals), and the file's
    /// name there; `None` if it is missing and not `create`d.
    pub fn parent_of(&self, id: &Id, area: &str, create: bool) -> Result<Option<(Dir, OsString)>> {
        let mut parts = id.components();
        let leaf = parts.pop().expect("an id has a component");
        let mut dir = Dir {
            fd: rustix::io::dup(&self.root.fd).context("cannot duplicate a descriptor")?,
            path: self.root.path.clone(),
        };
        let above = (!area.is_empty()).then(|| OsString::from(area));
        for part in above.into_iter().chain(parts) {
            match self.subdir(&dir, &part, create)? {
                Some(sub) => dir = sub,
                None => return Ok(None),
            }
        }
        Ok(Some((dir, leaf)))
    }

    /// Opens the regular file `name` in `dir` with `access` (and
    /// [`FILE_FLAGS`]); `None` if it is missing (and `access` does not
    /// create it).
    pub fn file(&self, dir: &Dir, name: &OsStr, access: OFlags) -> Result<Option<(OwnedFd, Stat)>> {
        let path = dir.path.join(name);
        let fd = match rustix::fs::openat(&dir.fd, name, access | FILE_FLAGS, self.file_mode()) {
            Err(Errno::NOENT) if !access.contains(OFlags::CREATE) => return Ok(None),
            Err(e @ Errno::LOOP) => {
                return Err(e).with_context(|| format!("{} is a symbolic link", path.display()));
            }
            other => other.with_context(|| format!("cannot open {}", path.display()))?,
        };
        let st = self.check(fd.as_fd(), &path, FileType::RegularFile, self.file_mode())?;
        Ok(Some((fd, st)))
    }

    /// Takes the rotation lock exclusively (a rotator); held until the
    /// descriptor is dropped.
    pub fn lock(&self) -> Result<OwnedFd> {
        let access = OFlags::RDWR | OFlags::CREATE;
        let (fd, _) = self
            .file(&self.root, OsStr::new(LOCK), access)?
            .expect("created");
        self.flock(fd, FlockOperation::LockExclusive)
    }

    /// Takes the rotation lock shared (a reader). A reader that cannot create
    /// it (a read-only lock directory) reads without: nobody can rotate there.
    pub fn lock_shared(&self) -> Result<Option<OwnedFd>> {
        let name = OsStr::new(LOCK);
        let found = match self.file(&self.root, name, OFlags::RDONLY)? {
            None => self
                .file(&self.root, name, OFlags::RDWR | OFlags::CREATE)
                .ok()
                .flatten(),
            found => found,
        };
        found
            .map(|(fd, _)| self.flock(fd, FlockOperation::LockShared))
            .transpose()
    }

    fn flock(&self, fd: OwnedFd, op: FlockOperation) -> Result<OwnedFd> {
        rustix::fs::flock(&fd, op)
            .with_context(|| format!("cannot lock {}", self.root.path.join(LOCK).display()))?;
        Ok(fd)
    }
}

pub fn stat(fd: BorrowedFd, path: &Path) -> Result<Stat> {
    rustix::fs::fstat(fd).with_context(|| format!("cannot stat {}", path.display()))
}
