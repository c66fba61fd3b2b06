//! The outcomes of background jobs, for the next `--wait-all`: one small
//! file per job in `<id>/queue/`, so that no outcome needs a lock, a write
//! that a full disk could refuse, or the mutex, to be recorded or counted.
//!
//! ```text
//! run.<pid>.<t>    a --bg job holding its slot; its supervisor flocks it
//! fail.<pid>.<t>   a --bg job that failed (its report line inside, if the
//!                  disk had room for it)
//! ```
//!
//! The record is created (locked, see `LockDir::create_locked`, so that
//! nobody ever sees it unlocked) the moment the slot is
//! taken, with the slot still held. The supervisor ends it in
//! [`Slot::finish`](super::super::Slot::finish), before releasing the slot:
//! removed for a success, renamed to `fail.*` for a failure. A rename needs
//! no free block or inode, so a full disk cannot lose a failure once the job
//! started (and a disk too full to create the record refuses the job with a
//! clear error, 125). A `run.*` record found unlocked belongs to a
//! supervisor that died (SIGKILL, OOM) before saying how its job ended: it
//! counts as a failure whose status is unknown. Counting removes what it
//! counts, each file by one `unlink`, so two `--wait-all` never count a
//! failure twice.

use super::lockdir::{IdDir, LockDir};
use crate::sys::{self, Probe};
use anyhow::{Context, Result};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

const RUNNING: &str = "run.";
const FAILED: &str = "fail.";

/// A background job's running record, locked for as long as its supervisor lives.
pub(super) struct Running {
    queue_path: PathBuf,
    name: OsString,
    fd: File,
}

impl Running {
    /// Creates the record of a job that has just taken its slot.
    pub fn create(lock_dir: &LockDir, dir: &IdDir) -> Result<Running> {
        let tail = format!("{}.{}", std::process::id(), sys::monotonic_nanos());
        let name = OsString::from(format!("{RUNNING}{tail}"));
        let fd = lock_dir.create_locked(dir, &name)?;
        Ok(Running {
            queue_path: dir.queue_path.clone(),
            name,
            fd,
        })
    }

    /// Ends the record: gone for a success, a failure record for a failure.
    pub fn finish(mut self, failure: Option<&str>) -> Result<()> {
        let path = self.queue_path.join(&self.name);
        let Some(line) = failure else {
            return std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()));
        };
        // The line is for whoever looks; the count needs only the name.
        let _ = writeln!(self.fd, "{}", line.replace(['\n', '\r'], " "));
        let tail = &self.name.as_bytes()[RUNNING.len()..];
        let mut failed = OsString::from(FAILED);
        failed.push(OsStr::from_bytes(tail));
        let to = self.queue_path.join(&failed);
        std::fs::rename(&path, &to).with_context(|| {
            format!(
                "cannot record a failed background job as {} (it will count as one whose status is unknown)",
                to.display()
            )
        })
    }
}

/// Counts, and removes, the failures recorded under `dir` since the last
/// call: failure records, and running records whose supervisor died.
pub(super) fn take_failures(dir: &IdDir) -> Result<u32> {
    let names = sys::list_dir(dir.queue.as_fd())
        .with_context(|| format!("cannot list {}", dir.queue_path.display()))?;
    let mut failed = 0;
    for name in names {
        let bytes = name.as_bytes();
        // Running records are left alone while locked, and so is a file
        // still being created (`new.*`, unlocked for a moment before it is
        // renamed into place).
        let counts = bytes.starts_with(FAILED.as_bytes())
            || (bytes.starts_with(RUNNING.as_bytes()) && abandoned(dir, &name));
        if !counts {
            continue;
        }
        match sys::unlink_at(dir.queue.as_fd(), &name) {
            Ok(()) => failed += 1,
            // Counted by another --wait-all, or finished meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot remove {}", dir.queue_path.join(&name).display())
                });
            }
        }
    }
    Ok(failed)
}

/// Whether a record's supervisor is gone: nobody holds its lock.
fn abandoned(dir: &IdDir, name: &OsStr) -> bool {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    sys::open_at(dir.queue.as_fd(), name, flags, 0)
        .is_ok_and(|fd| sys::probe_shared(&fd).is_ok_and(|p| p == Probe::Taken))
}
