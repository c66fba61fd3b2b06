//! One journal record: what became of one invocation, as one line of text.
//!
//! The line is tab-separated and versioned, so that a reader can refuse what
//! it does not understand (a future format, or the remains of a write cut
//! short by a full disk) rather than misread it:
//!
//! ```text
//! q1 <TAB> start µs since 1970 <TAB> wait µs <TAB> run µs or - <TAB> outcome
//!    <TAB> jobs <TAB> pid <TAB> report line
//! ```
//!
//! A record is at most [`MAX_RECORD`] bytes, well under PIPE_BUF, so that one
//! `write(2)` with `O_APPEND` always carries it whole.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest record, newline included.
pub const MAX_RECORD: usize = 1024;

const VERSION: &str = "q1";

/// How a job that ran ended, when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this non-zero status (or could not be started: 126, 127).
    Status(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// Why nothing ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The wait for a slot expired.
    Expired,
    /// `--max-waiting` invocations were waiting already.
    Crowded,
    /// This signal stopped the invocation before the job started.
    Signal(i32),
}

/// What became of an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(Ended),
    TimedOut,
    Skipped(Skip),
}

impl Outcome {
    /// The outcome of a job that ended with `status`.
    pub fn of(status: ExitStatus) -> Outcome {
        match (status.code(), status.signal()) {
            (Some(0), _) => Outcome::Ok,
            (Some(code), _) => Outcome::Failed(Ended::Status(code)),
            (None, Some(signo)) => Outcome::Failed(Ended::Signal(signo)),
            (None, None) => Outcome::Failed(Ended::Status(-1)),
        }
    }

    /// The coarse kind, as `--metrics` labels it.
    pub fn kind(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(_) => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Skipped(_) => "skipped",
        }
    }

    fn render(self) -> String {
        match self {
            Outcome::Failed(Ended::Status(n)) => format!("failed:status:{n}"),
            Outcome::Failed(Ended::Signal(n)) => format!("failed:signal:{n}"),
            Outcome::Skipped(Skip::Expired) => "skipped:expired".into(),
            Outcome::Skipped(Skip::Crowded) => "skipped:crowded".into(),
            Outcome::Skipped(Skip::Signal(n)) => format!("skipped:signal:{n}"),
            other => other.kind().into(),
        }
    }

    fn parse(s: &str) -> Option<Outcome> {
        let num = |n: &str| n.parse::<i32>().ok();
        Some(match s.split(':').collect::<Vec<_>>()[..] {
            ["ok"] => Outcome::Ok,
            ["timed_out"] => Outcome::TimedOut,
            ["failed", "status", n] => Outcome::Failed(Ended::Status(num(n)?)),
            ["failed", "signal", n] => Outcome::Failed(Ended::Signal(num(n)?)),
            ["skipped", "expired"] => Outcome::Skipped(Skip::Expired),
            ["skipped", "crowded"] => Outcome::Skipped(Skip::Crowded),
            ["skipped", "signal", n] => Outcome::Skipped(Skip::Signal(num(n)?)),
            _ => return None,
        })
    }
}

/// One invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub start: SystemTime,
    /// From the start until the semaphore answered.
    pub wait: Duration,
    /// How long the job ran; `None` if it never started.
    pub run: Option<Duration>,
    pub outcome: Outcome,
    pub jobs: u32,
    /// The job's pid; 0 if it never started.
    pub pid: u32,
    /// The report line of a failure; empty otherwise.
    pub line: String,
}

impl Record {
    /// The record as one line, cut to [`MAX_RECORD`] bytes.
    pub fn render(&self) -> Vec<u8> {
        let micros = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        let start = micros(self.start.duration_since(UNIX_EPOCH).unwrap_or_default());
        let run = self.run.map_or("-".to_string(), |d| micros(d).to_string());
        let head = format!(
            "{VERSION}\t{start}\t{}\t{run}\t{}\t{}\t{}\t",
            micros(self.wait),
            self.outcome.render(),
            self.jobs,
            self.pid
        );
        // Tabs and line ends would break the record; the rest is the line's.
        let line: String = self
            .line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let room = MAX_RECORD - 1 - head.len();
        let mut cut = line.len().min(room);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut out = head.into_bytes();
        out.extend_from_slice(&line.as_bytes()[..cut]);
        out.push(b'\n');
        out
    }

