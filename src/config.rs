//! The validated configuration: every raw flag from `cli.rs` turned, once, into
//! the value the rest of qsem works with. Nothing after this file sees `"+2"` or
//! `"1s"`; everything here is checked, and a bad value is a [`UsageError`] that
//! names it.

use crate::cli::{Cli, SemCli};
use crate::id::Id;
use crate::{duration, jobs};
use anyhow::{Context, Result};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

/// Bad usage: main prints it with the usage hint and exits 2.
#[derive(Debug)]
pub struct UsageError(pub String);

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

/// Where and how to reach an etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// `host:port` of every member to try, in the order given.
    pub endpoints: Vec<String>,
    /// `etcds://`: TLS, verified against the system's roots or `QSEM_ETCD_CACERT`.
    pub tls: bool,
    /// The etcd user, if the cluster has authentication on.
    pub user: Option<String>,
    /// The user's password if the URL had one (else `QSEM_ETCD_PASSWORD`).
    pub password: Option<String>,
    /// The TTL of the holders' leases: how soon a crashed or cut-off
    /// holder's slot frees.
    pub lost_after: Duration,
    /// `--on-lost=kill`: a watchdog process stops the job even if qsem
    /// itself is stopped (set by [`Config::from_cli`]).
    pub kill_on_lost: bool,
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

/// The program to run and how to show it in report lines.
#[derive(Debug, Clone)]
pub struct Command {
    /// What to execute: a name looked up in PATH, or a path.
    pub program: OsString,
    /// Its arguments, not including argv[0].
    pub args: Vec<OsString>,
}

impl Command {
    /// The command as one line, shell-quoted where needed, for humans.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Quotes a word the way a POSIX shell would read it back.
pub fn shell_quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if plain {
        s.into_owned()
    } else {
        let escaped: String = s
            .chars()
            .map(|c| match c {
                '\'' => "'\\''".to_string(),
                c if c.is_control() => c.escape_default().to_string(),
                c => c.to_string(),
            })
            .collect();
        format!("'{escaped}'")
    }
}

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
}

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
    /// Print a shell completion script.
    Completions(clap_complete::Shell),
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config> {
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
        let mode = if let Some(shell) = cli.completions {
            Mode::Completions(shell)
        } else if cli.status {
            Mode::Status {
                only: cli.id.is_some().then(|| id.clone()),
                json: cli.json,
            }
        } else if cli.wait_all {
            Mode::WaitAll
        } else {
            let command = match cli.shell_command {
                // With --each the item becomes $1 of the script.
                Some(script) if cli.each => Command {
                    program: "/bin/sh".into(),
                    args: vec!["-c".into(), script, "sh".into()],
                },
                Some(script) => Command {
                    program: "/bin/sh".into(),
                    args: vec!["-c".into(), script],
                },
                None => command_from_words(cli.command)?,
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
        };
        let dir = lock_dir(cli.dir)?;
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
        Ok(Config {
            dir,
            backend,
            on_lost,
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
        let (wait, on_timeout) = match &cli.semaphore_timeout {
            Some(st) => parse_semaphore_timeout(st, 0)?,
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
            let command = Command {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), words.join(OsStr::new(" "))],
            };
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
            mode,
        })
    }
}

/// GNU sem's default id: the terminal on stdin (so that one shell's jobs
/// share a limit), else `default`.
fn default_sem_id() -> Id {
    use std::os::unix::ffi::OsStringExt;
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; ttyname_r NUL-terminates on success.
    let rc = unsafe { libc::ttyname_r(0, buf.as_mut_ptr().cast(), buf.len()) };
    let name = (rc == 0)
        .then(|| {
            buf.iter()
                .position(|&b| b == 0)
                .map(|end| buf[..end].to_vec())
        })
        .flatten()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| b"default".to_vec());
    Id::new(&OsString::from_vec(name))
        .unwrap_or_else(|_| Id::new(OsStr::new("default")).expect("valid"))
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

