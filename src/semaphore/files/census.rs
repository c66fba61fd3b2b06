//! The census (`<id>/queue/census`): one byte per slot, 1 while a qsem holds
//! it, so that a taker need not probe the slot files of the slots it knows
//! are taken.
//!
//! Counting the held slots by probing costs four system calls per slot file
//! (open, fstat, flock, close): about 8 ms for 999 held slots here, against
//! 1 ms for the whole of an uncontended job. With the census, a taker probes
//! only the slot files whose byte is 0, and counts every slot whose byte is 1
//! as held without looking.
//!
//! The census is advice that can only make qsem more careful, never less:
//!
//! - A 1 is counted as held whether or not it still is (a holder killed
//!   before clearing its byte leaves a 1). So an admission made on the
//!   census's count is made on a count at least as large as the truth, and
//!   the admission rule holds.
//! - A 0 is never believed: that slot's file is probed. A slot held by
//!   someone who keeps no census (an older qsem, a process that cleared its
//!   byte early, the job's children that inherited the slot after qsem
//!   ended) is found so.
//! - A refusal is never made on the census: a taker that would be refused
//!   probes every slot file, and clears the 1s of the slots it finds free.
//!
//! So a lost, stale or garbled census costs probes, never the limit: anyone
//! who may write in the id's directory can make qsem slower through it, as
//! through any file there, and no more. Bytes are written one at a time,
//! with `pwrite`: a holder clears its own byte when it lets go of the slot,
//! without the mutex; all other writes are under it. The file lives in the
//! queue directory so that writing it never wakes the waiters that watch
//! the slot files.

use super::lockdir::{IdDir, LockDir};
use crate::sys;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

const CENSUS: &str = "census";

/// The census, open for reading and writing.
pub(super) struct Census {
    file: File,
}

impl Census {
    /// Opens (or creates) the id's census. `None` if that cannot be done,
    /// for whatever reason: a taker without one probes every slot file.
    pub fn open(dir: &IdDir, lock_dir: &LockDir) -> Option<Census> {
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let file = sys::open_at(
            dir.queue.as_fd(),
            OsStr::new(CENSUS),
            flags,
            lock_dir.file_mode(),
        )
        .ok()?;
        let path = dir.queue_path.join(CENSUS);
        let st = lock_dir.check_regular(&file, &path).ok()?;
        lock_dir.fix_mode(&file, &st, &path).ok()?;
        Some(Census { file })
    }

    /// The bytes of slots `1..=upto` (index `k - 1` for slot `k`); missing
    /// ones (a short file) are 0.
    pub fn read(&self, upto: u32) -> Vec<u8> {
        let mut marks = vec![0u8; upto as usize];
        let mut at = 0;
        while at < marks.len() {
            match self.file.read_at(&mut marks[at..], at as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => at += n,
            }
        }
        marks
    }

    /// Sets slot `k`'s byte to `held`. A write that fails leaves the byte as
    /// it was: a 0 that should be 1 costs a probe, a 1 that should be 0 a
    /// probe at the next refusal.
    pub fn set(&self, k: u32, held: bool) {
        let _ = self.file.write_all_at(&[u8::from(held)], u64::from(k - 1));
    }
}

/// A held slot's byte in the census: set when the slot is taken, cleared
/// when this is dropped (after the slot file is closed, see `SlotFile`).
pub(super) struct Mark {
    census: Census,
    slot: u32,
}

impl Mark {
    pub fn new(census: Census, slot: u32) -> Mark {
        census.set(slot, true);
        Mark { census, slot }
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.census.set(self.slot, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census(dir: &std::path::Path) -> Census {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(CENSUS))
            .unwrap();
        Census { file }
    }

    #[test]
    fn marks_are_set_while_held_and_cleared_on_drop() {
        let tmp = std::env::temp_dir().join(format!("qsem-census-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let c = census(&tmp);
        assert_eq!(c.read(3), [0, 0, 0], "a new census marks nothing");
        let m = Mark::new(census(&tmp), 2);
        assert_eq!(c.read(3), [0, 1, 0]);
        c.set(3, true);
        assert_eq!(c.read(4), [0, 1, 1, 0], "bytes past the end read as 0");
        drop(m);
        assert_eq!(c.read(3), [0, 0, 1]);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
