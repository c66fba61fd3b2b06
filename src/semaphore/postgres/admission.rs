//! The admission rule on the server, in one round trip: the one message that
//! takes a slot or says why not, and the holder's heartbeat. Every lock of
//! the id counts as held, whoever holds it (see `keys`): a foreign session
//! that holds one takes a slot away, visibly, and never makes one look free.
//!
//! The message: the first statement reads the held slots and, if fewer than
//! N are held, tries the free ones from the lowest with
//! `pg_try_advisory_lock`, stopping at the first it gets; in the same
//! statement it sets `application_name` to what the session now is (holder
//! or waiter). The second statement counts the id's locks again: a taker
//! that raced past its own N (possible only with mixed N) lets go and waits.
//! A new session's first look skips the reading (see [`Look::first`]): on
//! cold catalog caches it is the costliest part of an uncontended job.
//! Every condition sits in one `CASE` before the try: the planner may order
//! the terms of a `WHERE` as it likes, and a lock taken by a row that a
//! later term rejects would stay taken unseen (a waiter during the grace
//! after a restart held a reclaiming holder's slot so). `LIMIT 1` keeps it
//! to one slot.
//! No lock is held between round trips and none is waited for.
//!
//! A head also remembers what its last look saw ([`Seen`]), so that it
//! leaves a slot to a holder whose session an operator ended.

use super::keys::{Keys, SLOT_MASK};
use super::record::Record;
use super::seen::{Seen, killed_sql};
use super::session::{Session, lit, value};
use anyhow::{Context, Result};

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
/// release after the look goes unheard. A head passes what it saw at its
/// last look (see [`Seen`]).
pub async fn attempt(
    s: &mut Session,
    keys: &Keys,
    rec: &Record,
    asker: Asker,
    listen: bool,
    mut seen: Option<&mut Seen>,
) -> Result<Attempt> {
    let fresh = s.pid == 0 && !s.wants_facts();
    let got = once(s, keys, rec, asker, listen, seen.as_deref_mut()).await?;
    // A head that is to wait looks again at once, in full and after its
    // LISTEN, so that no release after the look goes unheard; the look after
    // a release then also runs on caches that the full look has filled (the
    // first look does not), and the handoff does not pay for them (1.5-2 ms
    // with 30 waiters, bench/RESULTS.md).
    if fresh && listen && matches!(got, Attempt::Wait { .. }) {
        return once(s, keys, rec, asker, listen, seen).await;
    }
    Ok(got)
}

/// One look (see [`attempt`]).
async fn once(
    s: &mut Session,
    keys: &Keys,
    rec: &Record,
    asker: Asker,
    listen: bool,
    seen: Option<&mut Seen>,
) -> Result<Attempt> {
    let jobs = rec.jobs;
    let facts = s.wants_facts();
    let fresh = s.pid == 0 && !facts;
    let setup = s.take_setup(false);
    // The first look does not LISTEN: a job that gets its slot at once has
    // no use for it, and a head that is to wait looks again at once.
    let listen = if listen && !s.listening && !fresh {
        format!("BEGIN; LISTEN {}; COMMIT; ", keys.channel())
    } else {
        String::new()
    };
    let look = Look::new(s, keys, rec, asker, seen.as_deref())?;
    // The record opens every message: `pg_stat_activity` shows the last
    // one, which says who runs it for `--status` (a new holder's, until its
    // first heartbeat).
    let statements = if fresh { look.first() } else { look.full() };
    let res = s
        .query(&format!("{}{setup}{listen}{statements}", rec.render()))
        .await?;
    if facts {
        s.learn(&res, 1)?;
    }
    s.listening |= !listen.is_empty();
    // The look and the count are the last two statements.
    let at = res
        .len()
        .checked_sub(2)
        .context("unexpected answer from the server")?;
    let row = res[at]
        .first()
        .context("unexpected answer from the server")?;
    let col = |i: usize| row.get(i).cloned().flatten();
    let took: Option<u32> = col(0).and_then(|v| v.parse().ok());
    let pid: i32 = col(2).and_then(|v| v.parse().ok()).unwrap_or(0);
    let now_ms: u64 = col(4).and_then(|v| v.parse().ok()).unwrap_or(0);
    if let Some(seen) = seen
        && !fresh
    {
        seen.read(col(5).as_deref(), col(6).as_deref());
        seen.turns.looked(col(7).as_deref());
    }
    let count = res[at + 1].first();
    let after: u32 = count
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let held_before: u32 = col(3).and_then(|v| v.parse().ok()).unwrap_or(after);
    if fresh {
        s.pid = pid;
    }
    if s.database == 0
        && let Some(db) = count.and_then(|r| r.get(1).cloned().flatten())
    {
        s.database = db.parse().context("unexpected answer from the server")?;
    }
    // Nothing was taken unless the session's own server process answered.
    if pid != s.pid {
        return Ok(Attempt::Shared);
    }
    match took {
        Some(slot) if after <= jobs => Ok(Attempt::Took(slot, now_ms)),
        Some(slot) => {
            // Past our N (racing takers, or holders of a larger N that the
            // first look does not read): let go, and wake the waiters that
            // our lock may have turned away meanwhile.
            s.query(&format!(
                "SELECT pg_advisory_unlock({}); NOTIFY {}, '{slot}'",
                keys.lock(slot),
                keys.channel()
            ))
            .await?;
            Ok(Attempt::Wait { held: after - 1 })
        }
        None => Ok(Attempt::Wait { held: held_before }),
    }
}

