//! Waiting for a slot: first in this host's queue (see `queue`), then, as
//! its head, on the server. The head gives its gate back once its job has
//! started (or it gives up), and the next in line becomes head.
//!
//! The head on the server: LISTEN on the id's channel and try, in one round
//! trip (see `admission`), sleep until its turn to answer a NOTIFY or its
//! share of the fleet's poll (see `turns`: a holder that crashed sends no
//! NOTIFY), the deadline or a stop signal; every query
//! races the deadline and the signals too, so a server that stops answering
//! cannot hold a waiter past its `--wait`. A connection that breaks while
//! waiting is opened again, for as long as the deadline lasts.

use super::admission::{Asker, Attempt, attempt};
use super::connect::Connector;
use super::holder::PgSlot;
use super::keys::Keys;
use super::pooler::{self, no_session_locks};
use super::queue;
use super::record::Record;
use super::seen::Seen;
use super::session::{News, Refused, Session, broken};
use super::turns::POLL;
use super::{Postgres, runtime};
use crate::id::Id;
use crate::report;
use crate::semaphore::{Acquired, Request};
use crate::signals::{Received, Signals};
use crate::sys;
use anyhow::{Context, Result, anyhow, bail};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long the first look may take even past an earlier deadline: `--wait
/// 0` means one look, which must have time to connect. Nothing another
/// client does can slow a look (no lock is waited for), only the server.
const FIRST_LOOK: Duration = Duration::from_secs(2);
/// How long a head that gives up may take to pass its turn on.
const PASS_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a waiter whose connection broke waits before connecting again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

pub fn acquire(pg: &mut Postgres, req: &Request, signals: &mut Signals) -> Result<Acquired> {
    let keys = Keys::of(req.id);
    let check = !pg.pooler_checked && !pooler::recently_checked(&pg.dir, &pg.connector);
    let mut rec = Record {
        id: req.id.as_bytes().to_vec(),
        started_ms: 0,
        jobs: req.jobs,
        pid: std::process::id(),
        host: sys::hostname(),
        command: req.command.to_string(),
    };
    let gate = match queue::head(pg, req, signals)? {
        Ok(head) => head,
        Err(other) => return Ok(other),
    };
    let head = HeadWait {
        c: pg.connector.clone(),
        verbose: pg.verbose,
        id: req.id.clone(),
        deadline: req.deadline,
        max_waiting: req.max_waiting,
        keys,
        rec: rec.clone(),
        check,
    };
    let got = wait_as_head(head, signals);
    pg.pooler_checked = true;
    let (s, slot, server_ms, answered) = match got? {
        Ended::Took(s, slot, ms, answered) => (*s, slot, ms, answered),
        Ended::TimedOut => return Ok(Acquired::TimedOut),
        Ended::Crowded => return Ok(Acquired::Crowded),
        Ended::Interrupted(r) => return Ok(Acquired::Interrupted(r)),
    };
    rec.started_ms = server_ms;
    let mut slot = PgSlot::start(pg, req.id, s, keys, (slot, rec), check)?;
    slot.keep_until_started(gate);
    if check && answered {
        pooler::remember(&pg.dir, &pg.connector);
    }
    Ok(Acquired::Slot(Box::new(slot)))
}

/// How the head's wait on the server ended.
enum Ended {
    /// The session, the slot, the server's clock then (ms), and whether a
    /// check for a pooler had its answer (none).
    Took(Box<Session>, u32, u64, bool),
    TimedOut,
    /// `--max-waiting 0` and no free slot: run now or never.
    Crowded,
    Interrupted(Received),
}

/// The end of a race that did not finish its work, as the wait's end.
macro_rules! settle {
    ($race:expr) => {
        match $race.await? {
            Race::Done(done) => done,
            Race::Expired => return Ok(Ended::TimedOut),
            Race::Signal(r) => return Ok(Ended::Interrupted(r)),
        }
    };
}

/// What the head's wait on the server works with, owned: it runs as a task
/// of its own on the runtime's worker thread, where the connection's task
/// runs too, so that a NOTIFY, the attempt it calls for and the answer wake
/// no other thread; the caller's thread waits only for its end or a stop
/// signal.
struct HeadWait {
    c: Connector,
    verbose: bool,
    id: Id,
    deadline: Option<Instant>,
    max_waiting: Option<u32>,
    keys: Keys,
    rec: Record,
    /// Open the first session with a check for a pooler.
    check: bool,
}