/// `--backend` / `QSEM_BACKEND`: empty or absent means lock files.
/// The engine: a shared server if `url` names one, else lock files.
fn parse_backend(url: Option<&str>, lost_after: Option<&str>) -> Result<Backend> {
    // Checked whatever the engine: a bad value is a mistake to point out.
    let lost_after = parse_lost_after(lost_after)?;
    let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
        return Ok(Backend::Files);
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres {
            url: url.to_string(),
            lost_after,
        })
    } else if url.starts_with("etcd://") || url.starts_with("etcds://") {
        parse_etcd(url, lost_after).map(Backend::Etcd)
    } else {
        let shown = url.split_once('@').map_or(url, |(_, host)| host);
        Err(usage(format!(
            "unsupported backend '{shown}': expected postgres://[USER@]HOST[:PORT]/DATABASE or etcd://HOST:PORT[,HOST:PORT...]"
        )))
    }
}

/// `etcd[s]://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...][/]`; the port
/// defaults to etcd's 2379. The error never shows a password.
fn parse_etcd(url: &str, lost_after: Duration) -> Result<EtcdSettings> {
    let (tls, rest) = match url.strip_prefix("etcds://") {
        Some(rest) => (true, rest),
        None => (false, url.trim_start_matches("etcd://")),
    };
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some(("", _)) => return Err(usage("etcd URL: empty user name")),
        Some((user, password)) => (
            Some(user.to_string()),
            (!password.is_empty()).then(|| password.to_string()),
        ),
        None => (None, None),
    };
    let bad = |what: &str, why: &str| {
        usage(format!(
            "invalid etcd endpoint '{what}' in --backend: {why} (expected etcd://HOST:PORT[,HOST:PORT...])"
        ))
    };
    let mut endpoints = Vec::new();
    for member in hosts.trim_end_matches('/').split(',') {
        let (host, port) = match member.rsplit_once(':') {
            // An IPv6 address without a port: `[::1]`.
            Some((h, p)) if !p.contains(']') => (h, p),
            _ => (member, "2379"),
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad(member, "no host"));
        }
        port.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad(member, "the port is not a number from 1 to 65535"))?;
        endpoints.push(format!("{host}:{port}"));
    }
    Ok(EtcdSettings {
        endpoints,
        tls,
        user,
        password,
        lost_after,
        kill_on_lost: false,
    })
}

