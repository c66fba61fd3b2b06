//! `--each`: xargs under the shared semaphore. Reads items from stdin (lines,
//! or NUL-separated with `-0`; `items.rs`), and for each one takes a slot of
//! the id, like any other qsem, and starts `COMMAND ARG... ITEM` holding it.
//! The item is one argument, never seen by a shell (with `-c STRING`, it is
//! `$1` of the script). Items are passed byte for byte; only empty ones are
//! skipped. Runs that fail are reported and counted; qsem carries on and
//! exits as xargs does: 0 all succeeded; 123 some exited 1-254 (or stdout
//! could not be written); 124 one exited 255; 125 one was killed by a
//! signal, stopped by `--timeout` (which sends one), or stdout was closed;
//! 126/127 as for one command. If `--wait` expires for an item (or
//! `--max-waiting` were waiting), the item is skipped and counted as a run
//! that exited with the `-E` code (by default: not at all).
//!
//! Three decisions shape it.
//!
//! - **The runs hold their own slots.** qsem hands each slot's descriptor to
//!   its run and closes its own copy at once, so a slot frees the moment its
//!   run ends, and the next acquisition (which sleeps in the semaphore like
//!   any waiter) wakes. qsem never holds a slot itself, which is why `-o` is
//!   refused here: with it, a slot would wait for qsem to notice the run's end
//!   while qsem waits for a slot.
//! - **Output is relayed whole lines at a time** (`relay.rs`). Children
//!   writing straight to a shared stdout interleave within lines as soon as
//!   they write more than one block. So each run's stdout and stderr are
//!   pipes that one relay thread reads, and it writes only complete lines to
//!   qsem's own. The runs' stdin is /dev/null: qsem's stdin is the item list.
//! - **One thread reaps.** The relay thread also waits for the runs, stops
//!   them at their timeout, prints their report lines and folds their
//!   statuses. The main thread reads items, takes slots, spawns, and passes on
//!   signals (exactly as a single command's are, `child.rs`); a pid is reaped
//!   only under the lock the main thread takes to signal it, so a signal can
//!   never reach a recycled pid.

mod items;
mod output;
mod relay;

use crate::child::{self, Target};
use crate::command::Command;
use crate::config::Config;
use crate::exit::Exit;
use crate::history::Entry;
use crate::report;
use crate::runner::{self, Taken};
use crate::semaphore::Semaphore;
use crate::signals::{Received, Signals, Wake};
use anyhow::{Context, Result};
use items::Items;
use relay::Relay;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};

/// Runs `cmd ITEM` for each item of stdin, under the semaphore.
pub fn run(cfg: &Config, cmd: &Command, separator: u8, sem: &mut dyn Semaphore) -> Result<Exit> {
    let program = runner::resolve_or_fail(cfg, cmd)?;
    let mut signals = Signals::install()?;
    let own_group = child::own_group();
    let mut relay = Relay::start(cfg)?;
    let how = How {
        cfg,
        cmd,
        program: &program,
        own_group,
    };
    let mut items = Items::new(separator);
    let stdin = std::io::stdin();
    let mut stopped: Option<Received> = None;
    'items: loop {
        while let Some(item) = items.next() {
            if relay.broken() {
                break 'items;
            }
            let mut display = cmd.clone();
            display.args.push(item.clone());
            let display = display.display();
            let mut entry = Entry::begin(cfg);
            let slot = match runner::take(cfg, sem, &mut signals, &display, false, &mut entry)? {
                Taken::Slot(slot) => Some(slot),
                Taken::Without => None,
                // The item is skipped, counted as if it had exited with
                // the conflict code (0 by default: not at all).
                Taken::Skipped(exit) => {
                    entry.skipped(exit);
                    let status = ExitStatus::from_raw(i32::from(exit.as_u8()) << 8);
                    relay.count(Exit::of_each_run(status));
                    continue;
                }
                Taken::Stopped(r) => {
                    entry.skipped(Exit::signal(r.signo));
                    stopped = Some(r);
                    break 'items;
                }
            };
            start(&how, item, display, slot, &relay, entry)?;
        }
        if items.at_end() {
            break;
        }
        match signals.wait(&[stdin.as_fd()], None)? {
            Wake::Signal(r) => {
                stopped = Some(r);
                break;
            }
            Wake::Ready(_) => items
                .fill(stdin.as_fd())
                .context("cannot read the items from stdin")?,
            Wake::Timeout => {}
        }
    }
    if let Some(r) = stopped {
        relay.forward(r);
    }
    let stopped = wait_for_the_last(relay.close()?, &relay, &mut signals)?.or(stopped);
    let worst = relay.finish()?;
    Ok(stopped.map_or(worst, |r| Exit::signal(r.signo)))
}

/// Waits until the last run has been reaped (`done` turns readable), still
/// passing signals on; returns the first signal that came meanwhile.
fn wait_for_the_last(
    done: std::os::fd::OwnedFd,
    relay: &Relay,
    signals: &mut Signals,
) -> Result<Option<Received>> {
    let mut first = None;
    loop {
        match signals.wait(&[done.as_fd()], None)? {
            Wake::Signal(r) => {
                relay.forward(r);
                first.get_or_insert(r);
            }
            Wake::Ready(_) => return Ok(first),
            Wake::Timeout => {}
        }
    }
}

/// Starts one run, holding `slot`, and hands it to the relay; a run that
/// cannot start is said and counted (126/127).
/// What every run shares: the configuration, the command, its program, and
/// whether runs get process groups of their own.
#[derive(Clone, Copy)]
struct How<'a> {
    cfg: &'a Config,
    cmd: &'a Command,
    program: &'a std::path::Path,
    own_group: bool,
}

fn start(
    how: &How,
    item: std::ffi::OsString,
    display: String,
    mut slot: Option<Box<dyn crate::semaphore::Slot>>,
    relay: &Relay,
    mut entry: Entry,
) -> Result<()> {
    let How {
        cfg,
        cmd,
        program,
        own_group,
    } = *how;
    let spawned = child::spawn(cfg, cmd, program, slot.as_deref(), own_group, |c| {
        c.arg(&item)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    });
    match spawned {
        Ok(child) => {
            entry.started(child.id());
            if let Some(slot) = slot.as_mut() {
                slot.started(child.id());
            }
            let target =
                Target::new(child.id(), own_group).context("the command has no valid pid")?;
            relay.add(child, target, display, cfg, entry)?;
            // The run holds the slot now; our copy must not outlive
            // it, or the slot would free only when qsem ends.
            drop(slot);
        }
        Err(e) => {
            let (exit, why) = child::spawn_failure(&cmd.program, &e);
            entry.not_started(exit, &why);
            report::line(&cfg.id, &why);
            relay.count(exit);
        }
    }
    Ok(())
}
