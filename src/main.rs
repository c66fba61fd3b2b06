//! qsem: run a command while holding one of N slots of a named semaphore.
//!
//! `main` is thin: `run()` does the work and returns the exit status it chose;
//! errors become one line of text here and nowhere else.

mod cli;
mod config;
mod duration;
mod exit;
mod id;
mod jobs;
mod report;
mod runner;
mod semaphore;
mod signals;
mod status;
mod sys;

use anyhow::Result;
use clap::{CommandFactory, Parser};
use config::{Config, Mode, UsageError};
use exit::{Exit, Failure};
use semaphore::Semaphore;
use semaphore::files::{Files, LockDir};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
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
    match run(cli) {
        Ok(exit) => exit.into(),
        Err(err) => {
            let exit = if let Some(usage) = err.downcast_ref::<UsageError>() {
                let hint = cli::Cli::command().render_usage();
                say(&format!(
                    "qsem: {usage}\n\n{hint}\n\nFor more information, try '--help'."
                ));
                Exit::USAGE
            } else if let Some(failure) = err.downcast_ref::<Failure>() {
                say(&failure.to_string());
                failure.exit
            } else {
                say(&format!("qsem: {err:#}"));
                Exit::OWN_FAILURE
            };
            exit.into()
        }
    }
}

/// Writes qsem's one error line. Unlike `eprintln!`, a closed or full stderr
/// is ignored: the exit status must still say what happened.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn run(cli: cli::Cli) -> Result<Exit> {
    let cfg = Config::from_cli(cli)?;
    match &cfg.mode {
        Mode::Status { only, json } => {
            let ids = if cfg.dir.exists() {
                let dir = LockDir::open(&cfg.dir, false)?;
                Files::new(dir, cfg.verbose).status(only.as_ref())?
            } else {
                Vec::new()
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
    }
}
