//! This host's queue of waiters for an id, and who of them is the head: the
//! one waiter of this host and id with a session on the server (see
//! `waiting`).
//!
//! The queue is the lock-file engine, used through the `Semaphore` trait on
//! a local id derived from the server and the id, with one slot: the `head`
//! gate's holder is the head, and everyone else queues for it. The engine
//! orders them, sleeps in the kernel, and ends on `--wait` or a signal, so a
//! hundred waiters on one host cost the server one session, not a hundred.
//! The head gives the gate back once its job has started.
//!
//! A successor that connected while the head still waited, ready to try the
//! moment the head took its slot, was built and measured: it cost a second
//! session per host and id and changed neither the handoff with 50 waiters
//! nor how busy the slots of a `-j3` id with 60 waiters are (95.5% with it,
//! 95.8% without, bench/RESULTS.md), so waiting keeps to one session.

use super::Postgres;
use super::keys::fnv1a;
use crate::id::Id;
use crate::semaphore::{Acquired, Request, Slot};
use crate::signals::Signals;
use anyhow::Result;
use std::ffi::OsStr;

/// The local id that queues this host's waiters for `id` on `target`.
pub fn local_id(target: &str, id: &Id, what: &str) -> Id {
    let h = fnv1a(
        target
            .bytes()
            .chain([0])
            .chain(id.as_bytes().iter().copied()),
    );
    Id::new(OsStr::new(&format!("postgres-{what}-{h:016x}"))).expect("a valid id")
}

/// Takes this host's head gate for `req`, queueing behind this host's other
/// waiters for it. The head holds the gate while it waits on the server, so
/// it counts as one of the `--max-waiting` waiters ahead of the queue.
pub fn head(
    pg: &Postgres,
    req: &Request,
    signals: &mut Signals,
) -> Result<Result<Box<dyn Slot>, Acquired>> {
    let head_id = local_id(&pg.connector.target, req.id, "head");
    let gate = Request {
        id: &head_id,
        jobs: 1,
        max_waiting: req.max_waiting.map(|k| k.saturating_sub(1)),
        ..*req
    };
    match pg.local()?.acquire(&gate, signals)? {
        Acquired::Slot(gate) => Ok(Ok(gate)),
        other => Ok(Err(other)),
    }
}
