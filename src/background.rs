//! `--bg` and `--wait-all`: jobs that run on, holding their slot, after the
//! qsem that started them has returned; and a barrier that waits for every
//! job of an id and says how many failed.
//!
//! Who waits for a background job: a detached supervisor, which is qsem itself.
//! `qsem --bg` (the launcher) starts `/proc/self/exe` again with the same
//! arguments plus a hidden `--bg-supervisor FD`, in a session of its own (so a
//! terminal's Ctrl-C or hang-up does not reach it), with stdin from /dev/null
//! and the caller's stdout and stderr. FD is one end of a socket pair whose
//! other end the launcher keeps. The supervisor is an ordinary foreground
//! qsem in every other respect: it takes the slot (honouring `--wait`, `-E`,
//! `--st`, `--max-waiting`), runs the job holding it, reaps it, passes
//! signals on, and records a failure under the id *before* its slot is
//! released (so that a `--wait-all` woken by the release cannot miss it).
//!
//! The hand-off decides who answers for a signal, so that none is lost:
//!
//! - While the supervisor waits for a slot, the launcher passes the signals
//!   it receives on to it, and the supervisor stops waiting; its status
//!   (128+N) becomes the launcher's. If the launcher itself dies (`kill -9`,
//!   `timeout -s KILL`), the kernel sends the supervisor SIGTERM
//!   (PR_SET_PDEATHSIG), and it gives up: nothing starts after its launcher
//!   is gone. A launcher that died before that was armed is caught by a
//!   check of the parent's pid.
//! - Once it holds the slot, the supervisor disarms that signal, writes one
//!   byte, and waits for the launcher's answer: `g` starts the job; a signal
//!   number (the launcher had one meanwhile), or the launcher's end closing,
//!   gives the slot back with nothing started. So the launcher exits 0 only
//!   if no signal reached it before the job was let go, and 128+N only if
//!   the job never started.

use crate::command::Command;
use crate::config::{Config, OnTimeout};
use crate::exit::Exit;
use crate::report;
use crate::runner;
use crate::semaphore::{Idle, Semaphore};
use crate::signals::{Received, Signals, Wake};
use crate::sys;
use anyhow::{Context, Result};
use rustix::process::{Pid, Signal};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

/// The launcher's answer that starts the job.
const GO: u8 = b'g';
/// The supervisor's word that it holds a slot.
const TAKEN: u8 = b't';

/// `qsem --bg`: starts the supervisor and returns once its job may start.
pub fn launch(cfg: &Config, cmd: &Command) -> Result<Exit> {
    runner::resolve_or_fail(cfg, cmd)?;
    let mut signals = Signals::install()?;
    let (mut link, theirs) = UnixStream::pair().context("cannot create a socket pair")?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "qsem".into());
    let mut supervisor = std::process::Command::new("/proc/self/exe");
    supervisor
        .arg0(arg0)
        .arg("--bg-supervisor")
        .arg(theirs.as_raw_fd().to_string())
        .args(args)
        .stdin(if cfg.bg_stdin {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    let launcher = rustix::process::getpid();
    // SAFETY: `detach` makes only system calls (setsid, prctl, getppid),
    // which are async-signal-safe, and allocates nothing.
    unsafe {
        supervisor.pre_exec(move || detach(launcher));
    }
    // The supervisor's end goes to it on purpose, for the time of the spawn
    // only (qsem is single-threaded here); ours is closed right after.
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())
        .context("cannot set up a socket pair")?;
    let spawned = supervisor.spawn();
    drop(theirs);
    let mut supervisor = spawned.context("cannot start the background supervisor")?;
    let pid = Pid::from_child(&supervisor);
    let mut first: Option<Received> = None;
    loop {
        match signals.wait(&[link.as_fd()], None)? {
            Wake::Signal(r) => {
                first.get_or_insert(r);
                if let Some(sig) = Signal::from_named_raw(r.signo) {
                    let _ = rustix::process::kill_process(pid, sig);
                }
            }
            Wake::Timeout => {}
            Wake::Ready(_) => {
                let mut byte = [0u8; 1];
                if link.read(&mut byte).unwrap_or(0) == 1 {
                    // It holds a slot. A signal that came until now is
                    // answered by starting nothing; one that comes later
                    // finds qsem --bg done, as if it had come after.
                    let first = first.or_else(|| signals.take_stop());
                    let answer = first.map_or(GO, |r| r.signo as u8);
                    let _ = link.write_all(&[answer]);
                    let Some(r) = first else {
                        return Ok(Exit::OK);
                    };
                    let _ = supervisor.wait();
                    return Ok(Exit::signal(r.signo));
                }
                let status = supervisor
                    .wait()
                    .context("cannot wait for the background supervisor")?;
                return Ok(Exit::of_child(status));
            }
        }
    }
}

