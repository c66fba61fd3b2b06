//! The etcd engine: a fleet shares one limit through an etcd cluster, which
//! keeps it through the loss of any minority of its members (Raft), unlike a
//! single server's session locks.
//!
//! It is built on transactions and watches, not on etcd's Lock service.
//! A slot is a key `qsem/<id>/h/<slot>` attached to its qsem's lease (TTL
//! `--lost-after`), created by a transaction that succeeds only if no other
//! holder key appeared since the revision the taker read (`admission.rs`:
//! the mixed-`-j` rule holds at every instant). A waiter queues as a key
//! `qsem/<id>/q/<lease>` whose create revision is its place; it sleeps in
//! [`Signals::wait`] on its signal pipe and a watch of the id's holders and
//! waiters that starts at the revision after the one it read (so the server
//! serves it from its synced path, not its 100 ms catch-up loop), brings its
//! view up to date from the watch's events, and decides again at every
//! change, at its deadline, and when an older waiter has let its turn pass.
//! The lease is revoked the moment a slot or a wait ends; a crashed qsem's
//! keys vanish when its lease expires (`lease.rs`, which also says how a
//! holder that cannot renew its lease reports the loss early enough for
//! `--on-lost=kill` to fence; `watchdog.rs` does it when qsem cannot).
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
mod failures;
mod keys;
mod lease;
mod status;
mod tls;
mod watch;
mod watchdog;
mod wire;

use self::admission::{Record, Turns, View};
use self::client::{CallError, Client};
use self::keys::Keys;
use self::lease::{EtcdSlot, Holding};
use self::watch::Watch;
use self::wire::{b64, int};
use super::{Acquired, IdStatus, Idle, Request, Semaphore};
use crate::config::EtcdSettings;
use crate::id::Id;
use crate::signals::{Signals, Wake};
use crate::{report, sys};
use anyhow::Result;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a waiter that gives up waits for its lease to be revoked, past
/// its deadline, before leaving its key to expire (others pass it after a
/// turn anyway).
const LEAVE_BOUND: Duration = Duration::from_millis(60);
/// How long the first look and take may run past a deadline that is
/// already (nearly) due, as with `--wait 0`: one attempt, not none.
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

    fn say(&self, id: &Id, msg: &str) {
        if self.verbose {
            report::line(id, msg);
        }
    }
}

/// A call's error as qsem's own failure.
fn failed(e: CallError) -> anyhow::Error {
    anyhow::Error::new(e)
}

/// Reads the id's holders and waiters at one revision.
fn look(c: &Client, keys: &Keys, until: Option<Instant>) -> Result<View, CallError> {
    let v = c.call("/v3/kv/range", &keys.queue_request(), until)?;
    Ok(View::parse(keys, &v, int(&v["header"]["revision"])))
}

/// The transaction that takes `slot`; `Some(fence)` if it succeeded.
fn commit(c: &Client, txn: &Value, until: Option<Instant>) -> Result<Option<i64>, CallError> {
    let v = c.call("/v3/kv/txn", txn, until)?;
    Ok((v["succeeded"].as_bool() == Some(true)).then(|| int(&v["header"]["revision"])))
}

/// One attempt as a newcomer, with a lease of its own: `(lease, slot, fence)`
/// if admitted now. For a holder whose lease expired (`lease.rs`).
fn take_once(
    c: &Client,
    keys: &Keys,
    record: &Record,
    ttl: Duration,
    background: bool,
    until: Option<Instant>,
) -> Result<Option<(i64, u32, i64)>, CallError> {
    let view = look(c, keys, until)?;
    let Some(slot) = view.admits(record.jobs, None, &Turns::default()) else {
        return Ok(None);
    };
    let lease = lease::grant(c, ttl, until)?;
    let also = background
        .then(|| failures::running(keys, lease, &record.command))
        .into_iter()
        .collect();
    match commit(
        c,
        &admission::take(keys, &view, slot, lease, record, also),
        until,
    )? {
        Some(fence) => Ok(Some((lease, slot, fence))),
        None => {
            lease::revoke(c, lease, Instant::now() + LEAVE_BOUND);
            Ok(None)
        }
    }
}

