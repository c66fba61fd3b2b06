//! Runs the command under a slot: finds it, takes the slot, starts it, passes
//! signals on, stops it at `--timeout`, waits, and turns its end into qsem's
//! exit status and report line. It knows the semaphore only through the
//! `Semaphore` trait (it is unit-tested against `semaphore::fake`), and learns
//! that a held slot was lost (a shared server's session can end) through
//! `Slot::events`, which it waits on beside its signal pipe and the child's
//! pidfd, in the one `Signals::wait`.
//!
//! The child inherits the slot's descriptor (unless `-o`), so that a
//! `kill -9` of qsem cannot free a slot whose job still runs. How it is
//! started and how signals reach it is `child.rs`.
//!
//! qsem stops its own job for two reasons, `--timeout` and a lost slot under
//! `--on-lost=kill`, the same way: SIGTERM to the job's process group, then
//! SIGKILL a grace period later if it is still there (`--kill-after`, or
//! the grace the engine gives with its [`SlotEvent::Lost`]). The report line
//! says what was sent, and nothing else.

use crate::child::{self, Target};
use crate::command::Command;
use crate::config::{Config, OnLost, OnTimeout};
use crate::duration;
use crate::exit::{Exit, Failure};
use crate::history::Entry;
use crate::report;
use crate::semaphore::{Acquired, Request, Semaphore, Slot, SlotEvent};
use crate::signals::{Received, Signals, Wake};
use anyhow::{Context, Result};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// How long a child is left unreaped between looks when the kernel has no
/// pidfds (before Linux 5.3) to say that it ended.
const NO_PIDFD_TICK: Duration = Duration::from_millis(50);

/// The supervisor of a `--bg` job asks its launcher, once the slot is taken,
/// whether to start the job: `None` starts it, `Some(exit)` gives up with
/// that status (see `background.rs`).
pub type Handoff<'a> = &'a mut dyn FnMut(&mut Signals) -> Result<Option<Exit>>;

/// What one run of the command came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit: Exit,
    /// The report line, for a run that failed.
    pub line: Option<String>,
    /// The line was said already, when it happened.
    pub said: bool,
}

/// How taking a slot ended.
pub enum Taken {
    Slot(Box<dyn Slot>),
    /// The wait expired and GNU sem's positive `--st` runs the command anyway.
    Without,
    /// The wait expired, or too many waited (`--max-waiting`): this status,
    /// silently.
    Skipped(Exit),
    /// A signal came first.
    Stopped(Received),
}

/// Runs `cmd` under the semaphore as `cfg` says, and returns qsem's status.
/// With `handoff`, as the supervisor of a `--bg` job: a failure is recorded
/// under the id (through [`Slot::finish`]) before the slot is released.
pub fn run(
    cfg: &Config,
    cmd: &Command,
    sem: &mut dyn Semaphore,
    handoff: Option<Handoff>,
) -> Result<Exit> {
    let outcome = execute(cfg, cmd, sem, handoff)?;
    if let Some(line) = &outcome.line
        && !cfg.quiet
        && !outcome.said
    {
        report::line(&cfg.id, line);
    }
    Ok(outcome.exit)
}

/// Finds the command before anything else happens, as a [`Failure`] (126/127).
pub fn resolve_or_fail(cfg: &Config, cmd: &Command) -> Result<PathBuf> {
    Ok(cmd.resolve().map_err(|(exit, why)| Failure {
        exit,
        message: format!("qsem[{}]: {}: {why}", cfg.id, cmd.program.to_string_lossy()),
    })?)
}

/// Takes a slot for `command` as `cfg` says; the journal's `entry` learns
/// when the wait ended and how.
pub fn take(
    cfg: &Config,
    sem: &mut dyn Semaphore,
    signals: &mut Signals,
    command: &str,
    background: bool,
    entry: &mut Entry,
) -> Result<Taken> {
    let request = Request {
        id: &cfg.id,
        jobs: cfg.jobs,
        deadline: cfg.wait.deadline(),
        max_waiting: cfg.max_waiting,
        background,
        command,
    };
    let acquired = sem.acquire(&request, signals)?;
    entry.waited(&acquired);
    Ok(match acquired {
        Acquired::Slot(slot) => {
            if cfg.verbose {
                let took = format!("took slot {} (limit {})", slot.number(), cfg.jobs);
                report::line(&cfg.id, &took);
            }
            Taken::Slot(slot)
        }
        Acquired::TimedOut | Acquired::Crowded => {
            if cfg.st_warning {
                report::say(match cfg.on_timeout {
                    OnTimeout::Exit(_) => "sem: Warning: Semaphore timed out. Exiting.",
                    OnTimeout::RunAnyway => {
                        "sem: Warning: Semaphore timed out. Stealing the semaphore."
                    }
                });
            }
            match cfg.on_timeout {
                OnTimeout::Exit(code) => Taken::Skipped(Exit::code(code)),
                OnTimeout::RunAnyway => Taken::Without,
            }
        }
        Acquired::Interrupted(r) => Taken::Stopped(r),
    })
}

