//! GNU sem's command line (qsem invoked as `sem`), turned into the same
//! [`Config`] qsem's own becomes.

use super::*;

impl Config {
    /// GNU sem's command line (qsem invoked as `sem`): background by default,
    /// `--wait` waits for all jobs, the command words are joined with spaces
    /// and run by /bin/sh, and a background job reads the caller's stdin.
    pub fn from_sem_cli(cli: SemCli) -> Result<Config> {
        let id = match &cli.id {
            Some(id) => Id::new(id).map_err(usage)?,
            None => default_sem_id(),
        };
        let jobs = match cli.jobs.as_deref().map(str::trim) {
            // GNU parallel's -j0: as many as possible.
            Some("0") => jobs::MAX_JOBS,
            Some(j) => jobs::parse_here(j).map_err(usage)?,
            None => 1,
        };
        // GNU sem exits 1 when a negative --st expires (and says so).
        let (wait, on_timeout) = match &cli.semaphore_timeout {
            Some(st) => parse_semaphore_timeout(st, 1)?,
            None => (Wait::Forever, OnTimeout::Exit(0)),
        };
        let mode = if cli.wait {
            if !cli.command.is_empty() {
                return Err(usage("--wait takes no command"));
            }
            Mode::WaitAll
        } else {
            let words: Vec<&OsStr> = cli.command.iter().map(OsString::as_os_str).collect();
            if words.is_empty() {
                return Err(usage("no command given"));
            }
            let command = Command::shell(words.join(OsStr::new(" ")), &[]);
            match (cli.fg, cli.bg_supervisor) {
                (true, _) => Mode::Run(command),
                (false, Some(notify)) => Mode::Supervise { command, notify },
                (false, None) => Mode::Background(command),
            }
        };
        Ok(Config {
            id,
            jobs,
            wait,
            on_timeout,
            quiet: false,
            verbose: false,
            close: false,
            bg_stdin: true,
            // GNU sem has no such options; the environment still chooses.
            dir: lock_dir(cli.dir)?,
            backend: parse_backend(std::env::var("QSEM_BACKEND").ok().as_deref(), None)?,
            on_lost: OnLost::Warn,
            timeout: None,
            kill_after: DEFAULT_KILL_AFTER,
            max_waiting: None,
            st_warning: cli.semaphore_timeout.is_some(),
            mode,
        })
    }
}

/// GNU sem's default id: the terminal on stdin (so that one shell's jobs
/// share a limit), else `default`.
fn default_sem_id() -> Id {
    use std::os::unix::ffi::OsStringExt;
    let name = rustix::termios::ttyname(rustix::stdio::stdin(), Vec::new())
        .map(|n| n.into_bytes())
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| b"default".to_vec());
    Id::new(&OsString::from_vec(name))
        .unwrap_or_else(|_| Id::new(OsStr::new("default")).expect("valid"))
}
