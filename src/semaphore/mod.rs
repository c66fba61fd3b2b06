//! The semaphore as one idea with interchangeable engines: take one of N slots
//! of an id, waiting at most until a deadline; give it back by dropping (or
//! finishing) the guard; list who holds and who waits.
//!
//! The runner sees only [`Semaphore`] and [`Slot`], and gets its engine from
//! [`open`]. Whatever upkeep an engine needs while a slot is held (a guard
//! against removed lock files, a server's heartbeat) it does on its own; what
//! the runner must hear of it (the slot was lost, or taken back) comes as
//! [`SlotEvent`]s on a descriptor the runner polls beside its signal pipe.
//!
//! The lock-file engine (`files`) is the default and needs nothing but a
//! directory; the PostgreSQL engine (`postgres`) shares a limit across
//! machines; `fake` is an in-memory engine for the runner's unit tests.

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(test)]
pub mod fake;
pub mod files;
#[cfg(feature = "postgres")]
pub mod postgres;

use crate::config::Backend;
use crate::id::Id;
use crate::signals::{Received, Signals};
use anyhow::Result;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// What an invocation asks for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub id: &'a Id,
    /// The invocation's admission limit: it takes a slot only while fewer than
    /// this many slots of the id are held, whatever limit the holders used.
    pub jobs: u32,
    /// Give up at this instant; `None` waits for ever. A deadline in the past
    /// means one attempt.
    pub deadline: Option<Instant>,
    /// `--max-waiting`: if this many invocations already wait for the id,
    /// give up at once ([`Acquired::Crowded`]) rather than queue behind them.
    pub max_waiting: Option<u32>,
    /// A `--bg` job: the engine records it as running from the moment its
    /// slot is taken, so that a supervisor that dies before
    /// [`Slot::finish`] counts as a failure (status unknown) at the next
    /// `--wait-all`.
    pub background: bool,
    /// The command, for the holder record that `--status` shows.
    pub command: &'a str,
}

/// How an acquisition ended.
pub enum Acquired {
    /// A slot, held until the guard is dropped or finished (and, if inherited,
    /// until every process that inherited it has ended).
    Slot(Box<dyn Slot>),
    /// The deadline passed.
    TimedOut,
    /// [`Request::max_waiting`] invocations were waiting already.
    Crowded,
    /// A signal in [`crate::signals::FORWARDED`] arrived while waiting.
    Interrupted(Received),
}

/// A held slot.
pub trait Slot {
    /// Its number, 1..=N.
    fn number(&self) -> u32;
    /// A descriptor that keeps the slot held for as long as any process has it
    /// open, for the child to inherit; `None` if the engine's slot cannot be
    /// shared with another process (a server session).
    fn inheritable(&self) -> Option<BorrowedFd<'_>>;
    /// A number that strictly increases every time a slot of the id is
    /// granted, anywhere the engine reaches (`QSEM_FENCE`), for the job to
    /// fence the systems it writes to; `None` if the engine has none.
    fn fence(&self) -> Option<u64>;
    /// The command has started as `pid`: recorded for `--status`.
    fn started(&mut self, pid: u32);
    /// A descriptor that becomes readable when [`Slot::take_events`] has news;
    /// `None`: this slot never has any.
    fn events(&self) -> Option<BorrowedFd<'_>>;
    /// The news since the last call, oldest first.
    fn take_events(&mut self) -> Vec<SlotEvent>;
    /// Releases the slot of a background job, recording first, while the slot
    /// is still held, whether it failed (its report line), so that a
    /// `--wait-all` woken by the release cannot miss the failure.
    fn finish(self: Box<Self>, failure: Option<&str>) -> Result<()>;
}

/// How long a job whose slot was lost has, under `--on-lost=kill`, between
/// SIGTERM and SIGKILL, unless its engine must have it end sooner.
pub const LOST_GRACE: Duration = Duration::from_secs(10);

/// Something that happened to a held slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotEvent {
    /// The slot is no longer held. `why` is for one stderr line; `grace` is
    /// how long the job may take to stop under `--on-lost=kill` (SIGTERM now,
    /// SIGKILL when it has passed): an engine that can give the slot to
    /// someone else at a known time says how long the job has before then.
    Lost { why: String, grace: Duration },
    /// The slot was lost and has been taken again; the text says which.
    Regained(String),
}

