//! The held slot: a thread that keeps its lease alive, reports its loss, and
//! gives it back when the job ends.
//!
//! **Loss, and fencing by `--on-lost=kill`.** A holder's thread renews the
//! lease every [`interval`]. The cluster cannot expire the lease before TTL
//! after the last renewal it granted, and that renewal was sent after the
//! instant the thread last *sent* a renewal that was then confirmed. So the
//! thread reports the slot lost ([`SlotEvent::Lost`]) once [`lose_after`]
//! has passed since that instant without a newer confirmation: early
//! enough that the runner's SIGTERM and, [`LOST_GRACE`] later, SIGKILL come
//! before the cluster can give the slot to anyone else, when the TTL leaves
//! room for them (`--lost-after` ≥ 15 s with the runner's 10 s grace). If
//! renewals are confirmed again in time, the slot was never lost, and it
//! says so ([`SlotEvent::Regained`]); if the lease has expired, it tries,
//! every interval, to take a slot again by the ordinary rule.

use super::admission::Record;
use super::client::Client;
use super::failures;
use super::keys::Keys;
use super::lease::{interval, lose_after, renew, revoke};
use super::watchdog::{self, Watchdog};
use super::wire::b64;
use crate::duration;
use crate::semaphore::LOST_GRACE;
use crate::semaphore::{Slot, SlotEvent};
use crate::sys;
use anyhow::{Context, Result};
use serde_json::json;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a holder that leaves waits for the cluster to take its lease
/// back before leaving it to expire.
const REVOKE_BOUND: Duration = Duration::from_secs(1);
/// How long a job runs before its pid is written into the holder key
/// (until then `--status` shows qsem's own, the job's parent).
const RECORD_AFTER: Duration = Duration::from_millis(50);

/// What the holder's thread is asked to do.
enum Order {
    Started(u32),
    Finish(Option<String>, mpsc::Sender<Result<()>>),
}

/// A held slot of the etcd engine.
pub struct EtcdSlot {
    number: u32,
    fence: u64,
    orders: Option<mpsc::Sender<Order>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Readable when `news` has something.
    ready: OwnedFd,
    news: Arc<Mutex<Vec<SlotEvent>>>,
}

/// Everything the holder's thread needs.
pub struct Holding {
    pub client: Arc<Client>,
    pub keys: Keys,
    pub lease: i64,
    pub slot: u32,
    pub fence: i64,
    pub record: Record,
    pub ttl: Duration,
    pub background: bool,
    /// When the last renewal (or the grant) that the cluster confirmed was sent.
    pub confirmed: Instant,
    /// `--on-lost=kill`: start a [`Watchdog`] with the job.
    pub kill_on_lost: bool,
    /// The id, for the watchdog's message.
    pub label: String,
}

impl EtcdSlot {
    pub fn start(holding: Holding) -> Result<EtcdSlot> {
        let (ready, wake) = sys::pipe().context("cannot create a pipe for slot events")?;
        let news = Arc::new(Mutex::new(Vec::new()));
        let (orders, inbox) = mpsc::channel();
        let (number, fence) = (holding.slot, holding.fence as u64);
        let keeper = Keeper {
            h: holding,
            wake,
            news: Arc::clone(&news),
            lost: false,
            watchdog: None,
        };
        let thread = std::thread::Builder::new()
            .name("qsem-etcd-lease".into())
            .spawn(move || keeper.run(inbox))
            .context("cannot start the lease thread")?;
        Ok(EtcdSlot {
            number,
            fence,
            orders: Some(orders),
            thread: Some(thread),
            ready,
            news,
        })
    }
}

impl Slot for EtcdSlot {
    fn number(&self) -> u32 {
        self.number
    }

    fn inheritable(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn fence(&self) -> Option<u64> {
        Some(self.fence)
    }

    fn started(&mut self, pid: u32) {
        if let Some(o) = &self.orders {
            let _ = o.send(Order::Started(pid));
        }
    }

    fn events(&self) -> Option<BorrowedFd<'_>> {
        Some(self.ready.as_fd())
    }

