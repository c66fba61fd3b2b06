//! `--bg` and `--wait-all`: jobs that run on, holding their slot, after the
//! qsem that started them has returned; and a barrier that waits for every
//! job of an id and says how many failed.
//!
//! Who waits for a background job: a detached supervisor, which is qsem itself.
//! `qsem --bg` starts `/proc/self/exe` again with the same arguments plus a
//! hidden `--bg-supervisor FD`, in a session of its own (so a terminal's
//! Ctrl-C or hang-up does not reach it), with stdin from /dev/null and the
//! caller's stdout and stderr. The supervisor is an ordinary foreground qsem in
//! every other respect: it takes the slot (honouring `--wait`, `-E`, `--st`),
//! writes one byte on FD to say so, runs the job holding the slot, reaps it,
//! and passes signals on to it. If the job fails, the supervisor records the
//! report line under the id *before* its slot is released (so that a
//! `--wait-all` woken by the release cannot miss it) and prints it on stderr.
//!
//! The launcher only waits for that byte. If the supervisor ends without
//! writing it (the wait expired, a signal, a failure of qsem), the launcher
//! exits with the supervisor's status, so `qsem --bg` answers exactly as a
//! foreground qsem would up to the moment the job starts. Signals the launcher
//! receives meanwhile are passed to the supervisor, which stops waiting.
//!
//! Re-executing rather than forking keeps the process single-threaded at every
//! `fork`, and makes the design independent of the engine: the supervisor
//! takes the slot itself, so nothing needs to be inherited across processes.

use crate::config::{Command, Config, OnTimeout};
use crate::exit::Exit;
use crate::report;
use crate::runner;
use crate::semaphore::{Idle, Semaphore};
use crate::signals::{FORWARDED, Signals};
use crate::sys;
use anyhow::{Context, Result};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;

/// `qsem --bg`: starts the supervisor and returns once it holds a slot.
pub fn launch(cfg: &Config, cmd: &Command) -> Result<Exit> {
    runner::resolve_or_fail(cfg, cmd)?;
    let mut signals = Signals::install()?;
    let (ready, notify) = sys::pipe().context("cannot create a pipe")?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "qsem".into());
    let mut supervisor = std::process::Command::new("/proc/self/exe");
    supervisor
        .arg0(arg0)
        .arg("--bg-supervisor")
        .arg(notify.as_raw_fd().to_string())
        .args(args)
        .stdin(if cfg.bg_stdin {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    // SAFETY: the closure only calls setsid(2), which is async-signal-safe.
    unsafe {
        supervisor.pre_exec(sys::setsid);
    }
    // The write end goes to the supervisor on purpose, for the time of the
    // spawn only (qsem is single-threaded here); ours is closed right after.
    sys::set_cloexec(notify.as_fd(), false).context("cannot set up a pipe")?;
    let spawned = supervisor.spawn();
    drop(notify);
    let mut supervisor = spawned.context("cannot start the background supervisor")?;
    let pid = supervisor.id() as libc::pid_t;
    loop {
        for r in signals.pending() {
            if FORWARDED.contains(&r.signo) {
                sys::kill(pid, r.signo);
            }
        }
        match sys::read(ready.as_fd(), &mut [0u8; 1]) {
            // It holds a slot: the job is its business from here on.
            Ok(1..) => return Ok(Exit::OK),
            Ok(0) => {
                let status = supervisor
                    .wait()
                    .context("cannot wait for the background supervisor")?;
                return Ok(Exit::of_child(status));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("cannot read from the background supervisor"),
        }
        sys::poll_readable(&[signals.fd(), ready.as_raw_fd()], None)
            .context("cannot wait (poll)")?;
    }
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
