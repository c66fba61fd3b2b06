//! The validated configuration: every raw flag from `cli.rs` turned, once, into
//! the value the rest of qsem works with. Nothing after this file sees `"+2"` or
//! `"1s"`; everything here is checked, and a bad value is a usage error that
//! names it, rendered by clap with the usage of the personality in use
//! (`qsem` or `sem`): [`parse`] is the only way in, and its error is the
//! [`Failure`] `main` prints.

use crate::cli::{self, Cli, SemCli};
use crate::command::Command;
use crate::exit::{Exit, Failure};
use crate::id::Id;
use crate::{duration, jobs};
use anyhow::Result;
use clap::{CommandFactory, FromArgMatches};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

mod backend;
mod dir;
mod sem;
pub use backend::EtcdSettings;
use backend::parse_backend;
use dir::lock_dir;

/// Reads qsem's command line (`args`, argv[0] first) in the personality its
/// name chooses. Help and version come back as a [`Failure`] with status 0,
/// for stdout.
pub fn parse(args: Vec<OsString>) -> Result<Config, Failure> {
    let as_sem = cli::invoked_as_sem(args.first().map(OsString::as_os_str));
    let mut definition = if as_sem {
        SemCli::command()
    } else {
        Cli::command()
    };
    let name = definition.get_name().to_string();
    let rendered = |e: clap::Error| {
        let text = e.render().to_string();
        let text = text
            .strip_prefix("error: ")
            .map_or_else(|| text.clone(), |rest| format!("{name}: {rest}"));
        let exit = if e.use_stderr() {
            Exit::USAGE
        } else {
            Exit::OK
        };
        Failure {
            exit,
            message: text.trim_end().to_string(),
        }
    };
    let matches = definition
        .try_get_matches_from_mut(args)
        .map_err(rendered)?;
    let checked = if as_sem {
        SemCli::from_arg_matches(&matches).map(Config::from_sem_cli)
    } else {
        Cli::from_arg_matches(&matches).map(Config::from_cli)
    };
    match checked.map_err(rendered)? {
        Ok(cfg) => Ok(cfg),
        Err(e) => Err(match e.downcast::<UsageError>() {
            Ok(usage) => rendered(definition.error(clap::error::ErrorKind::ValueValidation, usage)),
            Err(e) => Failure::from(e),
        }),
    }
}

/// Bad usage: [`parse`] renders it with the usage hint; qsem exits 2.
#[derive(Debug)]
struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl fmt::Display) -> anyhow::Error {
    UsageError(msg.to_string()).into()
}

/// How long to wait for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Until a slot frees, however long that takes.
    Forever,
    /// At most this long; zero means one attempt.
    For(Duration),
}

impl Wait {
    /// The instant the wait ends, counted from now; `None` for ever.
    pub fn deadline(self) -> Option<std::time::Instant> {
        match self {
            Wait::Forever => None,
            // A wait too long for the clock is, in practice, for ever.
            Wait::For(d) => std::time::Instant::now().checked_add(d),
        }
    }
}

/// What to do when the wait for a slot expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// Exit with this status, silently.
    Exit(u8),
    /// Run the command anyway, without a slot (GNU sem's positive `--st`).
    RunAnyway,
}

/// Where the semaphore lives, with the settings of that engine alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Lock files in [`Config::dir`]: one machine, no server.
    Files,
    /// A PostgreSQL server shared by a fleet.
    Postgres {
        /// A `postgres://` or `postgresql://` URL, completed by the standard
        /// `PG*` variables.
        url: String,
        /// How soon a holder cut off from the server loses its slot (the
        /// server frees it, and the holder notices), at least 2s.
        lost_after: Duration,
    },
    /// An etcd cluster shared by a fleet (`etcd://h:p[,h:p…]`, `etcds://` for TLS).
    Etcd(EtcdSettings),
}

/// What a job whose shared-server slot is lost should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLost {
    /// Say so on stderr and let the job run on (the default).
    Warn,
    /// Say so, stop the job (SIGTERM, then SIGKILL) and exit with `Exit::SLOT_LOST`.
    Kill,
}

/// The default bound for a cut-off holder to lose its slot.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(30);