/// A request on its way to a slot: its lease, place and watch, once it has them.
struct Attempt<'a> {
    c: &'a Arc<Client>,
    keys: Keys,
    req: &'a Request<'a>,
    record: Record,
    ttl: Duration,
    kill_on_lost: bool,
    /// The lease, and when its last confirmed renewal (or grant) was sent.
    lease: Option<(i64, Instant)>,
    /// The waiter key's create revision: the place in the queue.
    place: Option<i64>,
    watch: Option<Watch>,
    turns: Turns,
}

/// What one look at the id decided.
enum Step {
    Done(Acquired),
    /// Nothing to take yet: sleep until a change.
    Sleep,
    /// Look again at once (a transaction lost a race, or a key was written).
    Again(View),
}

/// Whether a call failed because the request's lease had expired (its qsem
/// was starved or stopped for longer than the TTL).
fn lease_gone(e: &CallError) -> bool {
    matches!(e, CallError::Refused(why) if why.contains("requested lease not found"))
}

impl Attempt<'_> {
    fn lease(&mut self) -> Result<i64, CallError> {
        if let Some((id, _)) = self.lease {
            return Ok(id);
        }
        let sent = Instant::now();
        let id = lease::grant(self.c, self.ttl, self.req.deadline)?;
        self.lease = Some((id, sent));
        Ok(id)
    }

    /// Decides on one view: take a slot, queue, give up, or sleep. A lease
    /// that expired meanwhile takes the place in the queue with it: queue
    /// again, with a new one.
    fn step(&mut self, view: &View) -> Result<Step, CallError> {
        match self.decide(view) {
            Err(e) if lease_gone(&e) => {
                (self.lease, self.place) = (None, None);
                Ok(Step::Again(look(self.c, &self.keys, self.req.deadline)?))
            }
            other => other,
        }
    }

    fn decide(&mut self, view: &View) -> Result<Step, CallError> {
        self.turns.note(view, self.place);
        let until = self.req.deadline;
        if let Some(slot) = view.admits(self.req.jobs, self.place, &self.turns) {
            let lease = self.lease()?;
            let mut also = Vec::new();
            if self.place.is_some() {
                also.push(json!({"request_delete_range": {"key": b64(&self.keys.waiter(lease))}}));
            }
            if self.req.background {
                also.push(failures::running(&self.keys, lease, self.req.command));
            }
            let mut record = self.record.clone();
            record.start = self.c.cluster_now().unwrap_or(0);
            let txn = admission::take(&self.keys, view, slot, lease, &record, also);
            let Some(fence) = commit(self.c, &txn, until)? else {
                return Ok(Step::Again(look(self.c, &self.keys, until)?));
            };
            let (lease, confirmed) = self.lease.take().expect("granted above");
            let slot = EtcdSlot::start(Holding {
                client: Arc::clone(self.c),
                keys: Keys::new(self.req.id),
                lease,
                slot,
                fence,
                record,
                ttl: self.ttl,
                background: self.req.background,
                confirmed,
                kill_on_lost: self.kill_on_lost,
                label: self.req.id.to_string(),
            })
            .map_err(|e| CallError::Refused(format!("{e:#}")))?;
            return Ok(Step::Done(Acquired::Slot(Box::new(slot))));
        }
        if until.is_some_and(|d| Instant::now() >= d) {
            return Ok(Step::Done(Acquired::TimedOut));
        }
        if self.place.is_none() {
            let crowded = self
                .req
                .max_waiting
                .is_some_and(|k| view.waiters.len() >= k as usize);
            if crowded {
                return Ok(Step::Done(Acquired::Crowded));
            }
            return self.queue().map(Step::Again);
        }
        Ok(Step::Sleep)
    }

    /// Puts the waiter key, and reads the queue at that same revision.
    fn queue(&mut self) -> Result<View, CallError> {
        let lease = self.lease()?;
        let put = json!({"request_put": {
            "key": b64(&self.keys.waiter(lease)),
            "value": b64(self.record.to_value().as_bytes()),
            "lease": lease.to_string(),
        }});
        let txn = json!({"success": [put, {"request_range": self.keys.queue_request()}]});
        let v = self.c.call("/v3/kv/txn", &txn, self.req.deadline)?;
        let revision = int(&v["header"]["revision"]);
        let view = View::parse(&self.keys, &v["responses"][1]["response_range"], revision);
        // The key's create revision, which is not this transaction's if an
        // earlier attempt was applied but not answered in time.
        let mine = self.keys.waiter(lease);
        let place = view.waiters.iter().find(|w| w.key == mine);
        self.place = Some(place.map_or(revision, |w| w.create_revision));
        Ok(view)
    }

    /// Renews the waiter's lease if due; a lease that expired (the qsem
    /// was stopped longer than the TTL) takes its place with it.
    fn renew_if_due(&mut self) -> Result<(), CallError> {
        let Some((id, sent)) = self.lease else {
            return Ok(());
        };
        if sent.elapsed() < self.ttl / 2 {
            return Ok(());
        }
        let now = Instant::now();
        if lease::renew(self.c, id, self.req.deadline)? {
            self.lease = Some((id, now));
        } else {
            (self.lease, self.place) = (None, None);
        }
        Ok(())
    }

    fn next_wake(&self) -> Option<Instant> {
        let renew = self.lease.map(|(_, sent)| sent + self.ttl / 2);
        [self.req.deadline, renew, self.turns.next_expiry()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Gives the lease back (its waiter key goes with it).
    fn leave(&mut self) {
        if let Some((id, _)) = self.lease.take() {
            lease::revoke(self.c, id, Instant::now() + LEAVE_BOUND);
        }
    }
}

impl Semaphore for Etcd {
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired> {
        let first_try = Instant::now() + FIRST_TRY;
        let req = &Request {
            deadline: req.deadline.map(|d| d.max(first_try)),
            ..*req
        };
        let mut a = Attempt {
            c: &self.client,
            keys: Keys::new(req.id),
            req,
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
        let outcome = self.wait_for_slot(&mut a, signals);
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

impl Etcd {
    /// The loop that decides how a wait ends: a slot, the deadline, a
    /// signal, a full queue, or the cluster out of reach.
    fn wait_for_slot(&self, a: &mut Attempt, signals: &mut Signals) -> Result<Acquired, CallError> {
        let mut view = look(a.c, &a.keys, a.req.deadline)?;
        loop {
            match a.step(&view)? {
                Step::Done(done) => return Ok(done),
                Step::Again(v) => {
                    view = v;
                    continue;
                }
                Step::Sleep => {}
            }
            if a.watch.is_none() {
                self.say(a.req.id, "waiting for a slot");
                let (start, end) = a.keys.queue_range();
                let w =
                    a.c.watch(&start, &end, view.revision + 1)
                        .map_err(|e| CallError::Refused(format!("{e:#}")))?;
                a.watch = Some(w);
            }
            let w = a.watch.as_ref().expect("set above");
            let wake = signals
                .wait(&[w.fd()], a.next_wake())
                .map_err(|e| CallError::Refused(format!("{e:#}")))?;
            match wake {
                Wake::Signal(r) => return Ok(Acquired::Interrupted(r)),
                // The watch's events say what changed; only a broken watch
                // (which may have missed some) costs a read.
                Wake::Ready(_) => match w.take() {
                    (_, true) => view = look(a.c, &a.keys, a.req.deadline)?,
                    (events, false) => view.apply(&a.keys, &events),
                },
                // The deadline, a renewal, or a turn let pass: the same view.
                Wake::Timeout => {}
            }
            a.renew_if_due()?;
        }
    }
}
