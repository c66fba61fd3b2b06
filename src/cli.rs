//! The command line, and nothing but the command line: clap's derive
//! definition. Values stay raw strings here; `config.rs` validates them once.

use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # crontab: at most two imports at once; if none can start within 1s, quietly skip
  */1 * * * * qsem --id proc -j2 --wait 1s -- ImportProcess

  # a shell script, one at a time, exiting 75 when busy; fails loudly if pg_dump does
  qsem --id backup --wait 0 -E 75 -c 'pg_dump db > db.sql && gzip -f db.sql'

  # an hourly job that may run at most 50 minutes, with at most one run queued
  0 * * * * qsem --id rollup --timeout 50m --max-waiting 1 -- rollup

  # as many jobs as there are CPUs, minus one
  qsem --id encode -j-1 -- ffmpeg -i in.mkv out.mp4

  # a pipeline: four gzips at a time, then wait for all and learn of failures
  for f in *.log; do qsem --id gz -j4 --bg -- gzip \"$f\"; done
  qsem --id gz --wait-all

  # the same, one run per line of stdin, exiting as xargs does
  find . -name '*.log' | qsem --id gz -j4 --each -- gzip

  # who holds which slot, and who waits
  qsem --status
  qsem --status --id proc --json

  # how often proc ran, waited, failed or was skipped today; Prometheus text
  qsem --history --id proc --since 24h
  d=/var/lib/prometheus/node-exporter; qsem --metrics > $d/qsem.prom.tmp && mv $d/qsem.prom.tmp $d/qsem.prom

In a crontab, set PATH (cron's is /usr/bin:/bin) and use foreground lines:
what a --bg job prints after the line returns never reaches cron's mail.

Exit status: the command's own; 128+N if it was killed by signal N; the -E value
(default 0) if the wait expired or --max-waiting were waiting; 124 if --timeout
stopped the command; 2 for bad usage; 125 if qsem itself failed;
126/127 if the command cannot be run or is not found. --bg: 0 once the job has
started. --wait-all: 1 if background jobs failed since the last --wait-all.
--each, as xargs: 123 if a run exited 1-254, 124 if one exited 255, 125 if one
was killed by a signal or timed out. --backend with --on-lost=kill: 122 if the job's slot was
lost. Invoked as `sem`, qsem reads GNU sem's command lines. See qsem(1).";

/// Run a command while holding one of N slots of a named semaphore.
#[derive(Parser, Debug)]
#[command(
    name = "qsem",
    version,
    after_help = EXAMPLES,
    max_term_width = 100,
    override_usage = "qsem [OPTIONS] [--] COMMAND [ARG]...\n       qsem [OPTIONS] -c STRING\n       qsem [OPTIONS] --each [--] COMMAND [ARG]...\n       qsem --id ID --wait-all [--wait DUR]\n       qsem --status [--id ID] [--json]\n       qsem --history [--id ID] [--since DUR] [--json]\n       qsem --metrics [--id ID]"
)]
pub struct Cli {
    /// The semaphore's name: any non-empty string of up to 255 bytes [default: default]
    #[arg(long, value_name = "ID", allow_hyphen_values = true)]
    pub id: Option<OsString>,

