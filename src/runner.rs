//! Runs the command under a slot: finds it, takes the slot, spawns it, passes
//! signals on, waits, and turns its end into qsem's exit status and report
//! line. It knows the semaphore only through the `Semaphore` trait, and learns
//! that a held slot was lost (a shared server's session can end) through
//! `Slot::events`, which it polls beside its signal pipe.
//!
//! Two decisions shape it. The child inherits the slot's descriptor (unless
//! `-o`), so that a `kill -9` of qsem cannot free a slot whose job still runs.
//! And signals reach the child exactly once: in a terminal's foreground group
//! the child shares qsem's process group (so that it can read the terminal), and
//! a signal the kernel sent to the whole group (Ctrl-C) is not sent again;
//! elsewhere (cron, scripts in the background) the child gets a process group of
//! its own and every signal qsem receives is passed to that group.

use crate::config::{Command, Config, OnLost, OnTimeout};
use crate::duration;
use crate::exit::{Exit, Failure};
use crate::history;
use crate::report;
use crate::semaphore::{Acquired, Request, Semaphore, Slot, SlotEvent};
use crate::signals::{self, Received, Signals};
use crate::sys;
use anyhow::{Context, Result};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// With `--on-lost=kill`: how long a job has between SIGTERM and SIGKILL.
pub const LOST_GRACE: Duration = Duration::from_secs(10);

/// Runs `cmd` under the semaphore as `cfg` says, and returns qsem's status.
pub fn run(cfg: &Config, cmd: &Command, sem: &mut dyn Semaphore) -> Result<Exit> {
    run_as(cfg, cmd, sem, None)
}

/// Runs `cmd` as the supervisor of a `--bg` job (see `background.rs`): as
/// [`run`], but writes one byte to `notify` once the slot is taken, and
/// records a failure under the id before the slot is released.
pub fn run_detached(
    cfg: &Config,
    cmd: &Command,
    sem: &mut dyn Semaphore,
    notify: OwnedFd,
) -> Result<Exit> {
    run_as(cfg, cmd, sem, Some(notify))
}

/// Finds the command before anything else happens, as a [`Failure`] (126/127):
/// nobody wants to wait an hour for a slot to learn of a typo.
pub fn resolve_or_fail(cfg: &Config, cmd: &Command) -> Result<PathBuf> {
    Ok(resolve(&cmd.program).map_err(|(exit, why)| Failure {
        exit,
        message: format!("qsem[{}]: {}: {why}", cfg.id, cmd.program.to_string_lossy()),
    })?)
}

