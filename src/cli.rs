//! The command line, and nothing but the command line: clap's derive
//! definition. Values stay raw strings here; `config.rs` validates them once.

use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # crontab: at most two imports at once; if none can start within 1s, quietly skip
  */1 * * * * qsem --id proc -j2 --wait 1s -- ImportProcess

  # a shell pipeline through /bin/sh, one at a time, failing with 75 when busy
  qsem --id backup --wait 0 -E 75 -c 'pg_dump db | gzip > db.gz'

  # as many jobs as there are CPUs, minus one
  qsem --id encode -j-1 -- ffmpeg -i in.mkv out.mp4

  # who holds which slot, and who waits
  qsem --status
  qsem --status --id proc --json

Exit status: the command's own; 128+N if it was killed by signal N; the -E value
(default 0) if the wait expired; 2 for bad usage; 125 if qsem itself failed;
126/127 if the command cannot be run or is not found. See qsem(1).";

/// Run a command while holding one of N slots of a named semaphore.
#[derive(Parser, Debug)]
#[command(
    name = "qsem",
    version,
    after_help = EXAMPLES,
    max_term_width = 100,
    override_usage = "qsem [OPTIONS] [--] COMMAND [ARG]...\n       qsem [OPTIONS] -c STRING\n       qsem --status [--id ID] [--json]"
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

    /// With --status: print one JSON document
    #[arg(long, requires = "status")]
    pub json: bool,

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
