//! One server session: connected, set up (timeouts that keep any one client
//! from stalling another, keepalives that let the server drop a silent one
//! within `--lost-after`, and what the server is: primary or standby, its
//! database's oid), queried in the simple protocol (several statements in
//! one message, one round trip), with a task that drives the connection and
//! passes on notifications and its end. The set-up is a round trip of its
//! own, or, for a waiter, the first part of its first admission attempt's
//! message: each round trip of a new session delays the job.
//!
//! A new server process plans its first statements with cold catalog caches,
//! and every function, operator and catalog a statement names costs a
//! lookup then (bench/RESULTS.md: 5.4 ms for the first message, 1.8 ms
//! warm). So what the server already reports at connection
//! (`in_hot_standby` and `default_transaction_read_only`, since PostgreSQL
//! 14) is read from the connection, not queried: a standby or read-only
//! server is refused before the first query is sent.

use super::connect::Keepalive;
use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The longest any one of qsem's statements may run on the server; they
/// take milliseconds, and none waits for a lock.
const STATEMENT_TIMEOUT_MS: u32 = 5000;
/// How long a statement may wait for a lock (only creating the failures
/// table ever does).
const LOCK_TIMEOUT_MS: u32 = 1000;
/// How long a session may sit inside a transaction: qsem never leaves one
/// open, so only a stalled client could.
const IDLE_IN_TRANSACTION_MS: u32 = 2000;

/// What the task that drives a connection tells its session.
pub enum News {
    /// A NOTIFY, with its payload: the slot a release gave back, if any.
    Notified(Option<u32>),
    Closed(String),
}

/// One open session.
pub struct Session {
    pub client: Client,
    pub news: mpsc::UnboundedReceiver<News>,
    /// `host:port/database`, for messages.
    target: String,
    /// The statements that set this session up, until its first query has
    /// sent them (see [`Session::connect`]).
    setup: Option<String>,
    /// Whether the server told at connection that it is a writable
    /// primary, so that the set-up need not ask.
    reported: bool,
    /// The server process that answered the first query (0 until then).
    /// Only a pooler in transaction or statement mode hands a later query
    /// to another one.
    pub pid: i32,
    /// The database's oid, as `pg_locks` names it (0 until known).
    pub database: u32,
    /// Whether the session LISTENs on the channel of the id it waits for.
    pub listening: bool,
    /// The server's major version, as it reported at connection (0 if not).
    pub major: u32,
}

/// The rows of each statement of a simple query, as text.
pub type Results = Vec<Vec<Vec<Option<String>>>>;

/// The first column of the first row of statement `i`'s result, if any.
pub fn value(res: &Results, i: usize) -> Option<&str> {
    res.get(i)?.first()?.first()?.as_deref()
}

/// [`value`] as a number; a missing or malformed one is an error.
pub fn number<T: std::str::FromStr>(res: &Results, i: usize) -> Result<T> {
    value(res, i)
        .and_then(|v| v.parse().ok())
        .context("unexpected answer from the server")
}

/// The statement that sets a session up: settings an ordinary user may
/// change (those the server does not know, on an old version, are skipped
/// rather than failing).
fn settings(ka: &Keepalive) -> String {
    format!(
        "SELECT set_config(s.name, s.value, false) FROM (VALUES \
         ('idle_session_timeout', '0'), ('statement_timeout', '{STATEMENT_TIMEOUT_MS}'), \
         ('lock_timeout', '{LOCK_TIMEOUT_MS}'), \
         ('idle_in_transaction_session_timeout', '{IDLE_IN_TRANSACTION_MS}'), \
         ('tcp_keepalives_idle', '{}'), ('tcp_keepalives_interval', '{}'), \
         ('tcp_keepalives_count', '{}'), ('tcp_user_timeout', '{}')) AS s(name, value) \
         WHERE current_setting(s.name, true) IS NOT NULL; ",
        ka.idle,
        ka.interval,
        ka.count,
        ka.total().as_millis()
    )
}

/// The statement whose answer [`Session::learn`] reads: the server process,
/// whether it is a standby or read-only, and the database's oid.
const FACTS: &str = "SELECT pg_backend_pid()::text, pg_is_in_recovery()::text, \
     current_setting('transaction_read_only'), \
     (SELECT oid FROM pg_database WHERE datname = current_database())::text; ";

/// What the server reported at connection, if it reports it (PostgreSQL 14
/// and later): a standby or read-only server is refused, `Ok(true)` is a
/// writable primary, `Ok(false)` a server that did not say.
fn reported<S, T>(conn: &tokio_postgres::Connection<S, T>, target: &str) -> Result<bool>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (Some(standby), Some(read_only)) = (
        conn.parameter("in_hot_standby"),
        conn.parameter("default_transaction_read_only"),
    ) else {
        return Ok(false);
    };
    if standby == "on" {
        return Err(anyhow::Error::new(Refused::standby(target)));
    }
    if read_only == "on" {
        return Err(anyhow::Error::new(Refused::read_only(target)));
    }
    Ok(true)
}

/// The server's major version from its `server_version` ("15.4 (Debian
/// 15.4-1)" is 15), or 0 if it did not report one.
fn major<S, T>(conn: &tokio_postgres::Connection<S, T>) -> u32
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.parameter("server_version").map_or(0, major_of)
}

fn major_of(version: &str) -> u32 {
    let digits = version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(version.len());
    version[..digits].parse().unwrap_or(0)
}

