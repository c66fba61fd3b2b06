//! The journal's files, under the lock directory:
//!
//! ```text
//! .history/<encoded id>      the current journal of an id
//! .history/.1/<encoded id>   the one before it, dropped at the next rotation
//! ```
//!
//! The id is encoded as for its lock files (`id.rs`), so a long id is a few
//! nested directories here too; names starting with `.` are never ids.
//!
//! Appending is one `write(2)` to a file opened `O_APPEND`, which the kernel
//! performs whole, so records of concurrent writers never mix. The size is
//! bounded by rotation: a writer that finds the journal at its limit takes
//! an exclusive `flock` on it, checks that the name still leads to it (a
//! concurrent writer may have rotated it already), renames it over `.1`, and
//! appends to a fresh file. A writer still holding the old file appends to it
//! under its new name, so nothing is lost but what `.1` held before.
//!
//! Files and directories are created with the lock directory's modes (0600
//! and 0700, or group read-write in a setgid group-shared lock directory),
//! opened `O_NOFOLLOW | O_CLOEXEC`, and refused if they are not what they
//! should be or belong to someone else.

use super::record::{self, Record};
use crate::id::Id;
use crate::sys;
use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The journals' directory inside the lock directory.
const HISTORY: &str = ".history";
/// The previous generation, inside [`HISTORY`].
const PREVIOUS: &str = ".1";
/// The size at which a journal is rotated when `QSEM_HISTORY_SIZE` is unset:
/// some 10,000 records, two generations of which are kept.
pub const DEFAULT_SIZE: u64 = 1024 * 1024;

/// The size limit of a journal: `QSEM_HISTORY_SIZE` bytes (at least one
/// record's worth), else [`DEFAULT_SIZE`]; `None` (no journal) if it is 0.
pub fn size_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| parse_size(std::env::var("QSEM_HISTORY_SIZE").ok().as_deref()))
}

/// `QSEM_HISTORY_SIZE`'s value; an unreadable one counts as unset.
fn parse_size(value: Option<&str>) -> Option<u64> {
    match value.map(str::trim).map(str::parse::<u64>) {
        Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n.max(record::MAX_RECORD as u64)),
        _ => Some(DEFAULT_SIZE),
    }
}