/// Runs the head's wait, until it ends or a stop signal comes.
fn wait_as_head(head: HeadWait, signals: &mut Signals) -> Result<Ended> {
    let rt = runtime()?;
    let mut task = rt.spawn(on_server(head));
    rt.block_on(async {
        match race(&mut task, None, Some(signals)).await? {
            Race::Done(ended) => ended.map_err(|e| anyhow!("the waiting task failed: {e}"))?,
            Race::Signal(r) => {
                task.abort();
                Ok(Ended::Interrupted(r))
            }
            Race::Expired => Ok(Ended::TimedOut),
        }
    })
}

async fn on_server(head: HeadWait) -> Result<Ended> {
    let c = &head.c;
    let (keys, rec) = (&head.keys, &head.rec);
    let (verbose, id) = (head.verbose, &head.id);
    let say = |msg: &str| {
        if verbose {
            report::line(id, msg);
        }
    };
    let deadline = head.deadline;
    let may_wait = deadline.is_none_or(|d| d > Instant::now());
    let asker = if may_wait { Asker::Waiter } else { Asker::Once };
    let first = deadline.map(|d| d.max(Instant::now() + FIRST_LOOK));
    let opened = async {
        if head.check {
            return pooler::open_checked(c).await;
        }
        Ok((c.connect().await?, false))
    };
    let (s, answered) = settle!(race(opened, first, None))?;
    let mut s = Some(s);
    let mut since = None;
    let mut until = first;
    // What the last look saw, across reconnections too (see `Seen`).
    let mut seen = Seen::default();
    loop {
        let Some(sess) = s.as_mut() else {
            s = Some(settle!(reconnect(c, verbose, id, deadline)));
            continue;
        };
        // Listens before looking (see `attempt`).
        let look = attempt(sess, keys, rec, asker, may_wait, Some(&mut seen));
        let outcome = match race(look, until, None).await? {
            Race::Done(done) => done,
            Race::Expired => {
                pass_turn(sess, keys).await;
                return Ok(Ended::TimedOut);
            }
            Race::Signal(r) => return Ok(Ended::Interrupted(r)),
        };
        until = deadline;
        match outcome {
            Ok(Attempt::Took(slot, now)) => {
                let s = s.take().expect("a session");
                return Ok(Ended::Took(Box::new(s), slot, now, answered));
            }
            Ok(Attempt::Shared) => bail!(no_session_locks(&c.target, "")),
            Ok(Attempt::Wait { held }) if head.max_waiting == Some(0) => {
                say(&format!("no free slot ({held} held), and --max-waiting 0"));
                return Ok(Ended::Crowded);
            }
            Ok(Attempt::Wait { held }) if !may_wait => {
                say(&format!("no free slot ({held} held); giving up at once"));
                return Ok(Ended::TimedOut);
            }
            Ok(Attempt::Wait { held }) => {
                if since.is_none() {
                    since = Some(Instant::now());
                    say(&format!(
                        "waiting for a slot ({held} held, limit {})",
                        rec.jobs
                    ));
                }
            }
            Err(e) if broken(&e) || sess.client.is_closed() => {
                say(&format!("{e:#}; connecting again"));
                s = None;
                continue;
            }
            Err(e) if e.is::<Refused>() => return Err(e),
            Err(e) => {
                return Err(e.context(format!("cannot take a slot on PostgreSQL at {}", c.target)));
            }
        }
        match sleep(sess, deadline, None, Some(&mut seen)).await? {
            Woke::Look => {}
            Woke::Broken(why) => {
                say(&format!(
                    "lost the connection to PostgreSQL at {}: {why}; connecting again",
                    c.target
                ));
                s = None;
            }
            Woke::Expired => {
                pass_turn(sess, keys).await;
                let waited = since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                say(&format!("no slot within {waited:.3}s; giving up"));
                return Ok(Ended::TimedOut);
            }
            Woke::Signal(r) => return Ok(Ended::Interrupted(r)),
        }
    }
}

/// A head that gives up passes its turn on (see `turns`), once a look has
/// named it a waiter: the heads behind it each count a NOTIFY heard.
async fn pass_turn(s: &Session, keys: &Keys) {
    if s.pid != 0 {
        let pass = format!("NOTIFY {}", keys.channel());
        let _ = tokio::time::timeout(PASS_TIMEOUT, s.query(&pass)).await;
    }
}

