//! The journal's files, under the lock directory:
//!
//! ```text
//! .history/<encoded id>          the current journal of an id
//! .history/.1/<encoded id>       the one before it, dropped at the next rotation
//! .history/.carry/<encoded id>   the totals of every generation dropped so far
//! .history/.lock                 rotators exclusive, readers shared
//! ```
//!
//! The id is encoded as for its lock files (`id.rs`), so a long id is a few
//! nested directories here too; names starting with `.` are never ids.
//!
//! Appending is one `write(2)` to a file opened `O_APPEND`, which the kernel
//! performs whole, so records of concurrent writers never mix, and takes no
//! lock. The size is bounded by rotation: a writer that finds the journal at
//! its limit takes the rotation lock, checks that the name still leads to
//! that file (a concurrent writer may have rotated it already), adds the
//! generation about to be dropped to the carry, renames the journal over
//! `.1`, and appends to a fresh file. A writer still holding the old file
//! appends to it under its new name, so it is counted when that generation
//! is dropped in turn.

use super::place::{Dir, Place};
use super::record::{self, Record};
use super::totals::Totals;
use crate::id::Id;
use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, OFlags};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

/// The previous generation, inside the journals' directory.
const PREVIOUS: &str = ".1";
/// The carried totals, inside the journals' directory.
const CARRY: &str = ".carry";
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

/// Appends one rendered record to `id`'s journal, rotating it first if it has
/// reached `limit` bytes.
pub fn append(lock_dir: &Path, id: &Id, record: &[u8], limit: u64) -> Result<()> {
    let place = Place::open(lock_dir, true)?.expect("created");
    let (dir, leaf) = place.parent_of(id, "", true)?.expect("created");
    let access = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE;
    let mut rotated = false;
    loop {
        let (file, st) = place.file(&dir, &leaf, access)?.expect("created");
        // Once: a fresh journal that others filled meanwhile takes this one too.
        if !rotated && st.st_size as u64 >= limit {
            rotate(&place, id, &dir, &leaf, &file)?;
            rotated = true;
            continue;
        }
        let path = dir.path.join(&leaf);
        let written = rustix::io::write(&file, record)
            .with_context(|| format!("cannot write to {}", path.display()))?;
        if written != record.len() {
            let whole = record.len();
            bail!(
                "cannot write to {}: {written} of {whole} bytes written",
                path.display()
            );
        }
        return Ok(());
    }
}

/// Moves the full journal `file` over the previous generation, unless a
/// concurrent writer did so first, carrying the dropped generation's totals.
fn rotate(place: &Place, id: &Id, dir: &Dir, leaf: &OsStr, file: &OwnedFd) -> Result<()> {
    let _lock = place.lock()?;
    let mine = rustix::fs::fstat(file).context("cannot stat a journal")?;
    let named = rustix::fs::statat(&dir.fd, leaf, AtFlags::SYMLINK_NOFOLLOW);
    if !named.is_ok_and(|s| s.st_dev == mine.st_dev && s.st_ino == mine.st_ino) {
        return Ok(());
    }
    let (old, _) = place.parent_of(id, PREVIOUS, true)?.expect("created");
    let (carry_dir, _) = place.parent_of(id, CARRY, true)?.expect("created");
    let mut carry = read_carry(place, &carry_dir, leaf)?;
    for r in records_of(place, &old, leaf)? {
        carry.add(&r);
    }
    // Under a name that is never an id's, then into place at once.
    let temporary = OsString::from(format!(".{}", leaf.to_string_lossy()));
    let access = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC;
    let (tmp, _) = place
        .file(&carry_dir, &temporary, access)?
        .expect("created");
    let text = carry.render();
    let path = carry_dir.path.join(leaf);
    let written = rustix::io::write(&tmp, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    if written != text.len() {
        bail!("cannot write {}: short write", path.display());
    }
    rustix::fs::renameat(&carry_dir.fd, &temporary, &carry_dir.fd, leaf)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    rustix::fs::renameat(&dir.fd, leaf, &old.fd, leaf)
        .with_context(|| format!("cannot rotate {}", dir.path.join(leaf).display()))
}

/// One id's journal as read: the totals carried from dropped generations,
/// and the records kept, oldest generation first.
pub struct Journal {
    pub id: Id,
    pub carry: Totals,
    pub records: Vec<Record>,
}

/// The journals of `only`, or of every id with one.
pub fn read(lock_dir: &Path, only: Option<&Id>) -> Result<Vec<Journal>> {
    let Some(place) = Place::open(lock_dir, false)? else {
        return Ok(only.map_or_else(Vec::new, |id| vec![empty(id)]));
    };
    // Shared: no rotation moves a generation while it is being read.
    let _lock = place.lock_shared()?;
    let ids = match only {
        Some(id) => vec![id.clone()],
        None => {
            let mut ids = list(&place, &place.root)?;
            if let Some(previous) = place.subdir(&place.root, OsStr::new(PREVIOUS), false)? {
                ids.extend(list(&place, &previous)?);
            }
            ids.sort();
            ids.dedup();
            ids
        }
    };
    let mut out = Vec::new();
    for id in ids {
        let mut journal = empty(&id);
        if let Some((dir, leaf)) = place.parent_of(&id, CARRY, false)? {
            journal.carry = read_carry(&place, &dir, &leaf)?;
        }
        for area in [PREVIOUS, ""] {
            if let Some((dir, leaf)) = place.parent_of(&id, area, false)? {
                journal.records.extend(records_of(&place, &dir, &leaf)?);
            }
        }
        out.push(journal);
    }
    Ok(out)
}

fn empty(id: &Id) -> Journal {
    Journal {
        id: id.clone(),
        carry: Totals::default(),
        records: Vec::new(),
    }
}

/// The whole records of the journal file `name` in `dir`; none if it is missing.
fn records_of(place: &Place, dir: &Dir, name: &OsStr) -> Result<Vec<Record>> {
    let text = read_text(place, dir, name)?;
    Ok(record::parse_all(&text).collect())
}

/// The carry file `name` in `dir`; nothing carried if it is missing.
fn read_carry(place: &Place, dir: &Dir, name: &OsStr) -> Result<Totals> {
    let text = read_text(place, dir, name)?;
    if text.is_empty() {
        return Ok(Totals::default());
    }
    let path = dir.path.join(name);
    Totals::parse(&text).with_context(|| format!("{} is not a carry of qsem's", path.display()))
}

fn read_text(place: &Place, dir: &Dir, name: &OsStr) -> Result<String> {
    let Some((fd, _)) = place.file(dir, name, OFlags::RDONLY)? else {
        return Ok(String::new());
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)
        .with_context(|| format!("cannot read {}", dir.path.join(name).display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The ids with a journal in the directory `top` of one generation.
fn list(place: &Place, top: &Dir) -> Result<Vec<Id>> {
    let mut ids = Vec::new();
    let fd = rustix::io::dup(&top.fd).context("cannot duplicate a descriptor")?;
    let mut stack = vec![(
        Dir {
            fd,
            path: top.path.clone(),
        },
        Vec::new(),
    )];
    while let Some((dir, prefix)) = stack.pop() {
        let shown = || format!("cannot list {}", dir.path.display());
        for entry in rustix::fs::Dir::read_from(dir.fd.as_fd()).with_context(shown)? {
            let entry = entry.with_context(shown)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            let mut parts: Vec<OsString> = prefix.clone();
            parts.push(name.clone());
            if Id::is_long_prefix(&name) {
                if let Some(sub) = place.subdir(&dir, &name, false)? {
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