fn run_as(
    cfg: &Config,
    cmd: &Command,
    sem: &mut dyn Semaphore,
    mut notify: Option<OwnedFd>,
) -> Result<Exit> {
    // Catch signals first: one that comes before the handlers would kill qsem
    // outright instead of ending it with 128+N.
    let mut signals = Signals::install()?;
    let mut entry = history::Entry::begin(cfg);
    let program = resolve_or_fail(cfg, cmd).inspect_err(|e| entry.failed(e))?;
    let display = cmd.display();
    let deadline = cfg.wait.deadline();
    let request = Request {
        max_waiting: None,
        background: notify.is_some(),
        id: &cfg.id,
        jobs: cfg.jobs,
        deadline,
        command: &display,
    };
    let acquired = sem.acquire(&request, &mut signals)?;
    entry.waited(&acquired);
    let mut slot = match acquired {
        Acquired::Slot(slot) => {
            if cfg.verbose {
                report::line(
                    &cfg.id,
                    &format!("took slot {} (limit {})", slot.number(), cfg.jobs),
                );
            }
            Some(slot)
        }
        Acquired::TimedOut | Acquired::Crowded => match cfg.on_timeout {
            OnTimeout::Exit(code) => return Ok(entry.skipped(Exit::code(code))),
            OnTimeout::RunAnyway => None,
        },
        Acquired::Interrupted(r) => return Ok(entry.skipped(Exit::signal(r.signo))),
    };
    // A stop signal that came while the slot was being taken: start nothing.
    if let Some(r) = signals.take_stop() {
        return Ok(entry.skipped(Exit::signal(r.signo)));
    }
    let background = notify.is_some();
    if let Some(fd) = notify.take() {
        // The launcher has done its part once it reads this byte (or EOF).
        let _ = std::io::Write::write_all(&mut std::fs::File::from(fd), b"1");
    }
    let own_group = !sys::in_terminal_foreground();
    let started = Instant::now();
    let mut child = match start(cfg, cmd, &program, slot.as_deref(), own_group) {
        Ok(child) => child,
        Err(e) => {
            let exit = match e.kind() {
                io::ErrorKind::NotFound => Exit::NOT_FOUND,
                _ => Exit::NOT_EXECUTABLE,
            };
            let why = format!("{}: {e}", cmd.program.to_string_lossy());
            if background && let Some(slot) = slot {
                slot.finish(Some(&why))?;
            }
            let err = Failure {
                exit,
                message: format!("qsem[{}]: {why}", cfg.id),
            }
            .into();
            entry.failed(&err);
            return Err(err);
        }
    };
    entry.started(child.id());
    if let Some(slot) = slot.as_mut() {
        slot.started(child.id());
    }
    let (status, stopped) = supervise(
        cfg,
        &mut child,
        &mut signals,
        own_group,
        slot.as_deref_mut(),
    )?;
    if stopped {
        // The loss was reported when it happened; the job's own end is moot.
        entry.ended(status, Some("stopped: its slot was lost (--on-lost=kill)"));
        return Ok(Exit::SLOT_LOST);
    }
    let exit = Exit::of_child(status);
    let line = (!exit.is_success()).then(|| describe(&display, status, started.elapsed()));
    entry.ended(status, line.as_deref());
    if let Some(line) = line {
        // Recorded while the slot is still held: a --wait-all woken by its
        // release must find the failure.
        let recorded = match slot.take() {
            Some(slot) if background => slot.finish(Some(&line)),
            _ => Ok(()),
        };
        if !cfg.quiet {
            report::line(&cfg.id, &line);
        }
        recorded?;
    }
    match slot {
        Some(slot) if background => slot.finish(None)?,
        other => drop(other),
    }
    Ok(exit)
}

/// Finds the program as execvp(3) would: a name with a slash as is, else the
/// first executable file of that name in PATH. Errors are (status, reason).
pub fn resolve(program: &OsStr) -> Result<PathBuf, (Exit, &'static str)> {
    let is_executable_file = |p: &Path| -> Option<bool> {
        let meta = std::fs::metadata(p).ok()?;
        if meta.is_dir() {
            return Some(false);
        }
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
        // SAFETY: `c` is a valid C string.
        Some(unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0)
    };
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match is_executable_file(&path) {
            Some(true) => Ok(path),
            Some(false) => Err((Exit::NOT_EXECUTABLE, "permission denied, or a directory")),
            None => Err((Exit::NOT_FOUND, "no such file")),
        };
    }
    let search =
        std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = false;
    for dir in std::env::split_paths(&search) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        match is_executable_file(&candidate) {
            Some(true) => return Ok(candidate),
            Some(false) => denied = true,
            None => {}
        }
    }
    if denied {
        Err((Exit::NOT_EXECUTABLE, "permission denied"))
    } else {
        Err((Exit::NOT_FOUND, "command not found"))
    }
}

/// The variables that tell the command its id, slot and limit (and, where
/// the engine has one, its fencing token).
fn job_env(cfg: &Config, slot: Option<&dyn Slot>) -> Vec<(&'static str, OsString)> {
    let fence = slot.and_then(|s| s.fence());
    let mut env = vec![
        ("QSEM_ID", OsStr::from_bytes(cfg.id.as_bytes()).to_owned()),
        (
            "QSEM_SLOT",
            slot.map_or(0, |s| s.number()).to_string().into(),
        ),
        ("QSEM_JOBS", cfg.jobs.to_string().into()),
    ];
    env.extend(fence.map(|f| ("QSEM_FENCE", f.to_string().into())));
    env
}

