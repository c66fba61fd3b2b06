//! The PostgreSQL engine: one session advisory lock per held slot, so that the
//! server frees a slot the moment its holder's session ends, as the kernel
//! frees a `flock`. A fleet of machines pointed at one database shares a limit.
//!
//! Keys use the two-int form `(key1, key2)`: `key1` is [`key`], the 32-bit
//! FNV-1a hash of the id's bytes (as a signed int4), `key2` is the slot
//! (1..=N), and `key2 = 0` is the id's admission mutex, a transaction lock.
//!
//! **Safety**: under the mutex a taker reads the held slots from `pg_locks`,
//! and takes the lowest free one (`pg_try_advisory_lock`, session level) only
//! while fewer than its N are held. The mutex is held for a few round trips,
//! never while sleeping. A holder's session then stays idle (the server only
//! notices a dead client between queries): no query runs while the job does,
//! apart from a heartbeat of a millisecond every few seconds.
//!
//! **Cut-off holders**: every session sets `tcp_keepalives_*` and
//! `tcp_user_timeout` from `--lost-after` (their sum a second short of it),
//! and `idle_session_timeout = 0`, so that the server drops a silent client,
//! and so its locks, within the bound. The holder sees the same from its side:
//! the connection breaks, or a heartbeat finds the lock gone, or no heartbeat
//! has been answered for `--lost-after`. It reports the loss through
//! [`Slot::events`]; its thread then tries, every heartbeat, to take a slot
//! again by the ordinary rule.
//!
//! **Waiting**: a waiter publishes itself in its `application_name`
//! (`qsem w <key1> <arrival µs> <N>`, the arrival read from the server's clock
//! under the mutex), LISTENs on `qsem_<key1>`, and sleeps until a NOTIFY (sent
//! by every releaser, and by a waiter that takes a slot or gives up), its
//! deadline, a signal, or a slow poll that catches holders that crashed
//! without a word. Fairness is the lock-file engine's rule: a request is
//! admitted only if no older waiter would also be admitted now. `--wait-all`
//! sleeps the same way on the same channel, until a look under the mutex
//! finds no slot of the key held and no session waiting (two ids whose keys
//! collide share their slots, and so wait for each other here too).
//!
//! **Failures** of background jobs must outlive every session (the next
//! `--wait-all` may run on another machine, after the job's qsem has gone),
//! so they are the one thing kept in a table: `qsem_failures` (id bytes,
//! time, host, report line), created by the first failure in the first
//! schema of the `search_path` (or by a DBA, with INSERT, SELECT and DELETE
//! granted to qsem's roles). A supervisor inserts its row before it releases
//! the slot; `--wait-all` counts and deletes the id's rows in one statement.
//! Locks, waiters and holders stay out of tables: no row can outlive a crash.
//!
//! **Connection**: a `postgres://` URL completed by the `PG*` variables, as
//! libpq would; `sslmode=require` means TLS with the server's certificate
//! verified (rustls), anything else plain TCP or a Unix socket.
//!
//! **Status**: holders are `pg_locks` rows joined to `pg_stat_activity`; the
//! `application_name` (`qsem h <key1> <slot> <N> <pid>@<host>`, readable by
//! every user) and a comment in the session's last query (id, start, command;
//! readable by the same role or `pg_read_all_stats`) say who they are.

use super::{Acquired, Holder, IdStatus, Idle, Request, Semaphore, Slot, SlotEvent};
use crate::id::Id;
use crate::signals::{Received, Signals};
use crate::{report, sys};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How often a waiter looks again unasked: a holder that crashed sends no NOTIFY.
pub const SLOW_POLL: Duration = Duration::from_secs(1);
/// The longest time between a holder's heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// The connect timeout unless the URL or `PGCONNECT_TIMEOUT` says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a releasing holder waits for the server before just hanging up.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the check for a pooler in transaction mode may take before qsem
/// goes on without its answer.
const POOLER_CHECK: Duration = Duration::from_secs(3);
/// How many times that check looks again after its first look.
const POOLER_LOOKS: u32 = 2;
/// Slot numbers fit between the mutex (0) and this.
const MAX_SLOT: u32 = crate::jobs::MAX_JOBS;

