//! The admission rule on the server, in one round trip: the id's keys, and
//! the one message that takes a slot or says why not.
//!
//! A slot is the advisory lock `prefix << 20 | slot` (one-bigint form, so
//! `pg_locks` shows it as `classid` = the high 32 bits, `objid` = the low 32,
//! `objsubid` = 1). Every such lock of the id counts as held, whoever holds
//! it: a foreign session that holds one takes a slot away, visibly, and
//! never makes one look free.
//!
//! The message: the first statement reads the held slots and, if fewer than
//! N are held, tries the free ones from the lowest with
//! `pg_try_advisory_lock`, stopping at the first it gets; in the same
//! statement it sets `application_name` to what the session now is (holder
//! or waiter). The second statement counts the id's locks again: a taker
//! that raced past its own N (possible only with mixed N) lets go and waits.
//! Every condition sits in one `CASE` before the try: the planner may order
//! the terms of a `WHERE` as it likes, and a lock taken by a row that a
//! later term rejects would stay taken unseen (a waiter during the grace
//! after a restart held a reclaiming holder's slot so). `LIMIT 1` keeps it
//! to one slot.
//! No lock is held between round trips and none is waited for.

use super::RECLAIM_GRACE;
use super::record::Record;
use super::session::{Session, cut, lit, value};
use crate::id::Id;
use anyhow::{Context, Result};

/// Slots fit in the low 20 bits of a key (`MAX_JOBS` is below 2^20).
const SLOT_BITS: u32 = 20;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
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
    fn session_name(&self, kind: char, rec: &Record) -> String {
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

/// What one admission attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The slot, and the server's clock then (ms since the epoch), which
    /// `--status` reckons the holder's age from.
    Took(u32, u64),
    /// Not admitted; `held` slots of the id were held.
    Wait { held: u32 },
    /// The look was answered by another server process than the session's
    /// first query: a pooler shares them between clients.
    Shared,
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// A newcomer that goes on waiting if refused: it shows as a waiter.
    Waiter,
    /// A newcomer that gives up if refused (`--wait 0`).
    Once,
    /// A holder that lost its slot, trying by the ordinary rule: refused, it
    /// shows as running without a slot.
    Lost,
    /// A holder whose session ended, taking its own slot back: it alone may
    /// come in during the grace after a server start.
    Reclaim(u32),
}

