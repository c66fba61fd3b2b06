//! The `-j` forms: `N`, `+K` / `-K` (online CPUs plus or minus K), `P%`
//! (percent of online CPUs). GNU parallel's forms, with its floor of one slot.
//!
//! The CPU count is a parameter so that the parser stays a pure function.

use std::fmt;

/// The largest number of slots an id can have.
pub const MAX_JOBS: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsError {
    input: String,
    reason: String,
}

impl fmt::Display for JobsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid number of jobs '{}': {} (expected N from 1 to {MAX_JOBS}, +K, -K or P%)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for JobsError {}

/// Parses a `-j` value into a slot count, given the number of online CPUs.
pub fn parse(input: &str, cpus: u32) -> Result<u32, JobsError> {
    let fail = |reason: &str| JobsError {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let number = |s: &str| -> Result<u64, JobsError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail("not a whole number"));
        }
        // More digits than any valid count are an overflow, not a parse error.
        s.parse::<u64>().map_err(|_| fail("too large"))
    };
    let s = input.trim();
    let cpus = u64::from(cpus.max(1));
    let jobs = if let Some(k) = s.strip_prefix('+') {
        cpus.saturating_add(number(k)?)
    } else if let Some(k) = s.strip_prefix('-') {
        cpus.saturating_sub(number(k)?).max(1)
    } else if let Some(p) = s.strip_suffix('%') {
        (cpus.saturating_mul(number(p)?) / 100).max(1)
    } else {
        let n = number(s)?;
        if n == 0 {
            return Err(fail("must be at least 1"));
        }
        n
    };
    if jobs > u64::from(MAX_JOBS) {
        return Err(fail(&format!("{jobs} is more than {MAX_JOBS}")));
    }
    Ok(jobs as u32)
}

/// [`parse`] with this machine's CPU count, which is read (from sysfs, about
/// 5 us) only for the forms that use it.
pub fn parse_here(input: &str) -> Result<u32, JobsError> {
    let plain = input.trim().bytes().all(|b| b.is_ascii_digit());
    parse(input, if plain { 1 } else { online_cpus() })
}

/// The number of online CPUs, at least 1.
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let table = [
            ("1", 4, 1),
            ("2", 4, 2),
            ("1000000", 4, 1_000_000),
            ("+0", 4, 4),
            ("+2", 4, 6),
            ("-1", 4, 3),
            ("-10", 4, 1),
            ("50%", 4, 2),
            ("10%", 4, 1),
            ("0%", 4, 1),
            ("150%", 4, 6),
            ("+1", 0, 2),
        ];
        for (input, cpus, want) in table {
            assert_eq!(parse(input, cpus), Ok(want), "{input} with {cpus} cpus");
        }
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the input, an answer and never a panic; what is accepted
            /// is always a slot count from 1 to MAX_JOBS.
            #[test]
            fn never_panics(s in "\\PC*", cpus in any::<u32>()) {
                if let Ok(n) = parse(&s, cpus) {
                    prop_assert!((1..=MAX_JOBS).contains(&n));
                }
            }

            #[test]
            fn near_misses(s in "[-+% 0-9.eEinfa]{0,30}", cpus in any::<u32>()) {
                if let Ok(n) = parse(&s, cpus) {
                    prop_assert!((1..=MAX_JOBS).contains(&n));
                }
            }

            /// Each form computes what GNU parallel documents, or refuses to
            /// exceed MAX_JOBS; it never wraps.
            #[test]
            fn forms_compute_exactly(k in any::<u64>(), cpus in 0u32..=4096, form in 0usize..4) {
                let c = u128::from(cpus.max(1));
                let k128 = u128::from(k);
                let (input, want) = match form {
                    0 => (k.to_string(), k128),
                    1 => (format!("+{k}"), c + k128),
                    2 => (format!("-{k}"), c.saturating_sub(k128).max(1)),
                    _ => (format!("{k}%"), (c * k128 / 100).max(1)),
                };
                match parse(&input, cpus) {
                    Ok(n) => prop_assert_eq!(u128::from(n), want),
                    Err(e) => prop_assert!(
                        want > u128::from(MAX_JOBS) || want == 0
                            // the product saturated in u64: it is huge anyway
                            || (form == 3 && c * k128 > u128::from(u64::MAX)),
                        "{}: {}", input, e
                    ),
                }
            }
        }
    }

    #[test]
    fn rejects() {
        let table = [
            ("0", "at least 1"),
            ("2000000", "more than"),
            ("abc", "whole number"),
            ("", "whole number"),
            ("1.5", "whole number"),
            ("+", "whole number"),
            ("%", "whole number"),
            ("-", "whole number"),
            ("99999999999999999999999", "too large"),
            ("+999999999999999999", "more than"),
            ("100000000%", "more than"),
            ("inf", "whole number"),
        ];
        for (input, why) in table {
            let msg = parse(input, 4).expect_err(input).to_string();
            assert!(msg.contains(why), "{input}: {msg}");
            assert!(msg.contains(&format!("'{input}'")), "{input}: {msg}");
        }
    }

    #[test]
    fn here_reads_the_cpus_for_the_forms_that_use_them() {
        let cpus = online_cpus();
        assert_eq!(parse_here(" 3 "), Ok(3));
        assert_eq!(parse_here("+0"), Ok(cpus));
        assert_eq!(parse_here("+1"), Ok(cpus + 1));
        assert_eq!(parse_here("100%"), Ok(cpus));
        assert!(parse_here("").is_err());
        assert!(parse_here("0").is_err());
    }
}
