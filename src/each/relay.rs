//! `--each`'s relay thread: it passes the runs' output on whole lines at a
//! time, stops a run at its `--timeout`, reaps the runs (through pidfds, so
//! nothing polls), says their report lines and folds their statuses as
//! xargs does.
//!
//! Output goes to qsem's stdout and stderr as xargs's children's would, and
//! a write error there counts as xargs counts it: stdout full or failing
//! (`>/dev/full`) is a failed run (123), said once; stdout closed (`| head`)
//! is a run killed by SIGPIPE (125): the runs' own stdout pipes are closed
//! too, so that they get SIGPIPE as they would under xargs, and no new run
//! starts.

use super::output::{Output, Pipe, Pumped, Sink};
use crate::child::Target;
use crate::config::Config;
use crate::exit::Exit;
use crate::history::Entry;
use crate::report;
use crate::runner::{self, Ended, Stop};
use crate::sys;
use anyhow::{Context, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, ChildStderr, ChildStdout};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the main thread and the relay thread share.
#[derive(Default)]
struct Shared {
    /// Runs handed over and not yet picked up by the relay thread.
    new: Vec<Run>,
    /// Runs not yet reaped, for passing signals on.
    live: Vec<Target>,
    /// The graver of the outcomes so far.
    worst: Option<Exit>,
    /// No more runs will come.
    closed: bool,
    /// qsem's stdout is closed: start no more runs.
    broken: bool,
}

impl Shared {
    fn count(&mut self, exit: Exit) {
        self.worst = Some(self.worst.unwrap_or(Exit::OK).graver(exit));
    }
}

/// One run, as the relay thread tends it.
struct Run {
    child: Child,
    target: Target,
    display: String,
    started: Instant,
    stop: Stop,
    /// Its journal record, written when it is reaped.
    entry: Entry,
    out: Option<Pipe<ChildStdout>>,
    err: Option<Pipe<ChildStderr>>,
    /// Readable once the run exits; `None` if pidfds are not available.
    pidfd: Option<OwnedFd>,
    reaped: bool,
}