/// The journals' directory, open, and how files in it are made.
struct Place {
    path: PathBuf,
    fd: OwnedFd,
    /// The group of a setgid, group-writable lock directory, which shares it.
    shared_gid: Option<u32>,
    euid: u32,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Place {
    /// Opens `DIR/.history`, creating both if `create`; `None` if missing.
    fn open(lock_dir: &Path, create: bool) -> Result<Option<Place>> {
        let shown = lock_dir.display();
        // The lock directory itself may be reached through a symlink (as for
        // the lock files); what is inside it may not.
        let flags = DIR_FLAGS.difference(OFlags::NOFOLLOW);
        let dir = match rustix::fs::open(lock_dir, flags, Mode::empty()) {
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
        let st = stat(dir.as_fd(), lock_dir)?;
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
            path: lock_dir.to_path_buf(),
            fd: dir,
            shared_gid: shared.then_some(st.st_gid),
            euid,
        };
        match place.subdir(place.fd.as_fd(), OsStr::new(HISTORY), create)? {
            Some(history) => {
                place.fd = history;
                place.path.push(HISTORY);
                Ok(Some(place))
            }
            None => Ok(None),
        }
    }

    fn file_mode(&self) -> Mode {
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

    /// Refuses what is not ours (or the sharing group's), and gives what is
    /// ours the mode it should have (the umask may have narrowed it).
    fn check(&self, fd: BorrowedFd, path: &Path, want: Mode) -> Result<Stat> {
        let st = stat(fd, path)?;
        if st.st_uid != self.euid && self.shared_gid != Some(st.st_gid) {
            bail!(
                "{} belongs to another user (uid {})",
                path.display(),
                st.st_uid
            );
        }
        if st.st_uid == self.euid && st.st_mode & 0o7777 != want.as_raw_mode() {
            rustix::fs::fchmod(fd, want)
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        }
        Ok(st)
    }

    /// Opens the directory `name` in `parent`, creating it if `create`.
    fn subdir(&self, parent: BorrowedFd, name: &OsStr, create: bool) -> Result<Option<OwnedFd>> {
        let path = self.path.join(name);
        loop {
            match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => {
                    self.check(fd.as_fd(), &path, self.dir_mode())?;
                    return Ok(Some(fd));
                }
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(parent, name, self.dir_mode()) {
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

    /// The directory that holds `id`'s journal in generation `dir` (the
    /// journals' directory or [`PREVIOUS`]), and the journal's file name.
    fn parent_of(
        &self,
        id: &Id,
        previous: bool,
        create: bool,
    ) -> Result<Option<(OwnedFd, OsString)>> {
        let mut parts = id.components();
        let leaf = parts.pop().expect("an id has a component");
        let mut fd = rustix::io::dup(&self.fd).context("cannot duplicate a descriptor")?;
        let above = previous.then(|| OsString::from(PREVIOUS));
        for part in above.into_iter().chain(parts) {
            match self.subdir(fd.as_fd(), &part, create)? {
                Some(sub) => fd = sub,
                None => return Ok(None),
            }
        }
        Ok(Some((fd, leaf)))
    }
}

fn stat(fd: BorrowedFd, path: &Path) -> Result<Stat> {
    rustix::fs::fstat(fd).with_context(|| format!("cannot stat {}", path.display()))
}

/// Appends one rendered record to `id`'s journal, rotating it first if it has
/// reached `limit` bytes.
pub fn append(lock_dir: &Path, id: &Id, record: &[u8], limit: u64) -> Result<()> {
    let place = Place::open(lock_dir, true)?.expect("created");
    let (dir, leaf) = place.parent_of(id, false, true)?.expect("created");
    let path = place.path.join(&leaf);
    let flags =
        OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut rotated = false;
    loop {
        let file = rustix::fs::openat(&dir, &leaf, flags, place.file_mode())
            .with_context(|| format!("cannot open {}", path.display()))?;
        let st = place.check(file.as_fd(), &path, place.file_mode())?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            bail!("{} is not a regular file", path.display());
        }
        // Once: a fresh journal that others filled meanwhile takes this one too.
        if !rotated && st.st_size as u64 >= limit {
            rotate(&place, id, &dir, &leaf, &file, limit)?;
            rotated = true;
            continue;
        }
        let written = rustix::io::write(&file, record)
            .with_context(|| format!("cannot write to {}", path.display()))?;
        if written != record.len() {
            bail!(
                "cannot write to {}: only {written} of {} bytes written",
                path.display(),
                record.len()
            );
        }
        return Ok(());
    }
}

/// Moves the full journal `file` over the previous generation, unless a
/// concurrent writer did so first.
fn rotate(
    place: &Place,
    id: &Id,
    dir: &OwnedFd,
    leaf: &OsStr,
    file: &OwnedFd,
    limit: u64,
) -> Result<()> {
    let path = place.path.join(leaf);
    // Held only by rotators, for a rename: appenders never wait for it.
    rustix::fs::flock(file, FlockOperation::LockExclusive)
        .with_context(|| format!("cannot lock {}", path.display()))?;
    let mine = stat(file.as_fd(), &path)?;
    let named = rustix::fs::statat(dir, leaf, AtFlags::SYMLINK_NOFOLLOW);
    let still = named.is_ok_and(|s| s.st_dev == mine.st_dev && s.st_ino == mine.st_ino);
    if still && mine.st_size as u64 >= limit {
        let (old, _) = place.parent_of(id, true, true)?.expect("created");
        rustix::fs::renameat(dir, leaf, &old, leaf)
            .with_context(|| format!("cannot rotate {}", path.display()))?;
    }
    Ok(())
}

/// The records of `only`, or of every id with a journal, oldest first.
pub fn read(lock_dir: &Path, only: Option<&Id>) -> Result<Vec<(Id, Vec<Record>)>> {
    let Some(place) = Place::open(lock_dir, false)? else {
        return Ok(Vec::new());
    };
    let ids = match only {
        Some(id) => vec![id.clone()],
        None => {
            let mut ids = list(&place, place.fd.as_fd())?;
            if let Some(previous) = place.subdir(place.fd.as_fd(), OsStr::new(PREVIOUS), false)? {
                ids.extend(list(&place, previous.as_fd())?);
            }
            ids.sort();
            ids.dedup();
            ids
        }
    };
    let mut out = Vec::new();
    for id in ids {
        let mut text = Vec::new();
        for previous in [true, false] {
            if let Some((dir, leaf)) = place.parent_of(&id, previous, false)? {
                text.extend(read_file(&place, dir.as_fd(), &leaf)?);
            }
        }
        let records: Vec<Record> = record::parse_all(&String::from_utf8_lossy(&text)).collect();
        if !records.is_empty() || only.is_some() {
            out.push((id, records));
        }
    }
    Ok(out)
}

/// A journal's bytes up to its last whole record; nothing if it is missing.
fn read_file(place: &Place, dir: BorrowedFd, leaf: &OsStr) -> Result<Vec<u8>> {
    let path = place.path.join(leaf);
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dir, leaf, flags, Mode::empty()) {
        Err(Errno::NOENT) => return Ok(Vec::new()),
        other => other.with_context(|| format!("cannot open {}", path.display()))?,
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    // A record being written has no newline yet; a reader leaves it out.
    bytes.truncate(bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1));
    Ok(bytes)
}

/// The ids with a journal in the directory `dir` of one generation.
fn list(place: &Place, dir: BorrowedFd) -> Result<Vec<Id>> {
    let mut ids = Vec::new();
    let mut stack = vec![(
        rustix::io::dup(dir).context("cannot duplicate a descriptor")?,
        Vec::new(),
    )];
    while let Some((fd, prefix)) = stack.pop() {
        let entries = rustix::fs::Dir::read_from(&fd)
            .with_context(|| format!("cannot list {}", place.path.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", place.path.display()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            let mut parts: Vec<OsString> = prefix.clone();
            parts.push(name.clone());
            if Id::is_long_prefix(&name) {
                if let Some(sub) = place.subdir(fd.as_fd(), &name, false)? {
                    stack.push((sub, parts));
                }
                continue;
            }
            let refs: Vec<&OsStr> = parts.iter().map(OsString::as_os_str).collect();
            ids.extend(Id::from_components(&refs));
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limits() {
        assert_eq!(parse_size(None), Some(DEFAULT_SIZE));
        assert_eq!(parse_size(Some("0")), None);
        assert_eq!(parse_size(Some(" 65536 ")), Some(65536));
        assert_eq!(parse_size(Some("1")), Some(record::MAX_RECORD as u64));
        assert_eq!(parse_size(Some("lots")), Some(DEFAULT_SIZE));
    }
}