/// [`run`] without the report line, which the caller says (or a test reads).
fn execute(
    cfg: &Config,
    cmd: &Command,
    sem: &mut dyn Semaphore,
    handoff: Option<Handoff>,
) -> Result<Outcome> {
    // Catch signals first: one that comes before the handlers would kill qsem
    // outright instead of ending it with 128+N.
    let mut signals = Signals::install()?;
    let mut entry = Entry::begin(cfg);
    let program = resolve_or_fail(cfg, cmd).inspect_err(|e| entry.failed(e))?;
    let display = cmd.display();
    let background = handoff.is_some();
    let quiet = |exit| Outcome {
        exit,
        line: None,
        said: false,
    };
    let taken = take(cfg, sem, &mut signals, &display, background, &mut entry)?;
    let mut slot = match taken {
        Taken::Slot(slot) => Some(slot),
        Taken::Without => None,
        Taken::Skipped(exit) => return Ok(quiet(entry.skipped(exit))),
        Taken::Stopped(r) => return Ok(quiet(entry.skipped(Exit::signal(r.signo)))),
    };
    // A signal that came while the slot was being taken, or a launcher that
    // gave up during the hand-off: start nothing.
    let given_up = match handoff {
        Some(confirm) => confirm(&mut signals)?,
        None => signals.take_stop().map(|r| Exit::signal(r.signo)),
    };
    if let Some(exit) = given_up {
        settle(slot, background, None)?;
        return Ok(quiet(entry.skipped(exit)));
    }
    let own_group = child::own_group();
    let started = Instant::now();
    let child = match child::spawn(cfg, cmd, &program, slot.as_deref(), own_group, |_| {}) {
        Ok(child) => child,
        Err(e) => {
            let (exit, why) = child::spawn_failure(&cmd.program, &e);
            entry.not_started(exit, &why);
            settle(slot, background, Some(&why))?;
            let message = format!("qsem[{}]: {why}", cfg.id);
            return Err(Failure { exit, message }.into());
        }
    };
    entry.started(child.id());
    if let Some(slot) = slot.as_mut() {
        slot.started(child.id());
    }
    let ended = supervise(cfg, child, own_group, &mut signals, slot.as_deref_mut())?;
    let outcome = conclude(cfg, &display, ended, started.elapsed());
    entry.concluded(ended, outcome.exit, outcome.line.as_deref());
    settle(slot, background, outcome.line.as_deref())?;
    // A waiter woken by the release is usually queued on this CPU (the
    // kernel puts a wakee beside its waker), behind what qsem has left to do:
    // its exit, whose unmapping alone takes 0.3-0.4 ms. Let it run first; it
    // costs qsem at most a time slice, and only when the CPU is contended.
    // Handoff p50 1.23-1.44x flock(1)'s -> 0.96-1.07x (bench/RESULTS.md).
    rustix::thread::sched_yield();
    Ok(outcome)
}

/// Gives the slot back. A background job's failure is recorded first, while
/// the slot is still held, so that a `--wait-all` woken by the release
/// cannot miss it.
fn settle(slot: Option<Box<dyn Slot>>, background: bool, failure: Option<&str>) -> Result<()> {
    match slot {
        Some(slot) if background => slot.finish(failure),
        _ => Ok(()),
    }
}

/// How the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// On its own (or of a signal qsem passed on).
    Exited(ExitStatus),
    /// Stopped by qsem at `--timeout`; SIGKILL was sent this long after SIGTERM.
    TimedOut { killed_after: Option<Duration> },
    /// Stopped by qsem because its slot was lost (`--on-lost=kill`).
    Lost,
}

/// The exit status and report line for how the job ended.
pub fn conclude(cfg: &Config, display: &str, ended: Ended, ran: Duration) -> Outcome {
    match ended {
        Ended::Exited(status) => {
            let exit = Exit::of_child(status);
            Outcome {
                exit,
                line: (!exit.is_success()).then(|| report::ended(display, status, ran)),
                said: false,
            }
        }
        Ended::TimedOut { killed_after } => Outcome {
            exit: Exit::TIMED_OUT,
            line: Some(report::timed_out(
                display,
                cfg.timeout.unwrap_or_default(),
                killed_after,
            )),
            said: false,
        },
        Ended::Lost => Outcome {
            exit: Exit::SLOT_LOST,
            line: Some(format!("{display}: stopped, its slot was lost")),
            said: true,
        },
    }
}

