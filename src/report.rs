//! Every line qsem writes on stderr, and how it is worded: the report line of
//! a failed or timed-out command and progress lines, all prefixed
//! `qsem[<id>]: ` so that cron's mail says which semaphore spoke, and
//! `main`'s one error line. Written unbuffered, one `write` per line; a
//! closed or full stderr is ignored, since the exit status must still say
//! what happened.

use crate::duration;
use crate::id::Id;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

/// Writes one line, as is.
pub fn say(text: &str) {
    let text = format!("{text}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Writes one line of the semaphore `id`.
pub fn line(id: &Id, msg: &str) {
    say(&format!("qsem[{id}]: {msg}"));
}

/// The report line for a command that ended with `status` after `ran`.
pub fn ended(command: &str, status: ExitStatus, ran: Duration) -> String {
    let after = duration::human(ran);
    let command = truncate(command, 200);
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("{command} exited with status {code} after {after}"),
        (None, Some(signo)) => {
            let name = signal_name(signo);
            let core = if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            };
            let hint = if signo == libc::SIGKILL {
                " (SIGKILL often means the out-of-memory killer; see dmesg)"
            } else {
                ""
            };
            format!("{command} was killed by {name}{core} after {after}{hint}")
        }
        (None, None) => format!(
            "{command} ended with wait status {} after {after}",
            status.into_raw()
        ),
    }
}

/// The report line for a command stopped by `--timeout`: what was sent,
/// and nothing that was not.
pub fn timed_out(command: &str, limit: Duration, killed_after: Option<Duration>) -> String {
    let command = truncate(command, 200);
    let limit = duration::concise(limit);
    match killed_after {
        Some(d) => format!(
            "{command} timed out after {limit} (SIGTERM; killed {} later)",
            duration::concise(d)
        ),
        None => format!("{command} timed out after {limit} (SIGTERM)"),
    }
}

/// The signal's conventional name, e.g. `SIGKILL`.
pub fn signal_name(signo: i32) -> String {
    signal_hook::low_level::signal_name(signo)
        .map(str::to_string)
        .unwrap_or_else(|| format!("signal {signo}"))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines() {
        let s = |raw| ExitStatus::from_raw(raw);
        assert_eq!(
            ended("ImportProcess", s(3 << 8), Duration::from_millis(12_400)),
            "ImportProcess exited with status 3 after 12.4s"
        );
        let killed = ended("ImportProcess", s(libc::SIGKILL), Duration::from_secs(2));
        assert!(
            killed.starts_with("ImportProcess was killed by SIGKILL after 2.0s"),
            "{killed}"
        );
        assert!(killed.contains("out-of-memory"), "{killed}");
        let segv = ended("x", s(libc::SIGSEGV | 0x80), Duration::from_secs(1));
        assert_eq!(segv, "x was killed by SIGSEGV (core dumped) after 1.0s");
        let long = ended(&"y".repeat(300), s(1 << 8), Duration::ZERO);
        assert_eq!(
            long,
            format!("{}… exited with status 1 after 0ms", "y".repeat(200))
        );
    }

    #[test]
    fn timeout_lines_say_what_was_sent() {
        let h = Duration::from_secs(3600);
        assert_eq!(
            timed_out("ImportProcess", h, Some(Duration::from_secs(10))),
            "ImportProcess timed out after 1h (SIGTERM; killed 10s later)"
        );
        assert_eq!(
            timed_out("ImportProcess", h, None),
            "ImportProcess timed out after 1h (SIGTERM)"
        );
    }
}
