//! The id's place among advisory locks: a slot is the advisory lock
//! `prefix << 20 | slot` (one-bigint form, so `pg_locks` shows it as
//! `classid` = the high 32 bits, `objid` = the low 32, `objsubid` = 1), where
//! `prefix` is 44 bits of FNV-1a 64 of the id; and the names that sessions
//! show in `application_name` for `--status`. Both are part of the interface
//! between qsem versions.

use super::record::Record;
use super::session::cut;
use crate::id::Id;

/// Slots fit in the low 20 bits of a key (`MAX_JOBS` is below 2^20).
pub const SLOT_BITS: u32 = 20;
pub const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const _: () = assert!(crate::jobs::MAX_JOBS as u64 <= SLOT_MASK);

/// The id's place among advisory locks: 44 bits of FNV-1a 64 of its bytes.
/// Part of the interface between qsem versions: it must never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub prefix: u64,
}

impl Keys {
    pub fn of(id: &Id) -> Keys {
        Keys {
            prefix: fnv1a(id.as_bytes().iter().copied()) >> SLOT_BITS,
        }
    }

    /// The lock of `slot`, as `pg_advisory_lock(bigint)` takes it.
    pub fn lock(&self, slot: u32) -> i64 {
        ((self.prefix << SLOT_BITS) | u64::from(slot)) as i64
    }

    /// The key's two halves in `pg_locks`: `classid`, and `objid >> 20`.
    fn halves(&self) -> (u64, u64) {
        (self.prefix >> 12, self.prefix & 0xfff)
    }

    pub fn hex(&self) -> String {
        format!("{:011x}", self.prefix)
    }

    /// The NOTIFY channel of the id.
    pub fn channel(&self) -> String {
        format!("qsem_{}", self.hex())
    }

    /// The condition on `pg_locks` for "a lock of this id", in database `db`
    /// (an SQL expression, see [`Session::db`]).
    pub fn locks_of(&self, db: &str) -> String {
        let (hi, lo) = self.halves();
        format!(
            "locktype = 'advisory' AND granted AND objsubid = 1 AND database = {db} \
             AND classid = '{hi}'::oid AND (objid::int8 >> {SLOT_BITS}) = {lo}"
        )
    }

    /// The condition on `pg_locks` for "this session holds `slot`".
    pub fn held_here(&self, db: &str, slot: u32) -> String {
        format!(
            "{} AND pid = pg_backend_pid() AND (objid::int8 & {SLOT_MASK}) = {slot}",
            self.locks_of(db)
        )
    }

    pub fn holder_name(&self, slot: u32, rec: &Record) -> String {
        let name = format!(
            "qsem h {} {slot} {} {}@{}",
            self.hex(),
            rec.jobs,
            rec.pid,
            rec.host
        );
        // application_name keeps 63 bytes.
        cut(&name, 63).to_string()
    }

    /// The name of a waiting head's session (`kind` `w`), or of a holder's
    /// that runs without a slot (`l`: it lost its slot and has not taken
    /// one again).
    pub fn session_name(&self, kind: char, rec: &Record) -> String {
        let name = format!(
            "qsem {kind} {} {} {}@{}",
            self.hex(),
            rec.jobs,
            rec.pid,
            rec.host
        );
        cut(&name, 63).to_string()
    }
}

/// FNV-1a 64 of `bytes`: the ids' keys, and the names of this host's files
/// for a server (its local queue, its remembered pooler check). Part of the
/// interface between qsem versions: it must never change.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The slot number of a key read from `pg_locks`, if it is one of `keys`.
pub fn slot_of(classid: u64, objid: u64) -> (u64, u32) {
    let key = (classid << 32) | objid;
    (key >> SLOT_BITS, (key & SLOT_MASK) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn keys_are_stable_and_wide() {
        let id = |s: &str| Keys::of(&Id::new(OsStr::new(s)).unwrap());
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c: the top 44 bits.
        assert_eq!(id("a").prefix, 0xaf63dc4c8601ec8c >> 20);
        // These two shared one 32-bit key.
        assert_ne!(id("job-439599"), id("job-622382"));
        let k = id("a");
        assert_eq!(k.lock(3) as u64 & SLOT_MASK, 3);
        let key = k.lock(7) as u64;
        assert_eq!(slot_of(key >> 32, key & 0xffff_ffff), (k.prefix, 7));
        assert_eq!(k.halves().0, key >> 32);
        assert_eq!(k.halves().1, (key & 0xffff_ffff) >> SLOT_BITS);
    }

    #[test]
    fn names_fit_application_name() {
        let keys = Keys { prefix: 1 };
        let rec = Record {
            id: b"x".to_vec(),
            started_ms: 0,
            jobs: 2,
            pid: 7,
            host: "h".repeat(100),
            command: String::new(),
        };
        let name = keys.holder_name(3, &rec);
        assert!(name.starts_with("qsem h 00000000001 3 2 7@hhh"), "{name}");
        assert_eq!(name.len(), 63);
        assert!(
            keys.session_name('w', &rec)
                .starts_with("qsem w 00000000001 2 7@h")
        );
    }
}