    /// Number of slots: N, +K or -K (online CPUs plus or minus K), or P% of the CPUs [default: 1]
    #[arg(
        short = 'j',
        long = "jobs",
        value_name = "N",
        allow_hyphen_values = true
    )]
    pub jobs: Option<String>,

    /// Longest time to wait for a slot (250ms, 1s, 2m, 1h, seconds); 0 tries once [default: for ever]
    #[arg(short = 'w', long, value_name = "DUR", allow_hyphen_values = true)]
    pub wait: Option<String>,

    /// Exit status when the wait expires (or --max-waiting are waiting) [default: 0]
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "N",
        allow_hyphen_values = true
    )]
    pub conflict_exit_code: Option<String>,

    /// Run STRING with /bin/sh -c instead of COMMAND
    #[arg(
        short = 'c',
        long = "command",
        value_name = "STRING",
        conflicts_with = "command",
        allow_hyphen_values = true
    )]
    pub shell_command: Option<OsString>,

    /// Hold the slot in qsem alone: the command and what it starts do not inherit it
    #[arg(short = 'o', long)]
    pub close: bool,

    /// Run in the foreground (the default; accepted for GNU sem compatibility)
    #[arg(long)]
    pub fg: bool,

    /// List who holds which slot and who waits, of ID or of every id; takes no slot
    #[arg(long, conflicts_with_all = ["command", "shell_command"])]
    pub status: bool,

    /// Take a slot, then leave the command running in the background and return 0
    #[arg(long, conflicts_with_all = ["fg", "status", "each", "wait_all"])]
    pub bg: bool,

    /// Wait until no slot of ID is held and nobody waits; exit 1 if background jobs failed
    #[arg(long, conflicts_with_all = ["command", "shell_command", "status", "each"])]
    pub wait_all: bool,

    /// Run the command once per line of stdin, the line appended as one argument
    #[arg(long, conflicts_with_all = ["status", "close"])]
    pub each: bool,

    /// With --each: items are separated by NUL bytes, not newlines (find -print0)
    #[arg(short = '0', long, requires = "each")]
    pub null: bool,

    /// Internal: run as the detached supervisor of a --bg job, telling the
    /// launcher on descriptor FD when the slot is taken
    #[arg(long, hide = true, value_name = "FD", requires = "bg")]
    pub bg_supervisor: Option<i32>,

    /// Print a completion script for bash, zsh or fish
    #[arg(long, hide = true, value_name = "SHELL")]
    pub completions: Option<clap_complete::Shell>,

    /// Longest time the command may run: then SIGTERM to its process group, SIGKILL
    /// --kill-after later; exit 124 (e.g. 30s, 50m, 2h)
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,

    /// With --timeout: how long after SIGTERM to send SIGKILL [default: 10s]
    #[arg(long = "kill-after", value_name = "DUR", requires = "timeout")]
    pub kill_after: Option<String>,

    /// If K invocations already wait for the id, give up at once as an expired
    /// wait does (0: run now or never) [default: no limit]
    #[arg(long = "max-waiting", value_name = "K")]
    pub max_waiting: Option<String>,

    /// With --status or --history: print one JSON document
    #[arg(long)]
    pub json: bool,

    /// Summarise the journal of ID or of every id: outcomes, wait and run times, last failure
    #[arg(long, conflicts_with_all = ["command", "shell_command", "status", "bg", "each", "wait_all"])]
    pub history: bool,

    /// With --history: only the invocations that started within DUR (24h; a week is 168h)
    #[arg(long, value_name = "DUR", requires = "history")]
    pub since: Option<String>,

    /// Print the journal and the live holders, of ID or of every id, in Prometheus's text format
    #[arg(long, conflicts_with_all = ["command", "shell_command", "status", "bg", "each", "wait_all", "history", "json"])]
    pub metrics: bool,

    /// Lock directory [default: $XDG_STATE_HOME/qsem or ~/.local/state/qsem]
    #[arg(long, value_name = "DIR", env = "QSEM_DIR")]
    pub dir: Option<PathBuf>,

    /// No report line when the command fails
    #[arg(short = 'q', long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Say on stderr when waiting starts, when a slot is taken, when the wait expires
    #[arg(short = 'v', long)]
    pub verbose: bool,

    /// GNU sem: negative SECS gives up after SECS; positive runs anyway, without a slot, after SECS
    #[arg(
        long = "semaphore-timeout",
        visible_alias = "st",
        value_name = "SECS",
        allow_hyphen_values = true,
        conflicts_with = "wait"
    )]
    pub semaphore_timeout: Option<String>,

    /// A shared server instead of lock files: postgres://[USER[:PASSWORD]@]HOST[:PORT]/DB[?sslmode=...]
    /// or etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)
    // The URL may hold a password: --help must not show the variable's value.
    #[arg(long, value_name = "URL", env = "QSEM_BACKEND", hide_env_values = true)]
    pub backend: Option<String>,

    /// With --backend, when the job's slot is lost: warn (let the job run on) or kill it [default: warn]
    #[arg(long = "on-lost", value_name = "WHAT")]
    pub on_lost: Option<String>,

    /// With --backend, how soon a holder cut off from the server loses its slot [default: 30s]
    #[arg(long = "lost-after", value_name = "DUR", env = "QSEM_LOST_AFTER")]
    pub lost_after: Option<String>,

    /// The command and its arguments; options end at the first word that is not one
    #[arg(value_name = "COMMAND", trailing_var_arg = true)]
    pub command: Vec<OsString>,
}

