//! `--each`: xargs under the shared semaphore. Reads items from stdin (lines,
//! or NUL-separated with `-0`), and for each one takes a slot of the id, like
//! any other qsem, and starts `COMMAND ARG... ITEM` holding it. The item is
//! one argument, never seen by a shell (with `-c STRING`, it is `$1` of the
//! script). Items are passed byte for byte; only empty ones are skipped.
//! Runs that fail are reported and counted; qsem carries on and exits as
//! xargs does. If `--wait` expires for an item, the item is skipped and
//! counted as a run that exited with the `-E` code (by default: not at all).
//!
//! Three decisions shape it.
//!
//! - **The runs hold their own slots.** qsem hands each slot's descriptor to
//!   its run and closes its own copy at once, so a slot frees the moment its
//!   run ends, and the next acquisition (which sleeps in the semaphore like
//!   any waiter) wakes. qsem never holds a slot itself, which is why `-o` is
//!   refused here: with it, a slot would wait for qsem to notice the run's end
//!   while qsem waits for a slot.
//! - **Output is relayed whole lines at a time.** Children writing straight
//!   to a shared stdout interleave within lines as soon as they write more
//!   than one block, or lines in pieces (stdio in a pipe flushes 4 KiB blocks,
//!   not lines). So each run's stdout and stderr are pipes that one relay
//!   thread reads, and it writes only complete lines, each batch in one
//!   `write(2)`, to qsem's own stdout and stderr. Lines of different runs never
//!   mix; a line longer than [`MAX_LINE`] is passed on in pieces; a last line
//!   without a newline is passed on when its run ends. The runs' stdin is
//!   /dev/null: qsem's stdin is the item list.
//! - **One thread reaps.** The relay thread also waits for the runs (through
//!   pidfds, so nothing polls), prints their report lines and folds their
//!   statuses. The main thread reads items, takes slots, spawns, and passes on
//!   signals; a pid is reaped only under the lock the main thread takes to
//!   signal it, so a signal can never reach a recycled pid.

use crate::config::{Command, Config, OnTimeout};
use crate::exit::Exit;
use crate::history;
use crate::report;
use crate::runner;
use crate::semaphore::{Acquired, Request, Semaphore};
use crate::signals::{FORWARDED, Received, Signals};
use crate::sys;
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::process::{Child, ChildStderr, ChildStdout, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest partial line kept back while waiting for its newline.
pub const MAX_LINE: usize = 1024 * 1024;

/// Signals a terminal sends to its whole foreground process group: when the
/// runs share qsem's group they have had these already.
const TERMINAL_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP];

/// Runs `cmd ITEM` for each item of stdin, under the semaphore.
pub fn run(cfg: &Config, cmd: &Command, separator: u8, sem: &mut dyn Semaphore) -> Result<Exit> {
    let program = runner::resolve_or_fail(cfg, cmd)?;
    let mut signals = Signals::install()?;
    let own_group = !sys::in_terminal_foreground();
    let mut relay = Relay::start(cfg.id.clone(), cfg.quiet)?;
    let mut items = Items::new(separator);
    let stdin = io::stdin();
    let mut stopped = None;
    'items: loop {
        while let Some(item) = items.next() {
            if let Some(r) = signals.take_stop() {
                pass_on(&relay, r.signo, None, own_group);
                stopped = Some(r.signo);
                break 'items;
            }
            let mut display = cmd.clone();
            display.args.push(item.clone());
            let request = Request {
                max_waiting: None,
                background: false,
                id: &cfg.id,
                jobs: cfg.jobs,
                deadline: cfg.wait.deadline(),
                command: &display.display(),
            };
            let mut entry = history::Entry::begin(cfg);
            let acquired = sem.acquire(&request, &mut signals)?;
            entry.waited(&acquired);
            let slot = match acquired {
                Acquired::Slot(slot) => Some(slot),
                Acquired::TimedOut | Acquired::Crowded => match cfg.on_timeout {
                    // The item is skipped, counted as if it had exited with
                    // the conflict code (0 by default: not at all).
                    OnTimeout::Exit(code) => {
                        entry.skipped(Exit::code(code));
                        relay.count(Exit::of_each_run(exit_status(code)));
                        continue;
                    }
                    OnTimeout::RunAnyway => None,
                },
                Acquired::Interrupted(r) => {
                    entry.skipped(Exit::signal(r.signo));
                    pass_on(&relay, r.signo, None, own_group);
                    stopped = Some(r.signo);
                    break 'items;
                }
            };
            let started = Instant::now();
            let spawned = runner::spawn(cfg, cmd, &program, slot.as_deref(), own_group, |c| {
                c.arg(&item)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            });
            match spawned {
                Ok(child) => {
                    let mut slot = slot;
                    if let Some(slot) = slot.as_mut() {
                        slot.started(child.id());
                    }
                    entry.started(child.id());
                    relay.add(child, display.display(), started, entry)?;
                    // The run holds the slot now; our copy must not outlive
                    // it, or the slot would free only when qsem ends.
                    drop(slot);
                }
                Err(e) => {
                    let exit = match e.kind() {
                        io::ErrorKind::NotFound => Exit::NOT_FOUND,
                        _ => Exit::NOT_EXECUTABLE,
                    };
                    let line = format!("{}: {e}", display.display());
                    entry.not_started(exit, &line);
                    report::line(&cfg.id, &line);
                    relay.count(exit);
                }
            }
        }
        if items.at_end() {
            break;
        }
        let ready = sys::poll_readable(&[signals.fd(), stdin.as_fd().as_raw_fd()], None)
            .context("cannot wait (poll)")?;
        if let Some(r) = signals.pending().into_iter().find(is_stop) {
            pass_on(&relay, r.signo, Some(r.from_kernel), own_group);
            stopped = Some(r.signo);
            break;
        }
        if ready.contains(&1) {
            items
                .fill(stdin.as_fd())
                .context("cannot read the items from stdin")?;
        }
    }
    // No more runs: wait for the last ones, still passing signals on.
    let done = relay.close()?;
    loop {
        for r in signals.pending().into_iter().filter(is_stop) {
            pass_on(&relay, r.signo, Some(r.from_kernel), own_group);
            stopped.get_or_insert(r.signo);
        }
        let ready = sys::poll_readable(&[signals.fd(), done.as_raw_fd()], None)
            .context("cannot wait (poll)")?;
        if ready.contains(&1) {
            break;
        }
    }
    let worst = relay.finish()?;
    Ok(stopped.map_or(worst, Exit::signal))
}