/// The relay thread's handle.
pub struct Relay {
    shared: Arc<Mutex<Shared>>,
    wake: OwnedFd,
    done: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(cfg: &Config) -> Result<Relay> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let flags = rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK;
        let (wake_read, wake) = rustix::pipe::pipe_with(flags).context("cannot create a pipe")?;
        let (done, done_write) = rustix::pipe::pipe_with(flags).context("cannot create a pipe")?;
        let theirs = Arc::clone(&shared);
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                tend(&theirs, &wake_read, &cfg);
                // Closing the write end tells the main thread we are done.
                drop(done_write);
            })
            .context("cannot start a thread")?;
        Ok(Relay {
            shared,
            wake,
            done: Some(done),
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn poke(&self) {
        let _ = rustix::io::write(&self.wake, b"x");
    }

    /// Hands a started run over.
    pub fn add(
        &self,
        mut child: Child,
        target: Target,
        display: String,
        cfg: &Config,
        entry: Entry,
    ) -> Result<()> {
        let out = child.stdout.take().map(|p| Pipe::new(p, Output::Stdout));
        let err = child.stderr.take().map(|p| Pipe::new(p, Output::Stderr));
        let pidfd = rustix::process::Pid::from_child(&child);
        let run = Run {
            target,
            display,
            started: Instant::now(),
            stop: Stop::new(cfg),
            entry,
            out: out.transpose().context("cannot set up a pipe")?,
            err: err.transpose().context("cannot set up a pipe")?,
            pidfd: rustix::process::pidfd_open(pidfd, rustix::process::PidfdFlags::empty()).ok(),
            child,
            reaped: false,
        };
        let mut shared = self.lock();
        shared.live.push(target);
        shared.new.push(run);
        drop(shared);
        self.poke();
        Ok(())
    }

    /// Counts the outcome of a run that did not start.
    pub fn count(&self, exit: Exit) {
        self.lock().count(exit);
    }

    /// Whether qsem's stdout has closed, so that no run should start.
    pub fn broken(&self) -> bool {
        self.lock().broken
    }

    /// Passes a signal on to every run still alive.
    pub fn forward(&self, r: crate::signals::Received) {
        for target in &self.lock().live {
            target.pass_on(r);
        }
    }

    /// No more runs; returns the descriptor that turns readable (EOF) when
    /// the last run has been reaped.
    pub fn close(&mut self) -> Result<OwnedFd> {
        self.lock().closed = true;
        self.poke();
        self.done.take().context("the relay was closed twice")
    }

    pub fn finish(mut self) -> Result<Exit> {
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the output relay thread failed"))?;
        }
        Ok(self.lock().worst.unwrap_or(Exit::OK))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // An error path: let the thread finish on its own once runs end.
        self.lock().closed = true;
        self.poke();
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic in the relay thread is a bug; its data is still consistent.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reaps the runs that ended, under the lock, so that the main thread never
/// signals a pid that has been recycled; says and counts their outcomes.
fn reap(runs: &mut [Run], shared: &Mutex<Shared>, sink: &mut Sink, cfg: &Config) {
    for run in runs.iter_mut().filter(|r| !r.reaped) {
        let mut s = lock(shared);
        let Ok(Some(status)) = run.child.try_wait() else {
            continue;
        };
        run.reaped = true;
        let pid = run.target.pid();
        s.live.retain(|t| t.pid() != pid);
        drop(s);
        // What it wrote before it ended comes before its report line.
        drain(run, sink);
        let ended = run.stop.ended(status);
        let outcome = runner::conclude(cfg, &run.display, ended, run.started.elapsed());
        run.entry
            .concluded(ended, outcome.exit, outcome.line.as_deref());
        if let Some(line) = outcome.line.filter(|_| !cfg.quiet) {
            report::line(&cfg.id, &line);
        }
        let exit = match ended {
            Ended::Exited(status) => Exit::of_each_run(status),
            // Stopped by a signal qsem sent: as xargs counts a killed run.
            Ended::TimedOut { .. } | Ended::Lost => Exit::EACH_KILLED,
        };
        lock(shared).count(exit);
    }
}

/// Passes on what a run's pipes hold now, without waiting for more; a pipe
/// at EOF is closed.
fn drain(run: &mut Run, sink: &mut Sink) {
    loop {
        let out = run.out.as_mut().map(|p| p.pump(sink));
        let err = run.err.as_mut().map(|p| p.pump(sink));
        if out == Some(Pumped::Closed) {
            run.out = None;
        }
        if err == Some(Pumped::Closed) {
            run.err = None;
        }
        if out != Some(Pumped::Data) && err != Some(Pumped::Data) {
            break;
        }
    }
}

/// Counts and says a write error on stdout, once; a closed stdout also
/// closes the runs' stdout pipes and stops new runs.
fn note_write_error(runs: &mut [Run], shared: &Mutex<Shared>, sink: &mut Sink, cfg: &Config) {
    let Some((exit, e)) = sink.failed.take() else {
        return;
    };
    sink.said = true;
    report::line(&cfg.id, &format!("cannot write to standard output: {e}"));
    let mut s = lock(shared);
    s.count(exit);
    if exit == Exit::EACH_KILLED {
        s.broken = true;
        drop(s);
        for run in runs {
            run.out = None;
        }
    }
}

/// The relay thread: passes the runs' output on, reaps them, reports failures.
fn tend(shared: &Mutex<Shared>, wake: &OwnedFd, cfg: &Config) {
    let mut runs: Vec<Run> = Vec::new();
    let mut sink = Sink {
        failed: None,
        said: false,
    };
    loop {
        let closed = {
            let mut s = lock(shared);
            runs.append(&mut s.new);
            s.closed
        };
        for run in runs.iter_mut().filter(|r| !r.reaped) {
            run.stop.due(&run.target);
        }
        reap(&mut runs, shared, &mut sink, cfg);
        note_write_error(&mut runs, shared, &mut sink, cfg);
        runs.retain(|r| !r.reaped || r.out.is_some() || r.err.is_some());
        if closed && runs.iter().all(|r| r.reaped) {
            // Whatever the runs wrote is in their pipes; a pipe still held
            // open by something they left behind is not waited for.
            for run in &mut runs {
                drain(run, &mut sink);
                for p in run.out.iter_mut() {
                    p.emit(p.pending.len(), &mut sink);
                }
                for p in run.err.iter_mut() {
                    p.emit(p.pending.len(), &mut sink);
                }
            }
            note_write_error(&mut runs, shared, &mut sink, cfg);
            return;
        }
        sleep(&mut runs, wake, &mut sink);
    }
}

/// Sleeps until a pipe has data, a run ends or is due to be stopped, or the
/// main thread pokes; passes on what the pipes hold.
fn sleep(runs: &mut [Run], wake: &OwnedFd, sink: &mut Sink) {
    let mut fds = vec![wake.as_raw_fd()];
    // (run, which: 0 stdout, 1 stderr, 2 pidfd) per descriptor after `wake`.
    let mut owners = Vec::new();
    let mut until = None::<Instant>;
    let mut earliest = |t: Option<Instant>| {
        if let Some(t) = t {
            until = Some(until.map_or(t, |u| u.min(t)));
        }
    };
    for (i, run) in runs.iter().enumerate() {
        if let Some(p) = &run.out {
            fds.push(p.pipe.as_raw_fd());
            owners.push((i, 0));
        }
        if let Some(p) = &run.err {
            fds.push(p.pipe.as_raw_fd());
            owners.push((i, 1));
        }
        if !run.reaped {
            earliest(run.stop.next());
            match &run.pidfd {
                Some(fd) => {
                    fds.push(fd.as_raw_fd());
                    owners.push((i, 2));
                }
                None => earliest(Some(Instant::now() + Duration::from_millis(50))),
            }
        }
    }
    let Ok(ready) = sys::poll_readable(&fds, until) else {
        return;
    };
    for i in ready {
        if i == 0 {
            let mut buf = [0u8; 256];
            while matches!(rustix::io::read(wake, &mut buf), Ok(1..)) {}
            continue;
        }
        let (r, which) = owners[i - 1];
        let run = &mut runs[r];
        // A pidfd: the reaping pass at the top of the loop sees it.
        let pumped = match which {
            0 => run.out.as_mut().map(|p| p.pump(sink)),
            1 => run.err.as_mut().map(|p| p.pump(sink)),
            _ => None,
        };
        if pumped == Some(Pumped::Closed) {
            match which {
                0 => run.out = None,
                _ => run.err = None,
            }
        }
    }
}
