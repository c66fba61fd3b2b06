//! qsem: run a command while holding one of N slots of a named semaphore.
//!
//! `main` is thin: `run()` does the work and returns the exit status it chose;
//! errors become one line of text here and nowhere else.

mod background;
mod cli;
mod config;
mod duration;
mod each;
mod exit;
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
use config::{Config, Mode, UsageError};
use exit::{Exit, Failure};
use semaphore::Semaphore;
use semaphore::files::{Files, LockDir};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
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
            return ExitCode::from(if e.use_stderr() {
                Exit::USAGE.as_u8()
            } else {
                0
            });
        }
    };
    match cfg.and_then(run) {
        Ok(exit) => exit.into(),
        Err(err) => {
            let exit = if let Some(usage) = err.downcast_ref::<UsageError>() {
                let (name, hint) = if as_sem {
                    ("sem", cli::SemCli::command().render_usage())
                } else {
                    ("qsem", cli::Cli::command().render_usage())
                };
                eprintln!("{name}: {usage}\n\n{hint}\n\nFor more information, try '--help'.");
                Exit::USAGE
            } else if let Some(failure) = err.downcast_ref::<Failure>() {
                eprintln!("{failure}");
                failure.exit
            } else {
                eprintln!("qsem: {err:#}");
                Exit::OWN_FAILURE
            };
            exit.into()
        }
    }
}

fn run(cfg: Config) -> Result<Exit> {
    match &cfg.mode {
        Mode::Status { only, json } => {
            let ids = if cfg.dir.exists() {
                let dir = LockDir::open(&cfg.dir, false)?;
                Files::new(dir, cfg.verbose).status(only.as_ref())?
            } else {
                // No lock directory yet: nothing is held, nobody waits.
                only.iter()
                    .map(|id| semaphore::IdStatus {
                        id: id.clone(),
                        holders: Vec::new(),
                        waiting: 0,
                    })
                    .collect()
            };
            let now = std::time::SystemTime::now();
            let text = if *json {
                status::json(&ids, now)
            } else {
                status::table(&ids, now)
            };
            std::io::stdout().lock().write_all(text.as_bytes())?;
            Ok(Exit::OK)
        }
        Mode::Run(cmd) => {
            let dir = LockDir::open(&cfg.dir, true)?;
            let mut sem = Files::new(dir, cfg.verbose);
            runner::run(&cfg, cmd, &mut sem)
        }
        Mode::Background(cmd) => background::launch(&cfg, cmd),
        Mode::Supervise { command, notify } => {
            let notify = sys::adopt_inherited(*notify)
                .with_context(|| format!("--bg-supervisor: descriptor {notify}"))?;
            runner::run_detached(&cfg, command, &mut local_semaphore(&cfg)?, notify)
        }
        Mode::WaitAll => background::wait_all(&cfg, &mut local_semaphore(&cfg)?),
        Mode::Each { command, separator } => {
            each::run(&cfg, command, *separator, &mut local_semaphore(&cfg)?)
        }
        Mode::Completions(shell) => {
            let mut cmd = cli::completion_command();
            clap_complete::generate(*shell, &mut cmd, "qsem", &mut std::io::stdout());
            Ok(Exit::OK)
        }
    }
}

/// The lock-file engine for `cfg`'s lock directory.
fn local_semaphore(cfg: &Config) -> Result<Files> {
    let dir = LockDir::open(&cfg.dir, true)?;
    Ok(Files::new(dir, cfg.verbose))
}
