//! The PostgreSQL engine: one session advisory lock per held slot, so that the
//! server frees a slot the moment its holder's session ends, as the kernel
//! frees a `flock`. A fleet of machines pointed at one database shares a limit.
//!
//! The design, in the order a slot is taken:
//!
//! - **Keys** ([`keys`]): a slot is one advisory lock in the one-bigint
//!   form, `prefix << 20 | slot`, where `prefix` is 44 bits of FNV-1a 64 of
//!   the id. Two ids share a semaphore only if 44 bits of their hashes agree
//!   (about one pair in 10^13), where the former 32-bit keys collided for
//!   pairs as plain as `job-439599` and `job-622382`.
//! - **Waiting costs one connection per host and id** ([`queue`],
//!   [`waiting`]): waiters on one host queue in the lock-file engine (a
//!   local id derived from the server and the id, one slot), which already
//!   orders them, sleeps in the kernel and obeys `--wait` and signals. Only
//!   the head of each host's queue waits on the server: it LISTENs on the
//!   id's channel and tries again on every NOTIFY (every release sends one),
//!   on a short poll (a crashed holder sends none), until its deadline. A
//!   lost connection is opened again while the deadline lasts.
//! - **Admission in one round trip**: a new session's set-up rides in its
//!   first attempt's message (a head that must wait LISTENs in its second,
//!   which follows at once); one statement looks at the id's held
//!   locks and takes the lowest free slot with `pg_try_advisory_lock` if
//!   fewer than N are held; a second, in the same message, counts again and
//!   the taker backs off if racing takers went past its N (a new session's
//!   first look only tries, and the count decides: on cold catalog caches,
//!   reading the locks first cost more than the rest of the message).
//!   Nothing is ever
//!   held across round trips and nothing blocks on a lock, so no client,
//!   stalled, stopped or hostile, can delay another; every session also sets
//!   `lock_timeout`, `statement_timeout` and
//!   `idle_in_transaction_session_timeout`, and every query a waiter makes
//!   ends with its deadline. `application_name` says who a session is, for
//!   `--status` and `--wait-all`, but admission never reads it.
//! - **Holding** ([`holder`]): the head's session becomes the holder's. A task
//!   on the process's one tokio runtime beats a heartbeat every quarter of
//!   the server's bound `F` (the keepalive and `tcp_user_timeout` sum,
//!   a second short of `--lost-after`). The server cannot free a silent
//!   holder's slot before `F` after the last heartbeat it answered, so a
//!   holder that has not had one confirmed for `F/2` reports the slot lost:
//!   under `--on-lost=kill` the job is stopped before anyone else can be
//!   admitted.
//! - **Restarts and terminated sessions**: a holder whose session ends opens
//!   a new one at once and takes its own slot back. After a server start,
//!   newcomers are admitted only once [`RECLAIM_GRACE`] has passed since
//!   `pg_postmaster_start_time()`, so that running jobs get their slots
//!   back first. A session an operator ended (`pg_terminate_backend`) frees
//!   its slot as a crash does, but the heads, which see the database's
//!   count of such sessions change, leave that slot alone for the same
//!   grace or until its holder has it again ([`seen`]). A holder that
//!   cannot take its slot back within [`TAKE_BACK`] of losing
//!   its session reports the slot lost (so that `--on-lost=kill` has stopped
//!   the job before a newcomer can come in), and then tries, by the ordinary
//!   rule, to take one again; meanwhile `--status` shows its job running
//!   without a slot (`-`).
//! - **Failures** of background jobs ([`failures`]) are rows of
//!   `qsem_failures`; one that cannot be written there is kept in the local
//!   lock directory instead, so the next `--wait-all` on this host still
//!   counts it.
//! - **Connection** ([`connect`]): a `postgres://` URL completed by the `PG*`
//!   variables and `~/.pgpass` as libpq would; a password in the URL is
//!   wiped from qsem's own argv and from `QSEM_BACKEND` before the job starts
//!   ([`secrets`]). A standby or read-only server is refused, and so is a
//!   pooler in transaction mode ([`pooler`]; a check that found none is
//!   remembered in the lock directory for ten minutes).
//!
//! Status ([`status`]) reads `pg_locks` and `pg_stat_activity`; a lock of the
//! id held by a session that is not a qsem holder shows as a foreign holder.

mod admission;
mod connect;
mod failures;
mod holder;
mod keys;
mod pooler;
mod queue;
mod record;
mod recover;
mod secrets;
mod seen;
mod session;
mod status;
mod turns;
mod waiting;

use super::{Acquired, IdStatus, Idle, Request, Semaphore};
use crate::config::Backend;
use crate::id::Id;
use crate::signals::Signals;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

pub use secrets::scrub_password;

/// How long a holder whose session ended tries to take its slot back
/// before it reports the slot lost (`recover`).
pub const TAKE_BACK: Duration = Duration::from_secs(4);

/// How long after a server start newcomers wait, so that the jobs still
/// running reclaim their slots first, and how long a head leaves the slot
/// of a holder whose session an operator ended to that holder
/// (`seen::Seen`): [`TAKE_BACK`] and two seconds more, for a holder that
/// has reported its slot lost to have stopped its job under
/// `--on-lost=kill`.
pub const RECLAIM_GRACE: Duration = Duration::from_secs(TAKE_BACK.as_secs() + 2);

/// The SQL condition "the server started less than [`RECLAIM_GRACE`]
/// ago": newcomers are not admitted then, and no id is idle.
fn in_reclaim_grace() -> String {
    format!(
        "clock_timestamp() - pg_postmaster_start_time() < interval '{} milliseconds'",
        RECLAIM_GRACE.as_millis()
    )
}

/// The PostgreSQL engine.
pub struct Postgres {
    connector: connect::Connector,
    /// The lock directory: the local queue of this host's waiters.
    dir: PathBuf,
    verbose: bool,
    /// Whether this process has made sure that the server keeps session
    /// locks (see [`connect::Connector::refuse_poolers`]).
    pooler_checked: bool,
}

impl Postgres {
    pub fn new(url: &str, lost_after: Duration, dir: &Path, verbose: bool) -> Result<Postgres> {
        Ok(Postgres {
            connector: connect::Connector::new(url, lost_after)?,
            dir: dir.to_path_buf(),
            verbose,
            pooler_checked: false,
        })
    }

    /// The lock-file engine on this host's lock directory.
    fn local(&self) -> Result<Box<dyn Semaphore>> {
        super::open(&Backend::Files, &self.dir, false)
    }
}

/// The process's one tokio runtime: one worker thread drives every
/// connection and every holder's heartbeat; callers block on it.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("qsem-pg")
        .enable_all()
        .build()
        .context("cannot start the PostgreSQL client")?;
    Ok(RT.get_or_init(|| rt))
}

impl Semaphore for Postgres {
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired> {
        waiting::acquire(self, req, signals)
    }

    fn status(&mut self, only: Option<&Id>) -> Result<Vec<IdStatus>> {
        status::status(self, only)
    }

    fn wait_idle(
        &mut self,
        id: &Id,
        deadline: Option<std::time::Instant>,
        signals: &mut Signals,
    ) -> Result<Idle> {
        status::wait_idle(&self.connector, id, deadline, signals, self.verbose)
    }

    fn take_failures(&mut self, id: &Id) -> Result<u32> {
        failures::take(self, id)
    }
}
