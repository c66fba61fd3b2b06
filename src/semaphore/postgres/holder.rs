//! A held slot: a task on the runtime keeps the session, beats the heart,
//! takes the slot back when the session ends, and tells the runner through
//! [`Slot::events`] when it cannot.
//!
//! Fencing: the server drops a silent client, and so frees its slot, no
//! sooner than `F` (the keepalive and `tcp_user_timeout` sum) after the last
//! query it answered. Heartbeats go every `F/4`; a holder whose last
//! confirmed heartbeat was *sent* `F/2` ago reports the slot lost, so that
//! under `--on-lost=kill` the job is stopped (SIGTERM, then SIGKILL within
//! `F/2 - 0.5s`, at most the usual grace) while the server still holds the
//! slot for it.
//!
//! A session that ends (a restart, `pg_terminate_backend`) is opened again
//! at once and the holder takes its own slot back, ahead of newcomers, who
//! wait `RECLAIM_GRACE` after a server start, and ahead of the heads, which
//! leave the slot of a session an operator ended to its holder (see
//! `admission::Seen`). It must be back within `TAKE_BACK` (and `F/2`), or
//! it reports the slot lost; after that
//! it tries, by the ordinary rule, to take a slot again and says so. Until
//! then it keeps a session named `qsem l …`, so that `--status` shows its
//! job running without a slot for as long as the server can be reached.
//! That way back is in `recover.rs`.

use super::admission::{Beat, heartbeat};
use super::connect::Connector;
use super::failures::Recorder;
use super::keys::Keys;
use super::pooler::{self, no_session_locks};
use super::record::Record;
use super::session::{News, Session};
use super::{Postgres, runtime};
use crate::id::Id;
use crate::semaphore::{Slot, SlotEvent};
use crate::sys;
use anyhow::{Context, Result};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The longest time between a holder's heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a releasing holder waits for the server before just hanging up.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon a holder that lost its slot, and has no session, tries again.
const LOST_RETRY: Duration = Duration::from_secs(1);
/// How long after the job's start the first heartbeat goes (it names the
/// job's pid for `--status`, and confirms the slot where the check for a
/// pooler was remembered): sent at once, it competed with the job's start
/// for the CPU and, for a short job, delayed the release (0.7 ms of a
/// 17 ms uncontended job, bench/RESULTS.md). The etcd engine waits as long.
const FIRST_BEAT: Duration = Duration::from_millis(50);

/// What the runner's thread asks of the holder's task.
enum Command {
    SetChild(u32),
    Release,
}

/// A held slot, as the runner sees it.
pub struct PgSlot {
    failures: Recorder,
    number: u32,
    commands: mpsc::UnboundedSender<Command>,
    events: Arc<Mutex<Vec<SlotEvent>>>,
    /// Readable when `events` has news.
    wake: OwnedFd,
    done: std::sync::mpsc::Receiver<()>,
    /// This host's head gate (see `queue`), given back once the job has
    /// started: the next head's promotion and its connecting then do not
    /// compete with starting the job.
    gate: Option<Box<dyn Slot>>,
}

impl PgSlot {
    /// Hands the session to a task of its own; first, after a check for a
    /// pooler (see `pooler`), confirms that the server keeps the lock `s`
    /// just took. Without one, the heartbeat that follows the job's start
    /// does.
    pub fn start(
        pg: &Postgres,
        id: &Id,
        s: Session,
        keys: Keys,
        taken: (u32, Record),
        checked: bool,
    ) -> Result<PgSlot> {
        let (slot, rec) = taken;
        let c = pg.connector.clone();
        let rt = runtime()?;
        if checked {
            rt.block_on(pooler::confirm(&s, &c, &keys, slot, &rec))?;
        }
        let (read, write) = sys::pipe().context("cannot create a pipe")?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let h = Holding {
            c: c.clone(),
            keys,
            rec,
            events: events.clone(),
            wake: write,
        };
        rt.spawn(async move {
            h.run(s, slot, rx).await;
            let _ = done_tx.send(());
        });
        Ok(PgSlot {
            failures: Recorder::new(c, &pg.dir, id),
            number: slot,
            commands,
            events,
            wake: read,
            done,
            gate: None,
        })
    }

    /// Keeps `gate` until the job has started.
    pub fn keep_until_started(&mut self, gate: Box<dyn Slot>) {
        self.gate = Some(gate);
    }
}

/// What the holder's task works with.
pub(super) struct Holding {
    pub(super) c: Connector,
    pub(super) keys: Keys,
    pub(super) rec: Record,
    events: Arc<Mutex<Vec<SlotEvent>>>,
    wake: OwnedFd,
}

/// Where the holder stands.
pub(super) enum State {
    /// The session holds the slot; the server answered a heartbeat sent at
    /// `confirmed`.
    Held(Box<Session>, Instant),
    /// The session ended; take the slot back before `until`.
    Reclaiming { why: String, until: Instant },
    /// Lost and said so: take one by the ordinary rule when it can. The
    /// session of the last try is kept, named as a holder without a slot.
    Lost(Option<Box<Session>>),
    /// Lost to a pooler that shares server processes: said so, and no
    /// slot is taken again through it.
    Refused,
}

impl Holding {
    pub(super) fn tell(&self, event: SlotEvent) {
        self.events.lock().expect("not poisoned").push(event);
        // The pipe only needs to be readable; a full pipe already is.
        let _ = rustix::io::write(&self.wake, b"x");
    }