/// One admission attempt, in one round trip (two if a race must be undone).
/// A session not yet set up sends its set-up in the same message, and one
/// that is to wait for a NOTIFY on `listen` and does not yet LISTEN starts
/// to, in a transaction of its own that commits before the look, so that no
/// release after the look goes unheard.
pub async fn attempt(
    s: &mut Session,
    keys: &Keys,
    rec: &Record,
    asker: Asker,
    listen: bool,
) -> Result<Attempt> {
    let jobs = rec.jobs;
    let (from, to, grace) = match asker {
        Asker::Reclaim(slot) => (slot, slot, "true".to_string()),
        Asker::Waiter | Asker::Once | Asker::Lost => (
            1,
            jobs,
            format!(
                "clock_timestamp() - pg_postmaster_start_time() >= interval '{} milliseconds'",
                RECLAIM_GRACE.as_millis()
            ),
        ),
    };
    let refused_name = match asker {
        Asker::Waiter => lit(&keys.session_name('w', rec)),
        Asker::Lost => lit(&keys.session_name('l', rec)),
        Asker::Once | Asker::Reclaim(_) => "current_setting('application_name')".into(),
    };
    let holder = keys.holder_name(0, rec);
    let (pre, post) = holder.split_once(" 0 ").context("holder name")?;
    let setup = s.take_setup();
    let listen = if listen && !s.listening {
        format!("BEGIN; LISTEN {}; COMMIT; ", keys.channel())
    } else {
        String::new()
    };
    // A standby's or read-only server's refusal comes with the answer (see
    // `Session::learn`); nothing may be taken there meanwhile.
    let other_pid = match s.pid {
        0 => String::new(),
        pid => format!("OR pg_backend_pid() <> {pid} "),
    };
    let cond = keys.locks_of(&s.db());
    let sql = format!(
        "{setup}{listen}{r}WITH held AS (SELECT DISTINCT (objid::int8 & {SLOT_MASK})::int AS s \
         FROM pg_locks WHERE {cond}) \
         SELECT x.s::text, set_config('application_name', CASE WHEN x.s IS NULL \
         THEN {refused_name} ELSE {pre} || ' ' || x.s || ' ' || {post} END, false), \
         pg_backend_pid()::text, (SELECT count(*) FROM held)::text, \
         (extract(epoch FROM clock_timestamp()) * 1000)::int8::text \
         FROM (SELECT (SELECT g FROM generate_series({from}, {to}) g \
         WHERE CASE WHEN (SELECT count(*) FROM held) >= {jobs} OR NOT ({grace}) \
         OR pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' \
         {other_pid}OR g IN (SELECT s FROM held) THEN false \
         ELSE pg_try_advisory_lock({base}::int8 + g) END LIMIT 1) AS s) x; \
         SELECT count(DISTINCT objid)::text FROM pg_locks WHERE {cond}",
        r = rec.render(),
        pre = lit(pre),
        post = lit(post),
        base = keys.lock(0),
    );
    let res = s.query(&sql).await?;
    if !setup.is_empty() {
        s.learn(&res, 1)?;
    }
    s.listening |= !listen.is_empty();
    // The look and the count are the last two statements.
    let look = res
        .len()
        .checked_sub(2)
        .context("unexpected answer from the server")?;
    let row = res[look]
        .first()
        .context("unexpected answer from the server")?;
    let col = |i: usize| row.get(i).cloned().flatten();
    let took: Option<u32> = col(0).and_then(|v| v.parse().ok());
    let pid: i32 = col(2).and_then(|v| v.parse().ok()).unwrap_or(0);
    let held_before: u32 = col(3).and_then(|v| v.parse().ok()).unwrap_or(0);
    let after: u32 = value(&res, look + 1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let now_ms: u64 = col(4).and_then(|v| v.parse().ok()).unwrap_or(0);
    // Nothing was taken unless the session's own server process answered.
    if pid != s.pid {
        return Ok(Attempt::Shared);
    }
    match took {
        Some(slot) if after <= jobs => Ok(Attempt::Took(slot, now_ms)),
        Some(slot) => {
            // Raced past our N with takers of a larger one: let go.
            s.query(&format!("SELECT pg_advisory_unlock({})", keys.lock(slot)))
                .await?;
            Ok(Attempt::Wait { held: after - 1 })
        }
        None => Ok(Attempt::Wait { held: held_before }),
    }
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The session's server process still holds the slot.
    Held,
    /// It does not: the session was reset, or the lock was let go.
    NotHeld,
    /// Another server process answered: a pooler shares them between
    /// clients, and the lock stays with a process that is not ours.
    Shared,
}

/// Whether this session still holds `slot`: the heartbeat. It also keeps
/// the record and `application_name` current, and a session that LISTENs
/// (it was a head) stops: a holder has no use for the NOTIFYs of releases,
/// and each would wake its server process and its qsem.
pub async fn heartbeat(s: &Session, keys: &Keys, slot: u32, rec: &Record) -> Result<Beat> {
    let sql = format!(
        "{unlisten}{r}SELECT pg_backend_pid()::text, set_config('application_name', {name}, false); \
         SELECT count(*)::text FROM pg_locks WHERE {mine}",
        unlisten = if s.listening { "UNLISTEN *; " } else { "" },
        r = rec.render(),
        name = lit(&keys.holder_name(slot, rec)),
        mine = keys.held_here(&s.db(), slot),
    );
    let res = s.query(&sql).await?;
    // The name's statement and the count are the last two.
    let at = res.len().saturating_sub(2);
    Ok(if value(&res, at) != Some(s.pid.to_string().as_str()) {
        Beat::Shared
    } else if value(&res, at + 1) == Some("1") {
        Beat::Held
    } else {
        Beat::NotHeld
    })
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