    /// A record rendered by [`Record::render`], without its newline; `None`
    /// for anything else.
    pub fn parse(line: &str) -> Option<Record> {
        let f: Vec<&str> = line.splitn(8, '\t').collect();
        let [VERSION, start, wait, run, outcome, jobs, pid, text] = f[..] else {
            return None;
        };
        let micros = |s: &str| s.parse::<u64>().ok().map(Duration::from_micros);
        Some(Record {
            start: UNIX_EPOCH.checked_add(micros(start)?)?,
            wait: micros(wait)?,
            run: if run == "-" { None } else { Some(micros(run)?) },
            outcome: Outcome::parse(outcome)?,
            jobs: jobs.parse().ok()?,
            pid: pid.parse().ok()?,
            line: text.to_string(),
        })
    }
}

/// Every whole record of a journal's text; a line that is not one (torn by
/// a full disk, or from another version) is passed over.
pub fn parse_all(text: &str) -> impl Iterator<Item = Record> + '_ {
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole.lines().filter_map(Record::parse)
}

/// A record for the tests of the summaries: started 1000 s after the epoch,
/// waited and ran as given, with no line.
#[cfg(test)]
pub fn sample(wait_ms: u64, run_ms: Option<u64>, outcome: Outcome) -> Record {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: Outcome, line: &str) -> Record {
        Record {
            start: UNIX_EPOCH + Duration::from_micros(1_764_466_000_123_456),
            wait: Duration::from_micros(1_500),
            run: Some(Duration::from_secs(12)),
            outcome,
            jobs: 2,
            pid: 4242,
            line: line.into(),
        }
    }

    #[test]
    fn records_round_trip() {
        for outcome in [
            Outcome::Ok,
            Outcome::Failed(Ended::Status(3)),
            Outcome::Failed(Ended::Signal(9)),
            Outcome::TimedOut,
            Outcome::Skipped(Skip::Expired),
            Outcome::Skipped(Skip::Crowded),
            Outcome::Skipped(Skip::Signal(15)),
        ] {
            let r = record(outcome, "x exited with status 3 after 12.0s");
            let text = String::from_utf8(r.render()).unwrap();
            assert!(text.ends_with('\n'), "{text:?}");
            assert_eq!(
                Record::parse(text.strip_suffix('\n').unwrap()),
                Some(r),
                "{text:?}"
            );
        }
        let mut skipped = record(Outcome::Skipped(Skip::Expired), "");
        skipped.run = None;
        let text = String::from_utf8(skipped.render()).unwrap();
        assert!(text.contains("\t-\tskipped:expired\t"), "{text:?}");
        assert_eq!(
            Record::parse(text.strip_suffix('\n').unwrap()),
            Some(skipped)
        );
    }

    #[test]
    fn lines_are_tamed_and_bounded() {
        let r = record(Outcome::Failed(Ended::Status(1)), "a\tb\nc");
        let text = String::from_utf8(r.render()).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.ends_with("a b c\n"), "{text:?}");
        let long = record(Outcome::Failed(Ended::Status(1)), &"é".repeat(2000));
        let bytes = long.render();
        assert!(bytes.len() <= MAX_RECORD, "{}", bytes.len());
        let text = String::from_utf8(bytes).expect("cut at a character boundary");
        assert!(Record::parse(text.strip_suffix('\n').unwrap()).is_some());
    }

    #[test]
    fn foreign_and_torn_lines_are_passed_over() {
        let good = String::from_utf8(record(Outcome::Ok, "").render()).unwrap();
        let torn = &good[..good.len() / 2];
        let text = format!("{good}q2\t1\t2\n{good}garbage\n{torn}");
        assert_eq!(parse_all(&text).count(), 2);
        for bad in [
            "",
            "q1",
            "q1\tx\t1\t1\tok\t1\t1\t",
            "q1\t1\t1\t1\tmaybe\t1\t1\t",
        ] {
            assert_eq!(Record::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn outcomes_of_statuses() {
        let s = ExitStatus::from_raw;
        assert_eq!(Outcome::of(s(0)), Outcome::Ok);
        assert_eq!(Outcome::of(s(3 << 8)), Outcome::Failed(Ended::Status(3)));
        assert_eq!(
            Outcome::of(s(libc::SIGKILL)),
            Outcome::Failed(Ended::Signal(9))
        );
        assert_eq!(Outcome::Skipped(Skip::Crowded).kind(), "skipped");
    }
}