impl SlotEvent {
    /// The slot is lost, and the job may take [`LOST_GRACE`] to stop.
    pub fn lost(why: String) -> SlotEvent {
        SlotEvent::Lost {
            why,
            grace: LOST_GRACE,
        }
    }
}

/// One held slot, as `--status` shows it.
#[derive(Debug, Clone)]
pub struct Holder {
    /// The slot; 0 for a job that runs without one (it lost its slot and has
    /// not taken one again), which `--status` shows as `-`.
    pub slot: u32,
    /// The process that holds the slot: the command, once it runs.
    pub pid: u32,
    pub host: String,
    pub started: Option<SystemTime>,
    /// The admission limit the holder was started with.
    pub jobs: u32,
    pub command: String,
}

/// Everything `--status` knows of one id.
#[derive(Debug, Clone)]
pub struct IdStatus {
    pub id: Id,
    pub holders: Vec<Holder>,
    /// How many wait for a slot.
    pub waiting: u32,
    /// The waiters the engine can name, oldest first: all of `waiting`, or
    /// fewer where an engine knows only a count for some of them.
    pub waiters: Vec<Waiter>,
}

/// One process waiting for a slot, as `--status` shows it.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub pid: u32,
    pub host: String,
    /// When it began to wait (on the server's clock where there is one,
    /// as a time on ours); `None` where the engine does not know.
    pub since: Option<SystemTime>,
}

/// How a wait for an id to fall idle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// No slot of the id was held and nobody waited for one.
    Reached,
    /// The deadline passed first.
    TimedOut,
    /// A signal in [`crate::signals::FORWARDED`] arrived while waiting.
    Interrupted(Received),
}

pub trait Semaphore {
    /// Takes a slot, waiting (in the kernel or the server, never spinning) until
    /// the request is admitted, its deadline passes, or a signal arrives.
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired>;

    /// Holders and waiters of one id, or of every id with any; never blocks,
    /// and creates nothing.
    fn status(&mut self, only: Option<&Id>) -> Result<Vec<IdStatus>>;

    /// Sleeps until no slot of `id` is held and nobody waits for one
    /// (`--wait-all`), the deadline passes, or a signal arrives.
    fn wait_idle(
        &mut self,
        id: &Id,
        deadline: Option<Instant>,
        signals: &mut Signals,
    ) -> Result<Idle>;

    /// How many background jobs of `id` failed (see [`Slot::finish`]) since
    /// the previous call; resets the count.
    fn take_failures(&mut self, id: &Id) -> Result<u32>;
}

/// Holders and waiters now, for `--status` and `--metrics`: `None` when the
/// lock-file engine has no lock directory yet (nothing is held, and looking
/// must not create it).
pub fn live(backend: &Backend, dir: &Path, only: Option<&Id>) -> Result<Option<Vec<IdStatus>>> {
    if *backend == Backend::Files && !dir.exists() {
        return Ok(None);
    }
    open(backend, dir, false)?.status(only).map(Some)
}

/// The engine `backend` names. `dir` is the lock directory, this host's
/// state on every engine.
pub fn open(backend: &Backend, dir: &Path, verbose: bool) -> Result<Box<dyn Semaphore>> {
    match backend {
        Backend::Files => Ok(Box::new(files::Files::new(
            files::LockDir::open(dir, true)?,
            verbose,
        ))),
        #[cfg(feature = "postgres")]
        Backend::Postgres { url, lost_after } => {
            let engine = postgres::Postgres::new(url, *lost_after, dir, verbose)?;
            // Read: now out of argv and the job's environment.
            postgres::scrub_password(url);
            Ok(Box::new(engine))
        }
        #[cfg(not(feature = "postgres"))]
        Backend::Postgres { .. } => anyhow::bail!(
            "--backend postgres://: this qsem was built without PostgreSQL support (cargo feature \"postgres\")"
        ),
        #[cfg(feature = "etcd")]
        Backend::Etcd(settings) => Ok(Box::new(etcd::Etcd::new(settings, verbose)?)),
        #[cfg(not(feature = "etcd"))]
        Backend::Etcd(_) => anyhow::bail!(
            "--backend etcd://: this qsem was built without etcd support (cargo feature \"etcd\")"
        ),
    }
}
