//! Who may take a slot: the view of an id's holders and waiters at one
//! revision (`keys.rs` says where they live), and the rule, as pure
//! functions.
//!
//! **The invariant** rests on one comparison: a holder key is created in a
//! transaction that succeeds only if no key under `h/` was created after the
//! revision the taker read (`create_revision < R + 1` over the whole range).
//! Holders that left since only lower the count, so the count at commit is
//! at most the count read, which was below the taker's N.
//!
//! **Order**: a waiter's place is its key's create revision. A request is
//! admitted only while the held slots plus the older waiters that would be
//! admitted now stay below its N; an older waiter that has let such a turn
//! pass for [`TURN`] (stopped, stalled, dead) no longer counts.

use super::keys::{Keys, prefix_end};
use super::wire::{b64, int, unb64};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long an older waiter may let a turn pass before others go first.
pub const TURN: Duration = Duration::from_secs(1);

/// What a holder or waiter key says of its qsem.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub host: String,
    pub pid: u32,
    pub jobs: u32,
    pub command: String,
    /// The cluster's clock when the slot was taken (Unix seconds), 0 if unknown.
    pub start: i64,
}

impl Record {
    pub fn to_value(&self) -> String {
        json!({"host": self.host, "pid": self.pid, "jobs": self.jobs,
            "command": self.command, "start": self.start})
        .to_string()
    }

    pub fn parse(bytes: &[u8]) -> Record {
        let v: Value = serde_json::from_slice(bytes).unwrap_or_default();
        let num = |k: &str| v[k].as_u64().unwrap_or(0);
        Record {
            host: v["host"].as_str().unwrap_or("?").to_string(),
            pid: num("pid") as u32,
            jobs: num("jobs") as u32,
            command: v["command"].as_str().unwrap_or("").to_string(),
            start: v["start"].as_i64().unwrap_or(0),
        }
    }
}

/// One key of the view.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub record: Record,
}

/// The holders and waiters of an id at one revision.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub revision: i64,
    pub holders: Vec<(u32, Entry)>,
    /// Oldest first.
    pub waiters: Vec<Entry>,
}

impl View {
    /// Reads a range response of [`Keys::queue_request`] (or a transaction's
    /// `response_range`), whose header revision is `revision`.
    pub fn parse(keys: &Keys, range: &Value, revision: i64) -> View {
        let (h, q) = (keys.kind("h"), keys.kind("q"));
        let mut view = View {
            revision,
            ..View::default()
        };
        for kv in range["kvs"].as_array().into_iter().flatten() {
            let key = unb64(&kv["key"]);
            let entry = |key: Vec<u8>| Entry {
                create_revision: int(&kv["create_revision"]),
                record: Record::parse(&unb64(&kv["value"])),
                key,
            };
            if let Some(slot) = key.strip_prefix(&h[..]) {
                let slot = std::str::from_utf8(slot).ok().and_then(|s| s.parse().ok());
                if let Some(slot) = slot {
                    view.holders.push((slot, entry(key)));
                }
            } else if key.starts_with(&q) {
                view.waiters.push(entry(key));
            }
        }
        view.waiters.sort_by_key(|w| w.create_revision);
        view
    }

    /// Brings the view up to date with a watch's events (`{"type", "kv"}`,
    /// in revision order, from a watch that started right after the view's
    /// revision, or earlier): events the view already has are skipped, and
    /// the view's revision becomes the last event's. Complete as long as
    /// the watch did not break (see `watch.rs`), which the invariant needs:
    /// a holder missing from a view at revision R is one that the taking
    /// transaction's comparison cannot see.
    pub fn apply(&mut self, keys: &Keys, events: &[Value]) {
        let (h, q) = (keys.kind("h"), keys.kind("q"));
        // One revision's events (a transaction's) come in one batch.
        let seen = self.revision;
        for e in events {
            let kv = &e["kv"];
            let revision = int(&kv["mod_revision"]);
            if revision <= seen {
                continue;
            }
            self.revision = self.revision.max(revision);
            let key = unb64(&kv["key"]);
            let deleted = e["type"].as_str() == Some("DELETE");
            let entry = || Entry {
                key: key.clone(),
                create_revision: int(&kv["create_revision"]),
                record: Record::parse(&unb64(&kv["value"])),
            };
            if let Some(slot) = key.strip_prefix(&h[..]) {
                let Some(slot) = std::str::from_utf8(slot).ok().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                self.holders.retain(|(s, _)| *s != slot);
                if !deleted {
                    self.holders.push((slot, entry()));
                }
            } else if key.starts_with(&q) {
                self.waiters.retain(|w| w.key != key);
                if !deleted {
                    self.waiters.push(entry());
                    self.waiters.sort_by_key(|w| w.create_revision);
                }
            }
        }
    }

