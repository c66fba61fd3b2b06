//! The semaphore as one idea with interchangeable engines: take one of N slots
//! of an id, waiting at most until a deadline; give it back by dropping the
//! guard; list who holds and who waits.
//!
//! The runner sees only [`Semaphore`] and [`Slot`]. The lock-file engine
//! (`files.rs`) is the default and needs nothing but a directory; the
//! PostgreSQL engine (`postgres.rs`) shares a limit across machines.

pub mod files;
#[cfg(feature = "postgres")]
pub mod postgres;

use crate::id::Id;
use crate::signals::Signals;
use anyhow::Result;
use std::os::fd::BorrowedFd;
use std::time::{Instant, SystemTime};

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
    /// The command, for the holder record that `--status` shows.
    pub command: &'a str,
}

/// How an acquisition ended.
pub enum Acquired {
    /// A slot, held until the guard is dropped (and, if inherited, until every
    /// process that inherited it has ended).
    Slot(Box<dyn Slot>),
    /// The deadline passed.
    TimedOut,
    /// A signal in [`crate::signals::FORWARDED`] arrived while waiting.
    Interrupted(libc::c_int),
}

/// A held slot.
pub trait Slot {
    /// Its number, 1..=N.
    fn number(&self) -> u32;
    /// A descriptor that keeps the slot held for as long as any process has it
    /// open, for the child to inherit; `None` if the engine cannot share a slot.
    fn inheritable(&self) -> Option<BorrowedFd<'_>>;
    /// Records the child's pid for `--status`.
    fn set_child(&mut self, pid: u32);
    /// A descriptor that becomes readable when [`Slot::take_events`] has news,
    /// for engines whose slot can be lost while held (a server's session can
    /// end; a kernel's lock cannot). `None`: nothing to watch.
    fn events(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// The news since the last call, oldest first.
    fn take_events(&mut self) -> Vec<SlotEvent> {
        Vec::new()
    }
    /// When the runner should next call [`Slot::upkeep`] while the command
    /// runs; `None`: never.
    fn upkeep_at(&self) -> Option<Instant> {
        None
    }
    /// Work a held slot does only once its command has run a while, kept off
    /// the path from taking the slot to starting the command.
    fn upkeep(&mut self) {}
}

/// Something that happened to a held slot.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotEvent {
    /// The slot is no longer held; the text says why, for one stderr line.
    Lost(String),
    /// The slot was lost and has been taken again; the text says which.
    Regained(String),
}

/// One held slot, as `--status` shows it.
#[derive(Debug, Clone)]
pub struct Holder {
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
    pub waiting: u32,
}

/// How a wait for an id to fall idle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// No slot of the id was held and nobody waited for one.
    Reached,
    /// The deadline passed first.
    TimedOut,
    /// A signal in [`crate::signals::FORWARDED`] arrived while waiting.
    Interrupted(libc::c_int),
}

pub trait Semaphore {
    /// Takes a slot, waiting (in the kernel or the server, never spinning) until
    /// the request is admitted, its deadline passes, or a signal arrives.
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired>;

    /// Holders and waiters of one id, or of every id with any; never blocks.
    fn status(&mut self, only: Option<&Id>) -> Result<Vec<IdStatus>>;

    /// Sleeps until no slot of `id` is held and nobody waits for one
    /// (`--wait-all`), the deadline passes, or a signal arrives.
    fn wait_idle(
        &mut self,
        id: &Id,
        deadline: Option<Instant>,
        signals: &mut Signals,
    ) -> Result<Idle> {
        let _ = (id, deadline, signals);
        anyhow::bail!("--wait-all is not supported by this backend")
    }

    /// Records that a background job of `id` failed, with its report line, so
    /// that the next [`Semaphore::take_failures`] counts it. Called while the
    /// job's slot is still held, so that a `--wait-all` woken by its release
    /// cannot miss it.
    fn record_failure(&mut self, id: &Id, line: &str) -> Result<()> {
        let _ = (id, line);
        anyhow::bail!("background jobs are not supported by this backend")
    }

    /// How many background jobs of `id` failed since the previous call; resets
    /// the count.
    fn take_failures(&mut self, id: &Id) -> Result<u32> {
        let _ = id;
        anyhow::bail!("--wait-all is not supported by this backend")
    }
}
