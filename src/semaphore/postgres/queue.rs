//! This host's queue of waiters for an id: who is the head (the one waiter
//! with a session on the server, see `waiting`), and who comes next.
//!
//! The queue is the lock-file engine, used through the `Semaphore` trait on
//! local ids derived from the server and the id, each with one slot: the
//! `head` gate's holder is the head; the `next` gate's holder is its
//! successor, and everyone else queues for `next`. The engine orders them,
//! sleeps in the kernel, and ends on `--wait` or a signal, so a hundred
//! waiters on one host cost the server two sessions, not a hundred.
//!
//! The successor connects and sets its session up while the head still
//! waits: when the head takes a slot (and gives its gate back), the
//! successor is ready to try at once (its first attempt's message starts
//! its LISTEN), instead of starting a session (a backend start,
//! authentication) after the NOTIFY that it should already be answering.
//! It does not LISTEN before: every release would wake it for nothing. A waiter that finds nobody waiting becomes head at once,
//! through one try of the `head` gate, which the engine grants no newcomer
//! while another waits for it.

use super::Postgres;
use super::connect::Connector;
use super::session::Session;
use crate::id::Id;
use crate::semaphore::{Acquired, Request, Slot};
use crate::signals::Signals;
use anyhow::Result;
use std::ffi::OsStr;
use std::time::Instant;
use tokio::task::JoinHandle;

/// How long a new successor waits before it connects: it becomes one as
/// the head before it starts its job, which a backend start and the
/// authentication would otherwise slow.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// The local id that queues this host's waiters for `id` on `target`.
pub fn local_id(target: &str, id: &Id, what: &str) -> Id {
    let h = target
        .bytes()
        .chain([0])
        .chain(id.as_bytes().iter().copied())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    Id::new(OsStr::new(&format!("postgres-{what}-{h:016x}"))).expect("a valid id")
}

/// The head's place: its gate, and the session it prepared as successor.
pub struct Head {
    pub gate: Box<dyn Slot>,
    pub ready: Ready,
}

/// A session being prepared on the runtime; dropped unused, it is stopped.
pub struct Ready(Option<JoinHandle<Result<Session>>>);

impl Ready {
    pub fn none() -> Ready {
        Ready(None)
    }

    /// The prepared session, once ready; `None` if none was prepared.
    pub async fn take(&mut self) -> Option<Result<Session>> {
        let handle = self.0.as_mut()?;
        let got = handle.await;
        self.0 = None;
        Some(got.unwrap_or_else(|e| Err(anyhow::anyhow!("the connecting task failed: {e}"))))
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// Takes this host's head gate for `req`, waiting behind the head and its
/// successor. `prepare`: whether to connect as successor (not when the
/// session must be checked for a pooler, see `pooler`, which opens its own).
pub fn head(
    pg: &Postgres,
    req: &Request,
    prepare: bool,
    signals: &mut Signals,
) -> Result<Result<Head, Acquired>> {
    let mut local = pg.local()?;
    let target = &pg.connector.target;
    let head_id = local_id(target, req.id, "head");
    let head_req = gate(&head_id, req, 1);
    let now = Request {
        deadline: Some(Instant::now()),
        ..head_req
    };
    match local.acquire(&now, signals)? {
        Acquired::Slot(gate) => {
            return Ok(Ok(Head {
                gate,
                ready: Ready::none(),
            }));
        }
        Acquired::Interrupted(r) => return Ok(Err(Acquired::Interrupted(r))),
        other
            if req.max_waiting == Some(0) || req.deadline.is_some_and(|d| d <= Instant::now()) =>
        {
            return Ok(Err(other));
        }
        _ => {}
    }
    let next_id = local_id(target, req.id, "next");
    let next_req = gate(&next_id, req, 2);
    let next = match local.acquire(&next_req, signals)? {
        Acquired::Slot(next) => next,
        other => return Ok(Err(other)),
    };
    let ready = match prepare {
        true => Ready(Some(
            super::runtime()?.spawn(successor(pg.connector.clone())),
        )),
        false => Ready::none(),
    };
    let gate = match local.acquire(&head_req, signals)? {
        Acquired::Slot(gate) => gate,
        other => return Ok(Err(other)),
    };
    drop(next);
    Ok(Ok(Head { gate, ready }))
}

/// The request for the local gate `id`, one slot, for `req`: the head and
/// the successor each hold a gate while they wait, so `ahead` of this
/// host's waiters do not queue for it.
fn gate<'a>(id: &'a Id, req: &Request<'a>, ahead: u32) -> Request<'a> {
    Request {
        id,
        jobs: 1,
        max_waiting: req.max_waiting.map(|k| k.saturating_sub(ahead)),
        ..*req
    }
}

/// The successor's session: connected and set up, after [`SETTLE`].
async fn successor(c: Connector) -> Result<Session> {
    tokio::time::sleep(SETTLE).await;
    c.open().await
}