/// `--lost-after`: at least 2s, as TCP keepalives count in seconds.
fn parse_lost_after(given: Option<&str>) -> Result<Duration> {
    let Some(given) = given else {
        return Ok(DEFAULT_LOST_AFTER);
    };
    let d = duration::parse(given).map_err(|e| usage(format!("invalid --lost-after: {e}")))?;
    if d < Duration::from_secs(2) {
        return Err(usage(format!(
            "invalid --lost-after '{given}': at least 2s (TCP keepalives count in seconds)"
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

/// `--dir` (or `QSEM_DIR`) if given, else the default.
fn lock_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(d) if d.as_os_str().is_empty() => Err(usage("--dir / QSEM_DIR is empty")),
        Some(d) => Ok(d),
        None => default_dir(),
    }
}

/// `$XDG_STATE_HOME/qsem`, else `$HOME/.local/state/qsem`: the same for a user's
/// cron jobs and shells.
fn default_dir() -> Result<PathBuf> {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from)
        && state.is_absolute()
    {
        return Ok(state.join("qsem"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(home_from_passwd)
        .context("cannot find a lock directory: set QSEM_DIR, or HOME")?;
    Ok(home.join(".local/state/qsem"))
}

fn home_from_passwd() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data; getpwuid_r writes only within `buf`, and
    // `pw_dir` points into it while `buf` lives.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut out = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        );
        if rc != 0 || out.is_null() || pwd.pw_dir.is_null() {
            return None;
        }
        let dir = std::ffi::CStr::from_ptr(pwd.pw_dir).to_bytes().to_vec();
        (!dir.is_empty()).then(|| PathBuf::from(OsString::from_vec(dir)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> Result<Config> {
        let mut argv = vec!["qsem", "--dir", "/tmp/qsem-test"];
        argv.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(argv).unwrap())
    }

    fn usage_message(args: &[&str]) -> String {
        let err = config(args).expect_err("should be rejected");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        err.to_string()
    }

    #[test]
    fn defaults() {
        let c = config(&["true"]).unwrap();
        assert_eq!(c.jobs, 1);
        assert_eq!(c.wait, Wait::Forever);
        assert_eq!(c.on_timeout, OnTimeout::Exit(0));
        assert_eq!(c.id.as_bytes(), b"default");
    }

    #[test]
    fn bad_values_name_themselves() {
        for (args, needle) in [
            (&["-j", "0", "true"][..], "'0'"),
            (&["-j", "2000000", "true"], "'2000000'"),
            (&["-j", "abc", "true"], "'abc'"),
            (&["--wait", "1x", "true"], "'1x'"),
            (&["--wait", "-3", "true"], "'-3'"),
            (&["--wait", "99999999999999999999999h", "true"], "too large"),
            (&["--id", "", "true"], "empty"),
            (&["-E", "300", "true"], "'300'"),
            (&["-E", "-1", "true"], "'-1'"),
            (&["--st", "x", "true"], "'x'"),
            (&[][..], "no command"),
        ] {
            let msg = usage_message(args);
            assert!(msg.contains(needle), "{args:?}: {msg}");
        }
    }

    #[test]
    fn semaphore_timeout_both_ways() {
        let c = config(&["--st", "-5", "true"]).unwrap();
        assert_eq!(c.wait, Wait::For(Duration::from_secs(5)));
        assert_eq!(c.on_timeout, OnTimeout::Exit(0));
        let c = config(&["--st", "5", "true"]).unwrap();
        assert_eq!(c.on_timeout, OnTimeout::RunAnyway);
    }

    #[test]
    fn shell_command() {
        let c = config(&["-c", "echo hi | wc"]).unwrap();
        let Mode::Run(cmd) = c.mode else { panic!() };
        assert_eq!(cmd.program, "/bin/sh");
        assert_eq!(cmd.display(), "/bin/sh -c 'echo hi | wc'");
    }

    #[test]
    fn pipeline_modes() {
        let c = config(&["--bg", "gzip", "a b"]).unwrap();
        let Mode::Background(cmd) = c.mode else {
            panic!()
        };
        assert_eq!(cmd.display(), "gzip 'a b'");
        assert!(matches!(
            config(&["--wait-all"]).unwrap().mode,
            Mode::WaitAll
        ));
        let c = config(&["--each", "-0", "gzip", "-9"]).unwrap();
        let Mode::Each { command, separator } = c.mode else {
            panic!()
        };
        assert_eq!((command.display().as_str(), separator), ("gzip -9", b'\0'));
        let c = config(&["--each", "-c", "echo \"$1\""]).unwrap();
        let Mode::Each { command, .. } = c.mode else {
            panic!()
        };
        assert_eq!(command.args.last().unwrap(), "sh");
        assert!(usage_message(&["--each"]).contains("no command"));
    }

    fn sem_config(args: &[&str]) -> Result<Config> {
        let mut argv = vec!["sem", "--dir", "/tmp/qsem-test"];
        argv.extend_from_slice(args);
        Config::from_sem_cli(SemCli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn sem_personality() {
        let c = sem_config(&["--id", "x", "-j2", "echo", "a  b", "$HOME"]).unwrap();
        let Mode::Background(cmd) = c.mode else {
            panic!()
        };
        assert_eq!(cmd.program, "/bin/sh");
        assert_eq!(cmd.args, ["-c", "echo a  b $HOME"]);
        assert!(c.bg_stdin);
        assert_eq!(c.jobs, 2);
        assert!(matches!(
            sem_config(&["--fg", "true"]).unwrap().mode,
            Mode::Run(_)
        ));
        assert!(matches!(
            sem_config(&["--wait"]).unwrap().mode,
            Mode::WaitAll
        ));
        assert_eq!(
            sem_config(&["-j", "0", "true"]).unwrap().jobs,
            jobs::MAX_JOBS
        );
        let c = sem_config(&["--st", "-2", "true"]).unwrap();
        assert_eq!(c.wait, Wait::For(Duration::from_secs(2)));
        assert_eq!(c.on_timeout, OnTimeout::Exit(0));
        let c = sem_config(&["--st", "2", "true"]).unwrap();
        assert_eq!(c.on_timeout, OnTimeout::RunAnyway);
        for (args, needle) in [
            (&["--wait", "true"][..], "no command"),
            (&[][..], "no command"),
            (&["-j", "x", "true"], "'x'"),
        ] {
            let err = sem_config(args).expect_err("should be rejected");
            assert!(err.to_string().contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn backends() {
        assert_eq!(config(&["true"]).unwrap().backend, Backend::Files);
        let c = config(&["--backend", "postgresql://h/db", "--on-lost=kill", "true"]).unwrap();
        assert_eq!(
            c.backend,
            Backend::Postgres {
                url: "postgresql://h/db".into(),
                lost_after: DEFAULT_LOST_AFTER
            }
        );
        assert_eq!(c.on_lost, OnLost::Kill);
        for (args, needle) in [
            (&["--backend", "redis://h", "true"][..], "'redis://h'"),
            (&["--backend", "mysql://u:secret@h", "true"], "'h'"),
            (&["--on-lost", "ignore", "true"], "'ignore'"),
            (&["--lost-after", "1s", "true"], "'1s'"),
            (&["--lost-after", "soon", "true"], "'soon'"),
        ] {
            let msg = usage_message(args);
            assert!(msg.contains(needle), "{args:?}: {msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
    }

    #[test]
    fn etcd_urls() {
        let etcd = |url: &str| match parse_backend(Some(url), Some("20s")) {
            Ok(Backend::Etcd(s)) => Ok(s),
            Ok(other) => panic!("{url}: {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let s = etcd("etcd://10.0.0.1:2379,10.0.0.2:2380,node3").unwrap();
        assert_eq!(
            s.endpoints,
            ["10.0.0.1:2379", "10.0.0.2:2380", "node3:2379"]
        );
        assert_eq!((s.tls, s.user, s.password), (false, None, None));
        assert_eq!(s.lost_after, Duration::from_secs(20));
        let s = etcd("etcds://qsem:s3cret@[::1]:2379,[::2]/").unwrap();
        assert_eq!(s.endpoints, ["[::1]:2379", "[::2]:2379"]);
        assert!(s.tls);
        assert_eq!(s.user.as_deref(), Some("qsem"));
        assert_eq!(s.password.as_deref(), Some("s3cret"));
        let s = etcd("etcd://qsem@h:1").unwrap();
        assert_eq!((s.user.as_deref(), s.password), (Some("qsem"), None));
        assert!(!s.kill_on_lost);
        let c = config(&["--backend", "etcd://h:1", "--on-lost=kill", "true"]).unwrap();
        assert!(matches!(c.backend, Backend::Etcd(s) if s.kill_on_lost));
        for (url, needle) in [
            ("etcd://h:x", "'h:x'"),
            ("etcd://h:0", "'h:0'"),
            ("etcd://a:1,,b:2", "''"),
            ("etcd://", "no host"),
            ("etcd://:pw@h:1", "empty user"),
            ("etcd://u:secret@h:99999", "'h:99999'"),
        ] {
            let msg = etcd(url).expect_err(url);
            assert!(msg.contains(needle), "{url}: {msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(OsStr::new("plain-1.txt")), "plain-1.txt");
        assert_eq!(shell_quote(OsStr::new("it's")), "'it'\\''s'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
        assert_eq!(shell_quote(OsStr::new("a\nb")), "'a\\nb'");
    }
}