/// Why qsem is stopping its own job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    TimedOut,
    /// The slot was lost; the engine gives the job this long to stop.
    Lost(Duration),
}

/// qsem stopping its job: SIGTERM, then SIGKILL after a grace period.
pub struct Stop {
    /// When `--timeout` strikes, if it has not yet.
    timeout_at: Option<Instant>,
    kill_after: Duration,
    /// Why and when SIGTERM was sent.
    began: Option<(Reason, Instant)>,
    killed: bool,
}

impl Stop {
    /// For a job that starts now.
    pub fn new(cfg: &Config) -> Stop {
        Stop {
            timeout_at: cfg.timeout.and_then(|t| Instant::now().checked_add(t)),
            kill_after: cfg.kill_after,
            began: None,
            killed: false,
        }
    }

    fn grace(&self, reason: Reason) -> Duration {
        match reason {
            Reason::TimedOut => self.kill_after,
            Reason::Lost(grace) => grace,
        }
    }

    /// Sends SIGTERM, once, whatever the reason.
    fn begin(&mut self, reason: Reason, target: &Target) {
        if self.began.is_none() {
            target.send(libc::SIGTERM);
            self.began = Some((reason, Instant::now()));
        }
    }

    /// The next instant something is due.
    pub fn next(&self) -> Option<Instant> {
        match self.began {
            None => self.timeout_at,
            Some((_, _)) if self.killed => None,
            Some((reason, at)) => at.checked_add(self.grace(reason)),
        }
    }

    /// Does what is due now: SIGTERM at the timeout, SIGKILL after the grace.
    pub fn due(&mut self, target: &Target) {
        if self.next().is_none_or(|t| Instant::now() < t) {
            return;
        }
        if self.began.is_none() {
            self.begin(Reason::TimedOut, target);
        } else {
            target.send(libc::SIGKILL);
            self.killed = true;
        }
    }

    pub fn ended(&self, status: ExitStatus) -> Ended {
        match self.began {
            None => Ended::Exited(status),
            Some((Reason::TimedOut, _)) => Ended::TimedOut {
                killed_after: self.killed.then_some(self.kill_after),
            },
            Some((Reason::Lost(_), _)) => Ended::Lost,
        }
    }
}

/// Waits for the child, passing signals on, stopping it at its timeout, and
/// watching the slot. The child is reaped only here, so its pid cannot be
/// reused while signals are still being sent to it.
fn supervise(
    cfg: &Config,
    mut child: std::process::Child,
    own_group: bool,
    signals: &mut Signals,
    mut slot: Option<&mut (dyn Slot + '_)>,
) -> Result<Ended> {
    let target = Target::new(child.id(), own_group).context("the command has no valid pid")?;
    let pidfd = rustix::process::Pid::from_child(&child);
    let pidfd = rustix::process::pidfd_open(pidfd, rustix::process::PidfdFlags::empty()).ok();
    let mut stop = Stop::new(cfg);
    loop {
        if let Some(status) = child.try_wait().context("cannot wait for the command")? {
            return Ok(stop.ended(status));
        }
        let events = slot
            .as_deref_mut()
            .map(|s| s.take_events())
            .unwrap_or_default();
        for event in events {
            slot_event(cfg, event, &mut stop, &target);
        }
        let mut until = stop.next();
        if pidfd.is_none() {
            let tick = Instant::now() + NO_PIDFD_TICK;
            until = Some(until.map_or(tick, |t| t.min(tick)));
        }
        let mut fds = Vec::with_capacity(2);
        fds.extend(pidfd.as_ref().map(|fd| fd.as_fd()));
        fds.extend(slot.as_deref().and_then(|s| s.events()));
        match signals.wait(&fds, until)? {
            Wake::Signal(r) => target.pass_on(r),
            Wake::Ready(_) => {}
            Wake::Timeout => stop.due(&target),
        }
    }
}

/// What the runner does when the engine says something of the held slot.
fn slot_event(cfg: &Config, event: SlotEvent, stop: &mut Stop, target: &Target) {
    let stopping = stop.began.is_some();
    match event {
        SlotEvent::Lost { why, grace } if cfg.on_lost == OnLost::Kill => {
            if !stopping {
                let after = duration::concise(grace);
                let what =
                    format!("{why}; stopping the command (SIGTERM, then SIGKILL after {after})");
                report::line(&cfg.id, &what);
                stop.begin(Reason::Lost(grace), target);
            }
        }
        SlotEvent::Lost { why, .. } => report::line(
            &cfg.id,
            &format!("{why}; the command runs on, and qsem tries to take a slot again"),
        ),
        SlotEvent::Regained(what) if !stopping => report::line(&cfg.id, &what),
        SlotEvent::Regained(_) => {}
    }
}

#[cfg(test)]
#[path = "runner/tests.rs"]
mod tests;