/// A new session for a waiter whose connection broke, tried every
/// [`RECONNECT_PAUSE`] until the deadline or a signal.
async fn reconnect(
    c: &Connector,
    verbose: bool,
    id: &Id,
    deadline: Option<Instant>,
) -> Result<Race<Session>> {
    loop {
        match race(c.connect(), deadline, None).await? {
            Race::Done(Ok(s)) => return Ok(Race::Done(s)),
            Race::Done(Err(e)) => {
                if verbose {
                    report::line(id, &format!("{e:#}; trying again"));
                }
                match race(tokio::time::sleep(RECONNECT_PAUSE), deadline, None).await? {
                    Race::Done(()) => {}
                    Race::Expired => return Ok(Race::Expired),
                    Race::Signal(r) => return Ok(Race::Signal(r)),
                }
            }
            Race::Expired => return Ok(Race::Expired),
            Race::Signal(r) => return Ok(Race::Signal(r)),
        }
    }
}

/// The signal pipe, for tokio to watch (borrowed: `Signals` owns it).
struct SignalFd(RawFd);

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Waits for a signal that stops a waiter (for ever without `signals`). A
/// signal that came earlier is seen at once: the pipe is still readable.
async fn stop_signal(signals: Option<&mut Signals>) -> Result<Received> {
    let Some(signals) = signals else {
        return std::future::pending().await;
    };
    // SAFETY: `signals` owns the descriptor, keeps it open, and outlives
    // `fd`, which lives only in this call.
    let fd = unsafe { AsyncFd::register_with_interest(SignalFd(signals.fd()), Interest::READABLE) }
        .map_err(|e| anyhow!("cannot watch signals: {e}"))?;
    loop {
        let mut ready = fd.readable().await.context("cannot wait for signals")?;
        // Clear first, then drain: a signal that comes after the drain makes
        // the pipe readable anew, so none can be missed.
        ready.clear_ready();
        if let Some(signo) = signals.take_stop() {
            return Ok(signo);
        }
    }
}

/// How a race of some work against the deadline and the signals ended.
pub enum Race<T> {
    Done(T),
    Expired,
    Signal(Received),
}

/// Runs `work` until it ends, the deadline passes, or a stop signal comes
/// (if `signals` are watched here).
pub async fn race<T>(
    work: impl Future<Output = T>,
    deadline: Option<Instant>,
    signals: Option<&mut Signals>,
) -> Result<Race<T>> {
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        done = work => Ok(Race::Done(done)),
        _ = expired => Ok(Race::Expired),
        signo = stop_signal(signals) => Ok(Race::Signal(signo?)),
    }
}

/// Why a waiter's sleep ended.
pub enum Woke {
    /// A NOTIFY, or the poll: look again.
    Look,
    Broken(String),
    Expired,
    Signal(Received),
}

/// The one way a waiter sleeps on the server: until a NOTIFY on the
/// channels its session listens to, the poll, the deadline, or a stop
/// signal. A head passes what it saw ([`Seen`]): it looks on a NOTIFY only
/// when its turn has come ([`Turns`]), polls at the fleet's shared pace,
/// and notes the slots that releases gave back.
pub async fn sleep(
    s: &mut Session,
    deadline: Option<Instant>,
    signals: Option<&mut Signals>,
    mut seen: Option<&mut Seen>,
) -> Result<Woke> {
    let poll = seen.as_deref_mut().map_or(POLL, |s| s.turns.poll());
    let news = async {
        let poll = tokio::time::sleep(poll);
        tokio::pin!(poll);
        loop {
            tokio::select! {
                news = s.news.recv() => match news {
                    Some(News::Notified(slot)) => {
                        let mut slots = vec![slot];
                        while let Ok(News::Notified(slot)) = s.news.try_recv() {
                            slots.push(slot);
                        }
                        let Some(seen) = seen.as_deref_mut() else {
                            return Woke::Look;
                        };
                        seen.released(slots.iter().flatten().copied());
                        if seen.turns.heard(slots.len() as u32) {
                            return Woke::Look;
                        }
                    }
                    Some(News::Closed(why)) => return Woke::Broken(why),
                    None => return Woke::Broken("the connection ended".into()),
                },
                _ = &mut poll => {
                    if let Some(seen) = seen.as_deref_mut() {
                        seen.turns.polled();
                    }
                    return Woke::Look;
                }
            }
        }
    };
    Ok(match race(news, deadline, signals).await? {
        Race::Done(w) => w,
        Race::Expired => Woke::Expired,
        Race::Signal(r) => Woke::Signal(r),
    })
}
