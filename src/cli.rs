//! The command line, and nothing but the command line: clap's derive
//! definition. Values stay raw strings here; `config.rs` validates them once.

use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # crontab: at most two imports at once; if none can start within 1s, quietly skip
  */1 * * * * qsem --id proc -j2 --wait 1s -- ImportProcess

  # a pipeline, one at a time, failing with 75 when busy; pipefail so that a
  # failed pg_dump fails the job (a pipeline's status is its last command's)
  qsem --id backup --wait 0 -E 75 -- bash -c 'set -o pipefail; pg_dump db | gzip > db.gz'

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
(default 0) if the wait expired; 2 for bad usage; 125 if qsem itself failed;
126/127 if the command cannot be run or is not found. --bg: 0 once the job has
started. --wait-all: 1 if background jobs failed since the last --wait-all.
--each, as xargs: 123 if a run exited 1-254, 124 if one exited 255, 125 if one
was killed by a signal. --backend with --on-lost=kill: 122 if the job's slot was
lost. Invoked as `sem`, qsem reads GNU sem's command lines. See qsem(1).";

/// Run a command while holding one of N slots of a named semaphore.
#[derive(Parser, Debug)]
#[command(
    name = "qsem",
    version,
    after_help = EXAMPLES,
    max_term_width = 100,
    override_usage = "qsem [OPTIONS] [--] COMMAND [ARG]...\n       qsem [OPTIONS] -c STRING\n       qsem [OPTIONS] --each [--] COMMAND [ARG]...\n       qsem --id ID --wait-all [--wait DUR]\n       qsem --status [--id ID] [--json]\n       qsem --history [--id ID] [--since DUR] [--json]\n       qsem --metrics"
)]
pub struct Cli {
    /// The semaphore's name: any non-empty string of up to 255 bytes [default: default]
    #[arg(long, value_name = "ID")]
    pub id: Option<OsString>,

    /// Number of slots: N, +K or -K (online CPUs plus or minus K), or P% of the CPUs
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

    /// Exit status when the wait expires
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
        conflicts_with = "command"
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

    /// With --status or --history: print one JSON document
    #[arg(long)]
    pub json: bool,

    /// Summarise the journal of ID or of every id: outcomes, wait and run times, last failure
    #[arg(long, conflicts_with_all = ["command", "shell_command", "status", "bg", "each", "wait_all"])]
    pub history: bool,

    /// With --history: only the invocations that started within DUR (24h; a week is 168h)
    #[arg(long, value_name = "DUR", requires = "history")]
    pub since: Option<String>,

    /// Print the journal and the live holders in Prometheus's text format, for node_exporter
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
pub fn invoked_as_sem() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
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
    #[arg(long, visible_alias = "semaphorename", value_name = "ID")]
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
    #[arg(short = 'u', long, alias = "line-buffer", hide = true)]
    pub ungroup: bool,

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
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_stop_at_the_command() {
        let cli = Cli::try_parse_from(["qsem", "-j2", "grep", "-v", "x", "file"]).unwrap();
        assert_eq!(cli.jobs.as_deref(), Some("2"));
        assert_eq!(cli.command, ["grep", "-v", "x", "file"]);
        let cli = Cli::try_parse_from(["qsem", "--", "-weird", "--id"]).unwrap();
        assert_eq!(cli.command, ["-weird", "--id"]);
    }

    #[test]
    fn value_forms() {
        for args in [
            &["qsem", "-j2", "true"][..],
            &["qsem", "-j", "2", "true"],
            &["qsem", "--jobs=2", "true"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.jobs.as_deref(), Some("2"), "{args:?}");
        }
        let cli = Cli::try_parse_from(["qsem", "-j", "-1", "--wait", "-3", "true"]).unwrap();
        assert_eq!(cli.jobs.as_deref(), Some("-1"));
        assert_eq!(cli.wait.as_deref(), Some("-3"));
        let cli = Cli::try_parse_from(["qsem", "--st", "-5", "true"]).unwrap();
        assert_eq!(cli.semaphore_timeout.as_deref(), Some("-5"));
    }