/// Everything a run of qsem needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The semaphore's name.
    pub id: Id,
    /// Slots of the id this invocation may count on (its admission limit).
    pub jobs: u32,
    /// How long to wait for a slot.
    pub wait: Wait,
    /// What happens when the wait expires.
    pub on_timeout: OnTimeout,
    /// No report line for a failed command.
    pub quiet: bool,
    /// Progress lines on stderr.
    pub verbose: bool,
    /// The slot stays with qsem; the command does not inherit it.
    pub close: bool,
    /// A `--bg` job reads the caller's stdin (GNU sem) rather than /dev/null.
    pub bg_stdin: bool,
    /// What to do.
    pub mode: Mode,
    /// The lock directory: this host's state on every engine (the lock
    /// files themselves, the local queue in front of a shared server, the
    /// journal).
    pub dir: PathBuf,
    /// Lock files, or a shared server.
    pub backend: Backend,
    /// With a shared server: what to do with a job whose slot is lost.
    pub on_lost: OnLost,
    /// `--timeout`: how long the job may run before qsem stops it.
    pub timeout: Option<Duration>,
    /// `--kill-after`: how long a timed-out job has between SIGTERM and SIGKILL.
    pub kill_after: Duration,
    /// `--max-waiting`: give up at once if this many already wait for the id.
    pub max_waiting: Option<u32>,
    /// GNU sem's `--st`: an expired wait says so on stderr, as GNU sem does.
    pub st_warning: bool,
}

/// `--kill-after`'s default, as timeout(1) users expect of a grace period.
pub const DEFAULT_KILL_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub enum Mode {
    /// Run a command under a slot.
    Run(Command),
    /// Print holders and waiters, of one id or of all.
    Status { only: Option<Id>, json: bool },
    /// `--bg`: start a detached supervisor that takes the slot and runs the
    /// command; return once it has the slot.
    Background(Command),
    /// The supervisor of a `--bg` job: run the command like [`Mode::Run`],
    /// writing to `notify` once the slot is taken, and record a failure.
    Supervise { command: Command, notify: RawFd },
    /// `--wait-all`: wait until the id is idle, then count failed jobs.
    WaitAll,
    /// `--each`: run the command once per item of stdin.
    Each { command: Command, separator: u8 },
    /// `--history`: summarise the journal, of one id or of all, optionally
    /// only the invocations that started within `since`.
    History {
        only: Option<Id>,
        since: Option<Duration>,
        json: bool,
    },
    /// `--metrics`: the journal and the live holders, of one id or of all,
    /// as Prometheus text.
    Metrics { only: Option<Id> },
    /// Print a shell completion script.
    Completions(clap_complete::Shell),
}

impl Config {
    pub fn from_cli(mut cli: Cli) -> Result<Config> {
        let id = Id::new(cli.id.as_deref().unwrap_or(OsStr::new("default"))).map_err(usage)?;
        let jobs = match &cli.jobs {
            Some(j) => jobs::parse_here(j).map_err(usage)?,
            None => 1,
        };
        let conflict = match &cli.conflict_exit_code {
            Some(e) => parse_exit_code(e)?,
            None => 0,
        };
        let (wait, on_timeout) = match (&cli.wait, &cli.semaphore_timeout) {
            (Some(w), _) => (
                Wait::For(duration::parse(w).map_err(usage)?),
                OnTimeout::Exit(conflict),
            ),
            (None, Some(st)) => parse_semaphore_timeout(st, conflict)?,
            (None, None) => (Wait::Forever, OnTimeout::Exit(conflict)),
        };
        let mode = mode(&id, &mut cli)?;
        if cli.json && !matches!(mode, Mode::Status { .. } | Mode::History { .. }) {
            return Err(usage("--json goes with --status or --history"));
        }
        let dir = lock_dir(cli.dir.take())?;
        let mut backend = parse_backend(cli.backend.as_deref(), cli.lost_after.as_deref())?;
        let on_lost = match cli.on_lost.as_deref() {
            None | Some("warn") => OnLost::Warn,
            Some("kill") => OnLost::Kill,
            Some(other) => {
                return Err(usage(format!(
                    "invalid --on-lost '{other}': expected warn or kill"
                )));
            }
        };
        if let Backend::Etcd(etcd) = &mut backend {
            etcd.kill_on_lost = on_lost == OnLost::Kill;
        }
        let (timeout, kill_after, max_waiting) = limits(&cli)?;
        Ok(Config {
            dir,
            backend,
            on_lost,
            timeout,
            kill_after,
            max_waiting,
            st_warning: false,
            id,
            jobs,
            wait,
            on_timeout,
            quiet: cli.quiet,
            verbose: cli.verbose,
            close: cli.close,
            bg_stdin: false,
            mode,
        })
    }
}

