//! Refusing a pooler that shares server processes between clients (PgBouncer
//! in transaction or statement mode): it hands a session's next query to any
//! server process, so a session advisory lock does not stay with the session
//! that took it, and no slot can be kept.
//!
//! One session cannot see such a pooler in an unused pool, so the check
//! opens a second one alongside the first and compares which processes
//! answer; the slot taken is then confirmed once more before the job starts.
//! That costs the server a second backend start, the larger part of an
//! uncontended job's cost, so a check that found none is remembered for
//! [`REMEMBER`] in the host's lock directory (an empty file per server and
//! role, `.pg-checked-HASH`, whose age is its time; hidden names are not
//! ids to the lock-file engine), and only the first job per server per
//! period pays. The others still see a pooler put in place meanwhile: every
//! admission attempt and heartbeat also compares the process that answers
//! with the session's first, and a holder that finds another one reports
//! its slot lost, as any lost slot is reported.

use super::admission::{Beat, heartbeat};
use super::connect::Connector;
use super::keys::{Keys, fnv1a};
use super::record::Record;
use super::session::{Session, number};
use anyhow::{Result, anyhow, bail};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a check that found no pooler is trusted.
pub const REMEMBER: Duration = Duration::from_secs(600);
/// How long the check may take before qsem goes on without its answer.
const CHECK: Duration = Duration::from_secs(3);
/// How many times the check looks again after its first look.
const LOOKS: u32 = 2;
/// How long the confirmation tries to free a slot that a pooler's other
/// server process took.
const UNDO: Duration = Duration::from_secs(3);

/// The error for a server that does not keep session locks, and so cannot
/// keep slots: in practice, a pooler in transaction or statement mode.
pub fn no_session_locks(target: &str, more: &str) -> String {
    format!(
        "PostgreSQL at {target} does not keep session locks (a connection pooler in \
         transaction or statement mode?); point --backend at the server itself, or at a \
         pooler in session mode{more}"
    )
}

/// The server process that answers this query of `s`.
async fn backend_pid(s: &Session) -> Result<i32> {
    number(&s.query("SELECT pg_backend_pid()::text").await?, 0)
}

/// Opens a session, set up, and refuses a pooler that shares server
/// processes between clients: a new session of ours answered by the process
/// of `s`, or `s` by another one. PgBouncer in transaction mode hands out
/// the last freed process first, so in a pool nobody else uses the second
/// session gets the first's; in a busy one it looks a few times. The second
/// session is opened alongside the first, so the check costs no extra
/// round of connecting. Also says whether the check had its answer (a
/// slow server may not answer it in time; then qsem goes on without it).
pub async fn open_checked(c: &Connector) -> Result<(Session, bool)> {
    let deadline = tokio::time::Instant::now() + CHECK;
    let other = async {
        tokio::time::timeout_at(deadline, c.open())
            .await
            .unwrap_or_else(|_| Err(anyhow!("no second session in time")))
    };
    let (s, other) = tokio::join!(c.open(), other);
    let s = s?;
    let look = async {
        let other = other?;
        let mut shared = other.pid == s.pid;
        for _ in 0..LOOKS {
            shared = shared || backend_pid(&s).await? != s.pid;
            shared = shared || backend_pid(&other).await? == s.pid;
        }
        anyhow::Ok(shared)
    };
    match tokio::time::timeout(CHECK, look).await {
        Ok(Ok(true)) => bail!(no_session_locks(&c.target, "")),
        Ok(Ok(false)) => Ok((s, true)),
        _ => Ok((s, false)),
    }
}

/// The first heartbeat after a checked session took `slot`. Our next query
/// may land on another server process in a busy transaction-mode pool;
/// then the one that took the lock may be in use by another client: catch
/// it idle to free the slot, or say that it stays taken.
pub async fn confirm(
    s: &Session,
    c: &Connector,
    keys: &Keys,
    slot: u32,
    rec: &Record,
) -> Result<()> {
    if heartbeat(s, keys, slot, rec).await? == Beat::Held {
        return Ok(());
    }
    let until = std::time::Instant::now() + UNDO;
    let unlock = format!(
        "SELECT pg_advisory_unlock({})::text FROM pg_locks WHERE {}",
        keys.lock(slot),
        keys.held_here(&s.db(), slot)
    );
    while std::time::Instant::now() < until {
        if s.query(&unlock)
            .await?
            .first()
            .is_some_and(|r| !r.is_empty())
        {
            bail!(no_session_locks(&c.target, ""));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(no_session_locks(
        &c.target,
        &format!(
            "; slot {slot} stays taken until the pooler closes the server session that holds it"
        )
    ))
}

/// The file that remembers a check of `c`'s server and role in `dir`.
fn memo(dir: &Path, c: &Connector) -> PathBuf {
    let h = fnv1a(c.target.bytes().chain([0]).chain(c.user().bytes()));
    dir.join(format!(".pg-checked-{h:016x}"))
}

/// Whether a check of `c`'s server found no pooler within [`REMEMBER`]: a
/// regular file of ours (or of the group that shares the directory), not
/// from the future.
pub fn recently_checked(dir: &Path, c: &Connector) -> bool {
    let (Ok(d), Ok(m)) = (dir.metadata(), memo(dir, c).symlink_metadata()) else {
        return false;
    };
    let shared_gid = (d.mode() & libc::S_ISGID != 0 && d.mode() & 0o020 != 0).then_some(d.gid());
    let ours = m.uid() == crate::sys::euid() || shared_gid == Some(m.gid());
    let age = m.modified().map(|t| SystemTime::now().duration_since(t));
    m.is_file() && ours && matches!(age, Ok(Ok(age)) if age < REMEMBER)
}

/// Remembers that a check of `c`'s server found no pooler: a new file,
/// written under a temporary name and renamed into place, with the mode of
/// the lock directory's files. Best effort: without it, the next job checks.
pub fn remember(dir: &Path, c: &Connector) {
    let to = memo(dir, c);
    let tmp = to.with_extension(std::process::id().to_string());
    let shared = dir
        .metadata()
        .is_ok_and(|d| d.mode() & libc::S_ISGID != 0 && d.mode() & 0o020 != 0);
    let mode = if shared { 0o660 } else { 0o600 };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            // The umask may have taken the group's bits away.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            writeln!(
                f,
                "{} {}: no pooler in transaction mode",
                c.target,
                c.user()
            )
        })
        .and_then(|()| std::fs::rename(&tmp, &to));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}
