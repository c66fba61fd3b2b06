//! `--status`: the holders and waiters the semaphore reports, as an aligned
//! table for people or one JSON document for programs. Pure rendering: the
//! data comes from `Semaphore::status`.
//!
//! Waiters are listed as far as the engine can name them; the count
//! (`waiting`) stays the truth, so a list shorter than the count is shown
//! as it is, never padded or taken as complete. An age nobody knows is "?"
//! in the table and `null` in JSON.

use crate::duration;
use crate::semaphore::IdStatus;
use std::fmt::Write;
use std::time::SystemTime;

/// What `--status` prints: a table for people, or one JSON document.
pub fn render(ids: &[IdStatus], json: bool, now: SystemTime) -> String {
    if json {
        self::json(ids, now)
    } else {
        table(ids, now)
    }
}

/// The status of ids nobody has used yet (no lock directory): nothing
/// held, nobody waiting.
pub fn nobody(only: Option<&crate::id::Id>) -> Vec<IdStatus> {
    only.iter()
        .map(|&id| IdStatus {
            id: id.clone(),
            holders: Vec::new(),
            waiting: 0,
            waiters: Vec::new(),
        })
        .collect()
}

/// How long ago `t` was, for the table.
fn age(t: Option<SystemTime>, now: SystemTime) -> String {
    t.and_then(|t| now.duration_since(t).ok())
        .map_or("?".into(), duration::human)
}

/// A holder's slot as the table shows it: `-` for one that runs without a
/// slot (slot 0: it lost its slot and has not taken one again).
fn slot_text(slot: u32) -> String {
    match slot {
        0 => "-".into(),
        n => n.to_string(),
    }
}

/// How many slots of the id are held: its holders, less those without one.
fn held(s: &IdStatus) -> usize {
    s.holders.iter().filter(|h| h.slot != 0).count()
}

/// The table: one row per held slot, one per named waiter (slot column
/// "waiting", the elapsed column the time waited), then one summary line
/// per id.
pub fn table(ids: &[IdStatus], now: SystemTime) -> String {
    if ids.is_empty() {
        return "no slot held, nobody waiting\n".to_string();
    }
    let mut rows = vec![["ID", "SLOT", "PID", "HOST", "ELAPSED", "COMMAND"].map(String::from)];
    for s in ids {
        for h in &s.holders {
            rows.push([
                s.id.to_string(),
                slot_text(h.slot),
                h.pid.to_string(),
                h.host.clone(),
                age(h.started, now),
                h.command.clone(),
            ]);
        }
        for w in &s.waiters {
            rows.push([
                s.id.to_string(),
                "waiting".into(),
                w.pid.to_string(),
                w.host.clone(),
                age(w.since, now),
                String::new(),
            ]);
        }
    }
    let mut widths = [0; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    if rows.len() > 1 {
        for row in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                if i == row.len() - 1 {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    for s in ids {
        let _ = writeln!(out, "{}: {} held, {} waiting", s.id, held(s), s.waiting);
    }
    out
}

/// One JSON document: `{"ids": [{"id", "held", "waiting", "holders": [...],
/// "waiters": [...]}]}`; times are seconds (since the epoch for `started`
/// and `since`), `null` where unknown.
pub fn json(ids: &[IdStatus], now: SystemTime) -> String {
    let mut out = String::from("{\"ids\":[");
    for (i, s) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"id\":{},\"held\":{},\"waiting\":{},\"holders\":[",
            quote(&String::from_utf8_lossy(s.id.as_bytes())),
            held(s),
            s.waiting
        );
        for (j, h) in s.holders.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let (started, elapsed) = times(h.started, now);
            let _ = write!(
                out,
                "{{\"slot\":{},\"pid\":{},\"host\":{},\"jobs\":{},\"started\":{started},\"elapsed\":{elapsed},\"command\":{}}}",
                match h.slot {
                    0 => "null".to_string(),
                    n => n.to_string(),
                },
                h.pid,
                quote(&h.host),
                h.jobs,
                quote(&h.command)
            );
        }
        out.push_str("],\"waiters\":[");
        for (j, w) in s.waiters.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let (since, waited) = times(w.since, now);
            let _ = write!(
                out,
                "{{\"pid\":{},\"host\":{},\"since\":{since},\"waited\":{waited}}}",
                w.pid,
                quote(&w.host),
            );
        }
        out.push_str("]}");
    }
    out.push_str("]}\n");
    out
}

/// A time as JSON seconds since the epoch, and its age at `now`.
fn times(t: Option<SystemTime>, now: SystemTime) -> (String, String) {
    let num = |d: Option<std::time::Duration>| {
        d.map_or("null".into(), |d| format!("{:.3}", d.as_secs_f64()))
    };
    (
        num(t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())),
        num(t.and_then(|t| now.duration_since(t).ok())),
    )
}

/// A JSON string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;
    use crate::semaphore::{Holder, Waiter};
    use std::ffi::OsStr;
    use std::time::Duration;

    fn sample() -> (Vec<IdStatus>, SystemTime) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let ids = vec![IdStatus {
            id: Id::new(OsStr::new("proc")).unwrap(),
            holders: vec![Holder {
                slot: 1,
                pid: 42,
                host: "web1".into(),
                started: Some(now - Duration::from_millis(12_400)),
                jobs: 2,
                command: "Import \"x\"".into(),
            }],
            waiting: 3,
            // One of the three unnamed: only a count is known of it.
            waiters: vec![
                Waiter {
                    pid: 77,
                    host: "web2".into(),
                    since: Some(now - Duration::from_secs(5)),
                },
                Waiter {
                    pid: 78,
                    host: "web1".into(),
                    since: None,
                },
            ],
        }];
        (ids, now)
    }

    #[test]
    fn table_rows_and_summary() {
        let (ids, now) = sample();
        let t = table(&ids, now);
        assert!(
            t.starts_with(
                "ID    SLOT     PID  HOST  ELAPSED  COMMAND\n\
                 proc  1        42   web1  12.4s    Import \"x\"\n\
                 proc  waiting  77   web2  5.0s\n\
                 proc  waiting  78   web1  ?\n\n"
            ),
            "{t}"
        );
        assert!(t.ends_with("proc: 1 held, 3 waiting\n"), "{t}");
        assert_eq!(table(&[], now), "no slot held, nobody waiting\n");
    }

    #[test]
    fn json_document() {
        let (ids, now) = sample();
        assert_eq!(
            json(&ids, now),
            "{\"ids\":[{\"id\":\"proc\",\"held\":1,\"waiting\":3,\"holders\":[{\"slot\":1,\"pid\":42,\"host\":\"web1\",\"jobs\":2,\"started\":987.600,\"elapsed\":12.400,\"command\":\"Import \\\"x\\\"\"}],\
             \"waiters\":[{\"pid\":77,\"host\":\"web2\",\"since\":995.000,\"waited\":5.000},\
             {\"pid\":78,\"host\":\"web1\",\"since\":null,\"waited\":null}]}]}\n"
        );
        assert_eq!(quote("a\u{1}"), "\"a\\u0001\"");
    }
}
