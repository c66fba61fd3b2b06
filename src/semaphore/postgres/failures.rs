//! Failed background jobs, for the next `--wait-all`: the one thing kept in
//! a table, `qsem_failures` (id bytes, time, host, report line), since it
//! must outlive every session (the next `--wait-all` may run on another
//! machine, after the job's qsem has gone). It is created by the first
//! failure in the first schema of the `search_path`, or by a DBA, with
//! INSERT, SELECT and DELETE granted to qsem's roles. A supervisor inserts
//! its row before it releases the slot; `--wait-all` counts and deletes the
//! id's rows in one statement.
//!
//! A failure the server will not take (no table and no right to create it,
//! a read-only server, a full disk, no answer) is kept in this host's lock
//! directory instead, through the lock-file engine's own failure record
//! under a local id, and the next `--wait-all` on this host counts it too:
//! a failure is never silently lost, and the supervisor still says why.

use super::connect::Connector;
use super::queue::local_id;
use super::session::{Session, error_text, value};
use super::{Postgres, runtime};
use crate::config::Backend;
use crate::id::Id;
use crate::semaphore::{Acquired, Request};
use crate::signals::Signals;
use anyhow::{Context, Result, anyhow};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The table of failed background jobs, created by the first failure.
const FAILURES_TABLE: &str = "CREATE TABLE IF NOT EXISTS qsem_failures (\
     id bytea NOT NULL, failed_at timestamptz NOT NULL DEFAULT now(), \
     host text NOT NULL, line text NOT NULL); \
     COMMENT ON TABLE qsem_failures IS 'qsem: failed background (--bg) jobs, \
     counted and deleted by the next qsem --wait-all of the id'";

/// The lock that serialises creating the table (two concurrent `CREATE TABLE
/// IF NOT EXISTS` can clash): "qsem" in ASCII, a key no slot can have.
const CREATE_LOCK: i64 = 0x7173_656d;

/// Records the failures of one background job's slot.
pub struct Recorder {
    c: Connector,
    dir: PathBuf,
    id: Id,
}

impl Recorder {
    pub fn new(c: Connector, dir: &Path, id: &Id) -> Recorder {
        Recorder {
            c,
            dir: dir.to_path_buf(),
            id: id.clone(),
        }
    }

    /// Records a failed background job under its id, on the server or, if
    /// it will not take it, in the local lock directory (and says so).
    pub fn record(&self, line: &str) -> Result<()> {
        let on_server = runtime().and_then(|rt| {
            // The job's slot is still held: a server that does not answer
            // must not keep it so for ever.
            rt.block_on(async {
                tokio::time::timeout(self.c.lost_after, insert(&self.c, &self.id, line)).await
            })
            .map_err(|_| anyhow!("no answer within --lost-after"))
            .and_then(|r| r)
        });
        let Err(e) = on_server else { return Ok(()) };
        let kept = match record_locally(&self.dir, &self.c.target, &self.id, line) {
            Ok(()) => "kept in the local lock directory for the next --wait-all on this host",
            Err(_) => "and not kept anywhere else either",
        };
        Err(e.context(format!(
            "cannot record a failed job of '{}' on PostgreSQL at {} ({kept})",
            self.id, self.c.target
        )))
    }
}

async fn insert(c: &Connector, id: &Id, line: &str) -> Result<()> {
    let s = c.open().await?;
    // Created only when missing: `CREATE ... IF NOT EXISTS` needs the
    // CREATE privilege even when the table is there, and a role may have
    // been granted only INSERT, SELECT and DELETE on it.
    if !table_exists(&s).await? {
        s.query(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({CREATE_LOCK}); {FAILURES_TABLE}; COMMIT"
        ))
        .await
        .context("cannot create the table qsem_failures")?;
    }
    s.client
        .execute(
            "INSERT INTO qsem_failures (id, host, line) VALUES ($1, $2, $3)",
            &[
                &id.as_bytes(),
                &crate::sys::hostname(),
                &line.replace('\0', ""),
            ],
        )
        .await
        .map_err(|e| anyhow!(error_text(&e)))?;
    Ok(())
}

/// The local stand-in: the lock-file engine's failure record of a local id.
fn record_locally(dir: &Path, target: &str, id: &Id, line: &str) -> Result<()> {
    let mut files = crate::semaphore::open(&Backend::Files, dir, false)?;
    let local = local_id(target, id, "failed");
    let req = Request {
        id: &local,
        jobs: crate::jobs::MAX_JOBS,
        deadline: Some(Instant::now()),
        max_waiting: None,
        // A background slot is what the engine records an outcome for.
        background: true,
        command: "",
    };
    let mut signals = Signals::install()?;
    match files.acquire(&req, &mut signals)? {
        Acquired::Slot(slot) => slot.finish(Some(line)),
        _ => Err(anyhow!("no local slot to record it under")),
    }
}

/// Whether `qsem_failures` is on the search path (and visible to this role).
async fn table_exists(s: &Session) -> Result<bool> {
    let res = s
        .query("SELECT (to_regclass('qsem_failures') IS NOT NULL)::text")
        .await?;
    Ok(value(&res, 0) == Some("true"))
}

/// How many background jobs of `id` failed since the last call, on the
/// server and, kept locally, on this host; both are reset.
pub fn take(pg: &Postgres, id: &Id) -> Result<u32> {
    let c = &pg.connector;
    let n: i64 = runtime()?
        .block_on(async {
            let s = c.open().await?;
            if !table_exists(&s).await? {
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
                c.target
            )
        })?;
    let local = pg
        .local()?
        .take_failures(&local_id(&c.target, id, "failed"))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX).saturating_add(local))
}
