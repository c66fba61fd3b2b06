//! `--history`: what the journal says of each id, as a table for people or
//! one JSON document for scripts. Pure: records in, text out.
//!
//! Percentiles are nearest-rank over the records themselves (a journal holds
//! some thousands, so sorting them is cheap and nothing is approximated). The
//! wait counts every invocation, including those that gave up; the run time
//! only those whose job started.

use super::record::{Outcome, Record, Skip};
use crate::duration;
use crate::id::Id;
use crate::status::quote;
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The 50th, 90th and 99th percentiles and the maximum of some durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Spread {
    /// `None` for no values.
    pub fn of(mut values: Vec<Duration>) -> Option<Spread> {
        values.sort_unstable();
        let max = *values.last()?;
        // Nearest rank: the smallest value at or above p percent of them.
        let rank = |p: usize| values[(values.len() * p).div_ceil(100) - 1];
        Some(Spread {
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max,
        })
    }
}

/// What the journal says of one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub id: Id,
    pub ok: u64,
    pub failed: u64,
    pub timed_out: u64,
    /// Skipped because the wait expired, the backlog was full, or a signal came.
    pub expired: u64,
    pub crowded: u64,
    pub interrupted: u64,
    pub wait: Option<Spread>,
    pub run: Option<Spread>,
    /// The latest failed or timed-out job: when it started, and its line.
    pub last_failure: Option<(SystemTime, String)>,
}

impl Summary {
    pub fn invocations(&self) -> u64 {
        self.ok + self.failed + self.timed_out + self.skipped()
    }

    pub fn skipped(&self) -> u64 {
        self.expired + self.crowded + self.interrupted
    }
}

/// Sums up the records that started at `from` or later (all if `None`).
pub fn summarise(id: Id, records: &[Record], from: Option<SystemTime>) -> Summary {
    let mut s = Summary {
        id,
        ok: 0,
        failed: 0,
        timed_out: 0,
        expired: 0,
        crowded: 0,
        interrupted: 0,
        wait: None,
        run: None,
        last_failure: None,
    };
    let chosen: Vec<&Record> = records
        .iter()
        .filter(|r| from.is_none_or(|from| r.start >= from))
        .collect();
    for r in &chosen {
        let counter = match r.outcome {
            Outcome::Ok => &mut s.ok,
            Outcome::Failed(_) => &mut s.failed,
            Outcome::TimedOut => &mut s.timed_out,
            Outcome::Skipped(Skip::Expired) => &mut s.expired,
            Outcome::Skipped(Skip::Crowded) => &mut s.crowded,
            Outcome::Skipped(Skip::Signal(_)) => &mut s.interrupted,
        };
        *counter += 1;
        if matches!(r.outcome, Outcome::Failed(_) | Outcome::TimedOut)
            && s.last_failure.as_ref().is_none_or(|(t, _)| r.start >= *t)
        {
            s.last_failure = Some((r.start, r.line.clone()));
        }
    }
    s.wait = Spread::of(chosen.iter().map(|r| r.wait).collect());
    s.run = Spread::of(chosen.iter().filter_map(|r| r.run).collect());
    s
}

