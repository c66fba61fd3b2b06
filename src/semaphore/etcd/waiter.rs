//! One request on its way to a slot: the waiter's loop.
//!
//! A request first tries, in one transaction, to take slot 1 of an id that
//! has no holder and no waiter; the transaction reads the id's holders and
//! waiters instead when it fails, so an idle id costs no read before the
//! write. It takes a slot when the rule admits it (`admission.rs`), and
//! otherwise queues as a key `q/<lease>` whose create revision is its place. It sleeps in [`Signals::wait`] on its
//! signal pipe and a watch of the id's holders and waiters that starts at
//! the revision after the one it read (so the server serves it from its
//! synced path, not its 100 ms catch-up loop), brings its view up to date
//! from the watch's events, and decides again at every change, at its
//! deadline, at its lease's renewal, and when an older waiter has let its
//! turn pass.

use super::admission::{self, Record, Turns, View};
use super::client::Client;
use super::errors::CallError;
use super::failures;
use super::holder::{EtcdSlot, Holding};
use super::keys::Keys;
use super::lease;
use super::watch::Watch;
use super::wire::{b64, int};
use crate::report;
use crate::semaphore::{Acquired, Request};
use crate::signals::{Signals, Wake};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a waiter that gives up waits for its lease to be revoked, past
/// its deadline, before leaving its key to expire (others pass it after a
/// turn anyway).
const LEAVE_BOUND: Duration = Duration::from_millis(60);

/// Reads the id's holders and waiters at one revision.
pub fn look(c: &Client, keys: &Keys, until: Option<Instant>) -> Result<View, CallError> {
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
pub fn take_once(
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
pub struct Attempt<'a> {
    pub c: &'a Arc<Client>,
    pub keys: Keys,
    /// Its calls' deadline: the request's own, or a little later for a
    /// first try (`FIRST_TRY`).
    pub req: &'a Request<'a>,
    /// The request's own deadline, after which it gives up (and queues no more).
    pub given: Option<Instant>,
    pub record: Record,
    pub ttl: Duration,
    pub kill_on_lost: bool,
    /// The lease, and when its last confirmed renewal (or grant) was sent.
    pub lease: Option<(i64, Instant)>,
    /// The waiter key's create revision: the place in the queue.
    pub place: Option<i64>,
    pub watch: Option<Watch>,
    pub turns: Turns,
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

    /// The first look, which takes slot 1 at once if the id is idle, in
    /// one transaction; otherwise the view it read instead.
    fn first(&mut self) -> Result<Result<Acquired, View>, CallError> {
        let (lease, record, also) = self.taking()?;
        let txn = admission::take_first(&self.keys, lease, &record, also);
        let v = self.c.call("/v3/kv/txn", &txn, self.req.deadline)?;
        let revision = int(&v["header"]["revision"]);
        if v["succeeded"].as_bool() == Some(true) {
            return self.hold(1, revision, record).map(Ok);
        }
        let range = &v["responses"][0]["response_range"];
        Ok(Err(View::parse(&self.keys, range, revision)))
    }

    /// The lease, the holder's record and the other operations of a
    /// transaction that takes a slot (the waiter key goes, a `--bg` job's
    /// running record comes).
    fn taking(&mut self) -> Result<(i64, Record, Vec<Value>), CallError> {
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
        Ok((lease, record, also))
    }

    /// The slot taken at revision `fence`: its thread keeps the lease alive.
    fn hold(&mut self, slot: u32, fence: i64, record: Record) -> Result<Acquired, CallError> {
        let (lease, confirmed) = self.lease.take().expect("granted before taking");
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
        Ok(Acquired::Slot(Box::new(slot)))
    }

    fn decide(&mut self, view: &View) -> Result<Step, CallError> {
        self.turns.note(view, self.place);
        let until = self.req.deadline;
        if let Some(slot) = view.admits(self.req.jobs, self.place, &self.turns) {
            let (lease, record, also) = self.taking()?;
            let txn = admission::take(&self.keys, view, slot, lease, &record, also);
            let Some(fence) = commit(self.c, &txn, until)? else {
                return Ok(Step::Again(look(self.c, &self.keys, until)?));
            };
            return self.hold(slot, fence, record).map(Step::Done);
        }
        if self.given.is_some_and(|d| Instant::now() >= d) {
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
    pub fn leave(&mut self) {
        if let Some((id, _)) = self.lease.take() {
            lease::revoke(self.c, id, Instant::now() + LEAVE_BOUND);
        }
    }

    /// The loop that decides how a wait ends: a slot, the deadline, a
    /// signal, a full queue, or the cluster out of reach.
    pub fn run(&mut self, signals: &mut Signals, verbose: bool) -> Result<Acquired, CallError> {
        let mut view = match self.first()? {
            Ok(done) => return Ok(done),
            Err(view) => view,
        };
        loop {
            match self.step(&view)? {
                Step::Done(done) => return Ok(done),
                Step::Again(v) => {
                    view = v;
                    continue;
                }
                Step::Sleep => {}
            }
            if self.watch.is_none() {
                if verbose {
                    report::line(self.req.id, "waiting for a slot");
                }
                let (start, end) = self.keys.queue_range();
                let w = self
                    .c
                    .watch(&start, &end, view.revision + 1)
                    .map_err(|e| CallError::Refused(format!("{e:#}")))?;
                self.watch = Some(w);
            }
            let w = self.watch.as_ref().expect("set above");
            let wake = signals
                .wait(&[w.fd()], self.next_wake())
                .map_err(|e| CallError::Refused(format!("{e:#}")))?;
            match wake {
                Wake::Signal(r) => return Ok(Acquired::Interrupted(r)),
                // The watch's events say what changed; only a broken watch
                // (which may have missed some) costs a read.
                Wake::Ready(_) => match w.take() {
                    (_, true) => view = look(self.c, &self.keys, self.req.deadline)?,
                    (events, false) => view.apply(&self.keys, &events),
                },
                // The deadline, a renewal, or a turn let pass: the same view.
                Wake::Timeout => {}
            }
            self.renew_if_due()?;
        }
    }
}