/// The two statements of an admission attempt, after the record: the look
/// that may take a slot, then the count of the id's locks.
struct Look {
    /// The slots to try, and the condition that lets anything be tried.
    from: u32,
    to: u32,
    guard: String,
    jobs: u32,
    /// `application_name` if refused, and the holder's name around the slot.
    refused: String,
    pre: String,
    post: String,
    base: i64,
    keys: Keys,
    db: String,
    /// The count of sessions ended by an operator, in SQL (`NULL` before
    /// PostgreSQL 14), and the condition that keeps slots left to their
    /// holders from being tried (see [`Seen`]).
    killed: String,
    keep_off: String,
    /// The heads and the older heads of this N, for
    /// [`Turns`](super::turns::Turns) (`NULL` if not counted).
    turns: String,
}

impl Look {
    fn new(
        s: &Session,
        keys: &Keys,
        rec: &Record,
        asker: Asker,
        seen: Option<&Seen>,
    ) -> Result<Look> {
        let (from, to, grace) = match asker {
            Asker::Reclaim(slot) => (slot, slot, String::new()),
            Asker::Waiter | Asker::Once | Asker::Lost => {
                (1, rec.jobs, format!("OR {} ", super::in_reclaim_grace()))
            }
        };
        // A standby's or read-only server's refusal comes with the answer
        // (see `Session::learn`) or came at connection; nothing may be
        // taken there meanwhile.
        let other_pid = match s.pid {
            0 => String::new(),
            pid => format!("OR pg_backend_pid() <> {pid} "),
        };
        let refused = match asker {
            Asker::Waiter => lit(&keys.session_name('w', rec)),
            Asker::Lost => lit(&keys.session_name('l', rec)),
            Asker::Once | Asker::Reclaim(_) => "current_setting('application_name')".into(),
        };
        let holder = keys.holder_name(0, rec);
        let (pre, post) = holder.split_once(" 0 ").context("holder name")?;
        // Only a look with a memory of the last one reads the count.
        let killed = match seen {
            Some(_) => killed_sql(s),
            None => "NULL".into(),
        };
        Ok(Look {
            keep_off: seen.map_or(String::new(), |seen| seen.keep_off(&killed)),
            turns: match seen {
                Some(seen) => seen.turns.sql(keys, rec.jobs, &s.db()),
                None => "NULL".into(),
            },
            killed,
            from,
            to,
            guard: format!(
                "{grace}OR pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' \
                 {other_pid}"
            ),
            jobs: rec.jobs,
            refused,
            pre: lit(pre),
            post: lit(post),
            base: keys.lock(0),
            keys: *keys,
            db: s.db(),
        })
    }

    /// The look's answer: the slot taken (or NULL), the session's name
    /// set to match, the server process, `held` (the slots held before, or
    /// NULL), the server's clock in ms, and `seen` (what [`Seen`] learns).
    fn select(&self, held: &str, refuse_if: &str, seen: &str) -> String {
        let Look {
            from,
            to,
            guard,
            refused,
            pre,
            post,
            base,
            ..
        } = self;
        format!(
            "SELECT x.s::text, set_config('application_name', CASE WHEN x.s IS NULL \
             THEN {refused} ELSE {pre} || ' ' || x.s || ' ' || {post} END, false), \
             pg_backend_pid()::text, {held}, \
             (extract(epoch FROM clock_timestamp()) * 1000)::int8::text, {seen} \
             FROM (SELECT (SELECT g FROM generate_series({from}, {to}) g \
             WHERE CASE WHEN false {guard}{refuse_if}THEN false \
             ELSE pg_try_advisory_lock({base}::int8 + g) END LIMIT 1) AS s) x"
        )
    }

    /// The look that reads the held slots first and tries only if fewer
    /// than N are held, and only the free ones: what a waiter does, so that
    /// it never holds a lock it must give back (a waiter of a smaller N
    /// that did, on every release, would wake every waiter every time).
    fn full(&self) -> String {
        let (jobs, cond) = (self.jobs, self.keys.locks_of(&self.db));
        let select = self.select(
            "(SELECT count(*) FROM held)::text",
            &format!(
                "OR (SELECT count(*) FROM held) >= {jobs} OR g IN (SELECT s FROM held) {}",
                self.keep_off
            ),
            &format!(
                "(SELECT string_agg(s::text, ',') FROM held), {}::text, {}",
                self.killed, self.turns
            ),
        );
        format!(
            "WITH held AS (SELECT DISTINCT (objid::int8 & {SLOT_MASK})::int AS s \
             FROM pg_locks WHERE {cond}) {select}; \
             SELECT count(DISTINCT objid)::text, ({db})::text FROM pg_locks WHERE {cond}",
            db = self.db
        )
    }

    /// The first look of a new session, whose server process has cold
    /// catalog caches that each statement's functions and catalogs must
    /// fill (bench/RESULTS.md: 3.2 ms for the full look's message, against
    /// 1.4 ms warm): it tries the slots from the lowest without reading
    /// `pg_locks` first, and the count after it decides, as after a race.
    /// Its lock, if any, names the database (`pg_locks.database`), which a
    /// lookup in `pg_database` would cost another 0.3-1 ms to find; without
    /// one, the count is of the id's locks in every database, which only
    /// a message shows.
    fn first(&self) -> String {
        let any_db = self.keys.locks_of("database");
        format!(
            "{}; WITH l AS (SELECT database, objid, pid FROM pg_locks WHERE {any_db}), \
             me AS (SELECT database FROM l WHERE pid = pg_backend_pid() LIMIT 1) \
             SELECT count(DISTINCT objid)::text, (SELECT database FROM me)::text FROM l \
             WHERE database = coalesce((SELECT database FROM me), database)",
            self.select("NULL", "", "NULL, NULL, NULL")
        )
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