/// One row per id, then the last failure of each id that had one.
pub fn table(summaries: &[Summary], now: SystemTime) -> String {
    if summaries.is_empty() {
        return "no history yet\n".to_string();
    }
    let spread = |s: Option<Spread>| {
        s.map_or("-".to_string(), |s| {
            [s.p50, s.p90, s.p99, s.max]
                .map(duration::human)
                .join(" / ")
        })
    };
    let head = ["ID", "RUNS", "OK", "FAILED", "TIMED OUT", "SKIPPED"].map(String::from);
    let mut rows = vec![
        head.into_iter()
            .chain([
                "WAIT p50 / p90 / p99 / max".into(),
                "RUN p50 / p90 / p99 / max".into(),
            ])
            .collect::<Vec<_>>(),
    ];
    for s in summaries {
        let counts = [s.invocations(), s.ok, s.failed, s.timed_out, s.skipped()];
        let mut row = vec![s.id.to_string()];
        row.extend(counts.map(|n| n.to_string()));
        row.extend([spread(s.wait), spread(s.run)]);
        rows.push(row);
    }
    let width = |col: usize| {
        rows.iter()
            .map(|r| r[col].chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..rows[0].len()).map(width).collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (col, cell) in row.iter().enumerate() {
            let w = widths[col];
            // Names and times to the left, counts to the right.
            match col {
                1..=5 => write!(line, "{cell:>w$}  "),
                _ => write!(line, "{cell:<w$}  "),
            }
            .expect("writing to a String");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for s in summaries {
        if let Some((at, line)) = &s.last_failure {
            let ago = now
                .duration_since(*at)
                .map_or("just now".into(), |d| format!("{} ago", duration::human(d)));
            let _ = writeln!(out, "{}: last failure, started {ago}: {line}", s.id);
        }
    }
    out
}

/// `{"ids": [{"id", "invocations", "ok", "failed", "timed_out", "skipped":
/// {"expired", "crowded", "interrupted"}, "wait", "run", "last_failure"}]}`;
/// durations in seconds, times in seconds since 1970.
pub fn json(summaries: &[Summary]) -> String {
    let secs = |d: Duration| format!("{:.6}", d.as_secs_f64());
    let spread = |s: Option<Spread>| {
        s.map_or("null".to_string(), |s| {
            format!(
                "{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}}",
                secs(s.p50),
                secs(s.p90),
                secs(s.p99),
                secs(s.max)
            )
        })
    };
    let mut out = String::from("{\"ids\":[");
    for (i, s) in summaries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let failure = s
            .last_failure
            .as_ref()
            .map_or("null".to_string(), |(at, line)| {
                let at = at.duration_since(UNIX_EPOCH).unwrap_or_default();
                format!("{{\"started\":{},\"line\":{}}}", secs(at), quote(line))
            });
        let _ = write!(
            out,
            "{{\"id\":{},\"invocations\":{},\"ok\":{},\"failed\":{},\"timed_out\":{},\
             \"skipped\":{{\"expired\":{},\"crowded\":{},\"interrupted\":{}}},\
             \"wait\":{},\"run\":{},\"last_failure\":{failure}}}",
            quote(&String::from_utf8_lossy(s.id.as_bytes())),
            s.invocations(),
            s.ok,
            s.failed,
            s.timed_out,
            s.expired,
            s.crowded,
            s.interrupted,
            spread(s.wait),
            spread(s.run),
        );
    }
    out.push_str("]}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::Ended;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn rec(start: u64, wait: u64, run: Option<u64>, outcome: Outcome, line: &str) -> Record {
        Record {
            start: at(start),
            wait: ms(wait),
            run: run.map(ms),
            outcome,
            jobs: 1,
            pid: 0,
            line: line.into(),
        }
    }

    fn id(s: &str) -> Id {
        Id::new(std::ffi::OsStr::new(s)).unwrap()
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(Spread::of(vec![]), None);
        let one = Spread::of(vec![ms(7)]).unwrap();
        assert_eq!((one.p50, one.p99, one.max), (ms(7), ms(7), ms(7)));
        // 1..=100 ms, shuffled: the p-th percentile is p ms.
        let values: Vec<Duration> = (1..=100).rev().map(ms).collect();
        let s = Spread::of(values).unwrap();
        assert_eq!(
            (s.p50, s.p90, s.p99, s.max),
            (ms(50), ms(90), ms(99), ms(100))
        );
        let s = Spread::of((1..=10).map(ms).collect()).unwrap();
        assert_eq!((s.p50, s.p90, s.p99), (ms(5), ms(9), ms(10)));
    }

    fn sample() -> Vec<Record> {
        vec![
            rec(100, 1, Some(2000), Outcome::Ok, ""),
            rec(160, 1000, None, Outcome::Skipped(Skip::Expired), ""),
            rec(
                220,
                3,
                Some(500),
                Outcome::Failed(Ended::Status(3)),
                "x exited with status 3",
            ),
            rec(280, 0, None, Outcome::Skipped(Skip::Crowded), ""),
            rec(
                340,
                2,
                Some(60_000),
                Outcome::TimedOut,
                "x timed out after 1m",
            ),
            rec(
                200,
                5,
                Some(10),
                Outcome::Failed(Ended::Signal(9)),
                "x was killed by SIGKILL",
            ),
        ]
    }

    #[test]
    fn counts_and_the_last_failure() {
        let s = summarise(id("proc"), &sample(), None);
        assert_eq!((s.ok, s.failed, s.timed_out), (1, 2, 1));
        assert_eq!((s.expired, s.crowded, s.interrupted), (1, 1, 0));
        assert_eq!(s.invocations(), 6);
        // By start time, not by the order of the journal.
        assert_eq!(
            s.last_failure,
            Some((at(340), "x timed out after 1m".into()))
        );
        assert_eq!(s.wait.unwrap().max, ms(1000));
        let run = s.run.unwrap();
        assert_eq!((run.p50, run.max), (ms(500), ms(60_000)));
        let recent = summarise(id("proc"), &sample(), Some(at(250)));
        assert_eq!(
            (recent.invocations(), recent.crowded, recent.timed_out),
            (2, 1, 1)
        );
        let none = summarise(id("proc"), &sample(), Some(at(1000)));
        assert_eq!((none.invocations(), none.wait, none.run), (0, None, None));
    }

    #[test]
    fn table_for_people() {
        let s = summarise(id("proc"), &sample(), None);
        let quiet = summarise(id("nightly"), &sample()[..1], None);
        let text = table(&[s, quiet], at(400));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("ID       RUNS  OK  FAILED  TIMED OUT  SKIPPED  WAIT p50"),
            "{text}"
        );
        assert!(lines[1].starts_with("proc        6   1       2          1        2  2ms / 1.0s / 1.0s / 1.0s    500ms / 1m00s"), "{text}");
        assert!(
            lines[2].starts_with("nightly     1   1       0          0        0  1ms / 1ms"),
            "{text}"
        );
        assert_eq!(
            lines[3],
            "proc: last failure, started 1m00s ago: x timed out after 1m"
        );
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(table(&[], at(0)), "no history yet\n");
    }

    #[test]
    fn json_for_scripts() {
        let s = summarise(id("a\"b"), &sample(), None);
        let text = json(&[s]);
        for want in [
            "{\"ids\":[{\"id\":\"a\\\"b\",\"invocations\":6,\"ok\":1,\"failed\":2,\"timed_out\":1,",
            "\"skipped\":{\"expired\":1,\"crowded\":1,\"interrupted\":0}",
            "\"run\":{\"p50\":0.500000,\"p90\":60.000000,\"p99\":60.000000,\"max\":60.000000}",
            "\"last_failure\":{\"started\":340.000000,\"line\":\"x timed out after 1m\"}}]}\n",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        let empty = json(&[summarise(id("e"), &[], None)]);
        assert!(
            empty.contains("\"wait\":null,\"run\":null,\"last_failure\":null"),
            "{empty}"
        );
    }
}