    /// The waiters older than `me` (every waiter, for a newcomer) whom a
    /// free slot would admit now.
    pub fn ahead(&self, me: Option<i64>) -> impl Iterator<Item = &Entry> {
        let held = self.holders.len();
        self.waiters
            .iter()
            .take_while(move |w| me.is_none_or(|m| w.create_revision < m))
            .filter(move |w| held < w.record.jobs as usize)
    }

    /// The slot a request with limit `jobs` takes now, if any: the lowest
    /// free one, while the held slots plus the waiters ahead that have not
    /// lost their turn stay below `jobs`.
    pub fn admits(&self, jobs: u32, me: Option<i64>, turns: &Turns) -> Option<u32> {
        let ahead = self.ahead(me).filter(|w| !turns.passed(&w.key)).count();
        if self.holders.len() + ahead >= jobs as usize {
            return None;
        }
        (1..=jobs).find(|s| self.holders.iter().all(|(h, _)| h != s))
    }
}

/// The waiters seen blocking a turn, and since when (on this host's clock).
#[derive(Default)]
pub struct Turns {
    since: HashMap<Vec<u8>, Instant>,
}

impl Turns {
    /// Notes who blocks the turn in `view`; forgets who no longer does.
    pub fn note(&mut self, view: &View, me: Option<i64>) {
        let now = Instant::now();
        let ahead: Vec<&Entry> = view.ahead(me).collect();
        self.since.retain(|k, _| ahead.iter().any(|w| &w.key == k));
        for w in ahead {
            self.since.entry(w.key.clone()).or_insert(now);
        }
    }

    /// Whether the waiter with this key has let its turn pass.
    pub fn passed(&self, key: &[u8]) -> bool {
        self.since.get(key).is_some_and(|t| t.elapsed() >= TURN)
    }

    /// When the next blocking waiter loses its turn, if one blocks.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.since
            .values()
            .map(|t| *t + TURN)
            .filter(|t| *t > Instant::now())
            .min()
    }
}

/// The transaction that takes `slot` for `lease` if no holder key was
/// created after `revision`; `also` adds operations (remove the waiter key,
/// record a running `--bg` job).
pub fn take(
    keys: &Keys,
    view: &View,
    slot: u32,
    lease: i64,
    record: &Record,
    also: Vec<Value>,
) -> Value {
    let h = keys.kind("h");
    let mut success = vec![json!({"request_put": {
        "key": b64(&keys.holder(slot)), "value": b64(record.to_value().as_bytes()),
        "lease": lease.to_string(),
    }})];
    success.extend(also);
    json!({
        "compare": [
            {"key": b64(&h), "range_end": b64(&prefix_end(&h)), "target": "CREATE",
             "result": "LESS", "create_revision": (view.revision + 1).to_string()},
            {"key": b64(&keys.holder(slot)), "target": "CREATE", "result": "EQUAL",
             "create_revision": "0"},
        ],
        "success": success,
    })
}

