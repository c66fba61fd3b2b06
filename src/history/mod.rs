//! The journal of what became of each invocation, and its two readings:
//! `--history` (a summary per id, for people or scripts) and `--metrics`
//! (Prometheus's text format, for node_exporter's textfile collector).
//!
//! Every invocation that runs a job, or gives up on one, appends one record
//! to its id's journal on this host, under the lock directory
//! (`DIR/.history/<encoded id>`, see `journal.rs`): when it started, how
//! long it waited, how long the job ran, and how it ended. The runner
//! drives an [`Entry`]: [`Entry::begin`] when the invocation starts,
//! [`Entry::waited`] when the semaphore answers, [`Entry::started`] when
//! the job runs, then exactly one of [`Entry::skipped`], [`Entry::failed`],
//! [`Entry::ended`] or [`Entry::timed_out`], which writes the record.
//!
//! Two decisions shape it. The journal is on the job's path, so a record is
//! one `write(2)` of one line to a file opened `O_APPEND`: no lock, no
//! read, no fsync, and concurrent writers never tear each other's records
//! (only the rotation, once in some 10,000 records, locks and reads).
//! And the journal is a convenience, never a reason for a job to fail: if it
//! cannot be written, qsem says so once on stderr and goes on.

mod journal;
mod place;
mod prometheus;
mod record;
mod summary;
mod totals;

use crate::config::Config;
use crate::exit::{Exit, Failure};
use crate::id::Id;
use crate::report;
use crate::semaphore::{self, Acquired};
use anyhow::Result;
use record::{Ended, Outcome, Record, Skip};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// One invocation's record in the making.
pub struct Entry {
    dir: PathBuf,
    id: Id,
    jobs: u32,
    start: SystemTime,
    begun: Instant,
    /// When the semaphore answered, and why it said no if it did.
    answered: Option<(Instant, Option<Skip>)>,
    /// When the job started, and its pid.
    ran: Option<(Instant, u32)>,
    written: bool,
}

impl Entry {
    /// The invocation starts now.
    pub fn begin(cfg: &Config) -> Entry {
        Entry {
            dir: cfg.dir.clone(),
            id: cfg.id.clone(),
            jobs: cfg.jobs,
            start: SystemTime::now(),
            begun: Instant::now(),
            answered: None,
            ran: None,
            written: false,
        }
    }

    /// The semaphore answered: the wait ends here.
    pub fn waited(&mut self, acquired: &Acquired) {
        let skip = match acquired {
            Acquired::Slot(_) => None,
            Acquired::TimedOut => Some(Skip::Expired),
            Acquired::Crowded => Some(Skip::Crowded),
            Acquired::Interrupted(r) => Some(Skip::Signal(r.signo)),
        };
        self.answered = Some((Instant::now(), skip));
    }

    /// The job started as `pid`: its run time counts from here.
    pub fn started(&mut self, pid: u32) {
        self.ran = Some((Instant::now(), pid));
    }

    /// Nothing ran (the wait expired, the backlog was full, a signal came):
    /// records why, and passes `exit` on.
    pub fn skipped(&mut self, exit: Exit) -> Exit {
        // With a slot but no job, only a stop signal (128 + N) ends an invocation.
        let signalled = || Skip::Signal(i32::from(exit.as_u8().saturating_sub(128)));
        let why = self
            .answered
            .and_then(|(_, skip)| skip)
            .unwrap_or_else(signalled);
        self.write(Outcome::Skipped(why), "");
        exit
    }

    /// The job could not be started, or qsem failed: records a [`Failure`]
    /// (not found, not executable) with its line; other errors are qsem's
    /// own and are not the job's outcome.
    pub fn failed(&mut self, err: &anyhow::Error) {
        if let Some(f) = err.downcast_ref::<Failure>() {
            let prefix = format!("qsem[{}]: ", self.id);
            self.not_started(
                f.exit,
                f.message.strip_prefix(&prefix).unwrap_or(&f.message),
            );
        }
    }

    /// The job could not be started (`exit`: 126, 127), or was stopped by
    /// qsem (122), and why.
    pub fn not_started(&mut self, exit: Exit, line: &str) {
        let status = i32::from(exit.as_u8());
        self.write(Outcome::Failed(Ended::Status(status)), line);
    }

    /// The job ended with `status`; `line` is its report line if it failed.
    pub fn ended(&mut self, status: ExitStatus, line: Option<&str>) {
        self.write(Outcome::of(status), line.unwrap_or(""));
    }

    /// The job ran past `--timeout` and was stopped; `line` says so.
    pub fn timed_out(&mut self, line: &str) {
        self.write(Outcome::TimedOut, line);
    }

    /// The job ended as the runner saw it: on its own, stopped at its
    /// timeout, or stopped because its slot was lost (recorded as a failure
    /// with qsem's status, `exit`); `line` is the report line of a failure.
    pub fn concluded(&mut self, ended: crate::runner::Ended, exit: Exit, line: Option<&str>) {
        match ended {
            crate::runner::Ended::Exited(status) => self.ended(status, line),
            crate::runner::Ended::TimedOut { .. } => self.timed_out(line.unwrap_or("")),
            crate::runner::Ended::Lost => self.not_started(exit, line.unwrap_or("")),
        }
    }

    fn write(&mut self, outcome: Outcome, line: &str) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let Some(limit) = journal::size_limit() else {
            return;
        };
        let now = Instant::now();
        let answered = self.answered.map(|(t, _)| t);
        let waited_until = answered.or(self.ran.map(|(t, _)| t)).unwrap_or(now);
        let record = Record {
            start: self.start,
            wait: waited_until.saturating_duration_since(self.begun),
            run: self.ran.map(|(t, _)| now.saturating_duration_since(t)),
            outcome,
            jobs: self.jobs,
            pid: self.ran.map_or(0, |(_, pid)| pid),
            line: line.to_string(),
        };
        if let Err(e) = journal::append(&self.dir, &self.id, &record.render(), limit) {
            warn_once(&self.id, &e);
        }
    }
}

/// Says that the journal cannot be written, once per process (an `--each`
/// of a thousand items must not say it a thousand times).
fn warn_once(id: &Id, err: &anyhow::Error) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        report::line(
            id,
            &format!("cannot write history: {err:#}; the job is unaffected"),
        );
    }
}

/// `--history`: the summary of one id's journal or of all, as a table or JSON.
pub fn show(
    cfg: &Config,
    only: Option<&Id>,
    since: Option<Duration>,
    json: bool,
) -> Result<String> {
    let now = SystemTime::now();
    let from = since.and_then(|d| now.checked_sub(d));
    let summaries: Vec<summary::Summary> = journal::read(&cfg.dir, only)?
        .into_iter()
        .map(|j| summary::summarise(j.id, &j.records, from))
        .collect();
    Ok(if json {
        summary::json(&summaries)
    } else {
        summary::table(&summaries, now)
    })
}

/// `--metrics`: every id's journal, and the live holders and waiters of the
/// configured engine, in Prometheus's text exposition format.
pub fn metrics(cfg: &Config, only: Option<&Id>) -> Result<String> {
    let journals = journal::read(&cfg.dir, only)?;
    let live = semaphore::live(&cfg.backend, &cfg.dir, only)?.unwrap_or_default();
    Ok(prometheus::render(&journals, &live))
}