/// Runs `start`, which starts the command, with the slot's descriptor
/// inheritable (unless `-o`). The descriptor is close-on-exec like every
/// other; the child gets it on purpose, for the time of the spawn only (no
/// other thread of qsem spawns processes, so no other child can inherit it
/// meanwhile).
fn holding_slot<T>(
    cfg: &Config,
    slot: Option<&dyn Slot>,
    start: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let inherit = slot.filter(|_| !cfg.close).and_then(|s| s.inheritable());
    if let Some(fd) = inherit {
        sys::set_cloexec(fd, false)?;
    }
    let started = start();
    if let Some(fd) = inherit {
        sys::set_cloexec(fd, true)?;
    }
    started
}

/// Starts the command with qsem's environment, holding `slot` unless `-o`;
/// `adjust` adds what a caller needs (`--each`: the item and pipes).
pub fn spawn(
    cfg: &Config,
    cmd: &Command,
    program: &Path,
    slot: Option<&dyn Slot>,
    own_group: bool,
    adjust: impl FnOnce(&mut std::process::Command),
) -> io::Result<std::process::Child> {
    let mut child = std::process::Command::new(program);
    child
        .arg0(&cmd.program)
        .args(&cmd.args)
        .env_remove("QSEM_FENCE")
        .envs(job_env(cfg, slot));
    adjust(&mut child);
    if own_group {
        child.process_group(0);
    }
    holding_slot(cfg, slot, || child.spawn())
}

