//! Background jobs' outcomes, kept in etcd under the id, so that the next
//! `--wait-all` finds them on whichever machine it runs.
//!
//! A `--bg` job's slot is taken in the same transaction that writes its
//! running record `r/<lease>` (no lease: it must outlive the qsem). Its
//! supervisor, while it still holds the slot, replaces the record by a
//! failure `f/<lease>` or removes it. A running record whose lease no longer
//! exists is a supervisor that died, or could not record the job's end: it
//! counts as a failure, so that an outcome that could not be written makes
//! `--wait-all` fail rather than pass. [`take`] counts these and removes
//! exactly the keys it counted, in one transaction guarded by each key's
//! revision, so that two `--wait-all`s never count one failure twice.

use super::client::Client;
use super::keys::{Keys, prefix_end};
use super::wire::{b64, int, unb64};
use anyhow::Result;
use serde_json::{Value, json};
use std::time::Instant;

/// The operation, for the taking transaction, that records a running job.
pub fn running(keys: &Keys, lease: i64, line: &str) -> Value {
    json!({"request_put": {"key": b64(&keys.running(lease)), "value": b64(line.as_bytes())}})
}

/// Records a background job's end, while its lease still holds.
pub fn finish(c: &Client, keys: &Keys, lease: i64, failure: Option<&str>) -> Result<()> {
    let mut ops = vec![json!({"request_delete_range": {"key": b64(&keys.running(lease))}})];
    if let Some(line) = failure {
        ops.push(json!({"request_put": {
            "key": b64(&keys.failure(lease)), "value": b64(line.as_bytes()),
        }}));
    }
    let until = Instant::now() + super::client::ATTEMPT * 2;
    c.call("/v3/kv/txn", &json!({"success": ops}), Some(until))
        .map_err(|e| anyhow::anyhow!("cannot record the job's end in etcd: {e}"))?;
    Ok(())
}

/// Counts and removes the id's failures and orphaned running records.
pub fn take(c: &Client, keys: &Keys) -> Result<u32> {
    loop {
        let (f, r) = (keys.kind("f"), keys.kind("r"));
        let list = |prefix: &[u8]| {
            json!({"request_range": {
                "key": b64(prefix), "range_end": b64(&prefix_end(prefix)),
            }})
        };
        let (h_start, h_end) = (keys.kind("h"), prefix_end(&keys.kind("h")));
        let holders = json!({"request_range": {"key": b64(&h_start), "range_end": b64(&h_end)}});
        let v = c.call(
            "/v3/kv/txn",
            &json!({"success": [list(&f), list(&r), holders]}),
            None,
        )?;
        let ranges: Vec<&Value> = (0..3)
            .map(|i| &v["responses"][i]["response_range"])
            .collect();
        let kvs = |i: usize| ranges[i]["kvs"].as_array().cloned().unwrap_or_default();
        let live: Vec<i64> = kvs(2).iter().map(|kv| int(&kv["lease"])).collect();
        let mut counted: Vec<(Vec<u8>, i64)> = Vec::new();
        for kv in kvs(0) {
            counted.push((unb64(&kv["key"]), int(&kv["mod_revision"])));
        }
        for kv in kvs(1) {
            let key = unb64(&kv["key"]);
            let lease = std::str::from_utf8(&key[r.len()..])
                .ok()
                .and_then(|h| i64::from_str_radix(h, 16).ok());
            // The holder key and the running record are written together;
            // no holder key with the record's lease: its qsem has gone.
            if lease.is_some_and(|l| !live.contains(&l)) {
                counted.push((key, int(&kv["mod_revision"])));
            }
        }
        if counted.is_empty() {
            return Ok(0);
        }
        let compare: Vec<Value> = counted
            .iter()
            .map(|(k, rev)| {
                json!({"key": b64(k), "target": "MOD", "result": "EQUAL",
                "mod_revision": rev.to_string()})
            })
            .collect();
        let delete: Vec<Value> = counted
            .iter()
            .map(|(k, _)| json!({"request_delete_range": {"key": b64(k)}}))
            .collect();
        let done = c.call(
            "/v3/kv/txn",
            &json!({"compare": compare, "success": delete}),
            None,
        )?;
        if done["succeeded"].as_bool() == Some(true) {
            return Ok(counted.len() as u32);
        }
        // Another --wait-all took some of them first: count again.
    }
}
