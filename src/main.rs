//! qsem: run a command while holding one of N slots of a named semaphore.
//!
//! `main` is thin: `run()` does the work and returns the exit status it chose;
//! errors become one line of text here and nowhere else.
//!
//! qsem starts at the C `main`, not at std's: std's start-up reads all of
//! /proc/self/maps to place a guard for the main thread's stack and sets up
//! a stack-overflow handler, about a tenth of an uncontended job's CPU time
//! (bench/RESULTS.md), for a diagnostic qsem does not need. What qsem does need
//! of that start-up, [`sys::startup`] does.

#![cfg_attr(not(test), no_main)]

mod background;
mod cli;
mod config;
mod duration;
mod each;
mod exit;
mod history;
mod id;
mod jobs;
mod report;
mod runner;
mod semaphore;
mod signals;
mod status;
mod sys;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use config::{Backend, Config, Mode, UsageError};
use exit::{Exit, Failure};
use std::io::Write;

/// The program's entry point, called by the C runtime (see above).
#[cfg(not(test))]
#[unsafe(no_mangle)]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    sys::startup();
    let status = qsem();
    // std's start-up would have flushed stdout on return.
    let _ = std::io::stdout().flush();
    status.into()
}

/// Under `cargo test` the harness has the entry point; this one keeps the
/// code it calls checked as it is in the program.
#[cfg(test)]
fn main() {
    sys::startup();
    std::process::exit(qsem().into());
}

/// Parses the command line, runs, and says what went wrong; returns the exit status.
fn qsem() -> u8 {
    let as_sem = cli::invoked_as_sem();
    let parsed = if as_sem {
        cli::SemCli::try_parse().map(Config::from_sem_cli)
    } else {
        cli::Cli::try_parse().map(Config::from_cli)
    };
    let cfg = match parsed {
        Ok(cfg) => cfg,
        Err(e) => {
            // clap prints help and version to stdout (status 0), usage errors
            // with their hint to stderr (status 2).
            let _ = e.print();
            return if e.use_stderr() {
                Exit::USAGE.as_u8()
            } else {
                0
            };
        }
    };
    match cfg.and_then(run) {
        Ok(exit) => exit.as_u8(),
        Err(err) => {
            let exit = if let Some(usage) = err.downcast_ref::<UsageError>() {
                let (name, hint) = if as_sem {
                    ("sem", cli::SemCli::command().render_usage())
                } else {
                    ("qsem", cli::Cli::command().render_usage())
                };
                say(&format!(
                    "{name}: {usage}\n\n{hint}\n\nFor more information, try '--help'."
                ));
                Exit::USAGE
            } else if let Some(failure) = err.downcast_ref::<Failure>() {
                say(&failure.to_string());
                failure.exit
            } else {
                say(&format!("qsem: {err:#}"));
                Exit::OWN_FAILURE
            };
            exit.as_u8()
        }
    }
}

/// Writes qsem's one error line. Unlike `eprintln!`, a closed or full stderr
/// is ignored: the exit status must still say what happened.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn print_status(ids: Vec<semaphore::IdStatus>, json: bool) -> Result<Exit> {
    let now = std::time::SystemTime::now();
    let text = if json {
        status::json(&ids, now)
    } else {
        status::table(&ids, now)
    };
    write_out(text.as_bytes())
}

/// Writes all of `bytes` to stdout; a reader that went away is no error.
fn write_out(bytes: &[u8]) -> Result<Exit> {
    match std::io::stdout().lock().write_all(bytes) {
        // `qsem --status | head`: the reader has all it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Exit::OK),
        other => other
            .map(|()| Exit::OK)
            .context("cannot write to standard output"),
    }
}

fn run(cfg: Config) -> Result<Exit> {
    match &cfg.mode {
        Mode::Status { only, json } => {
            let ids = if cfg.backend == Backend::Files && !cfg.dir.exists() {
                // No lock directory yet: nothing is held, nobody waits.
                only.iter()
                    .map(|id| semaphore::IdStatus {
                        id: id.clone(),
                        holders: Vec::new(),
                        waiting: 0,
                    })
                    .collect()
            } else {
                semaphore::open(&cfg.backend, &cfg.dir, cfg.verbose)?.status(only.as_ref())?
            };
            print_status(ids, *json)
        }
        Mode::Run(cmd) => runner::run(
            &cfg,
            cmd,
            semaphore::open(&cfg.backend, &cfg.dir, cfg.verbose)?.as_mut(),
        ),
        Mode::Background(cmd) => background::launch(&cfg, cmd),
        Mode::Supervise { command, notify } => {
            let notify = sys::adopt_inherited(*notify)
                .with_context(|| format!("--bg-supervisor: descriptor {notify}"))?;
            runner::run_detached(
                &cfg,
                command,
                semaphore::open(&cfg.backend, &cfg.dir, cfg.verbose)?.as_mut(),
                notify,
            )
        }
        Mode::WaitAll => background::wait_all(
            &cfg,
            semaphore::open(&cfg.backend, &cfg.dir, cfg.verbose)?.as_mut(),
        ),
        Mode::Each { command, separator } => each::run(
            &cfg,
            command,
            *separator,
            semaphore::open(&cfg.backend, &cfg.dir, cfg.verbose)?.as_mut(),
        ),
        Mode::History { only, since, json } => {
            write_out(history::show(&cfg, only.as_ref(), *since, *json)?.as_bytes())
        }
        Mode::Metrics => write_out(history::metrics(&cfg)?.as_bytes()),
        Mode::Completions(shell) => {
            let mut cmd = cli::completion_command();
            // Into memory first: clap_complete panics on a write error.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "qsem", &mut script);
            write_out(&script)
        }
    }
}
