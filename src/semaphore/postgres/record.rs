//! The [`Record`]: who a session is, written as a comment before its
//! queries so that `pg_stat_activity` shows it to `--status` (the id, the
//! start on the server's clock, the limit, the pid, host and command), in a
//! form that nothing in it can end or nest.

use super::session::cut;
use std::fmt::Write as _;

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

/// Who a session is, for `--status`: written as a comment before each of its
/// queries, so that its last query (which `pg_stat_activity` shows) says it.
/// `started_ms` is on the server's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: Vec<u8>,
    pub started_ms: u64,
    pub jobs: u32,
    pub pid: u32,
    pub host: String,
    pub command: String,
}

impl Record {
    pub fn render(&self) -> String {
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

    pub fn parse(query: &str) -> Option<Record> {
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
#[cfg(test)]
mod tests {
    use super::*;

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
}
