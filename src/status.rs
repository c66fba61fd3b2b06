//! `--status`: the holders and waiters the semaphore reports, as an aligned
//! table for people or one JSON document for programs. Pure rendering: the
//! data comes from `Semaphore::status`.

use crate::duration;
use crate::semaphore::IdStatus;
use std::fmt::Write;
use std::time::SystemTime;

/// The table: one row per held slot, then one summary line per id.
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
        })
        .collect()
}

pub fn table(ids: &[IdStatus], now: SystemTime) -> String {
    if ids.is_empty() {
        return "no slot held, nobody waiting\n".to_string();
    }
    let mut rows = vec![["ID", "SLOT", "PID", "HOST", "ELAPSED", "COMMAND"].map(String::from)];
    for s in ids {
        for h in &s.holders {
            rows.push([
                s.id.to_string(),
                h.slot.to_string(),
                h.pid.to_string(),
                h.host.clone(),
                h.started
                    .and_then(|t| now.duration_since(t).ok())
                    .map_or("?".into(), duration::human),
                h.command.clone(),
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
        let _ = writeln!(
            out,
            "{}: {} held, {} waiting",
            s.id,
            s.holders.len(),
            s.waiting
        );
    }
    out
}

/// One JSON document: `{"ids": [{"id", "held", "waiting", "holders": [...]}]}`.
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
            s.holders.len(),
            s.waiting
        );
        for (j, h) in s.holders.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let started = h
                .started
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
            let elapsed = h.started.and_then(|t| now.duration_since(t).ok());
            let num = |d: Option<std::time::Duration>| {
                d.map_or("null".into(), |d| format!("{:.3}", d.as_secs_f64()))
            };
            let _ = write!(
                out,
                "{{\"slot\":{},\"pid\":{},\"host\":{},\"jobs\":{},\"started\":{},\"elapsed\":{},\"command\":{}}}",
                h.slot,
                h.pid,
                quote(&h.host),
                h.jobs,
                num(started),
                num(elapsed),
                quote(&h.command)
            );
        }
        out.push_str("]}");
    }
    out.push_str("]}\n");
    out
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
    use crate::semaphore::Holder;
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
        }];
        (ids, now)
    }

    #[test]
    fn table_rows_and_summary() {
        let (ids, now) = sample();
        let t = table(&ids, now);
        assert!(t.starts_with("ID    SLOT  PID  HOST  ELAPSED  COMMAND\nproc  1     42   web1  12.4s    Import \"x\"\n"), "{t}");
        assert!(t.ends_with("proc: 1 held, 3 waiting\n"), "{t}");
        assert_eq!(table(&[], now), "no slot held, nobody waiting\n");
    }

    #[test]
    fn json_document() {
        let (ids, now) = sample();
        assert_eq!(
            json(&ids, now),
            "{\"ids\":[{\"id\":\"proc\",\"held\":1,\"waiting\":3,\"holders\":[{\"slot\":1,\"pid\":42,\"host\":\"web1\",\"jobs\":2,\"started\":987.600,\"elapsed\":12.400,\"command\":\"Import \\\"x\\\"\"}]}]}\n"
        );
        assert_eq!(quote("a\u{1}"), "\"a\\u0001\"");
    }
}
