//! Leases: their TTL, how often they are renewed, and when a holder whose
//! renewals go unconfirmed must call its slot lost.
//!
//! Every qsem that waits or holds has one lease, granted with TTL
//! `--lost-after`; its waiter key and then its holder key are attached to
//! it, so that the cluster removes them when the qsem stops renewing. A slot
//! that ends (the job exits, or qsem is stopped by a signal) revokes the
//! lease at once, which frees the slot for the next waiter. The held slot
//! that keeps a lease alive is in `holder.rs`.

use super::client::Client;
use super::errors::CallError;
use super::watchdog;
use super::wire::int;
use crate::semaphore::LOST_GRACE;
use serde_json::json;
use std::time::{Duration, Instant};

/// The lease's TTL in whole seconds (etcd's unit), at least 2.
pub fn ttl_secs(lost_after: Duration) -> i64 {
    lost_after.as_secs().max(2) as i64
}

/// How often a lease is renewed.
pub fn interval(ttl: Duration) -> Duration {
    ttl / 6
}

/// How long after the last confirmed renewal was sent a holder declares its
/// slot lost: a third of the TTL, less if SIGTERM plus [`LOST_GRACE`] and a
/// margin would not fit before the TTL, but never less than one interval.
pub fn lose_after(ttl: Duration) -> Duration {
    let fits = ttl.saturating_sub(LOST_GRACE + watchdog::LAG + Duration::from_secs(1));
    (ttl / 3).min(fits).max(interval(ttl))
}

pub fn grant(c: &Client, ttl: Duration, until: Option<Instant>) -> Result<i64, CallError> {
    let v = c.call(
        "/v3/lease/grant",
        &json!({"TTL": ttl_secs(ttl).to_string()}),
        until,
    )?;
    Ok(int(&v["ID"]))
}

/// Renews a lease; `false` if the cluster no longer has it.
pub fn renew(c: &Client, lease: i64, until: Option<Instant>) -> Result<bool, CallError> {
    let v = c.call(
        "/v3/lease/keepalive",
        &json!({"ID": lease.to_string()}),
        until,
    )?;
    Ok(int(&v["result"]["TTL"]) > 0)
}

/// Takes a lease back, with its keys; a failure leaves it to expire.
pub fn revoke(c: &Client, lease: i64, until: Instant) {
    let _ = c.call(
        "/v3/lease/revoke",
        &json!({"ID": lease.to_string()}),
        Some(until),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_slot_is_declared_before_the_kill_cannot_fit() {
        let s = Duration::from_secs;
        for ttl in [15, 20, 30, 60, 300] {
            let ttl = s(ttl);
            let declared = lose_after(ttl);
            assert!(declared >= interval(ttl), "{ttl:?}");
            // SIGTERM at `declared` (the watchdog's a lag later), SIGKILL a
            // grace later: before expiry.
            assert!(
                declared + watchdog::LAG + LOST_GRACE < ttl,
                "{ttl:?}: {declared:?}"
            );
        }
        assert_eq!(lose_after(s(30)), s(10));
        // Too short a TTL for the grace: declared as early as renewals allow.
        assert_eq!(lose_after(s(6)), s(1));
        assert_eq!(ttl_secs(Duration::from_millis(2500)), 2);
    }
}