/// The definition that shell completions are generated from: the visible
/// options only (clap_complete would offer hidden ones too).
pub fn completion_command() -> clap::Command {
    use clap::CommandFactory;
    let full = Cli::command();
    let visible: Vec<clap::Arg> = full
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new("qsem")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .args(visible)
}

const SEM_EXAMPLES: &str = "\
Examples:
  # at most two of these at once; each call returns as soon as its job has started
  sem --id proc -j2 ImportProcess
  # wait until every job of the id has ended (exit 1 if any failed)
  sem --id proc --wait
  # in the foreground, with the job's exit status (a failed pg_dump fails it)
  sem --fg --id backup 'pg_dump db > db.sql && gzip -f db.sql'

This is qsem's GNU sem personality (qsem invoked as `sem`). Not for crontabs:
what a background job prints after the line returns is lost to cron's mail;
use qsem in the foreground there. See qsem(1).";

/// Whether qsem was invoked as `sem` (a symlink), and so reads GNU sem's
/// command lines.
pub fn invoked_as_sem(arg0: Option<&std::ffi::OsStr>) -> bool {
    arg0.map(std::path::Path::new)
        .is_some_and(|p| p.file_name().is_some_and(|n| n == "sem"))
}

/// GNU sem's command line, as qsem understands it when invoked as `sem`.
#[derive(Parser, Debug)]
#[command(
    name = "sem",
    about = "Run a command while holding one of N slots of a named semaphore (qsem as GNU sem)",
    version,
    after_help = SEM_EXAMPLES,
    max_term_width = 100,
    override_usage = "sem [--fg] [--id ID] [-j N] [--st SECS] COMMAND [ARG]...\n       sem [--id ID] --wait"
)]
pub struct SemCli {
    /// The semaphore's name [default: the terminal on stdin, else default]
    #[arg(
        long,
        visible_alias = "semaphorename",
        value_name = "ID",
        allow_hyphen_values = true
    )]
    pub id: Option<OsString>,

    /// Number of slots: N, +K or -K (online CPUs plus or minus K), P% of the CPUs; 0 is no limit
    #[arg(
        short = 'j',
        long = "jobs",
        visible_alias = "max-procs",
        short_alias = 'P',
        value_name = "N",
        allow_hyphen_values = true
    )]
    pub jobs: Option<String>,

    /// Run in the foreground, exiting with the command's status
    #[arg(long, conflicts_with = "bg")]
    pub fg: bool,

    /// Run in the background (the default)
    #[arg(long)]
    pub bg: bool,

    /// Wait until no job of the id runs; exit 1 if background jobs failed
    #[arg(long, conflicts_with_all = ["fg", "bg"])]
    pub wait: bool,

    /// Negative SECS: give up after SECS; positive: run anyway, without a slot, after SECS
    #[arg(
        long = "semaphoretimeout",
        visible_aliases = ["st", "semaphore-timeout"],
        value_name = "SECS",
        allow_hyphen_values = true
    )]
    pub semaphore_timeout: Option<String>,

    /// Accepted for GNU parallel compatibility (`parallel --semaphore` is sem)
    #[arg(long, hide = true)]
    pub semaphore: bool,

    /// Accepted for GNU parallel compatibility: output is never grouped
    #[arg(short = 'u', long, aliases = ["line-buffer", "lb"], hide = true)]
    pub ungroup: bool,

    /// Accepted for GNU parallel compatibility: the citation notice is never shown
    #[arg(long = "will-cite", alias = "bibtex", hide = true)]
    pub will_cite: bool,

    /// Lock directory [default: $XDG_STATE_HOME/qsem or ~/.local/state/qsem]
    #[arg(long, value_name = "DIR", env = "QSEM_DIR")]
    pub dir: Option<PathBuf>,

    /// Internal: as qsem's --bg-supervisor
    #[arg(long, hide = true, value_name = "FD")]
    pub bg_supervisor: Option<i32>,

    /// The command; its words are joined with spaces and run by /bin/sh
    #[arg(value_name = "COMMAND", trailing_var_arg = true)]
    pub command: Vec<OsString>,
}

#[cfg(test)]
#[path = "cli/tests.rs"]
mod tests;