/// What to do, from the mode flags (`--status`, `--each`, `--bg`, …).
fn mode(id: &Id, cli: &mut Cli) -> Result<Mode> {
    Ok(if let Some(shell) = cli.completions {
        Mode::Completions(shell)
    } else if cli.status {
        Mode::Status {
            only: cli.id.is_some().then(|| id.clone()),
            json: cli.json,
        }
    } else if cli.history {
        let since = cli.since.as_deref().map(duration::parse).transpose();
        Mode::History {
            only: cli.id.is_some().then(|| id.clone()),
            since: since.map_err(|e| usage(format!("--since: {e}")))?,
            json: cli.json,
        }
    } else if cli.metrics {
        Mode::Metrics {
            only: cli.id.is_some().then(|| id.clone()),
        }
    } else if cli.wait_all {
        Mode::WaitAll
    } else {
        let command = match cli.shell_command.take() {
            // With --each the item becomes $1 of the script.
            Some(script) if cli.each => Command::shell(script, &["sh"]),
            Some(script) => Command::shell(script, &[]),
            None => command_from_words(std::mem::take(&mut cli.command))?,
        };
        match (cli.each, cli.bg, cli.bg_supervisor) {
            (true, _, _) => Mode::Each {
                command,
                separator: if cli.null { b'\0' } else { b'\n' },
            },
            (false, true, Some(notify)) => Mode::Supervise { command, notify },
            (false, true, None) => Mode::Background(command),
            (false, false, _) => Mode::Run(command),
        }
    })
}

/// `--timeout`, `--kill-after` and `--max-waiting`.
fn limits(cli: &Cli) -> Result<(Option<Duration>, Duration, Option<u32>)> {
    let timeout = cli
        .timeout
        .as_deref()
        .map(|t| positive("--timeout", t))
        .transpose()?;
    let kill_after = match cli.kill_after.as_deref() {
        Some(k) => positive("--kill-after", k)?,
        None => DEFAULT_KILL_AFTER,
    };
    let max_waiting = match cli.max_waiting.as_deref() {
        Some(k) => Some(k.trim().parse::<u32>().map_err(|_| {
            usage(format!(
                "invalid --max-waiting '{k}': expected a number of waiters, 0 or more"
            ))
        })?),
        None => None,
    };
    Ok((timeout, kill_after, max_waiting))
}

fn command_from_words(words: Vec<OsString>) -> Result<Command> {
    let mut words = words.into_iter();
    let program = words
        .next()
        .ok_or_else(|| usage("no command given (use -- COMMAND [ARG...] or -c STRING)"))?;
    if program.is_empty() {
        return Err(usage("the command is an empty string"));
    }
    Ok(Command {
        program,
        args: words.collect(),
    })
}

/// A duration option that must be more than zero (`--timeout 0` would stop
/// every job before it starts).
fn positive(option: &str, given: &str) -> Result<Duration> {
    let d = duration::parse(given).map_err(|e| usage(format!("invalid {option}: {e}")))?;
    if d.is_zero() {
        return Err(usage(format!(
            "invalid {option} '{given}': must be more than 0"
        )));
    }
    Ok(d)
}

fn parse_exit_code(s: &str) -> Result<u8> {
    s.trim().parse::<u8>().map_err(|_| {
        usage(format!(
            "invalid conflict exit code '{s}': expected 0 to 255"
        ))
    })
}

/// GNU sem's `--st SECS`: negative gives up after SECS, positive runs anyway.
fn parse_semaphore_timeout(s: &str, conflict: u8) -> Result<(Wait, OnTimeout)> {
    let t = s.trim();
    let (give_up, magnitude) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let d = duration::parse(magnitude)
        .map_err(|e| usage(format!("invalid --semaphore-timeout '{s}': {e}")))?;
    Ok(if give_up {
        (Wait::For(d), OnTimeout::Exit(conflict))
    } else {
        (Wait::For(d), OnTimeout::RunAnyway)
    })
}

#[cfg(test)]
#[path = "config/tests.rs"]
mod tests;