impl Session {
    /// A session connected but not yet set up: its first query must begin
    /// with [`Session::take_setup`]'s statements and hand their answer to
    /// [`Session::learn`], which saves a round trip where it matters (a
    /// waiter's first admission attempt).
    pub async fn connect(
        pg: &tokio_postgres::Config,
        tls: Option<&MakeRustlsConnect>,
        target: &str,
        ka: &Keepalive,
    ) -> Result<Session> {
        let failed = || format!("cannot connect to PostgreSQL at {target}");
        let (client, news, (reported, major)) = match tls {
            Some(tls) => {
                let (client, conn) = pg.connect(tls.clone()).await.with_context(failed)?;
                let known = (reported(&conn, target)?, major(&conn));
                (client, drive(conn), known)
            }
            None => {
                let (client, conn) = pg.connect(NoTls).await.with_context(failed)?;
                let known = (reported(&conn, target)?, major(&conn));
                (client, drive(conn), known)
            }
        };
        Ok(Session {
            client,
            news,
            target: target.to_string(),
            setup: Some(settings(ka)),
            reported,
            pid: 0,
            database: 0,
            listening: false,
            major,
        })
    }

    /// A session connected and set up, in a round trip of its own.
    pub async fn open(
        pg: &tokio_postgres::Config,
        tls: Option<&MakeRustlsConnect>,
        target: &str,
        ka: &Keepalive,
    ) -> Result<Session> {
        let mut s = Session::connect(pg, tls, target, ka).await?;
        let sql = s.take_setup(true);
        let res = s
            .query(&sql)
            .await
            .with_context(|| format!("cannot set up a session on PostgreSQL at {target}"))?;
        s.learn(&res, 1)?;
        Ok(s)
    }

    /// The set-up statements, if this session still needs them: the
    /// settings, then the facts [`Session::learn`] reads from the second
    /// statement's answer if `facts` or if the server did not report them
    /// at connection (see [`Session::wants_facts`]). Empty once sent.
    pub fn take_setup(&mut self, facts: bool) -> String {
        match self.setup.take() {
            Some(sql) if facts || !self.reported => sql + FACTS,
            Some(sql) => sql,
            None => String::new(),
        }
    }

    /// Whether [`Session::take_setup`]`(false)` includes the facts.
    pub fn wants_facts(&self) -> bool {
        self.setup.is_some() && !self.reported
    }

    /// Reads the facts of the set-up (statement `i` of `res`), and refuses a
    /// standby or a read-only server: its locks are not the primary's.
    pub fn learn(&mut self, res: &Results, i: usize) -> Result<()> {
        let row = res
            .get(i)
            .and_then(|rows| rows.first())
            .context("unexpected answer from the server")?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        if col(1) == "true" {
            return Err(anyhow::Error::new(Refused::standby(&self.target)));
        }
        if col(2) == "on" {
            return Err(anyhow::Error::new(Refused::read_only(&self.target)));
        }
        self.pid = col(0)
            .parse()
            .context("unexpected answer from the server")?;
        self.database = col(3)
            .parse()
            .context("unexpected answer from the server")?;
        Ok(())
    }

    /// The database's oid in SQL: a literal once known.
    pub fn db(&self) -> String {
        match self.database {
            0 => "(SELECT oid FROM pg_database WHERE datname = current_database())".into(),
            oid => format!("'{oid}'::oid"),
        }
    }

    pub async fn query(&self, sql: &str) -> Result<Results> {
        let msgs = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| anyhow::Error::new(QueryError::from(&e)))?;
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
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let _ = tx.send(News::Notified(n.payload().parse().ok()));
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

/// A server that qsem will not use, and why: a whole error line as it is.
#[derive(Debug)]
pub struct Refused(String);

impl Refused {
    fn standby(target: &str) -> Refused {
        Refused(format!(
            "PostgreSQL at {target} is a standby (in recovery): its locks are not the primary's; \
             point --backend at the primary"
        ))
    }

    fn read_only(target: &str) -> Refused {
        Refused(format!(
            "PostgreSQL at {target} is read-only (default_transaction_read_only or a standby): \
             point --backend at the primary"
        ))
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A failed query: the server's message, and whether the session (not the
/// request) failed, so that a waiter connects again rather than giving up.
#[derive(Debug)]
pub struct QueryError {
    text: String,
    pub broken: bool,
}

impl From<&tokio_postgres::Error> for QueryError {
    fn from(e: &tokio_postgres::Error) -> QueryError {
        // Class 08: connection exception; 57: operator intervention (a
        // shutdown, a terminated session, a server still starting).
        let broken = e.is_closed()
            || e.as_db_error().is_none_or(|db| {
                let code = db.code().code();
                code.starts_with("08") || code.starts_with("57") || db.severity() != "ERROR"
            });
        QueryError {
            text: error_text(e),
            broken,
        }
    }
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for QueryError {}

/// Whether `e` says that the session broke, rather than that a request failed.
pub fn broken(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<QueryError>().is_some_and(|q| q.broken))
}

/// A tokio-postgres error as one line, with the server's own message if any.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// An SQL string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\0', "").replace('\'', "''"))
}

/// Cuts a string to at most `max` bytes, on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(lit("it's"), "'it''s'");
        assert_eq!(cut("héllo", 2), "h");
    }

    #[test]
    fn major_versions() {
        assert_eq!(major_of("15.4 (Debian 15.4-1.pgdg120+1)"), 15);
        assert_eq!(major_of("9.6.24"), 9);
        assert_eq!(major_of("17devel"), 17);
        assert_eq!(major_of(""), 0);
    }
}