    /// How long the server keeps a silent client's slot, at the least.
    pub(super) fn bound(&self) -> Duration {
        self.c.keepalive.total()
    }

    async fn run(
        mut self,
        s: Session,
        mut slot: u32,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let every = (self.bound() / 4).clamp(Duration::from_millis(250), HEARTBEAT);
        let mut s = s;
        if s.listening {
            // A head's NOTIFYs are of no use to a holder; each would wake
            // its server process, and this one's own release would too.
            let sql = format!("{}UNLISTEN *", self.rec.render());
            s.listening = s.query(&sql).await.is_err();
        }
        let mut state = State::Held(Box::new(s), Instant::now());
        // When the job's first heartbeat is due, once it has started.
        let mut first: Option<Instant> = None;
        loop {
            let pace = pace(&state, first, every);
            let news = async {
                match &mut state {
                    State::Held(s, _) => s.news.recv().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::SetChild(pid)) => {
                        self.rec.pid = pid;
                        first = Some(Instant::now() + FIRST_BEAT);
                    }
                    Some(Command::Release) | None => return self.release(state, slot).await,
                },
                news = news => {
                    if let State::Held(_, confirmed) = state
                        && let Some(why) = ended(news)
                    {
                        state = self.reclaiming(why, confirmed);
                    }
                },
                _ = tokio::time::sleep(pace) => {
                    first = None;
                    state = match state {
                        State::Held(..) => self.beat(state, slot).await,
                        State::Reclaiming { why, until } => self.reclaim(slot, why, until).await,
                        State::Lost(kept) => self.again(kept, &mut slot).await,
                        State::Refused => State::Refused,
                    };
                },
            }
        }
    }

    /// Gives the slot back, if it is still held, and wakes the waiters.
    async fn release(&self, state: State, slot: u32) {
        if let State::Held(s, _) = state {
            let sql = format!(
                "SELECT pg_advisory_unlock({}); NOTIFY {}, '{slot}'",
                self.keys.lock(slot),
                self.keys.channel()
            );
            let _ = tokio::time::timeout(RELEASE_TIMEOUT, s.query(&sql)).await;
        }
    }

    /// One heartbeat. It may wait for an answer only until `F/2` has passed
    /// since the last confirmed one was sent.
    async fn beat(&self, state: State, slot: u32) -> State {
        let State::Held(s, confirmed) = state else {
            return state;
        };
        let sent = Instant::now();
        let left = (confirmed + self.bound() / 2).saturating_duration_since(sent);
        let beat = heartbeat(&s, &self.keys, slot, &self.rec);
        match tokio::time::timeout(left, beat).await {
            Ok(Ok(Beat::Held)) => {
                let mut s = s;
                s.listening = false;
                State::Held(s, sent)
            }
            Ok(Ok(Beat::NotHeld)) => {
                self.reclaiming("the server no longer holds it".into(), confirmed)
            }
            Ok(Ok(Beat::Shared)) => {
                self.lose(slot, no_session_locks(&self.c.target, ""));
                State::Refused
            }
            Ok(Err(e)) => self.reclaiming(format!("the heartbeat failed ({e:#})"), confirmed),
            Err(_) => self.lose(
                slot,
                format!(
                    "no answer from the server for {} (half the time after which it frees a silent holder's slot)",
                    crate::duration::human(self.bound() / 2)
                ),
            ),
        }
    }
}

/// How long the holder's task sleeps before its next step in `state`:
/// the heartbeat's period (the job's first one `first`, once it has
/// started), at once when taking the slot back, never when refused.
fn pace(state: &State, first: Option<Instant>, every: Duration) -> Duration {
    match state {
        State::Held(..) => first.map_or(every, |t| {
            t.saturating_duration_since(Instant::now()).min(every)
        }),
        State::Lost(Some(_)) => every,
        // Soon, so that `--status` shows the job without a slot.
        State::Lost(None) => every.min(LOST_RETRY),
        State::Reclaiming { .. } => Duration::ZERO,
        State::Refused => Duration::MAX,
    }
}

/// Why a held session ended, if the news says it did (a NOTIFY does not).
fn ended(news: Option<News>) -> Option<String> {
    match news {
        Some(News::Notified(_)) => None,
        Some(News::Closed(why)) => Some(format!("the server ended the session ({why})")),
        None => Some("the session ended".into()),
    }
}

impl Slot for PgSlot {
    fn number(&self) -> u32 {
        self.number
    }

    fn inheritable(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn fence(&self) -> Option<u64> {
        None
    }

    fn started(&mut self, pid: u32) {
        let _ = self.commands.send(Command::SetChild(pid));
        self.gate = None;
    }

    fn finish(self: Box<Self>, failure: Option<&str>) -> Result<()> {
        match failure {
            Some(line) => self.failures.record(line),
            None => Ok(()),
        }
    }

    fn events(&self) -> Option<BorrowedFd<'_>> {
        Some(self.wake.as_fd())
    }

    fn take_events(&mut self) -> Vec<SlotEvent> {
        let mut buf = [0u8; 64];
        while rustix::io::read(&self.wake, &mut buf).is_ok_and(|n| n > 0) {}
        std::mem::take(&mut *self.events.lock().expect("not poisoned"))
    }
}

impl Drop for PgSlot {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Release);
        // Unlock and NOTIFY if the server answers soon; else qsem's exit hangs
        // up, and the server frees the slot on its own.
        let _ = self
            .done
            .recv_timeout(RELEASE_TIMEOUT + Duration::from_millis(500));
    }
}