/// A newcomer's first try, which needs no read before it: slot 1 if the id
/// has no holder and no waiter at all (an empty range compares as a key
/// created at revision 0), which every rule admits; otherwise the
/// transaction fails and reads the holders and waiters instead, at the
/// revision it was evaluated at.
pub fn take_first(keys: &Keys, lease: i64, record: &Record, also: Vec<Value>) -> Value {
    let none = |kind: &str| {
        let k = keys.kind(kind);
        json!({"key": b64(&k), "range_end": b64(&prefix_end(&k)), "target": "CREATE",
            "result": "EQUAL", "create_revision": "0"})
    };
    let mut success = vec![json!({"request_put": {
        "key": b64(&keys.holder(1)), "value": b64(record.to_value().as_bytes()),
        "lease": lease.to_string(),
    }})];
    success.extend(also);
    json!({
        "compare": [none("h"), none("q")],
        "success": success,
        "failure": [{"request_range": keys.queue_request()}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;

    fn entry(key: &str, rev: i64, jobs: u32) -> Entry {
        Entry {
            key: key.as_bytes().to_vec(),
            create_revision: rev,
            record: Record {
                jobs,
                ..Record::default()
            },
        }
    }

    fn view(held: &[u32], waiters: &[(i64, u32)]) -> View {
        View {
            revision: 100,
            holders: held
                .iter()
                .map(|&s| (s, entry(&format!("h{s}"), 1, 9)))
                .collect(),
            waiters: waiters
                .iter()
                .map(|&(rev, jobs)| entry(&format!("q{rev}"), rev, jobs))
                .collect(),
        }
    }

    #[test]
    fn the_mixed_jobs_rule_and_first_come_first_served() {
        let none = Turns::default();
        // Fewer than N held: the lowest free slot.
        assert_eq!(view(&[], &[]).admits(2, None, &none), Some(1));
        assert_eq!(view(&[1, 3], &[]).admits(5, None, &none), Some(2));
        // N or more held, whatever limits the holders used: wait.
        assert_eq!(view(&[4, 5], &[]).admits(2, None, &none), None);
        // An older waiter that a free slot admits goes first ...
        assert_eq!(view(&[], &[(10, 1)]).admits(1, Some(11), &none), None);
        // ... but two free slots serve it and the next one at once.
        assert_eq!(view(&[], &[(10, 2)]).admits(2, Some(11), &none), Some(1));
        // An older waiter that cannot run now (its N is smaller) does not block.
        assert_eq!(view(&[1], &[(10, 1)]).admits(5, Some(11), &none), Some(2));
        // Younger waiters never block; a newcomer is behind everyone.
        assert_eq!(view(&[], &[(12, 1)]).admits(1, Some(11), &none), Some(1));
        assert_eq!(view(&[], &[(12, 1)]).admits(1, None, &none), None);
    }

    #[test]
    fn a_waiter_that_lets_its_turn_pass_loses_it() {
        let v = view(&[], &[(10, 1)]);
        let mut turns = Turns::default();
        turns.note(&v, Some(11));
        assert_eq!(v.admits(1, Some(11), &turns), None);
        assert!(turns.next_expiry().is_some());
        let long_ago = Instant::now() - TURN - Duration::from_millis(1);
        turns.since.insert(b"q10".to_vec(), long_ago);
        assert_eq!(v.admits(1, Some(11), &turns), Some(1));
        // Noted again while still blocking: the old instant stays.
        turns.note(&v, Some(11));
        assert!(turns.passed(b"q10"));
        // Once it no longer blocks, it is forgotten.
        turns.note(&view(&[1], &[(10, 1)]), Some(11));
        assert!(!turns.passed(b"q10"));
    }

    #[test]
    fn watch_events_bring_a_view_up_to_date() {
        let keys = Keys::new(&Id::new(std::ffi::OsStr::new("w")).unwrap());
        let kv = |key: Vec<u8>, create: i64, m: i64| {
            json!({"key": b64(&key), "create_revision": create.to_string(),
                "mod_revision": m.to_string(), "value": b64(br#"{"jobs":2}"#)})
        };
        let put = |key, create, m| json!({"kv": kv(key, create, m)});
        let del = |key, m| json!({"type": "DELETE", "kv": kv(key, 0, m)});
        let mut v = View {
            revision: 10,
            ..View::default()
        };
        v.apply(
            &keys,
            &[
                put(keys.holder(1), 9, 9), // seen already: skipped
                put(keys.waiter(7), 11, 11),
                put(keys.holder(2), 12, 12),
                del(keys.waiter(7), 12),
                put(keys.waiter(5), 13, 13),
                put(keys.holder(2), 12, 14),  // a record updated
                put(keys.running(1), 15, 15), // not in the queue's range
            ],
        );
        assert_eq!(v.revision, 15);
        let slots: Vec<u32> = v.holders.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, [2]);
        assert_eq!(v.waiters.len(), 1);
        assert_eq!(v.waiters[0].key, keys.waiter(5));
        assert_eq!(v.waiters[0].record.jobs, 2);
        // A taking transaction: the waiter key goes, the holder key comes.
        v.apply(
            &keys,
            &[
                del(keys.holder(2), 16),
                del(keys.waiter(5), 17),
                put(keys.holder(1), 17, 17),
            ],
        );
        assert_eq!(v.revision, 17);
        assert!(v.waiters.is_empty());
        let slots: Vec<u32> = v.holders.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, [1]);
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            host: "web-1".into(),
            pid: 42,
            jobs: 3,
            command: "gzip 'a b'".into(),
            start: 1_700_000_000,
        };
        assert_eq!(Record::parse(r.to_value().as_bytes()), r);
        assert_eq!(Record::parse(b"junk").host, "?");
    }
}