fn is_stop(r: &Received) -> bool {
    FORWARDED.contains(&r.signo)
}

/// Passes a signal on to the runs, unless they have had it already: when they
/// share qsem's process group (in a terminal's foreground), a signal the
/// terminal sent reached them too. Where the origin is unknown (the semaphore
/// reports only the number), the signals a terminal sends are assumed to come
/// from it.
fn pass_on(relay: &Relay, signo: libc::c_int, from_kernel: Option<bool>, own_group: bool) {
    let from_terminal = from_kernel.unwrap_or_else(|| TERMINAL_SIGNALS.contains(&signo));
    if own_group || !from_terminal {
        relay.forward(signo, own_group);
    }
}

/// The wait status of a process that exited with `code`.
fn exit_status(code: u8) -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    std::process::ExitStatus::from_raw(i32::from(code) << 8)
}

/// Splits stdin into items without ever blocking in `read` more than once:
/// the caller polls, then [`Items::fill`] reads what is there.
struct Items {
    separator: u8,
    buf: Vec<u8>,
    /// Where the next item starts in `buf`.
    start: usize,
    eof: bool,
}

impl Items {
    fn new(separator: u8) -> Items {
        Items {
            separator,
            buf: Vec::new(),
            start: 0,
            eof: false,
        }
    }

    fn fill(&mut self, fd: BorrowedFd) -> io::Result<()> {
        self.buf.drain(..self.start);
        self.start = 0;
        let mut chunk = [0u8; 64 * 1024];
        let n = sys::read(fd, &mut chunk)?;
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next complete item; empty items are skipped, as xargs skips blank lines.
    fn next(&mut self) -> Option<OsString> {
        loop {
            let rest = &self.buf[self.start..];
            let (len, used) = match rest.iter().position(|&b| b == self.separator) {
                Some(i) => (i, i + 1),
                None if self.eof && !rest.is_empty() => (rest.len(), rest.len()),
                None => return None,
            };
            let item = rest[..len].to_vec();
            self.start += used;
            if !item.is_empty() {
                return Some(OsString::from_vec(item));
            }
        }
    }

    fn at_end(&self) -> bool {
        self.eof && self.start == self.buf.len()
    }
}

/// What the main thread and the relay thread share.
#[derive(Default)]
struct Shared {
    /// Runs handed over and not yet picked up by the relay thread.
    new: Vec<Run>,
    /// Pids of runs not yet reaped, for passing signals on.
    live: Vec<libc::pid_t>,
    /// The graver of the outcomes so far.
    worst: Option<Exit>,
    /// No more runs will come.
    closed: bool,
}

/// One run, as the relay thread tends it.
struct Run {
    child: Child,
    display: String,
    started: Instant,
    /// Its journal record, written when it is reaped.
    entry: history::Entry,
    out: Option<Pipe<ChildStdout>>,
    err: Option<Pipe<ChildStderr>>,
    /// Readable once the run exits; `None` if pidfds are not available.
    pidfd: Option<OwnedFd>,
    reaped: bool,
}

impl Run {
    /// Passes on what its pipes hold now, without waiting for more; a pipe
    /// at EOF is closed.
    fn drain(&mut self) {
        loop {
            let out = self.out.as_mut().map(Pipe::pump);
            let err = self.err.as_mut().map(Pipe::pump);
            if out == Some(Pumped::Closed) {
                self.out = None;
            }
            if err == Some(Pumped::Closed) {
                self.err = None;
            }
            if out != Some(Pumped::Data) && err != Some(Pumped::Data) {
                break;
            }
        }
    }
}

/// What one read of a pipe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pumped {
    Data,
    Empty,
    Closed,
}