/// The first advisory-lock key of an id: FNV-1a (32 bits) of its bytes. It is
/// part of the interface between qsem versions and must never change.
pub fn key(id: &Id) -> u32 {
    id.as_bytes().iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The key as `pg_advisory_lock(int4, int4)` takes it.
fn key_i32(k: u32) -> i32 {
    k as i32
}

/// The PostgreSQL engine.
#[derive(Clone)]
pub struct Postgres {
    pg: tokio_postgres::Config,
    /// TLS for `sslmode=require` (or `verify-ca`, `verify-full`); `None`: plain.
    tls: Option<MakeRustlsConnect>,
    /// `host:port/database`, for messages (never the password).
    target: String,
    lost_after: Duration,
    verbose: bool,
    /// Whether this process has made sure that the server keeps session
    /// locks (see [`Postgres::shares_sessions`]).
    pooler_checked: bool,
}

impl Postgres {
    /// Reads the URL, completed as libpq would by `PGHOST`, `PGPORT`, `PGUSER`,
    /// `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE` and `PGCONNECT_TIMEOUT`.
    pub fn new(url: &str, lost_after: Duration, verbose: bool) -> Result<Postgres> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        // qsem always verifies a server's certificate, so libpq's stricter
        // modes mean the same as `require` here.
        let url = url
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| anyhow!("invalid --backend URL: {e}"))?;
        if pg.get_hosts().is_empty() {
            pg.host(env("PGHOST").as_deref().unwrap_or("localhost"));
        }
        if pg.get_ports().is_empty()
            && let Some(port) = env("PGPORT")
        {
            pg.port(
                port.parse()
                    .with_context(|| format!("invalid PGPORT '{port}'"))?,
            );
        }
        if pg.get_user().is_none() {
            let user = env("PGUSER")
                .or_else(|| env("USER"))
                .or_else(|| env("LOGNAME"))
                .context("no PostgreSQL user: put one in the URL, or set PGUSER")?;
            pg.user(user);
        }
        if pg.get_password().is_none()
            && let Some(password) = env("PGPASSWORD")
        {
            pg.password(password);
        }
        if pg.get_dbname().is_none()
            && let Some(db) = env("PGDATABASE")
        {
            pg.dbname(db);
        }
        if !url.contains("sslmode=")
            && let Some(mode) = env("PGSSLMODE")
        {
            pg.ssl_mode(match mode.as_str() {
                "disable" => tokio_postgres::config::SslMode::Disable,
                "prefer" | "allow" => tokio_postgres::config::SslMode::Prefer,
                "require" | "verify-ca" | "verify-full" => tokio_postgres::config::SslMode::Require,
                other => bail!("invalid PGSSLMODE '{other}': expected disable, prefer or require"),
            });
        }
        let tls = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Require => Some(tls_connector()?),
            // Plain, as `prefer` is with a server that offers no TLS: a
            // certificate qsem cannot verify must not break a default setup.
            _ => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
        };
        if pg.get_connect_timeout().is_none() {
            let secs = env("PGCONNECT_TIMEOUT").and_then(|s| s.parse::<u64>().ok());
            pg.connect_timeout(secs.map_or(CONNECT_TIMEOUT, Duration::from_secs));
        }
        let ka = Keepalive::for_bound(lost_after);
        pg.application_name("qsem")
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(ka.idle))
            .keepalives_interval(Duration::from_secs(ka.interval))
            .keepalives_retries(ka.count)
            .tcp_user_timeout(ka.total());
        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let db = pg.get_dbname().or(pg.get_user()).unwrap_or("?");
        let target = format!("{host}:{port}/{db}");
        Ok(Postgres {
            pg,
            tls,
            target,
            lost_after,
            verbose,
            pooler_checked: false,
        })
    }

    /// Records a failed background job under its id, for the next --wait-all.
    fn record_failure(&self, id: &Id, line: &str) -> Result<()> {
        let rt = Self::runtime()?;
        let record = async {
            let s = self.open().await?;
            // Created only when missing: `CREATE ... IF NOT EXISTS` needs the
            // CREATE privilege even when the table is there, and a role may
            // have been granted only INSERT, SELECT and DELETE on it.
            if !failures_table(&s).await? {
                s.query(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({CREATE_LOCK}); {FAILURES_TABLE}; COMMIT"
                ))
                .await
                .context("cannot create the table qsem_failures")?;
            }
            s.client
                .execute(
                    "INSERT INTO qsem_failures (id, host, line) VALUES ($1, $2, $3)",
                    &[&id.as_bytes(), &sys::hostname(), &line.replace('\0', "")],
                )
                .await
                .map_err(|e| anyhow!(error_text(&e)))?;
            anyhow::Ok(())
        };
        // The job's slot is still held: a server that does not answer must
        // not keep it so for ever.
        rt.block_on(async { tokio::time::timeout(self.lost_after, record).await })
            .map_err(|_| anyhow!("no answer within --lost-after"))
            .and_then(|r| r)
            .with_context(|| {
                format!(
                    "cannot record a failed job of '{id}' on PostgreSQL at {}",
                    self.target
                )
            })
    }

    fn open(&self) -> impl Future<Output = Result<Session>> + '_ {
        Session::open(&self.pg, self.tls.as_ref(), &self.target, self.lost_after)
    }

    fn runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the PostgreSQL client")
    }

    /// Whether a new session of ours is answered by the server process of
    /// `s`, or `s` by another one: only a pooler that shares server
    /// processes between clients does that. PgBouncer in transaction mode
    /// puts the process back in its pool after each query, and hands out the
    /// last freed first: in a pool nobody else uses, the new session always
    /// gets the process of `s`. In a busy one another client may be quicker,
    /// so it looks a few times, each right after a query of `s`. A new
    /// session that cannot connect or get an answer in time (no connection
    /// to spare) finds nothing: the later checks still look. `other` was
    /// opened alongside `s`, so that the check costs no extra round of
    /// connecting; which of the two got which server process first does not
    /// matter, as each look goes to the one freed last.
    async fn shares_sessions(&self, s: &Session, other: Result<Session>) -> bool {
        let look = async {
            let other = other?;
            let mut shared = other.pid == s.pid;
            for _ in 0..POOLER_LOOKS {
                shared = shared || backend_pid(s).await? != s.pid;
                shared = shared || backend_pid(&other).await? == s.pid;
            }
            anyhow::Ok(shared)
        };
        matches!(tokio::time::timeout(POOLER_CHECK, look).await, Ok(Ok(true)))
    }

    /// Whether the server keeps the session lock that `s` just took: our
    /// next query, the heartbeat, may land on another server process in a
    /// busy pool. If so the process that took it may be in use by another
    /// client: catch it idle, or the slot stays taken as long as the pool
    /// keeps that process.
    async fn check_session_locks(
        &self,
        s: &Session,
        keys: &Keys,
        slot: u32,
        rec: &Record,
    ) -> Result<Locks> {
        s.query(&format!("UNLISTEN {}", keys.channel())).await?;
        if heartbeat(s, keys, slot, rec).await? {
            return Ok(Locks::Kept);
        }
        let until = Instant::now() + POOLER_CHECK;
        while Instant::now() < until {
            if free_if_here(s, keys, slot).await? {
                return Ok(Locks::NotKept);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Locks::NotKeptAndSlotLeft)
    }

    fn say(&self, req: &Request, msg: &str) {
        if self.verbose {
            report::line(req.id, msg);
        }
    }
}

