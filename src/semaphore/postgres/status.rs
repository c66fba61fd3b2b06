//! `--status` and `--wait-all` on the server: who holds which slot, who
//! waits, and waiting until nobody does.
//!
//! Holders are the `pg_locks` rows of the ids' keys joined to
//! `pg_stat_activity`; the record in a session's last query (id, start on
//! the server's clock, command) says who it is. A lock of the asked id held
//! by a session that is not a qsem holder shows as a foreign holder (its
//! server pid, user and application), never as a free slot. Ages are
//! computed on the server's clock, so a holder whose clock is off shows
//! its true age. Waiters are the heads of the hosts' queues, the sessions
//! named `qsem w <key> <jobs> <pid>@<host>`, aged from their session's
//! start (when they began to wait on the server; the time they queued on
//! their host before is not on the server); this host's own queue behind
//! its head adds its waiters from the lock-file engine. Other hosts' queues
//! are not on the server: neither counted nor listed.

use super::connect::Connector;
use super::keys::{Keys, SLOT_MASK, slot_of};
use super::queue::local_id;
use super::record::Record;
use super::seen::{Seen, killed_sql};
use super::session::lit;
use super::waiting::{Woke, sleep};
use super::{Postgres, runtime};
use crate::id::Id;
use crate::report;
use crate::semaphore::{Holder, IdStatus, Idle, Waiter};
use crate::signals::Signals;
use anyhow::Result;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant, SystemTime};

/// Holders and waiters of one id, or of every id with a holder; the
/// waiters of this host that queue behind their head are added from the
/// local queue.
pub fn status(pg: &Postgres, only: Option<&Id>) -> Result<Vec<IdStatus>> {
    let mut out = on_server(&pg.connector, only)?;
    let mut local = pg.local()?;
    for s in &mut out {
        let gate = local_id(&pg.connector.target, &s.id, "head");
        for queue in local.status(Some(&gate))? {
            s.waiting += queue.waiting;
            s.waiters.extend(queue.waiters);
        }
    }
    Ok(out)
}

