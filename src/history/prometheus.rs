//! `--metrics`: the journal and the live state in Prometheus's text
//! exposition format (version 0.0.4), for node_exporter's textfile collector
//! (a command that exits cannot be scraped, so cron writes a file).
//!
//! Every family is written whole, HELP and TYPE first, one series per id;
//! label values are escaped as the format says (backslash, double quote,
//! newline), and an id that is not UTF-8 is shown with U+FFFD in place of
//! its bad bytes. The counters count what the journal holds, so they fall
//! back when the journal rotates, which Prometheus's `rate()` and
//! `increase()` take for a counter reset.

use super::record::{Outcome, Record};
use crate::id::Id;
use crate::semaphore::IdStatus;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// Bucket bounds of the wait, in seconds: from "at once" to "an hour".
const WAIT_BUCKETS: [f64; 9] = [0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0];
/// Bucket bounds of the run time, in seconds: from a second to a day.
const RUN_BUCKETS: [f64; 9] = [
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
];

const OUTCOMES: [&str; 4] = ["ok", "failed", "timed_out", "skipped"];

/// The exposition of every id with a journal or live holders or waiters.
pub fn render(journals: &[(Id, Vec<Record>)], live: &[IdStatus]) -> String {
    let mut ids: BTreeMap<&Id, (&[Record], Option<&IdStatus>)> = BTreeMap::new();
    for (id, records) in journals {
        ids.entry(id).or_default().0 = records;
    }
    for s in live {
        ids.entry(&s.id).or_default().1 = Some(s);
    }
    let mut out = String::new();
    family(
        &mut out,
        "qsem_runs_total",
        "counter",
        "Invocations in the journal, by outcome.",
    );
    for (id, (records, _)) in &ids {
        for outcome in OUTCOMES {
            let n = records
                .iter()
                .filter(|r| r.outcome.kind() == outcome)
                .count();
            let _ = writeln!(
                out,
                "qsem_runs_total{{id=\"{}\",outcome=\"{outcome}\"}} {n}",
                label(id)
            );
        }
    }
    family(
        &mut out,
        "qsem_wait_seconds",
        "histogram",
        "Time from the start of an invocation until the semaphore answered.",
    );
    for (id, (records, _)) in &ids {
        histogram(
            &mut out,
            "qsem_wait_seconds",
            id,
            &WAIT_BUCKETS,
            records.iter().map(|r| r.wait),
        );
    }
    family(
        &mut out,
        "qsem_run_seconds",
        "histogram",
        "Run time of the jobs that started.",
    );
    for (id, (records, _)) in &ids {
        histogram(
            &mut out,
            "qsem_run_seconds",
            id,
            &RUN_BUCKETS,
            records.iter().filter_map(|r| r.run),
        );
    }
    let failure = |r: &&Record| matches!(r.outcome, Outcome::Failed(_) | Outcome::TimedOut);
    family(
        &mut out,
        "qsem_last_failure_timestamp_seconds",
        "gauge",
        "When the latest failed or timed-out job in the journal started (0: none).",
    );
    for (id, (records, _)) in &ids {
        let at = records.iter().filter(failure).map(|r| r.start).max();
        let secs = at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "qsem_last_failure_timestamp_seconds{{id=\"{}\"}} {}",
            label(id),
            secs.as_secs_f64()
        );
    }
    family(
        &mut out,
        "qsem_holders",
        "gauge",
        "Slots of the id held now.",
    );
    for (id, (_, status)) in &ids {
        let n = status.map_or(0, |s| s.holders.len());
        let _ = writeln!(out, "qsem_holders{{id=\"{}\"}} {n}", label(id));
    }
    family(
        &mut out,
        "qsem_waiting",
        "gauge",
        "Invocations waiting for a slot of the id now.",
    );
    for (id, (_, status)) in &ids {
        let n = status.map_or(0, |s| s.waiting);
        let _ = writeln!(out, "qsem_waiting{{id=\"{}\"}} {n}", label(id));
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One id's series of a histogram: cumulative buckets, `+Inf`, sum, count.
fn histogram(
    out: &mut String,
    name: &str,
    id: &Id,
    bounds: &[f64],
    values: impl Iterator<Item = Duration>,
) {
    let values: Vec<f64> = values.map(|d| d.as_secs_f64()).collect();
    let id = label(id);
    for bound in bounds {
        let n = values.iter().filter(|&&v| v <= *bound).count();
        let _ = writeln!(out, "{name}_bucket{{id=\"{id}\",le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{id=\"{id}\",le=\"+Inf\"}} {}",
        values.len()
    );
    // Six decimals: microseconds, as recorded, without binary fractions' tails.
    let _ = writeln!(
        out,
        "{name}_sum{{id=\"{id}\"}} {:.6}",
        values.iter().sum::<f64>()
    );
    let _ = writeln!(out, "{name}_count{{id=\"{id}\"}} {}", values.len());
}

/// An id as a label value: `\`, `"` and newline escaped, as the format says.
fn label(id: &Id) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(id.as_bytes()).chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::{Ended, Skip};
    use crate::semaphore::Holder;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn id(s: &str) -> Id {
        Id::new(std::ffi::OsStr::new(s)).unwrap()
    }

    fn rec(wait_ms: u64, run_ms: Option<u64>, outcome: Outcome) -> Record {
        Record {
            start: UNIX_EPOCH + Duration::from_secs(1000),
            wait: Duration::from_millis(wait_ms),
            run: run_ms.map(Duration::from_millis),
            outcome,
            jobs: 1,
            pid: 1,
            line: String::new(),
        }
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label(&id("plain")), "plain");
        assert_eq!(label(&id("a\\b\"c\nd")), "a\\\\b\\\"c\\nd");
        let bad = Id::new(std::os::unix::ffi::OsStrExt::from_bytes(
            b"x\xff".as_slice(),
        ))
        .unwrap();
        assert_eq!(label(&bad), "x\u{fffd}");
    }

    #[test]
    fn families_counters_and_histograms() {
        let journal = vec![(
            id("proc"),
            vec![
                rec(0, Some(500), Outcome::Ok),
                rec(2000, None, Outcome::Skipped(Skip::Expired)),
                rec(5, Some(20_000), Outcome::Failed(Ended::Status(3))),
            ],
        )];
        let live = vec![IdStatus {
            id: id("other"),
            holders: vec![Holder {
                slot: 1,
                pid: 7,
                host: "h".into(),
                started: Some(SystemTime::now()),
                jobs: 2,
                command: "x".into(),
            }],
            waiting: 3,
        }];
        let text = render(&journal, &live);
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE qsem_runs_total counter",
            "qsem_runs_total{id=\"proc\",outcome=\"ok\"} 1",
            "qsem_runs_total{id=\"proc\",outcome=\"failed\"} 1",
            "qsem_runs_total{id=\"proc\",outcome=\"timed_out\"} 0",
            "qsem_runs_total{id=\"proc\",outcome=\"skipped\"} 1",
            "qsem_runs_total{id=\"other\",outcome=\"ok\"} 0",
            "# TYPE qsem_wait_seconds histogram",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"0.001\"} 1",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"0.01\"} 2",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"1\"} 2",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"10\"} 3",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"+Inf\"} 3",
            "qsem_wait_seconds_sum{id=\"proc\"} 2.005000",
            "qsem_wait_seconds_count{id=\"proc\"} 3",
            "qsem_run_seconds_bucket{id=\"proc\",le=\"1\"} 1",
            "qsem_run_seconds_bucket{id=\"proc\",le=\"60\"} 2",
            "qsem_run_seconds_count{id=\"proc\"} 2",
            "qsem_last_failure_timestamp_seconds{id=\"proc\"} 1000",
            "qsem_last_failure_timestamp_seconds{id=\"other\"} 0",
            "qsem_holders{id=\"other\"} 1",
            "qsem_holders{id=\"proc\"} 0",
            "qsem_waiting{id=\"other\"} 3",
        ] {
            assert!(lines.contains(&want), "{want} in\n{text}");
        }
        // Each family once, whole: its HELP and TYPE, then only its samples.
        let types: Vec<&str> = lines
            .iter()
            .filter(|l| l.starts_with("# TYPE"))
            .copied()
            .collect();
        assert_eq!(types.len(), 6, "{text}");
        let mut current = "";
        for line in &lines {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                current = rest.split(' ').next().unwrap();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(current), "{line} outside {current}");
            }
        }
    }
}