/// The TLS client: the server's certificate is always verified, against the
/// PEM file in `PGSSLROOTCERT` if set, else the system's trusted roots.
fn tls_connector() -> Result<MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match std::env::var_os("PGSSLROOTCERT").filter(|p| !p.is_empty()) {
        Some(path) => {
            let shown = std::path::Path::new(&path).display().to_string();
            for cert in CertificateDer::pem_file_iter(&path)
                .with_context(|| format!("cannot read PGSSLROOTCERT {shown}"))?
            {
                let cert = cert.with_context(|| format!("cannot read PGSSLROOTCERT {shown}"))?;
                roots
                    .add(cert)
                    .with_context(|| format!("unusable certificate in PGSSLROOTCERT {shown}"))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        bail!("sslmode=require: no trusted certificates (set PGSSLROOTCERT to the server's CA)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// TCP keepalive settings whose sum stays within the bound: a silent peer is
/// dropped after `idle + interval * count` seconds after its last packet,
/// which is kept a second short of the bound (when it is 3s or more) for the
/// server's timers and the holder's last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Keepalive {
    idle: u64,
    interval: u64,
    count: u32,
}

impl Keepalive {
    /// The time after which a silent peer is dropped; also the
    /// `tcp_user_timeout`, because Linux lets that decide when keepalive
    /// probes have failed, once it is set.
    fn total(&self) -> Duration {
        Duration::from_secs(self.idle + self.interval * u64::from(self.count))
    }

    fn for_bound(bound: Duration) -> Keepalive {
        let b = bound.as_secs().max(2);
        let b = if b >= 3 { b - 1 } else { b };
        let idle = (b / 2).max(1);
        let interval = ((b - idle) / 3).max(1);
        let count = ((b - idle) / interval).clamp(1, 3) as u32;
        Keepalive {
            idle,
            interval,
            count,
        }
    }
}

/// What the task that drives a connection tells its session.
enum News {
    Notified,
    Closed(String),
}

/// One open session: the client, and news from its connection's driver task.
struct Session {
    client: Client,
    news: mpsc::UnboundedReceiver<News>,
    /// The server process that answered the first query. Only a pooler in
    /// transaction or statement mode hands a later query to another one.
    pid: i32,
}

/// The rows of each statement of a simple query, as text.
type Results = Vec<Vec<Vec<Option<String>>>>;

/// The first column of the first row of statement `i`'s result, if any.
fn value(res: &Results, i: usize) -> Option<&str> {
    res.get(i)?.first()?.first()?.as_deref()
}

/// [`value`] as a number; a missing or malformed one is an error.
fn number<T: std::str::FromStr>(res: &Results, i: usize) -> Result<T> {
    value(res, i)
        .and_then(|v| v.parse().ok())
        .context("unexpected answer from the server")
}

impl Session {
    async fn open(
        pg: &tokio_postgres::Config,
        tls: Option<&MakeRustlsConnect>,
        target: &str,
        bound: Duration,
    ) -> Result<Session> {
        let failed = || format!("cannot connect to PostgreSQL at {target}");
        let (client, news) = match tls {
            Some(tls) => {
                let (client, conn) = pg.connect(tls.clone()).await.with_context(failed)?;
                (client, drive(conn))
            }
            None => {
                let (client, conn) = pg.connect(NoTls).await.with_context(failed)?;
                (client, drive(conn))
            }
        };
        let mut s = Session {
            client,
            news,
            pid: 0,
        };
        let ka = Keepalive::for_bound(bound);
        // Settings an ordinary user may change; those the server does not know
        // (an old version) are skipped rather than failing.
        let sql = format!(
            "SELECT set_config(s.name, s.value, false) FROM (VALUES \
             ('idle_session_timeout', '0'), ('statement_timeout', '0'), ('lock_timeout', '0'), \
             ('tcp_keepalives_idle', '{}'), ('tcp_keepalives_interval', '{}'), \
             ('tcp_keepalives_count', '{}'), ('tcp_user_timeout', '{}')) AS s(name, value) \
             WHERE s.name IN (SELECT name FROM pg_settings); \
             SELECT pg_backend_pid()::text",
            ka.idle,
            ka.interval,
            ka.count,
            ka.total().as_millis()
        );
        let res = s
            .query(&sql)
            .await
            .with_context(|| format!("cannot set up a session on PostgreSQL at {target}"))?;
        s.pid = number(&res, 1)?;
        Ok(s)
    }

    async fn query(&self, sql: &str) -> Result<Results> {
        let msgs = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| anyhow!(error_text(&e)))?;
        let mut out = Vec::new();
        let mut rows = Vec::new();
        for m in msgs {
            match m {
                SimpleQueryMessage::Row(row) => {
                    rows.push(
                        (0..row.len())
                            .map(|i| row.get(i).map(String::from))
                            .collect(),
                    );
                }
                SimpleQueryMessage::CommandComplete(_) => out.push(std::mem::take(&mut rows)),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Drives a connection in a task of its own, passing on notifications and
/// its end.
fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>) -> mpsc::UnboundedReceiver<News>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, news) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let msg = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
            let closed = match msg {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    let _ = tx.send(News::Notified);
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => error_text(&e),
                None => "the server closed the connection".to_string(),
            };
            let _ = tx.send(News::Closed(closed));
            return;
        }
    });
    news
}

/// A tokio-postgres error as one line, with the server's own message if any.
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// An SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\0', "").replace('\'', "''"))
}

/// Text for an SQL comment: nothing in it can end (or nest) the comment.
fn comment_safe(s: &str) -> String {
    s.replace('\0', "")
        .replace("*/", "* /")
        .replace("/*", "/ *")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Cuts a string to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Who a session is, for `--status`: written as a comment before each of its
/// queries, so that its last query (which `pg_stat_activity` shows) says it.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    id: Vec<u8>,
    started_ms: u64,
    jobs: u32,
    pid: u32,
    host: String,
    command: String,
}

impl Record {
    fn render(&self) -> String {
        let host: String = self.host.split_whitespace().collect::<Vec<_>>().join("_");
        format!(
            "/*qsem {} {} {} {} {} {}*/ ",
            hex(&self.id),
            self.started_ms,
            self.jobs,
            self.pid,
            comment_safe(cut(&host, 64)),
            comment_safe(&cut(&self.command, 400).replace(['\n', '\r'], " "))
        )
    }