    fn take_events(&mut self) -> Vec<SlotEvent> {
        let mut buf = [0u8; 64];
        while rustix::io::read(self.ready.as_fd(), &mut buf).is_ok_and(|n| n > 0) {}
        std::mem::take(&mut *self.news.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn finish(mut self: Box<Self>, failure: Option<&str>) -> Result<()> {
        let (reply, answer) = mpsc::channel();
        if let Some(o) = self.orders.take() {
            let _ = o.send(Order::Finish(failure.map(str::to_string), reply));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        answer.recv().unwrap_or(Ok(()))
    }
}

impl Drop for EtcdSlot {
    fn drop(&mut self) {
        // Closing the channel tells the thread to revoke the lease.
        drop(self.orders.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The holder's thread.
struct Keeper {
    h: Holding,
    wake: OwnedFd,
    news: Arc<Mutex<Vec<SlotEvent>>>,
    /// Reported lost, and not (yet) confirmed or taken again.
    lost: bool,
    watchdog: Option<Watchdog>,
}

impl Keeper {
    fn run(mut self, inbox: mpsc::Receiver<Order>) {
        let every = interval(self.h.ttl);
        let mut next = Instant::now() + every;
        loop {
            match inbox.recv_timeout(next.saturating_duration_since(Instant::now())) {
                // A job that ends within RECORD_AFTER needs no pid in
                // `--status`, and the write would delay the release.
                Ok(Order::Started(pid)) => {
                    self.guard(pid);
                    match inbox.recv_timeout(RECORD_AFTER) {
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            self.leave();
                            return;
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) | Ok(Order::Started(_)) => {
                            self.record_pid(pid);
                        }
                        Ok(Order::Finish(failure, reply)) => {
                            let _ = reply.send(self.end(failure.as_deref()));
                            return;
                        }
                    }
                }
                Ok(Order::Finish(failure, reply)) => {
                    let _ = reply.send(self.end(failure.as_deref()));
                    return;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.leave();
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.beat();
                    next = Instant::now() + every;
                }
            }
        }
    }

    /// Gives the slot back without a word (the slot was dropped).
    fn leave(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.stand_down();
        }
        revoke(&self.h.client, self.h.lease, Instant::now() + REVOKE_BOUND);
    }

    fn tell(&self, event: SlotEvent) {
        self.news
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        let _ = rustix::io::write(&self.wake, b"e");
    }

    /// One renewal, and what it means for the slot.
    fn beat(&mut self) {
        let limit = lose_after(self.h.ttl);
        let sent = Instant::now();
        // Never wait past the instant the loss must be declared.
        let until = (sent + interval(self.h.ttl)).min(self.h.confirmed + limit);
        let until = until.max(sent + Duration::from_millis(100));
        match renew(&self.h.client, self.h.lease, Some(until)) {
            Ok(true) => {
                self.confirmed(sent);
                if self.lost {
                    self.lost = false;
                    self.tell(SlotEvent::Regained(format!(
                        "the cluster confirmed slot {} again: it was never given away",
                        self.h.slot
                    )));
                }
            }
            Ok(false) if self.lost => self.retake(),
            Ok(false) => {
                self.lost = true;
                self.tell(SlotEvent::lost(format!(
                    "slot {}'s lease expired on the etcd cluster",
                    self.h.slot
                )));
                self.retake();
            }
            Err(_) if !self.lost && self.h.confirmed.elapsed() >= limit => {
                self.lost = true;
                self.tell(SlotEvent::lost(format!(
                    "etcd has not confirmed slot {}'s lease for {} (it expires {} after the last renewal)",
                    self.h.slot,
                    duration::human(self.h.confirmed.elapsed()),
                    duration::human(self.h.ttl)
                )));
            }
            Err(_) => {}
        }
    }

    /// After the lease expired: one attempt to take a slot again.
    fn retake(&mut self) {
        let bound = Some(Instant::now() + interval(self.h.ttl));
        let sent = Instant::now();
        let Ok(Some((lease, slot, fence))) = super::waiter::take_once(
            &self.h.client,
            &self.h.keys,
            &self.h.record,
            self.h.ttl,
            self.h.background,
            bound,
        ) else {
            return;
        };
        let old = self.h.slot;
        if self.h.background {
            // The new lease's running record stands for the job now.
            let stale = json!({"key": b64(&self.h.keys.running(self.h.lease))});
            let _ = self.h.client.call("/v3/kv/deleterange", &stale, bound);
        }
        (self.h.lease, self.h.slot, self.h.fence) = (lease, slot, fence);
        self.confirmed(sent);
        self.lost = false;
        self.tell(SlotEvent::Regained(format!(
            "took slot {slot} again (it had slot {old}; QSEM_SLOT and QSEM_FENCE still say the old ones, fence now {fence})"
        )));
    }

    fn record_pid(&mut self, pid: u32) {
        self.h.record.pid = pid;
        let put = json!({
            "key": b64(&self.h.keys.holder(self.h.slot)),
            "value": b64(self.h.record.to_value().as_bytes()),
            "lease": self.h.lease.to_string(),
        });
        let until = Instant::now() + interval(self.h.ttl);
        let _ = self.h.client.call("/v3/kv/put", &put, Some(until));
    }

    /// With `--on-lost=kill`: a watchdog for the job `pid`, due when the
    /// loss would be declared, plus its lag.
    fn guard(&mut self, pid: u32) {
        if !self.h.kill_on_lost {
            return;
        }
        let due = watchdog::at(self.h.confirmed, lose_after(self.h.ttl) + watchdog::LAG);
        let message = format!(
            "qsem[{}]: etcd has not confirmed slot {}'s lease and qsem does not answer; \
             stopping the command (SIGTERM, then SIGKILL after {})\n",
            self.h.label,
            self.h.slot,
            duration::human(LOST_GRACE)
        );
        match Watchdog::start(pid, due, message) {
            Ok(w) => self.watchdog = Some(w),
            Err(e) => self.tell(SlotEvent::lost(format!(
                "cannot guard the job against a lost lease ({e:#})"
            ))),
        }
    }

    /// Tells the watchdog, if any, of a renewal confirmed as sent at `sent`.
    fn confirmed(&mut self, sent: Instant) {
        self.h.confirmed = sent;
        if let Some(w) = &self.watchdog {
            w.extend(watchdog::at(sent, lose_after(self.h.ttl) + watchdog::LAG));
        }
    }

    /// Records a background job's end, then gives the slot back.
    fn end(&mut self, failure: Option<&str>) -> Result<()> {
        if let Some(w) = self.watchdog.take() {
            w.stand_down();
        }
        let recorded = if self.h.background {
            failures::finish(&self.h.client, &self.h.keys, self.h.lease, failure)
        } else {
            Ok(())
        };
        revoke(&self.h.client, self.h.lease, Instant::now() + REVOKE_BOUND);
        recorded
    }
}