/// One of a run's output pipes, with its partial last line.
struct Pipe<P> {
    pipe: P,
    pending: Vec<u8>,
    to: RawFd,
}

impl<P: AsFd> Pipe<P> {
    fn new(pipe: P, to: RawFd) -> Pipe<P> {
        Pipe {
            pipe,
            pending: Vec::new(),
            to,
        }
    }

    /// Reads what is there (once) and passes on the complete lines; at EOF,
    /// passes on the rest too.
    fn pump(&mut self) -> Pumped {
        let mut chunk = [0u8; 64 * 1024];
        let n = match sys::read(self.pipe.as_fd(), &mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pumped::Empty,
            Err(_) => 0,
        };
        if n == 0 {
            self.emit(self.pending.len());
            return Pumped::Closed;
        }
        self.pending.extend_from_slice(&chunk[..n]);
        let whole = match self.pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if self.pending.len() >= MAX_LINE => self.pending.len(),
            None => 0,
        };
        self.emit(whole);
        Pumped::Data
    }

    fn emit(&mut self, len: usize) {
        if len == 0 {
            return;
        }
        let bytes: Vec<u8> = self.pending.drain(..len).collect();
        // SAFETY: `to` is 1 or 2, qsem's own stdout or stderr, which stay
        // open for the life of the process.
        let fd = unsafe { BorrowedFd::borrow_raw(self.to) };
        // A reader that went away (EPIPE) just does not want the output.
        let _ = sys::write_all(fd, &bytes);
    }
}

/// The relay thread's handle.
struct Relay {
    shared: Arc<Mutex<Shared>>,
    wake: OwnedFd,
    done: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(id: crate::id::Id, quiet: bool) -> Result<Relay> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (wake_read, wake) = sys::pipe().context("cannot create a pipe")?;
        let (done, done_write) = sys::pipe().context("cannot create a pipe")?;
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                tend(&theirs, &wake_read, &id, quiet);
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
        // A panic in the relay thread is a bug; its data is still consistent.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poke(&self) {
        let _ = sys::write_all(self.wake.as_fd(), b"x");
    }

    fn add(
        &self,
        mut child: Child,
        display: String,
        started: Instant,
        entry: history::Entry,
    ) -> Result<()> {
        let pid = child.id() as libc::pid_t;
        let out = child.stdout.take().map(|p| Pipe::new(p, 1));
        let err = child.stderr.take().map(|p| Pipe::new(p, 2));
        for fd in [
            out.as_ref().map(|p| p.pipe.as_fd()),
            err.as_ref().map(|p| p.pipe.as_fd()),
        ]
        .into_iter()
        .flatten()
        {
            sys::set_nonblocking(fd).context("cannot set up a pipe")?;
        }
        let run = Run {
            child,
            display,
            started,
            entry,
            out,
            err,
            pidfd: sys::pidfd_open(pid).ok(),
            reaped: false,
        };
        let mut shared = self.lock();
        shared.live.push(pid);
        shared.new.push(run);
        drop(shared);
        self.poke();
        Ok(())
    }

    fn count(&self, exit: Exit) {
        let mut shared = self.lock();
        shared.worst = Some(shared.worst.unwrap_or(Exit::OK).graver(exit));
    }

    /// Passes a signal on to every run still alive.
    fn forward(&self, signo: libc::c_int, own_group: bool) {
        let shared = self.lock();
        for &pid in &shared.live {
            if own_group {
                // SAFETY: no memory is passed; a failure means the group is gone.
                if unsafe { libc::kill(-pid, signo) } != 0 {
                    sys::kill(pid, signo);
                }
            } else {
                sys::kill(pid, signo);
            }
        }
    }

    /// No more runs; returns the descriptor that turns readable (EOF) when
    /// the last run has been reaped.
    fn close(&mut self) -> Result<OwnedFd> {
        self.lock().closed = true;
        self.poke();
        self.done.take().context("the relay was closed twice")
    }

    fn finish(mut self) -> Result<Exit> {
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the output relay thread failed"))?;
        }
        Ok(self.lock().worst.unwrap_or(Exit::OK))
    }
}

