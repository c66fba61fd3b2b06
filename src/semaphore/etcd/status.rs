//! `--status` from the cluster: every holder key (host, pid, command, and
//! the elapsed time on the cluster's clock: the start recorded from the
//! cluster's `Date` when the slot was taken, against its `Date` now) and
//! the waiter keys, of one id or of all. One read; nothing is written.

use super::admission::View;
use super::client::Client;
use super::errors::CallError;
use super::keys::{Keys, prefix_end};
use super::wire::{b64, int, unb64};
use crate::id::Id;
use crate::semaphore::{Holder, IdStatus, Waiter};
use serde_json::json;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

pub fn list(c: &Client, only: Option<&Id>) -> Result<Vec<IdStatus>, CallError> {
    let (key, end) = match only {
        Some(id) => Keys::new(id).queue_range(),
        None => (b"qsem/".to_vec(), prefix_end(b"qsem/")),
    };
    let v = c.call(
        "/v3/kv/range",
        &json!({"key": b64(&key), "range_end": b64(&end)}),
        None,
    )?;
    let now = c.cluster_now();
    // Group the keys by id: `qsem/<hex>/...`.
    let mut by_id: BTreeMap<Vec<u8>, Vec<serde_json::Value>> = BTreeMap::new();
    for kv in v["kvs"].as_array().into_iter().flatten() {
        let k = unb64(&kv["key"]);
        let hex = k[5.min(k.len())..]
            .split(|&b| b == b'/')
            .next()
            .unwrap_or(b"");
        if let Some(bytes) = unhex(hex) {
            by_id.entry(bytes).or_default().push(kv.clone());
        }
    }
    let mut out = Vec::new();
    for (bytes, kvs) in by_id {
        let Ok(id) = Id::new(OsStr::from_bytes(&bytes)) else {
            continue;
        };
        let keys = Keys::new(&id);
        let view = View::parse(&keys, &json!({ "kvs": kvs }), int(&v["header"]["revision"]));
        if view.holders.is_empty() && view.waiters.is_empty() {
            continue;
        }
        let mut holders: Vec<Holder> = view
            .holders
            .iter()
            .map(|(slot, e)| Holder {
                slot: *slot,
                pid: e.record.pid,
                host: e.record.host.clone(),
                started: started(now, e.record.start),
                jobs: e.record.jobs,
                command: e.record.command.clone(),
            })
            .collect();
        holders.sort_by_key(|h| h.slot);
        // A waiter's record carries no start (it gets one with its slot),
        // so its age is unknown.
        let waiters = view
            .waiters
            .iter()
            .map(|e| Waiter {
                pid: e.record.pid,
                host: e.record.host.clone(),
                since: None,
            })
            .collect();
        out.push(IdStatus {
            id,
            holders,
            waiting: view.waiters.len() as u32,
            waiters,
        });
    }
    Ok(out)
}

/// A start on the cluster's clock, as an instant on this host's: now here,
/// less the time elapsed there.
fn started(cluster_now: Option<i64>, start: i64) -> Option<SystemTime> {
    let elapsed = cluster_now?.checked_sub(start).filter(|_| start > 0)?;
    SystemTime::now().checked_sub(Duration::from_secs(elapsed.max(0) as u64))
}

fn unhex(hex: &[u8]) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_time_is_the_clusters() {
        let t = started(Some(1_000_100), 1_000_000).unwrap();
        let elapsed = SystemTime::now().duration_since(t).unwrap().as_secs();
        assert!((100..=101).contains(&elapsed), "{elapsed}");
        assert!(started(None, 5).is_none());
        assert!(started(Some(5), 0).is_none());
        assert_eq!(unhex(b"612f62"), Some(b"a/b".to_vec()));
        assert_eq!(unhex(b"6"), None);
        assert_eq!(unhex(b"zz"), None);
    }
}