    #[test]
    fn pipeline_options() {
        let cli = Cli::try_parse_from(["qsem", "--id", "gz", "-j4", "--bg", "gzip", "a"]).unwrap();
        assert!(cli.bg);
        let cli =
            Cli::try_parse_from(["qsem", "--id", "gz", "--wait-all", "--wait", "1s"]).unwrap();
        assert!(cli.wait_all);
        let cli = Cli::try_parse_from(["qsem", "-0", "--each", "--", "gzip", "-9"]).unwrap();
        assert!(cli.each && cli.null);
        assert_eq!(cli.command, ["gzip", "-9"]);
        for bad in [
            &["qsem", "--wait-all", "true"][..],
            &["qsem", "--bg", "--each", "true"],
            &["qsem", "-0", "true"],
            &["qsem", "--each", "-o", "true"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn completions_offer_only_visible_options() {
        let cmd = completion_command();
        cmd.clone().debug_assert();
        let names: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        for want in ["bg", "wait-all", "each", "null", "jobs", "status"] {
            assert!(names.contains(&want), "{want}: {names:?}");
        }
        for hidden in ["bg-supervisor", "completions"] {
            assert!(!names.contains(&hidden), "{hidden}");
        }
    }

    #[test]
    fn sem_definition_is_consistent() {
        SemCli::command().debug_assert();
    }

    #[test]
    fn sem_command_lines() {
        let cli = SemCli::try_parse_from(["sem", "--id", "x", "-j4", "sleep", "1"]).unwrap();
        assert_eq!(cli.jobs.as_deref(), Some("4"));
        assert_eq!(cli.command, ["sleep", "1"]);
        for (args, jobs) in [
            (&["sem", "-j", "2", "true"][..], "2"),
            (&["sem", "--jobs", "+1", "true"], "+1"),
            (&["sem", "--jobs=-1", "true"], "-1"),
            (&["sem", "-j", "-1", "true"], "-1"),
            (&["sem", "-j50%", "true"], "50%"),
            (&["sem", "-P", "3", "true"], "3"),
        ] {
            let cli = SemCli::try_parse_from(args).unwrap();
            assert_eq!(cli.jobs.as_deref(), Some(jobs), "{args:?}");
        }
        let cli = SemCli::try_parse_from(["sem", "--semaphorename", "a", "--wait"]).unwrap();
        assert!(cli.wait);
        assert_eq!(cli.id.as_deref(), Some(std::ffi::OsStr::new("a")));
        let cli = SemCli::try_parse_from(["sem", "--st", "-2", "--fg", "echo", "-n", "x"]).unwrap();
        assert_eq!(cli.semaphore_timeout.as_deref(), Some("-2"));
        assert_eq!(cli.command, ["echo", "-n", "x"]);
        let cli = SemCli::try_parse_from(["sem", "--semaphoretimeout", "3", "true"]).unwrap();
        assert_eq!(cli.semaphore_timeout.as_deref(), Some("3"));
    }

    #[test]
    fn unknown_options_are_errors() {
        assert!(Cli::try_parse_from(["qsem", "--bogus", "true"]).is_err());
        assert!(Cli::try_parse_from(["qsem", "-c", "x", "true"]).is_err());
    }

    #[test]
    fn backend_options() {
        let cli = Cli::try_parse_from([
            "qsem",
            "--backend",
            "postgres://db/qsem",
            "--on-lost=kill",
            "--lost-after",
            "5s",
            "true",
        ])
        .unwrap();
        assert_eq!(cli.backend.as_deref(), Some("postgres://db/qsem"));
        assert_eq!(cli.on_lost.as_deref(), Some("kill"));
        assert_eq!(cli.lost_after.as_deref(), Some("5s"));
    }
}
