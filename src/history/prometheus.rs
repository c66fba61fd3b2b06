//! `--metrics`: the journal and the live state in Prometheus's text
//! exposition format (version 0.0.4), for node_exporter's textfile collector
//! (a command that exits cannot be scraped, so cron writes a file).
//!
//! Every family is written whole, HELP and TYPE first, one series per id;
//! label values are escaped as the format says (backslash, double quote,
//! newline), and an id that is not UTF-8 is shown with U+FFFD in place of
//! its bad bytes. The counters and histograms never fall: what a rotation
//! drops from the journal lives on in its carry (`totals.rs`).

use super::journal::Journal;
use super::record::{Outcome, Record};
use super::totals::{Histogram, OUTCOMES, RUN_BUCKETS, Totals, WAIT_BUCKETS};
use crate::id::Id;
use crate::semaphore::IdStatus;
use std::collections::BTreeMap;
use std::fmt::Write;

/// What one id's series are made of.
#[derive(Default)]
struct Series<'a> {
    totals: Totals,
    /// When the latest failed or timed-out job in the journal started.
    last_failure: Option<std::time::SystemTime>,
    live: Option<&'a IdStatus>,
}

/// The exposition of every id with a journal or live holders or waiters.
pub fn render(journals: &[Journal], live: &[IdStatus]) -> String {
    let mut ids: BTreeMap<&Id, Series> = BTreeMap::new();
    for j in journals {
        let s = ids.entry(&j.id).or_default();
        s.totals = j.carry;
        for r in &j.records {
            s.totals.add(r);
        }
        let failed = |r: &&Record| matches!(r.outcome, Outcome::Failed(_) | Outcome::TimedOut);
        s.last_failure = j.records.iter().filter(failed).map(|r| r.start).max();
    }
    for status in live {
        ids.entry(&status.id).or_default().live = Some(status);
    }
    let mut out = String::new();
    let help = "Invocations recorded in the journal, by outcome.";
    family(&mut out, "qsem_runs_total", "counter", help);
    for (id, s) in &ids {
        for (outcome, n) in OUTCOMES.iter().zip(s.totals.runs) {
            let id = label(id);
            let _ = writeln!(
                out,
                "qsem_runs_total{{id=\"{id}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    let help = "Time from the start of an invocation until the semaphore answered.";
    family(&mut out, "qsem_wait_seconds", "histogram", help);
    for (id, s) in &ids {
        histogram(
            &mut out,
            "qsem_wait_seconds",
            id,
            &WAIT_BUCKETS,
            &s.totals.wait,
        );
    }
    let help = "Run time of the jobs that started.";
    family(&mut out, "qsem_run_seconds", "histogram", help);
    for (id, s) in &ids {
        histogram(
            &mut out,
            "qsem_run_seconds",
            id,
            &RUN_BUCKETS,
            &s.totals.run,
        );
    }
    let name = "qsem_last_failure_timestamp_seconds";
    let help = "When the latest failed or timed-out job in the journal started (0: none).";
    family(&mut out, name, "gauge", help);
    for (id, s) in &ids {
        let since = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).ok();
        let secs = s.last_failure.and_then(since).unwrap_or_default();
        let _ = writeln!(out, "{name}{{id=\"{}\"}} {}", label(id), secs.as_secs_f64());
    }
    family(
        &mut out,
        "qsem_holders",
        "gauge",
        "Slots of the id held now.",
    );
    for (id, s) in &ids {
        let n = s.live.map_or(0, |s| s.holders.len());
        let _ = writeln!(out, "qsem_holders{{id=\"{}\"}} {n}", label(id));
    }
    let help = "Invocations waiting for a slot of the id now.";
    family(&mut out, "qsem_waiting", "gauge", help);
    for (id, s) in &ids {
        let n = s.live.map_or(0, |s| s.waiting);
        let _ = writeln!(out, "qsem_waiting{{id=\"{}\"}} {n}", label(id));
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One id's series of a histogram: cumulative buckets, `+Inf`, sum, count.
fn histogram(out: &mut String, name: &str, id: &Id, bounds: &[f64], h: &Histogram) {
    let id = label(id);
    for (bound, n) in bounds.iter().zip(h.cumulative()) {
        let _ = writeln!(out, "{name}_bucket{{id=\"{id}\",le=\"{bound}\"}} {n}");
    }
    let count = h.count;
    let _ = writeln!(out, "{name}_bucket{{id=\"{id}\",le=\"+Inf\"}} {count}");
    // Microseconds, as recorded: six decimals, without binary fractions' tails.
    let (secs, micros) = (h.sum_micros / 1_000_000, h.sum_micros % 1_000_000);
    let _ = writeln!(out, "{name}_sum{{id=\"{id}\"}} {secs}.{micros:06}");
    let _ = writeln!(out, "{name}_count{{id=\"{id}\"}} {count}");
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
    use crate::history::record::{Ended, Skip, sample};
    use crate::semaphore::Holder;
    use std::time::SystemTime;

    fn id(s: &str) -> Id {
        Id::new(std::ffi::OsStr::new(s)).unwrap()
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
        // What rotations dropped: one run that waited a minute and took two.
        let mut carry = Totals::default();
        carry.add(&sample(60_000, Some(120_000), Outcome::Ok));
        let journal = vec![Journal {
            id: id("proc"),
            carry,
            records: vec![
                sample(0, Some(500), Outcome::Ok),
                sample(2000, None, Outcome::Skipped(Skip::Expired)),
                sample(5, Some(20_000), Outcome::Failed(Ended::Status(3))),
            ],
        }];
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
            waiters: Vec::new(),
        }];
        let text = render(&journal, &live);
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE qsem_runs_total counter",
            "qsem_runs_total{id=\"proc\",outcome=\"ok\"} 2",
            "qsem_runs_total{id=\"proc\",outcome=\"failed\"} 1",
            "qsem_runs_total{id=\"proc\",outcome=\"timed_out\"} 0",
            "qsem_runs_total{id=\"proc\",outcome=\"skipped\"} 1",
            "qsem_runs_total{id=\"other\",outcome=\"ok\"} 0",
            "# TYPE qsem_wait_seconds histogram",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"0.001\"} 1",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"0.01\"} 2",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"1\"} 2",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"10\"} 3",
            "qsem_wait_seconds_bucket{id=\"proc\",le=\"+Inf\"} 4",
            "qsem_wait_seconds_sum{id=\"proc\"} 62.005000",
            "qsem_wait_seconds_count{id=\"proc\"} 4",
            "qsem_run_seconds_bucket{id=\"proc\",le=\"1\"} 1",
            "qsem_run_seconds_bucket{id=\"proc\",le=\"60\"} 2",
            "qsem_run_seconds_bucket{id=\"proc\",le=\"300\"} 3",
            "qsem_run_seconds_count{id=\"proc\"} 3",
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