/// The relay thread: passes the runs' output on, reaps them, reports failures.
fn tend(shared: &Mutex<Shared>, wake: &OwnedFd, id: &crate::id::Id, quiet: bool) {
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let mut runs: Vec<Run> = Vec::new();
    loop {
        let closed = {
            let mut s = lock();
            runs.append(&mut s.new);
            s.closed
        };
        // Reap the runs that ended, under the lock, so that the main thread
        // never signals a pid that has been recycled.
        for run in runs.iter_mut().filter(|r| !r.reaped) {
            let mut s = lock();
            let Ok(Some(status)) = run.child.try_wait() else {
                continue;
            };
            run.reaped = true;
            let pid = run.child.id() as libc::pid_t;
            s.live.retain(|&p| p != pid);
            drop(s);
            // What it wrote before it ended comes before its report line.
            run.drain();
            let exit = Exit::of_each_run(status);
            let line = (!exit.is_success())
                .then(|| runner::describe(&run.display, status, run.started.elapsed()));
            run.entry.ended(status, line.as_deref());
            if let Some(line) = line.filter(|_| !quiet) {
                report::line(id, &line);
            }
            let mut s = lock();
            s.worst = Some(s.worst.unwrap_or(Exit::OK).graver(exit));
        }
        runs.retain(|r| !r.reaped || r.out.is_some() || r.err.is_some());
        if closed && runs.iter().all(|r| r.reaped) {
            // Whatever the runs wrote is in their pipes; a pipe still held
            // open by something they left behind is not waited for.
            for run in &mut runs {
                run.drain();
                for p in run.out.iter_mut() {
                    p.emit(p.pending.len());
                }
                for p in run.err.iter_mut() {
                    p.emit(p.pending.len());
                }
            }
            return;
        }
        // Sleep until a pipe has data, a run ends, or the main thread pokes.
        let mut fds = vec![wake.as_raw_fd()];
        let mut owners = vec![None];
        let mut fallback = false;
        for (i, run) in runs.iter().enumerate() {
            if let Some(p) = &run.out {
                fds.push(p.pipe.as_raw_fd());
                owners.push(Some((i, 0)));
            }
            if let Some(p) = &run.err {
                fds.push(p.pipe.as_raw_fd());
                owners.push(Some((i, 1)));
            }
            if !run.reaped {
                match &run.pidfd {
                    Some(fd) => {
                        fds.push(fd.as_raw_fd());
                        owners.push(Some((i, 2)));
                    }
                    None => fallback = true,
                }
            }
        }
        let until = fallback.then(|| Instant::now() + Duration::from_millis(50));
        let Ok(ready) = sys::poll_readable(&fds, until) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        for i in ready {
            match owners[i] {
                None => drain(wake),
                Some((r, 0)) => {
                    if runs[r].out.as_mut().map(Pipe::pump) == Some(Pumped::Closed) {
                        runs[r].out = None;
                    }
                }
                Some((r, 1)) => {
                    if runs[r].err.as_mut().map(Pipe::pump) == Some(Pumped::Closed) {
                        runs[r].err = None;
                    }
                }
                // A pidfd: the reaping pass at the top of the loop sees it.
                Some(_) => {}
            }
        }
    }
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 256];
    while matches!(sys::read(fd.as_fd(), &mut buf), Ok(1..)) {}
}

impl Drop for Relay {
    fn drop(&mut self) {
        // An error path: let the thread finish on its own once runs end.
        let mut s = self.lock();
        s.closed = true;
        drop(s);
        self.poke();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], separator: u8) -> Vec<String> {
        let mut items = Items::new(separator);
        items.buf = input.to_vec();
        items.eof = true;
        std::iter::from_fn(|| items.next())
            .map(|i| i.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn items() {
        assert_eq!(split(b"a\nb c\n", b'\n'), ["a", "b c"]);
        assert_eq!(split(b"a\n\n\nb", b'\n'), ["a", "b"]);
        assert_eq!(split(b"kept\r\n", b'\n'), ["kept\r"]);
        assert_eq!(split(b"a\nb\0c\r\0", b'\0'), ["a\nb", "c\r"]);
        assert_eq!(split(b"", b'\n'), Vec::<String>::new());
    }

    #[test]
    fn an_incomplete_item_waits_for_its_end() {
        let mut items = Items::new(b'\n');
        items.buf = b"one\ntw".to_vec();
        assert_eq!(items.next().unwrap(), "one");
        assert_eq!(items.next(), None);
        assert!(!items.at_end());
        items.eof = true;
        assert_eq!(items.next().unwrap(), "tw");
        assert!(items.at_end());
    }
}