    fn parse(query: &str) -> Option<Record> {
        let body = query.trim_start().strip_prefix("/*qsem ")?;
        let body = &body[..body.find("*/")?];
        let mut it = body.splitn(6, ' ');
        Some(Record {
            id: unhex(it.next()?)?,
            started_ms: it.next()?.parse().ok()?,
            jobs: it.next()?.parse().ok()?,
            pid: it.next()?.parse().ok()?,
            host: it.next()?.to_string(),
            command: it.next().unwrap_or("").to_string(),
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a session is in the id's admission protocol.
struct Keys {
    k: u32,
}

impl Keys {
    fn hex(&self) -> String {
        format!("{:08x}", self.k)
    }
    fn channel(&self) -> String {
        format!("qsem_{}", self.hex())
    }
    fn holder_name(&self, slot: u32, rec: &Record) -> String {
        let name = format!(
            "qsem h {} {slot} {} {}@{}",
            self.hex(),
            rec.jobs,
            rec.pid,
            rec.host
        );
        // application_name keeps 63 bytes.
        cut(&name, 63).to_string()
    }
    fn waiter_name(&self, arrival: i64, jobs: u32) -> String {
        format!("qsem w {} {arrival} {jobs}", self.hex())
    }
    /// The condition on `pg_locks` for "this session's server process holds `slot`".
    fn held_here(&self, slot: u32) -> String {
        format!(
            "locktype = 'advisory' AND granted AND pid = pg_backend_pid() \
             AND classid = '{}'::oid AND objid = '{slot}'::oid AND objsubid = 2",
            self.k
        )
    }
    fn slot_locks(&self) -> String {
        format!(
            "SELECT objid::text FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 2 AND mode = 'ExclusiveLock' AND classid = '{}'::oid \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            self.k
        )
    }
}

/// A waiter seen in `pg_stat_activity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    arrival: i64,
    pid: i32,
    jobs: u32,
}

fn parse_waiter(app_name: &str, pid: i32) -> Option<Waiter> {
    let mut it = app_name.strip_prefix("qsem w ")?.split(' ');
    let _key = it.next()?;
    Some(Waiter {
        arrival: it.next()?.parse().ok()?,
        pid,
        jobs: it.next()?.parse().ok()?,
    })
}

/// The admission rule, pure: the slot to take, or `None` to wait. `me` is the
/// asker's place in the queue, `None` for a newcomer (behind everyone).
fn admit(held: &[u32], jobs: u32, waiters: &[Waiter], me: Option<(i64, i32)>) -> Option<u32> {
    let count = held.len() as u32;
    if count >= jobs {
        return None;
    }
    let older_admissible = waiters
        .iter()
        .any(|w| me.is_none_or(|m| (w.arrival, w.pid) < m) && w.jobs > count);
    if older_admissible {
        return None;
    }
    (1..=MAX_SLOT).find(|k| !held.contains(k))
}

/// The table of failed background jobs, created by the first failure.
const FAILURES_TABLE: &str = "CREATE TABLE IF NOT EXISTS qsem_failures (\
     id bytea NOT NULL, failed_at timestamptz NOT NULL DEFAULT now(), \
     host text NOT NULL, line text NOT NULL); \
     COMMENT ON TABLE qsem_failures IS 'qsem: failed background (--bg) jobs, \
     counted and deleted by the next qsem --wait-all of the id'";

/// The lock that serialises creating the table (two concurrent `CREATE TABLE
/// IF NOT EXISTS` can clash): "qsem" in ASCII, in the one-bigint key form,
/// which `pg_locks` keeps apart from the two-int keys of slots and mutexes.
const CREATE_LOCK: i64 = 0x7173_656d;

/// Whether `qsem_failures` is on the search path (and visible to this role).
async fn failures_table(s: &Session) -> Result<bool> {
    let res = s
        .query("SELECT (to_regclass('qsem_failures') IS NOT NULL)::text")
        .await?;
    Ok(value(&res, 0) == Some("true"))
}

/// The slot numbers in the answer to [`Keys::slot_locks`] (the mutex, 0, is none).
fn slots(rows: Option<&Vec<Vec<Option<String>>>>) -> Vec<u32> {
    rows.into_iter()
        .flatten()
        .filter_map(|row| row.first().cloned().flatten()?.parse().ok())
        .filter(|k| (1..=MAX_SLOT).contains(k))
        .collect()
}

/// How many slots of the id are held and how many sessions wait for one:
/// what `--wait-all` waits to see at zero. Read under the id's mutex, since
/// everything that adds a waiter or a holder happens under it: while we hold
/// it both numbers can only fall, so two zeros are zeros at one instant.
async fn busy(s: &Session, keys: &Keys) -> Result<(u32, u32)> {
    let sql = format!(
        "BEGIN; SELECT pg_advisory_xact_lock({k}, 0); \
         SELECT count(*)::text FROM pg_stat_activity WHERE application_name LIKE 'qsem w {hex} %' \
         AND datname = current_database(); {locks}; COMMIT",
        k = key_i32(keys.k),
        hex = keys.hex(),
        locks = keys.slot_locks(),
    );
    let res = s.query(&sql).await?;
    let waiting = number(&res, 2)?;
    Ok((slots(res.get(3)).len() as u32, waiting))
}

/// What one admission attempt came to.
enum Attempt {
    Took(u32),
    Wait {
        held: u32,
        place: Option<(i64, i32)>,
    },
    /// The look was answered by another server process than the session's
    /// first query: a pooler shares them between clients.
    Shared,
}

/// One admission attempt under the id's mutex. A newcomer that is not admitted
/// joins the queue (when `enqueue`) in the same transaction.
async fn attempt(
    s: &Session,
    keys: &Keys,
    jobs: u32,
    rec: &Record,
    me: Option<(i64, i32)>,
    enqueue: bool,
) -> Result<Attempt> {
    let r = rec.render();
    for _ in 0..100 {
        // A newcomer that may wait listens before it looks, so that no
        // release between the look and the sleep goes unheard.
        let listen = me.is_none() && enqueue;
        let sql = format!(
            "{r}{listen}BEGIN; SELECT pg_advisory_xact_lock({k}, 0); {locks}; \
             SELECT pid::text, application_name FROM pg_stat_activity \
             WHERE application_name LIKE 'qsem w {hex} %' AND pid <> pg_backend_pid() \
             AND datname = current_database(); \
             SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text, \
             pg_backend_pid()::text",
            listen = if listen {
                format!("LISTEN {}; ", keys.channel())
            } else {
                String::new()
            },
            k = key_i32(keys.k),
            locks = keys.slot_locks(),
            hex = keys.hex(),
        );
        let mut res = s.query(&sql).await?;
        if listen {
            res.remove(0);
        }
        let col = |stmt: usize, row: &Vec<Option<String>>, i: usize| -> Result<String> {
            row.get(i)
                .cloned()
                .flatten()
                .ok_or_else(|| anyhow!("unexpected answer from the server (statement {stmt})"))
        };
        let held = slots(res.get(2));
        let mut waiters = Vec::new();
        for row in res.get(3).into_iter().flatten() {
            let pid = col(3, row, 0)?.parse().unwrap_or(0);
            waiters.extend(parse_waiter(&col(3, row, 1)?, pid));
        }
        let clock = res
            .get(4)
            .and_then(|rows| rows.first())
            .context("unexpected answer from the server")?;
        let now_us: i64 = col(4, clock, 0)?.parse().unwrap_or(0);
        let my_pid: i32 = col(4, clock, 1)?.parse().unwrap_or(0);
        if my_pid != s.pid {
            // Frees the id's mutex now rather than when the pooler notices.
            s.query("ROLLBACK").await?;
            return Ok(Attempt::Shared);
        }
        let Some(slot) = admit(&held, jobs, &waiters, me) else {
            let place = match me {
                Some(m) => Some(m),
                None if enqueue => {
                    s.query(&format!(
                        "{r}SELECT set_config('application_name', {}, false); COMMIT",
                        lit(&keys.waiter_name(now_us, jobs))
                    ))
                    .await?;
                    Some((now_us, my_pid))
                }
                None => None,
            };
            if place.is_none() || me.is_some() {
                s.query("COMMIT").await?;
            }
            return Ok(Attempt::Wait {
                held: held.len() as u32,
                place,
            });
        };
        // A waiter that takes a slot tells the younger ones to look again:
        // one that deferred to it may be admitted now, or may have to wait.
        let notify = if me.is_some() {
            format!("NOTIFY {}; ", keys.channel())
        } else {
            String::new()
        };
        let res = s
            .query(&format!(
                // Taking the lock and becoming a holder in `pg_stat_activity`
                // happen in one statement, so that nobody sees a holder that
                // still looks like a waiter.
                "{r}SELECT (set_config('application_name', CASE WHEN \
                 pg_try_advisory_lock({k}, {slot}) THEN {name} \
                 ELSE current_setting('application_name') END, false) = {name})::text; \
                 {notify}COMMIT",
                k = key_i32(keys.k),
                name = lit(&keys.holder_name(slot, rec)),
            ))
            .await?;
        if value(&res, 0) == Some("true") {
            return Ok(Attempt::Took(slot));
        }
        // Held by something that is not qsem (another mode, another tool): look again.
    }
    bail!(
        "advisory locks of key {} keep changing under qsem; does something else use them?",
        keys.k
    )
}

/// Whether this session still holds the slot: the heartbeat. It also keeps
/// the record and `application_name` current.
async fn heartbeat(s: &Session, keys: &Keys, slot: u32, rec: &Record) -> Result<bool> {
    let sql = format!(
        "{r}SELECT set_config('application_name', {name}, false); \
         SELECT count(*)::text FROM pg_locks WHERE {mine}",
        r = rec.render(),
        name = lit(&keys.holder_name(slot, rec)),
        mine = keys.held_here(slot),
    );
    let res = s.query(&sql).await?;
    Ok(value(&res, 1) == Some("1"))
}

/// The server process that answers this query of `s`.
async fn backend_pid(s: &Session) -> Result<i32> {
    number(&s.query("SELECT pg_backend_pid()::text").await?, 0)
}

/// Frees `slot` if this session's server session holds it, which only a
/// pooler that shares server sessions between clients makes possible for a
/// session that did not take it.
async fn free_if_here(s: &Session, keys: &Keys, slot: u32) -> Result<bool> {
    let sql = format!(
        "SELECT pg_advisory_unlock({}, {slot})::text FROM pg_locks WHERE {}",
        key_i32(keys.k),
        keys.held_here(slot)
    );
    let res = s.query(&sql).await?;
    Ok(res.first().is_some_and(|rows| !rows.is_empty()))
}

/// What [`Postgres::check_session_locks`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locks {
    Kept,
    /// A pooler shares server processes; the slot was freed.
    NotKept,
    /// A pooler shares server processes, and the one that holds the slot
    /// could not be reached.
    NotKeptAndSlotLeft,
}

/// The signal pipe, for tokio to watch (borrowed: `Signals` owns it).
struct SignalFd(RawFd);

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Waits for a signal that stops a waiter.
async fn stop_signal(fd: &AsyncFd<SignalFd>, signals: &mut Signals) -> Result<Received> {
    loop {
        let mut ready = fd.readable().await.context("cannot wait for signals")?;
        // Clear first, then drain: a signal that comes after the drain makes
        // the pipe readable anew, so none can be missed.
        ready.clear_ready();
        if let Some(signo) = signals.take_stop() {
            return Ok(signo);
        }
    }
}

/// Why a waiter's sleep ended.
enum Woke {
    /// A NOTIFY, or the slow poll: look again.
    Look,
    Expired,
    Signal(Received),
}

/// The one way a waiter sleeps: until a NOTIFY on the channels its session
/// listens to, the slow poll (a holder that crashed sends no NOTIFY), the
/// deadline, or a stop signal. A signal that came earlier is seen at once:
/// the pipe is still readable.
async fn sleep(
    s: &mut Session,
    deadline: Option<Instant>,
    signals: &mut Signals,
    target: &str,
) -> Result<Woke> {
    // SAFETY: `signals` owns the descriptor, keeps it open, and outlives
    // `sig_fd`, which lives only in this call.
    let sig_fd =
        unsafe { AsyncFd::register_with_interest(SignalFd(signals.fd()), Interest::READABLE) }
            .map_err(|e| anyhow!("cannot watch signals: {e}"))?;
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        news = s.news.recv() => match news {
            Some(News::Notified) => {
                while let Ok(News::Notified) = s.news.try_recv() {}
                Ok(Woke::Look)
            }
            Some(News::Closed(why)) => {
                bail!("lost the connection to PostgreSQL at {target} while waiting: {why}")
            }
            None => bail!("lost the connection to PostgreSQL at {target}"),
        },
        _ = tokio::time::sleep(SLOW_POLL) => Ok(Woke::Look),
        _ = expired => Ok(Woke::Expired),
        signo = stop_signal(&sig_fd, signals) => Ok(Woke::Signal(signo?)),
    }
}

impl Semaphore for Postgres {
    fn acquire(&mut self, req: &Request, signals: &mut Signals) -> Result<Acquired> {
        let rt = Self::runtime()?;
        let keys = Keys { k: key(req.id) };
        let mut rec = Record {
            id: req.id.as_bytes().to_vec(),
            started_ms: now_ms(),
            jobs: req.jobs,
            pid: std::process::id(),
            host: sys::hostname(),
            command: req.command.to_string(),
        };
        let may_wait = req.deadline.is_none_or(|d| d > Instant::now());
        // Once per process is enough: --each acquires many times.
        let check = !self.pooler_checked;
        let got = rt.block_on(async {
            let mut s = if check {
                let deadline = tokio::time::Instant::now() + POOLER_CHECK;
                let other = async {
                    tokio::time::timeout_at(deadline, self.open())
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("no second session in time")))
                };
                let (s, other) = tokio::join!(self.open(), other);
                let s = s?;
                if self.shares_sessions(&s, other).await {
                    bail!(no_session_locks(&self.target, ""));
                }
                s
            } else {
                self.open().await?
            };
            let mut place = None;
            let mut since = None;
            loop {
                match attempt(&s, &keys, req.jobs, &rec, place, may_wait).await? {
                    Attempt::Took(slot) => return Ok(Some((s, slot))),
                    Attempt::Shared => bail!(no_session_locks(&self.target, "")),
                    Attempt::Wait { held, place: p } => {
                        if p.is_none() {
                            self.say(req, "no free slot; giving up at once");
                            return Ok(None);
                        }
                        if since.is_none() {
                            since = Some(Instant::now());
                            self.say(
                                req,
                                &format!("waiting for a slot ({held} held, limit {})", req.jobs),
                            );
                        }
                        place = p;
                    }
                }
                match sleep(&mut s, req.deadline, signals, &self.target).await? {
                    Woke::Look => {}
                    Woke::Expired => {
                        let waited = since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                        self.say(req, &format!("no slot within {waited:.3}s; giving up"));
                        leave(&s, &keys).await;
                        return Err(anyhow::Error::new(TimedOut));
                    }
                    Woke::Signal(signo) => {
                        leave(&s, &keys).await;
                        return Err(anyhow::Error::new(Interrupted(signo)));
                    }
                }
            }
        });
        self.pooler_checked = true;
        let (s, slot) = match got {
            Ok(Some(taken)) => taken,
            Ok(None) => return Ok(Acquired::TimedOut),
            Err(e) if e.is::<TimedOut>() => return Ok(Acquired::TimedOut),
            Err(e) => match e.downcast::<Interrupted>() {
                Ok(Interrupted(signo)) => return Ok(Acquired::Interrupted(signo)),
                Err(e) => return Err(e),
            },
        };
        rec.started_ms = now_ms();
        let locks = rt.block_on(self.check_session_locks(&s, &keys, slot, &rec))?;
        if locks != Locks::Kept {
            let left = if locks == Locks::NotKeptAndSlotLeft {
                format!(
                    "; slot {slot} of '{}' stays taken until the pooler closes the server \
                     session that holds it",
                    req.id
                )
            } else {
                String::new()
            };
            bail!(no_session_locks(&self.target, &left));
        }
        let failures = (self.clone(), req.id.clone());
        Ok(Acquired::Slot(Box::new(PgSlot::start(
            failures,
            rt,
            s,
            keys,
            slot,
            rec,
            (self.pg.clone(), self.tls.clone()),
            self.target.clone(),
            self.lost_after,
        )?)))
    }

    fn status(&mut self, only: Option<&Id>) -> Result<Vec<IdStatus>> {
        let rt = Self::runtime()?;
        let filter = only.map(key);
        let (holders, waiters) = rt.block_on(async {
            let s = self.open().await?;
            let key_cond = filter.map_or(String::new(), |k| format!(" AND l.classid = '{k}'::oid"));
            let name_like = filter.map_or("qsem w %".to_string(), |k| format!("qsem w {k:08x} %"));
            let res = s
                .query(&format!(
                    "SELECT l.classid::text, l.objid::text, a.application_name, \
                     coalesce(a.query, '') FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                     AND l.mode = 'ExclusiveLock' AND a.application_name LIKE 'qsem h %' \
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()){key_cond}; \
                     SELECT application_name, coalesce(query, '') FROM pg_stat_activity \
                     WHERE application_name LIKE {} AND datname = current_database()",
                    lit(&name_like)
                ))
                .await?;
            anyhow::Ok((
                res.first().cloned().unwrap_or_default(),
                res.get(1).cloned().unwrap_or_default(),
            ))
        })?;
        let text =
            |row: &Vec<Option<String>>, i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        // Grouped by key; the id's name comes from a record when one is readable.
        let mut by_key: BTreeMap<u32, (Option<Id>, Vec<Holder>, u32)> = BTreeMap::new();
        let name_of =
            |k: u32,
             rec: Option<&Record>,
             map: &mut BTreeMap<u32, (Option<Id>, Vec<Holder>, u32)>| {
                let entry = map.entry(k).or_insert((None, Vec::new(), 0));
                if entry.0.is_none() {
                    entry.0 = rec.and_then(|r| Id::new(OsStr::from_bytes(&r.id)).ok());
                }
            };
        for row in &holders {
            let (Ok(k), Ok(slot)) = (text(row, 0).parse::<u32>(), text(row, 1).parse::<u32>())
            else {
                continue;
            };
            if !(1..=MAX_SLOT).contains(&slot) {
                continue;
            }
            let rec = Record::parse(&text(row, 3));
            if let (Some(only), Some(r)) = (only, &rec)
                && r.id != only.as_bytes()
            {
                continue; // another id with the same key
            }
            name_of(k, rec.as_ref(), &mut by_key);
            let app = text(row, 2);
            // qsem h <key> <slot> <N> <pid>@<host>
            let mut it = app.splitn(6, ' ').skip(4);
            let jobs = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let (pid, host) = it
                .next()
                .and_then(|p| p.split_once('@'))
                .map(|(p, h)| (p.parse().unwrap_or(0), h.to_string()))
                .unwrap_or((0, "?".into()));
            let holder = match &rec {
                Some(r) => Holder {
                    slot,
                    pid: r.pid,
                    host: r.host.clone(),
                    started: Some(UNIX_EPOCH + Duration::from_millis(r.started_ms)),
                    jobs: r.jobs,
                    command: r.command.clone(),
                },
                None => Holder {
                    slot,
                    pid,
                    host,
                    started: None,
                    jobs,
                    command: "?".into(),
                },
            };
            by_key.get_mut(&k).expect("entered above").1.push(holder);
        }
        for row in &waiters {
            let app = text(row, 0);
            let Some(k) = app
                .split(' ')
                .nth(2)
                .and_then(|h| u32::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            let rec = Record::parse(&text(row, 1));
            if let (Some(only), Some(r)) = (only, &rec)
                && r.id != only.as_bytes()
            {
                continue;
            }
            name_of(k, rec.as_ref(), &mut by_key);
            by_key.get_mut(&k).expect("entered above").2 += 1;
        }
        let mut out: Vec<IdStatus> = by_key
            .into_iter()
            .map(|(k, (id, mut holders, waiting))| {
                holders.sort_by_key(|h| h.slot);
                let id = id.or_else(|| only.cloned()).unwrap_or_else(|| {
                    Id::new(OsStr::new(&format!("#{k:08x}"))).expect("valid id")
                });
                IdStatus {
                    id,
                    holders,
                    waiting,
                }
            })
            .collect();
        if out.is_empty()
            && let Some(id) = only
        {
            out.push(IdStatus {
                id: id.clone(),
                holders: Vec::new(),
                waiting: 0,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn wait_idle(
        &mut self,
        id: &Id,
        deadline: Option<Instant>,
        signals: &mut Signals,
    ) -> Result<Idle> {
        let rt = Self::runtime()?;
        let keys = Keys { k: key(id) };
        rt.block_on(async {
            let mut s = self.open().await?;
            // Listen before looking, so that no release between the look
            // and the sleep goes unheard.
            s.query(&format!("LISTEN {}", keys.channel())).await?;
            let mut told = None;
            loop {
                let (held, waiting) = busy(&s, &keys).await?;
                if held == 0 && waiting == 0 {
                    return Ok(Idle::Reached);
                }
                if self.verbose && told != Some((held, waiting)) {
                    told = Some((held, waiting));
                    report::line(
                        id,
                        &format!("waiting for {held} held slot(s) and {waiting} waiter(s)"),
                    );
                }
                match sleep(&mut s, deadline, signals, &self.target).await? {
                    Woke::Look => {}
                    Woke::Expired => return Ok(Idle::TimedOut),
                    Woke::Signal(signo) => return Ok(Idle::Interrupted(signo)),
                }
            }
        })
    }

    fn take_failures(&mut self, id: &Id) -> Result<u32> {
        let rt = Self::runtime()?;
        let n: i64 = rt
            .block_on(async {
                let s = self.open().await?;
                if !failures_table(&s).await? {
                    return Ok(0);
                }
                // One statement: two barriers that end together count each
                // failure once between them.
                let row = s
                    .client
                    .query_one(
                        "WITH gone AS (DELETE FROM qsem_failures WHERE id = $1 RETURNING 1) \
                         SELECT count(*) FROM gone",
                        &[&id.as_bytes()],
                    )
                    .await
                    .map_err(|e| anyhow!(error_text(&e)))?;
                anyhow::Ok(row.get(0))
            })
            .with_context(|| {
                format!(
                    "cannot count the failed jobs of '{id}' on PostgreSQL at {}",
                    self.target
                )
            })?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

/// A waiter that gives up tells the others, in case they deferred to it.
/// Best effort, and quick: qsem is about to exit, which ends the session anyway.
async fn leave(s: &Session, keys: &Keys) {
    let sql = format!("NOTIFY {}", keys.channel());
    let _ = tokio::time::timeout(Duration::from_millis(200), s.query(&sql)).await;
}

/// The wait expired (carried through `block_on` as an error).
#[derive(Debug)]
struct TimedOut;
impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("timed out")
    }
}
impl std::error::Error for TimedOut {}

/// The error for a server that does not keep session locks, and so cannot
/// keep slots: in practice, a pooler in transaction or statement mode.
fn no_session_locks(target: &str, more: &str) -> String {
    format!(
        "PostgreSQL at {target} does not keep session locks (a connection pooler in \
         transaction or statement mode?); point --backend at the server itself, or at a \
         pooler in session mode{more}"
    )
}

/// A stop signal arrived while waiting.
#[derive(Debug)]
struct Interrupted(Received);
impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by signal {}", self.0.signo)
    }
}
impl std::error::Error for Interrupted {}

/// What the runner's thread asks of the holder's thread.
enum Command {
    SetChild(u32),
    Release,
}

/// A held slot: a thread keeps the session, beats the heart, and reports.
struct PgSlot {
    /// Where a background job's failure is recorded (see [`Slot::finish`]).
    failures: (Postgres, Id),
    number: u32,
    commands: mpsc::UnboundedSender<Command>,
    events: Arc<Mutex<Vec<SlotEvent>>>,
    /// Readable when `events` has news.
    wake: OwnedFd,
    done: std::sync::mpsc::Receiver<()>,
}

/// What the holder's thread works with.
struct Holding {
    keys: Keys,
    rec: Record,
    pg: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    target: String,
    lost_after: Duration,
    events: Arc<Mutex<Vec<SlotEvent>>>,
    wake: OwnedFd,
}

impl PgSlot {
    #[allow(clippy::too_many_arguments)]
    fn start(
        failures: (Postgres, Id),
        rt: tokio::runtime::Runtime,
        s: Session,
        keys: Keys,
        slot: u32,
        rec: Record,
        (pg, tls): (tokio_postgres::Config, Option<MakeRustlsConnect>),
        target: String,
        lost_after: Duration,
    ) -> Result<PgSlot> {
        let (read, write) = sys::pipe().context("cannot create a pipe")?;
        set_nonblocking(read.as_fd())?;
        set_nonblocking(write.as_fd())?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let h = Holding {
            keys,
            rec,
            pg,
            tls,
            target,
            lost_after,
            events: events.clone(),
            wake: write,
        };
        std::thread::Builder::new()
            .name("qsem-holder".into())
            .spawn(move || {
                rt.block_on(h.run(s, slot, rx));
                let _ = done_tx.send(());
            })
            .context("cannot start a thread")?;
        Ok(PgSlot {
            failures,
            number: slot,
            commands,
            events,
            wake: read,
            done,
        })
    }
}

fn set_nonblocking(fd: BorrowedFd) -> Result<()> {
    // SAFETY: no memory is passed.
    let rc = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set up a pipe");
    }
    Ok(())
}

impl Holding {
    fn tell(&self, event: SlotEvent) {
        self.events.lock().expect("not poisoned").push(event);
        // The pipe only needs to be readable; a full pipe already is.
        // SAFETY: one byte from a valid buffer.
        unsafe { libc::write(self.wake.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    }

    async fn run(mut self, s: Session, slot: u32, mut commands: mpsc::UnboundedReceiver<Command>) {
        let every = HEARTBEAT.min(self.lost_after / 3);
        let mut held: Option<(Session, u32)> = Some((s, slot));
        // When the server last confirmed that this session holds the slot.
        let mut confirmed = Instant::now();
        loop {
            let news = async {
                match held.as_mut() {
                    Some((s, _)) => s.news.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::SetChild(pid)) => {
                        self.rec.pid = pid;
                        self.beat(&mut held, &mut confirmed).await;
                    }
                    Some(Command::Release) | None => {
                        if let Some((s, k)) = held.take() {
                            let sql = format!(
                                "SELECT pg_advisory_unlock({}, {k}); NOTIFY {}",
                                key_i32(self.keys.k),
                                self.keys.channel()
                            );
                            let _ = tokio::time::timeout(RELEASE_TIMEOUT, s.query(&sql)).await;
                        }
                        return;
                    }
                },
                news = news => match news {
                    Some(News::Notified) => {}
                    Some(News::Closed(why)) => self.lose(&mut held, format!("the server ended the session ({why})")),
                    None => self.lose(&mut held, "the session ended".into()),
                },
                _ = tokio::time::sleep(every) => match &held {
                    Some(_) => self.beat(&mut held, &mut confirmed).await,
                    None => {
                        if let Ok(Some(taken)) = self.retake().await {
                            let note = if taken.1 == slot {
                                String::new()
                            } else {
                                format!(" (the command's QSEM_SLOT still says {slot})")
                            };
                            self.tell(SlotEvent::Regained(format!(
                                "took slot {} again{note}",
                                taken.1
                            )));
                            held = Some(taken);
                            confirmed = Instant::now();
                        }
                    }
                },
            }
        }
    }

    /// One heartbeat. It may wait for an answer only until `--lost-after`
    /// has passed since the last confirmation: by then a server cut off from
    /// us has freed the slot, so we must say it is lost.
    async fn beat(&self, held: &mut Option<(Session, u32)>, confirmed: &mut Instant) {
        let Some((s, k)) = held.as_ref() else { return };
        let left = (*confirmed + self.lost_after).saturating_duration_since(Instant::now());
        let beat = heartbeat(s, &self.keys, *k, &self.rec);
        match tokio::time::timeout(left.max(Duration::from_millis(100)), beat).await {
            Ok(Ok(true)) => *confirmed = Instant::now(),
            outcome => self.lose(held, beat_failure(outcome, self.lost_after)),
        }
    }

    fn lose(&self, held: &mut Option<(Session, u32)>, why: String) {
        if let Some((_, k)) = held.take() {
            self.tell(SlotEvent::Lost(format!(
                "lost slot {k} on PostgreSQL at {}: {why}",
                self.target
            )));
        }
    }

    /// One try, in a new session, to take a slot by the ordinary rule.
    async fn retake(&self) -> Result<Option<(Session, u32)>> {
        let open = Session::open(&self.pg, self.tls.as_ref(), &self.target, self.lost_after);
        let s = tokio::time::timeout(self.lost_after, open).await??;
        match attempt(&s, &self.keys, self.rec.jobs, &self.rec, None, false).await? {
            Attempt::Took(k) => Ok(heartbeat(&s, &self.keys, k, &self.rec)
                .await?
                .then_some((s, k))),
            Attempt::Wait { .. } | Attempt::Shared => Ok(None),
        }
    }
}

fn beat_failure(
    outcome: Result<Result<bool>, tokio::time::error::Elapsed>,
    lost_after: Duration,
) -> String {
    match outcome {
        Ok(Ok(_)) => "the server no longer holds it (terminated? a connection pooler?)".into(),
        Ok(Err(e)) => format!("the heartbeat failed ({e:#})"),
        Err(_) => format!(
            "no answer from the server for {} (--lost-after)",
            crate::duration::human(lost_after)
        ),
    }
}

impl Slot for PgSlot {
    fn number(&self) -> u32 {
        self.number
    }

    fn inheritable(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn fence(&self) -> Option<u64> {
        None
    }

    fn started(&mut self, pid: u32) {
        let _ = self.commands.send(Command::SetChild(pid));
    }

    fn finish(self: Box<Self>, failure: Option<&str>) -> Result<()> {
        match failure {
            Some(line) => self.failures.0.record_failure(&self.failures.1, line),
            None => Ok(()),
        }
    }

    fn events(&self) -> Option<BorrowedFd<'_>> {
        Some(self.wake.as_fd())
    }

    fn take_events(&mut self) -> Vec<SlotEvent> {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a valid local buffer; the pipe is non-blocking.
        while unsafe { libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
        }
        std::mem::take(&mut *self.events.lock().expect("not poisoned"))
    }
}

impl Drop for PgSlot {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Release);
        // Unlock and NOTIFY if the server answers soon; else qsem's exit hangs
        // up, and the server frees the slot on its own.
        let _ = self
            .done
            .recv_timeout(RELEASE_TIMEOUT + Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable() {
        let id = |s: &str| Id::new(OsStr::new(s)).unwrap();
        // FNV-1a 32 reference values: they are the on-server interface.
        assert_eq!(key(&id("a")), 0xe40c_292c);
        assert_eq!(key(&id("foobar")), 0xbf9c_f968);
        assert_eq!(key_i32(0xe40c_292c), -468_965_076);
    }

    #[test]
    fn keepalives_fit_the_bound() {
        for secs in [2u64, 3, 5, 10, 30, 60, 3600] {
            let ka = Keepalive::for_bound(Duration::from_secs(secs));
            assert!(ka.total() <= Duration::from_secs(secs), "{secs}: {ka:?}");
            assert!(ka.idle >= 1 && ka.interval >= 1 && ka.count >= 1, "{ka:?}");
        }
        assert_eq!(
            Keepalive::for_bound(Duration::from_secs(30)),
            Keepalive {
                idle: 14,
                interval: 5,
                count: 3
            }
        );
    }

    #[test]
    fn admission_rule() {
        let w = |arrival, pid, jobs| Waiter { arrival, pid, jobs };
        // Lowest free slot, while fewer than N are held.
        assert_eq!(admit(&[], 2, &[], None), Some(1));
        assert_eq!(admit(&[1, 3], 5, &[], None), Some(2));
        assert_eq!(admit(&[1, 2], 2, &[], None), None);
        // Mixed N: a -j7 newcomer may run where a -j2 may not.
        assert_eq!(admit(&[1, 2], 7, &[w(1, 10, 2)], None), Some(3));
        // An older admissible waiter goes first; an older inadmissible one does not block.
        assert_eq!(admit(&[1], 5, &[w(1, 10, 3)], None), None);
        assert_eq!(admit(&[1], 5, &[w(1, 10, 3)], Some((2, 11))), None);
        assert_eq!(admit(&[1], 5, &[w(3, 10, 3)], Some((2, 11))), Some(2));
        assert_eq!(admit(&[1], 5, &[w(1, 10, 1)], Some((2, 11))), Some(2));
        // Equal arrival: the lower pid is older.
        assert_eq!(admit(&[], 5, &[w(2, 10, 3)], Some((2, 11))), None);
        assert_eq!(admit(&[], 5, &[w(2, 12, 3)], Some((2, 11))), Some(1));
    }

    #[test]
    fn records_round_trip_and_stay_comments() {
        let r = Record {
            id: b"a b/*".to_vec(),
            started_ms: 1_700_000_000_123,
            jobs: 3,
            pid: 42,
            host: "web 1".into(),
            command: "sh -c 'echo */ /* x'\nnext".into(),
        };
        let text = r.render();
        assert!(
            text.starts_with("/*qsem ") && text.ends_with("*/ "),
            "{text}"
        );
        assert_eq!(text.matches("*/").count(), 1, "{text}");
        assert_eq!(text.matches("/*").count(), 1, "{text}");
        let back = Record::parse(&format!("{text}SELECT 1")).unwrap();
        assert_eq!(back.id, r.id);
        assert_eq!(
            (back.started_ms, back.jobs, back.pid),
            (r.started_ms, 3, 42)
        );
        assert_eq!(back.host, "web_1");
        assert_eq!(back.command, "sh -c 'echo * / / * x' next");
        assert_eq!(Record::parse("SELECT 1"), None);
    }

    #[test]
    fn waiter_names() {
        let keys = Keys { k: 0xab };
        let name = keys.waiter_name(1_700_000_000_000_000, 7);
        assert_eq!(name, "qsem w 000000ab 1700000000000000 7");
        assert_eq!(
            parse_waiter(&name, 9),
            Some(Waiter {
                arrival: 1_700_000_000_000_000,
                pid: 9,
                jobs: 7
            })
        );
        assert_eq!(parse_waiter("qsem h 000000ab 1 2 3@x", 9), None);
    }

    #[test]
    fn literals_and_names() {
        assert_eq!(lit("it's"), "'it''s'");
        assert_eq!(cut("héllo", 2), "h");
        let keys = Keys { k: 1 };
        let rec = Record {
            id: b"x".to_vec(),
            started_ms: 0,
            jobs: 2,
            pid: 7,
            host: "h".repeat(100),
            command: String::new(),
        };
        let name = keys.holder_name(3, &rec);
        assert!(name.starts_with("qsem h 00000001 3 2 7@hhh"), "{name}");
        assert_eq!(name.len(), 63);
    }
}