/// Starts the command as [`spawn`] does, for a job that keeps qsem's own
/// stdin, stdout and stderr: through [`sys::spawn`], which spares the child
/// glibc's reset of every signal action (126 system calls, about 30 us a job).
fn start(
    cfg: &Config,
    cmd: &Command,
    program: &Path,
    slot: Option<&dyn Slot>,
    own_group: bool,
) -> io::Result<sys::Child> {
    let c = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let path = c(program.as_os_str())?;
    let args = std::iter::once(&cmd.program)
        .chain(&cmd.args)
        .map(|a| c(a))
        .collect::<io::Result<Vec<_>>>()?;
    let env = job_env(cfg, slot);
    // A fence inherited from an outer job is not this job's.
    let names: Vec<&[u8]> = env
        .iter()
        .map(|(name, _)| name.as_bytes())
        .chain([&b"QSEM_FENCE"[..]])
        .collect();
    let vars = env
        .iter()
        .map(|(name, value)| {
            let mut entry = OsString::from(name);
            entry.push("=");
            entry.push(value);
            c(&entry)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut envp = sys::environ_except(&names);
    envp.extend(vars.iter().map(|v| v.as_ptr()));
    envp.push(std::ptr::null());
    let mut argv: Vec<_> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    holding_slot(cfg, slot, || {
        sys::spawn(&path, &argv, &envp, own_group, &signals::CAUGHT)
    })
}

/// Waits for the child, passing signals on, and watches the slot: an engine
/// that can lose a held slot says so through [`Slot::events`]. Returns the
/// child's status and whether it was stopped because its slot was lost
/// (`--on-lost=kill`). The child is reaped only here, so its pid cannot be
/// reused while signals are still being sent to it.
fn supervise(
    cfg: &Config,
    child: &mut sys::Child,
    signals: &mut Signals,
    own_group: bool,
    mut slot: Option<&mut (dyn Slot + '_)>,
) -> Result<(ExitStatus, bool)> {
    let pid = child.id() as libc::pid_t;
    let send = |signo| {
        // SAFETY: no memory is passed; a failure means the group is gone.
        if !own_group || unsafe { libc::kill(-pid, signo) } != 0 {
            sys::kill(pid, signo);
        }
    };
    // Set once the job is being stopped for a lost slot: when to send SIGKILL.
    let mut stopping: Option<Option<Instant>> = None;
    loop {
        for r in signals.pending() {
            if !forwards(r, own_group) {
                continue;
            }
            send(r.signo);
        }
        let events = slot
            .as_deref_mut()
            .map(|s| s.take_events())
            .unwrap_or_default();
        for event in events {
            match event {
                SlotEvent::Lost(why) if cfg.on_lost == OnLost::Kill => {
                    if stopping.is_none() {
                        report::line(
                            &cfg.id,
                            &format!(
                                "{why}; stopping the command (SIGTERM, then SIGKILL after {})",
                                duration::human(LOST_GRACE)
                            ),
                        );
                        send(libc::SIGTERM);
                        stopping = Some(Instant::now().checked_add(LOST_GRACE));
                    }
                }
                SlotEvent::Lost(why) => report::line(
                    &cfg.id,
                    &format!("{why}; the command runs on, and qsem tries to take a slot again"),
                ),
                SlotEvent::Regained(what) if stopping.is_none() => report::line(&cfg.id, &what),
                SlotEvent::Regained(_) => {}
            }
        }
        if let Some(status) = child.try_wait().context("cannot wait for the command")? {
            return Ok((status, stopping.is_some()));
        }
        let kill_at = stopping.flatten();
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            send(libc::SIGKILL);
            stopping = Some(None);
            continue;
        }
        let mut fds = vec![signals.fd()];
        fds.extend(
            slot.as_deref()
                .and_then(|s| s.events())
                .map(|fd| fd.as_raw_fd()),
        );
        sys::poll_readable(&fds, kill_at).context("cannot wait (poll)")?;
    }
}

/// Whether a signal qsem received must be passed to the command. In a
/// terminal's foreground group (not `own_group`), a signal the kernel sent to
/// the whole group (Ctrl-C, Ctrl-\, hang-up) has reached the command already.
pub fn forwards(r: Received, own_group: bool) -> bool {
    r.signo != libc::SIGCHLD && (own_group || !r.from_kernel)
}

/// The report line for a failed command.
pub fn describe(command: &str, status: ExitStatus, ran: std::time::Duration) -> String {
    let after = duration::human(ran);
    let command = truncate(command, 200);
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("{command} exited with status {code} after {after}"),
        (None, Some(signo)) => {
            let name = sys::signal_name(signo);
            let core = if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            };
            let hint = if signo == libc::SIGKILL {
                " (SIGKILL often means the out-of-memory killer; see dmesg)"
            } else {
                ""
            };
            format!("{command} was killed by {name}{core} after {after}{hint}")
        }
        (None, None) => format!(
            "{command} ended with wait status {} after {after}",
            status.into_raw()
        ),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn report_lines() {
        let s = |raw| ExitStatus::from_raw(raw);
        assert_eq!(
            describe("ImportProcess", s(3 << 8), Duration::from_millis(12_400)),
            "ImportProcess exited with status 3 after 12.4s"
        );
        let killed = describe("ImportProcess", s(libc::SIGKILL), Duration::from_secs(2));
        assert!(
            killed.starts_with("ImportProcess was killed by SIGKILL after 2.0s"),
            "{killed}"
        );
        assert!(killed.contains("out-of-memory"), "{killed}");
        let segv = describe("x", s(libc::SIGSEGV | 0x80), Duration::from_secs(1));
        assert_eq!(segv, "x was killed by SIGSEGV (core dumped) after 1.0s");
    }

    #[test]
    fn terminal_signals_are_not_sent_twice() {
        let r = |signo, from_kernel| Received { signo, from_kernel };
        // In the terminal's foreground group: the terminal reached the command.
        assert!(!forwards(r(libc::SIGINT, true), false));
        assert!(forwards(r(libc::SIGINT, false), false));
        assert!(forwards(r(libc::SIGTERM, false), false));
        // In a group of its own, only qsem can pass signals on.
        assert!(forwards(r(libc::SIGINT, true), true));
        assert!(forwards(r(libc::SIGHUP, false), true));
        assert!(!forwards(r(libc::SIGCHLD, false), true));
    }

    #[test]
    fn resolution() {
        assert!(resolve(OsStr::new("sh")).is_ok());
        assert_eq!(
            resolve(OsStr::new("no-such-command-qsem")).unwrap_err().0,
            Exit::NOT_FOUND
        );
        assert_eq!(
            resolve(OsStr::new("/no/such/file")).unwrap_err().0,
            Exit::NOT_FOUND
        );
        assert_eq!(
            resolve(OsStr::new("/")).unwrap_err().0,
            Exit::NOT_EXECUTABLE
        );
    }
}