/// In the supervisor before exec: a session of its own, and SIGTERM when its
/// launcher dies, armed before checking that the launcher is still there.
fn detach(launcher: Pid) -> std::io::Result<()> {
    rustix::process::setsid()?;
    rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
    if rustix::process::getppid() != Some(launcher) {
        return Err(std::io::Error::other("the launcher is gone"));
    }
    Ok(())
}

/// The supervisor of a `--bg` job (`--bg-supervisor FD`): runs the command
/// as the foreground does, asking the launcher on FD once the slot is taken.
pub fn supervise(cfg: &Config, cmd: &Command, fd: RawFd, sem: &mut dyn Semaphore) -> Result<Exit> {
    let mut link = UnixStream::from(
        sys::adopt_inherited(fd).with_context(|| format!("--bg-supervisor: descriptor {fd}"))?,
    );
    let mut confirm = |signals: &mut Signals| -> Result<Option<Exit>> {
        // From here the link, not a signal, says whether the launcher is there.
        rustix::process::set_parent_process_death_signal(None)
            .context("cannot disarm the parent-death signal")?;
        if link.write_all(&[TAKEN]).is_err() {
            return Ok(Some(Exit::OWN_FAILURE));
        }
        loop {
            match signals.wait(&[link.as_fd()], None)? {
                Wake::Signal(r) => return Ok(Some(Exit::signal(r.signo))),
                Wake::Timeout => {}
                Wake::Ready(_) => {
                    let mut answer = [0u8; 1];
                    return Ok(match link.read(&mut answer) {
                        Ok(1) if answer[0] == GO => None,
                        Ok(1) => Some(Exit::signal(i32::from(answer[0]))),
                        // The launcher is gone without an answer: start nothing.
                        _ => Some(Exit::OWN_FAILURE),
                    });
                }
            }
        }
    };
    runner::run(cfg, cmd, sem, Some(&mut confirm))
}

/// `qsem --wait-all`: waits until the id is idle, then reports failed jobs.
pub fn wait_all(cfg: &Config, sem: &mut dyn Semaphore) -> Result<Exit> {
    let mut signals = Signals::install()?;
    match sem.wait_idle(&cfg.id, cfg.wait.deadline(), &mut signals)? {
        Idle::Reached => {}
        Idle::TimedOut => match cfg.on_timeout {
            OnTimeout::Exit(code) => return Ok(Exit::code(code)),
            // GNU sem's positive --st: stop waiting, carry on as if idle.
            OnTimeout::RunAnyway => {}
        },
        Idle::Interrupted(r) => return Ok(Exit::signal(r.signo)),
    }
    let failed = sem.take_failures(&cfg.id)?;
    if failed == 0 {
        return Ok(Exit::OK);
    }
    let jobs = if failed == 1 { "job" } else { "jobs" };
    report::line(
        &cfg.id,
        &format!("{failed} background {jobs} failed since the last --wait-all"),
    );
    Ok(Exit::JOBS_FAILED)
}
