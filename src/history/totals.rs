//! What `--metrics` counts of one id: runs by outcome, and the wait and
//! run-time histograms, summed over every record the id's journal ever held.
//!
//! Prometheus's counters must never fall, but a bounded journal drops its
//! oldest generation at each rotation. So the rotator first adds the
//! generation it is about to drop to a *carry* (`journal.rs` keeps it in a
//! small file beside the journals), and a reading is the carry plus the
//! records still kept. The carry is one line of numbers, [`Totals::render`].

use super::record::Record;
use std::time::Duration;

/// Bucket bounds of the wait, in seconds: from "at once" to "an hour".
pub const WAIT_BUCKETS: [f64; 9] = [0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0];
/// Bucket bounds of the run time, in seconds: from a second to a day.
pub const RUN_BUCKETS: [f64; 9] = [
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
];

/// The outcomes as `qsem_runs_total` labels them, in [`Totals::runs`]'s order.
pub const OUTCOMES: [&str; 4] = ["ok", "failed", "timed_out", "skipped"];

const VERSION: &str = "c1";

/// A histogram of durations over fixed bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative).
    pub within: [u64; 9],
    pub count: u64,
    pub sum_micros: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64; 9], d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = bounds.iter().position(|&b| secs <= b) {
            self.within[i] += 1;
        }
        self.count += 1;
        self.sum_micros = self.sum_micros.saturating_add(d.as_micros() as u64);
    }

    /// The cumulative bucket counts, one per bound (then `count` for `+Inf`).
    pub fn cumulative(&self) -> [u64; 9] {
        let mut sum = 0;
        self.within.map(|n| {
            sum += n;
            sum
        })
    }

    fn numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.within
            .iter()
            .copied()
            .chain([self.count, self.sum_micros])
    }
}

/// Everything `--metrics` counts of one id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Invocations by outcome, in [`OUTCOMES`]'s order.
    pub runs: [u64; 4],
    pub wait: Histogram,
    pub run: Histogram,
}

impl Totals {
    pub fn add(&mut self, r: &Record) {
        let kind = OUTCOMES.iter().position(|&k| k == r.outcome.kind());
        self.runs[kind.expect("every outcome has a label")] += 1;
        self.wait.observe(&WAIT_BUCKETS, r.wait);
        if let Some(run) = r.run {
            self.run.observe(&RUN_BUCKETS, run);
        }
    }

    /// The carry's one line: the version, then every number, space-separated.
    pub fn render(&self) -> String {
        let numbers = self
            .runs
            .iter()
            .copied()
            .chain(self.wait.numbers())
            .chain(self.run.numbers());
        let mut out = String::from(VERSION);
        for n in numbers {
            out.push(' ');
            out.push_str(&n.to_string());
        }
        out.push('\n');
        out
    }

    /// A line made by [`Totals::render`]; `None` for anything else.
    pub fn parse(text: &str) -> Option<Totals> {
        let mut words = text.trim_end().split(' ');
        if words.next()? != VERSION {
            return None;
        }
        let numbers: Vec<u64> = words.map(str::parse).collect::<Result<_, _>>().ok()?;
        if numbers.len() != 4 + 2 * 11 {
            return None;
        }
        let histogram = |n: &[u64]| Histogram {
            within: n[..9].try_into().expect("nine"),
            count: n[9],
            sum_micros: n[10],
        };
        Some(Totals {
            runs: numbers[..4].try_into().expect("four"),
            wait: histogram(&numbers[4..15]),
            run: histogram(&numbers[15..26]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::{Ended, Outcome, Skip, sample};

    #[test]
    fn counts_and_buckets() {
        let mut t = Totals::default();
        t.add(&sample(0, Some(500), Outcome::Ok));
        t.add(&sample(2000, None, Outcome::Skipped(Skip::Expired)));
        t.add(&sample(5, Some(20_000), Outcome::Failed(Ended::Status(3))));
        t.add(&sample(7_200_000, Some(90_000_000), Outcome::TimedOut));
        assert_eq!(t.runs, [1, 1, 1, 1]);
        assert_eq!(t.wait.cumulative(), [1, 2, 2, 2, 3, 3, 3, 3, 3]);
        assert_eq!((t.wait.count, t.wait.sum_micros), (4, 7_202_005_000));
        // Past the last bound: counted only in +Inf (the count).
        assert_eq!(t.run.cumulative(), [1, 1, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(t.run.count, 3);
    }

    #[test]
    fn carries_round_trip() {
        let mut b = Totals::default();
        b.add(&sample(30_000, None, Outcome::Skipped(Skip::Crowded)));
        b.add(&sample(3, Some(4), Outcome::Ok));
        let line = b.render();
        assert!(
            line.starts_with("c1 1 0 0 1 ") && line.ends_with('\n'),
            "{line}"
        );
        assert_eq!(Totals::parse(&line), Some(b));
        for bad in ["", "c1", "c2 0", "c1 1 2 x", &line.replace("c1 ", "c1 1 ")] {
            assert_eq!(Totals::parse(bad), None, "{bad:?}");
        }
    }
}
