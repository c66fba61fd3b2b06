//! The etcd engine: a fleet shares one limit through an etcd cluster, which
//! keeps it through the loss of any minority of its members (Raft), unlike a
//! single server's session locks.
//!
//! It is built on transactions and watches, not on etcd's Lock service.
//! A slot is a key `qsem/<id>/h/<slot>` attached to its qsem's lease (TTL
//! `--lost-after`), created by a transaction that succeeds only if no other
//! holder key appeared since the revision the taker read (`admission.rs`:
//! the mixed-`-j` rule holds at every instant). A waiter queues as a key
//! `qsem/<id>/q/<lease>` whose create revision is its place, and sleeps on a
//! watch of the id (`waiter.rs`). The lease is revoked the moment a slot or
//! a wait ends; a crashed qsem's keys vanish when its lease expires
//! (`lease.rs`; `holder.rs` says how a holder that cannot renew its lease
//! reports the loss early enough for `--on-lost=kill` to fence;
//! `watchdog.rs` does it when qsem cannot).
//!
//! The fencing token (`QSEM_FENCE`) is the holder key's create revision:
//! etcd's revision grows with every write to the cluster, so every grant of
//! any slot of the id, anywhere, has a larger one than every grant before it.
//!
//! Every call to the cluster is bounded by the waiter's deadline (and tries
//! every endpoint, `client.rs`), so `--wait` holds even when no member answers;
//! none answering for a few seconds is qsem's own failure (125).

mod admission;
mod client;
mod errors;
mod failures;
mod holder;
mod keys;
mod lease;
mod resolve;
mod status;
mod tls;
mod waiter;
mod watch;
mod watchdog;
mod wire;

use self::admission::{Record, Turns};
use self::client::Client;
use self::errors::CallError;
use self::keys::Keys;
use self::waiter::{Attempt, look};
use self::watch::Watch;
use super::{Acquired, IdStatus, Idle, Request, Semaphore};
use crate::config::EtcdSettings;
use crate::id::Id;
use crate::signals::{Signals, Wake};
use crate::sys;
use anyhow::Result;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the first look and take may run past a deadline that is
/// already (nearly) due, as with `--wait 0`: one attempt, not none. A
/// request whose own deadline has passed by then gives up without queueing.
const FIRST_TRY: Duration = Duration::from_millis(80);

pub struct Etcd {
    client: Arc<Client>,
    ttl: Duration,
    verbose: bool,
    kill_on_lost: bool,
}

impl Etcd {
    pub fn new(settings: &EtcdSettings, verbose: bool) -> Result<Etcd> {
        Ok(Etcd {
            client: Arc::new(Client::new(settings)?),
            ttl: Duration::from_secs(lease::ttl_secs(settings.lost_after) as u64),
            verbose,
            kill_on_lost: settings.kill_on_lost,
        })
    }
}

/// A call's error as qsem's own failure.
fn failed(e: CallError) -> anyhow::Error {
    anyhow::Error::new(e)
}

impl Semaphore for Etcd {
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired> {
        let first_try = Instant::now() + FIRST_TRY;
        let given = req.deadline;
        let req = &Request {
            deadline: req.deadline.map(|d| d.max(first_try)),
            ..*req
        };
        let mut a = Attempt {
            c: &self.client,
            keys: Keys::new(req.id),
            req,
            given,
            record: Record {
                host: sys::hostname(),
                pid: std::process::id(),
                jobs: req.jobs,
                command: req.command.to_string(),
                start: 0,
            },
            ttl: self.ttl,
            kill_on_lost: self.kill_on_lost,
            lease: None,
            place: None,
            watch: None,
            turns: Turns::default(),
        };
        let outcome = a.run(signals, self.verbose);
        if !matches!(outcome, Ok(Acquired::Slot(_))) {
            a.leave();
        }
        match outcome {
            // Not one answer before the deadline: the cluster is out of
            // reach, which is not a quiet expiry.
            Err(CallError::Expired) if self.client.cluster_now().is_none() => {
                Err(failed(CallError::Unreachable(format!(
                    "cannot reach etcd at {} before the --wait deadline",
                    self.client.describe()
                ))))
            }
            Err(CallError::Expired) => Ok(Acquired::TimedOut),
            other => other.map_err(failed),
        }
    }

    fn status(&mut self, only: Option<&Id>) -> Result<Vec<IdStatus>> {
        status::list(&self.client, only).map_err(failed)
    }

    fn wait_idle(
        &mut self,
        id: &Id,
        deadline: Option<Instant>,
        signals: &mut Signals,
    ) -> Result<Idle> {
        let keys = Keys::new(id);
        let mut watch: Option<Watch> = None;
        loop {
            let view = match look(&self.client, &keys, deadline) {
                Err(CallError::Expired) => return Ok(Idle::TimedOut),
                other => other.map_err(failed)?,
            };
            if view.holders.is_empty() && view.waiters.is_empty() {
                return Ok(Idle::Reached);
            }
            if watch.is_none() {
                let (start, end) = keys.queue_range();
                watch = Some(self.client.watch(&start, &end, view.revision + 1)?);
            }
            let w = watch.as_ref().expect("set above");
            match signals.wait(&[w.fd()], deadline)? {
                Wake::Signal(r) => return Ok(Idle::Interrupted(r)),
                Wake::Timeout => return Ok(Idle::TimedOut),
                Wake::Ready(_) => w.drain(),
            }
        }
    }

    fn take_failures(&mut self, id: &Id) -> Result<u32> {
        failures::take(&self.client, &Keys::new(id))
    }
}
