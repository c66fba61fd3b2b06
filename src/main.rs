//! qsem: run a command while holding one of N slots of a named semaphore.
//!
//! One invocation's path: `cli.rs` parses the command line and `config.rs`
//! validates it once into a [`config::Config`]; [`run`] opens the engine
//! (`semaphore::open`) and hands it to the mode's code (`runner.rs` for a
//! command, `each/` for `--each`, `background.rs` for `--bg` and
//! `--wait-all`, `status.rs` for `--status`), which acquires a slot, spawns
//! (`child.rs`), waits and reports (`report.rs`). Everything that ends qsem
//! early comes back here as one [`exit::Failure`], printed once.
//!
//! `main` is std's: its start-up keeps descriptors 0-2 open and SIGPIPE
//! ignored (so that a closed pipe is an error qsem reports), which qsem
//! relies on.

mod background;
mod child;
mod cli;
mod command;
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
use config::{Config, Mode};
use exit::{Exit, Failure};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let done = config::parse(std::env::args_os().collect())
        .and_then(|cfg| run(cfg).map_err(Failure::from));
    let exit = match done {
        Ok(exit) => exit,
        Err(Failure { exit, message }) if exit.is_success() => {
            // --help, --version: for a pager or a file.
            let _ = writeln!(std::io::stdout(), "{message}");
            exit
        }
        Err(Failure { exit, message }) => {
            report::say(&message);
            exit
        }
    };
    ExitCode::from(exit.as_u8())
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
    let open = || semaphore::open(&cfg.backend, &cfg.dir, cfg.verbose);
    match &cfg.mode {
        Mode::Status { only, json } => {
            let ids = semaphore::live(&cfg.backend, &cfg.dir, only.as_ref())?
                .unwrap_or_else(|| status::nobody(only.as_ref()));
            write_out(status::render(&ids, *json, std::time::SystemTime::now()).as_bytes())
        }
        Mode::Run(cmd) => runner::run(&cfg, cmd, open()?.as_mut(), None),
        Mode::Background(cmd) => background::launch(&cfg, cmd),
        Mode::Supervise { command, notify } => {
            background::supervise(&cfg, command, *notify, open()?.as_mut())
        }
        Mode::WaitAll => background::wait_all(&cfg, open()?.as_mut()),
        Mode::Each { command, separator } => each::run(&cfg, command, *separator, open()?.as_mut()),
        Mode::History { only, since, json } => {
            write_out(history::show(&cfg, only.as_ref(), *since, *json)?.as_bytes())
        }
        Mode::Metrics { only } => write_out(history::metrics(&cfg, only.as_ref())?.as_bytes()),
        Mode::Completions(shell) => {
            let mut cmd = cli::completion_command();
            // Into memory first: clap_complete panics on a write error.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "qsem", &mut script);
            write_out(&script)
        }
    }
}