fn on_server(c: &Connector, only: Option<&Id>) -> Result<Vec<IdStatus>> {
    let keys = only.map(Keys::of);
    let (locks, waiters, lost) = runtime()?.block_on(async {
        let s = c.open().await?;
        let cond = match &keys {
            Some(k) => k.locks_of(&s.db()),
            None => format!(
                "locktype = 'advisory' AND granted AND objsubid = 1 AND database = {}",
                s.db()
            ),
        };
        let like = |kind: &str| {
            lit(&keys.map_or(format!("qsem {kind} %"), |k| {
                format!("qsem {kind} {} %", k.hex())
            }))
        };
        let res = s
            .query(&format!(
                "SELECT l.classid::text, l.objid::text, l.pid::text, coalesce(a.usename, ''), \
                 coalesce(a.application_name, ''), coalesce(a.query, ''), \
                 (extract(epoch FROM clock_timestamp()) * 1000)::int8::text, \
                 coalesce(host(a.client_addr), 'local'), \
                 (extract(epoch FROM a.query_start) * 1000)::int8::text \
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE {cond}; \
                 SELECT application_name, \
                 (extract(epoch FROM now() - backend_start) * 1000)::int8::text \
                 FROM pg_stat_activity \
                 WHERE application_name LIKE {} AND datname = current_database(); \
                 SELECT query, (extract(epoch FROM clock_timestamp()) * 1000)::int8::text \
                 FROM pg_stat_activity \
                 WHERE application_name LIKE {} AND datname = current_database()",
                like("w"),
                like("l")
            ))
            .await?;
        anyhow::Ok((
            res.first().cloned().unwrap_or_default(),
            res.get(1).cloned().unwrap_or_default(),
            res.get(2).cloned().unwrap_or_default(),
        ))
    })?;
    let now = SystemTime::now();
    // Grouped by key prefix; the id's name comes from a record.
    type Entry = (Option<Id>, Vec<Holder>, Vec<Waiter>);
    let mut by_key: BTreeMap<u64, Entry> = BTreeMap::new();
    for row in &locks {
        let Some((prefix, id, holder)) = holder_of(row, only.is_some(), now) else {
            continue;
        };
        let entry = by_key.entry(prefix).or_default();
        entry.0 = entry.0.take().or(id);
        entry.1.push(holder);
    }
    for row in &waiters {
        if let Some((prefix, waiter)) = waiter_of(row, now) {
            by_key.entry(prefix).or_default().2.push(waiter);
        }
    }
    for row in &lost {
        if let Some((prefix, id, holder)) = lost_of(row, now) {
            let entry = by_key.entry(prefix).or_default();
            entry.0 = entry.0.take().or(Some(id));
            entry.1.push(holder);
        }
    }
    let mut out: Vec<IdStatus> = by_key
        .into_iter()
        .filter(|(_, (id, _, _))| id.is_some() || only.is_some())
        .map(|(k, (id, mut holders, mut waiters))| {
            holders.sort_by_key(|h| (h.slot == 0, h.slot));
            waiters.sort_by_key(|w| w.since);
            IdStatus {
                id: only.cloned().or(id).unwrap_or_else(|| unknown(k)),
                holders,
                waiting: waiters.len() as u32,
                waiters,
            }
        })
        .collect();
    if out.is_empty()
        && let Some(id) = only
    {
        out.push(IdStatus {
            id: id.clone(),
            holders: Vec::new(),
            waiting: 0,
            waiters: Vec::new(),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Column `i` of a row, as text.
fn text(row: &[Option<String>], i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

/// One `pg_locks` row as a holder: a qsem holder if its session says so in
/// its name and record (the record's id must hash to the lock's key), else,
/// when one id was asked for, a foreign session holding a slot of it.
fn holder_of(
    row: &[Option<String>],
    asked: bool,
    now: SystemTime,
) -> Option<(u64, Option<Id>, Holder)> {
    let (classid, objid) = (text(row, 0).parse().ok()?, text(row, 1).parse().ok()?);
    let (prefix, slot) = slot_of(classid, objid);
    let server_now: u64 = text(row, 6).parse().unwrap_or(0);
    let id = Record::parse(&text(row, 5))
        .filter(|_| text(row, 4).starts_with("qsem h "))
        .map(|mut r| {
            // A holder's record has its start from its first heartbeat on;
            // until then its last query is the admission's, which began
            // when it took the slot.
            if r.started_ms == 0 {
                r.started_ms = text(row, 8).parse().unwrap_or(0);
            }
            r
        })
        .and_then(|r| Some((Id::new(OsStr::from_bytes(&r.id)).ok()?, r)))
        .filter(|(id, _)| Keys::of(id).prefix == prefix);
    let holder = match &id {
        Some((_, r)) => recorded(r, slot, server_now, now),
        // Unknown ids' locks are anybody's; the asked id's are its slots.
        None if !asked => return None,
        None => Holder {
            slot,
            pid: text(row, 2).parse().unwrap_or(0),
            host: text(row, 7),
            started: None,
            jobs: 0,
            command: format!(
                "(foreign session: user {}, application '{}')",
                text(row, 3),
                text(row, 4)
            ),
        },
    };
    Some((prefix, id.map(|(id, _)| id), holder))
}

/// A holder's session that runs its job without a slot (`qsem l …`: it
/// lost its slot and has not taken one again), from its record: a holder
/// whose slot is 0, which `--status` shows as `-`.
fn lost_of(row: &[Option<String>], now: SystemTime) -> Option<(u64, Id, Holder)> {
    let r = Record::parse(&text(row, 0))?;
    let id = Id::new(OsStr::from_bytes(&r.id)).ok()?;
    let server_now: u64 = text(row, 1).parse().unwrap_or(0);
    let holder = recorded(&r, 0, server_now, now);
    Some((Keys::of(&id).prefix, id, holder))
}

/// A qsem holder of `slot` as its record says; `server_now` is the
/// server's clock (ms) when it was read.
fn recorded(r: &Record, slot: u32, server_now: u64, now: SystemTime) -> Holder {
    Holder {
        slot,
        pid: r.pid,
        host: r.host.clone(),
        // The age on the server's clock, as a time on ours.
        started: now.checked_sub(Duration::from_millis(
            server_now.saturating_sub(r.started_ms),
        )),
        jobs: r.jobs,
        command: r.command.clone(),
    }
}

/// One head's session (`qsem w <key> <jobs> <pid>@<host>`, its age on the
/// server in ms) as a waiter of key prefix `<key>`. A name cut at 63 bytes
/// keeps what is left of the host.
fn waiter_of(row: &[Option<String>], now: SystemTime) -> Option<(u64, Waiter)> {
    let name = text(row, 0);
    let mut it = name.splitn(5, ' ');
    let prefix = u64::from_str_radix(it.nth(2)?, 16).ok()?;
    let (pid, host) = it.nth(1)?.split_once('@')?;
    let since = text(row, 1)
        .parse()
        .ok()
        .and_then(|ms: u64| now.checked_sub(Duration::from_millis(ms)));
    let waiter = Waiter {
        pid: pid.parse().ok()?,
        host: host.to_string(),
        since,
    };
    Some((prefix, waiter))
}

fn unknown(k: u64) -> Id {
    Id::new(OsStr::new(&format!("#{k:011x}"))).expect("valid id")
}

/// How many jobs of the id run and how many heads wait for a slot: what
/// `--wait-all` waits to see at zero. A job runs in a slot's lock, or
/// without one in a session named `qsem l …` (it lost its slot and has not
/// taken one again). The reads go waiters, then jobs without a slot, then
/// locks: a waiter or a lost job that takes a slot between two reads is
/// seen twice rather than missed. Within [`RECLAIM_GRACE`](super::RECLAIM_GRACE) of a server
/// start the jobs that ran before it may still be on their way back to
/// their slots, holding nothing yet: the id counts as busy until the
/// grace has passed, as it does for newcomers. So it does while a slot
/// whose session an operator ended is left to its holder (see [`Seen`]).
async fn busy(s: &super::session::Session, keys: &Keys, seen: &mut Seen) -> Result<Busy> {
    let named = |kind| {
        format!(
            "SELECT count(*)::text FROM pg_stat_activity WHERE application_name LIKE {} \
             AND datname = current_database()",
            lit(&format!("qsem {kind} {} %", keys.hex()))
        )
    };
    let sql = format!(
        "{}; {}; SELECT count(DISTINCT objid)::text, \
         string_agg(DISTINCT (objid::int8 & {SLOT_MASK})::text, ','), {}::text \
         FROM pg_locks WHERE {}; SELECT ({})::text",
        named('w'),
        named('l'),
        killed_sql(s),
        keys.locks_of(&s.db()),
        super::in_reclaim_grace(),
    );
    let res = s.query(&sql).await?;
    let number = |i| super::session::number(&res, i);
    let locks = res.get(2).and_then(|rows| rows.first());
    let col = |i: usize| locks.and_then(|r| r.get(i).cloned().flatten());
    seen.read(col(1).as_deref(), col(2).as_deref());
    Ok(Busy {
        running: number(1)? + number(2)?,
        waiting: number(0)?,
        reclaiming: super::session::value(&res, 3) == Some("true")
            || seen.leaves_any(Instant::now()),
    })
}

/// What [`busy`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Busy {
    running: u32,
    waiting: u32,
    /// The server started less than [`RECLAIM_GRACE`](super::RECLAIM_GRACE)
    /// ago, or a slot is left to a holder whose session an operator ended.
    reclaiming: bool,
}

pub fn wait_idle(
    c: &Connector,
    id: &Id,
    deadline: Option<Instant>,
    signals: &mut Signals,
    verbose: bool,
) -> Result<Idle> {
    let keys = Keys::of(id);
    runtime()?.block_on(async {
        let mut s = c.open().await?;
        // Listen before looking, so that no release between the look and
        // the sleep goes unheard.
        s.query(&format!("LISTEN {}", keys.channel())).await?;
        let mut told = None;
        let mut seen = Seen::default();
        loop {
            let now = busy(&s, &keys, &mut seen).await?;
            if now.running == 0 && now.waiting == 0 && !now.reclaiming {
                return Ok(Idle::Reached);
            }
            if verbose && told != Some(now) {
                told = Some(now);
                let (held, waiting) = (now.running, now.waiting);
                let grace = if now.reclaiming {
                    " (the server has just started, or an operator ended a session: \
                     jobs may still be taking their slots back)"
                } else {
                    ""
                };
                report::line(
                    id,
                    &format!("waiting for {held} held slot(s) and {waiting} waiter(s){grace}"),
                );
            }
            match sleep(&mut s, deadline, Some(&mut *signals), Some(&mut seen)).await? {
                Woke::Look => {}
                Woke::Broken(why) => {
                    anyhow::bail!("lost the connection to PostgreSQL at {}: {why}", c.target)
                }
                Woke::Expired => return Ok(Idle::TimedOut),
                Woke::Signal(r) => return Ok(Idle::Interrupted(r)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heads_session_names_its_waiter() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let row = |name: &str, ms: &str| vec![Some(name.to_string()), Some(ms.to_string())];
        let (prefix, w) = waiter_of(&row("qsem w 0000000001f 2 4242@web 1", "1500"), now).unwrap();
        assert_eq!((prefix, w.pid, w.host.as_str()), (0x1f, 4242, "web 1"));
        assert_eq!(w.since, Some(now - Duration::from_millis(1500)));
        let (_, w) = waiter_of(&row("qsem w 0000000001f 2 7@h", ""), now).unwrap();
        assert_eq!(w.since, None);
        for bad in ["qsem w 0000000001f 2", "qsem w zz 2 7@h", "qsem w 1f 2 x@h"] {
            assert!(waiter_of(&row(bad, "1"), now).is_none(), "{bad}");
        }
    }
}
