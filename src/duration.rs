//! Durations as people type them: `250ms`, `1s`, `1.5s`, `2m`, `1h`, or a bare
//! number of seconds (`0`, `0.5`, `30`).
//!
//! The parser is exact decimal arithmetic on integers, never floating point, so
//! `0.1s` is 100 ms to the nanosecond and `nan`, `inf` or `1e400` are simply not
//! numbers here. Anything that would not fit a `Duration` is an error rather
//! than a silently clamped value.

use std::fmt;
use std::time::Duration;

/// Why a duration was rejected; the message names the input and the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration '{}': {} (expected e.g. 250ms, 1s, 1.5s, 2m, 1h, or seconds)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for DurationError {}

/// Parses a non-negative duration.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let fail = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(fail("it is empty"));
    }
    if s.starts_with('-') {
        return Err(fail("it is negative"));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    // Nanoseconds in one unit.
    let scale: u128 = match unit {
        "" | "s" | "sec" => 1_000_000_000,
        "ms" => 1_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(fail("unknown unit")),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(fail("no number"));
    }
    if fraction.contains('.') {
        return Err(fail("more than one decimal point"));
    }
    let digits = |s: &str| -> Result<u128, DurationError> {
        s.bytes().try_fold(0u128, |acc, b| {
            acc.checked_mul(10)
                .and_then(|acc| acc.checked_add(u128::from(b - b'0')))
                .ok_or_else(|| fail("it is too large"))
        })
    };
    let mut nanos = digits(whole)?
        .checked_mul(scale)
        .ok_or_else(|| fail("it is too large"))?;
    // Fractions finer than a nanosecond are dropped, not rounded.
    let mut place = scale;
    for b in fraction.bytes() {
        place /= 10;
        // Checked: a whole part just under the limit plus a fraction can overflow.
        nanos = nanos
            .checked_add(u128::from(b - b'0') * place)
            .ok_or_else(|| fail("it is too large"))?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| fail("it is too large"))?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// A short human rendering for report lines: `850ms`, `12.4s`, `3m05s`, `2h03m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", d.as_secs_f64()),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// A configured limit as a person would write it, e.g. `1h`, `10s`,
/// `1m30s`, `1.5s`, `250ms`: for report lines that quote an option's value.
pub fn concise(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return if ms < 1000 {
            format!("{ms}ms")
        } else {
            format!("{}s", d.as_secs_f64())
        };
    }
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n != 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() { "0s".into() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concise_limits() {
        for (ms, want) in [
            (3_600_000, "1h"),
            (10_000, "10s"),
            (90_000, "1m30s"),
            (3_661_000, "1h1m1s"),
            (1_500, "1.5s"),
            (250, "250ms"),
            (0, "0s"),
        ] {
            assert_eq!(concise(Duration::from_millis(ms)), want);
        }
    }

    #[test]
    fn accepts_the_documented_forms() {
        let ok = [
            ("0", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("1s", Duration::from_secs(1)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.1", Duration::from_millis(100)),
            (".5", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("30", Duration::from_secs(30)),
            ("1.25ms", Duration::from_micros(1250)),
            (" 2s ", Duration::from_secs(2)),
            ("0.0000000001", Duration::ZERO),
        ];
        for (input, want) in ok {
            assert_eq!(parse(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let bad = [
            ("", "empty"),
            ("1x", "unit"),
            ("-3", "negative"),
            ("-0", "negative"),
            ("s", "no number"),
            (".", "no number"),
            ("1.2.3", "decimal point"),
            ("nan", "unit"),
            ("inf", "unit"),
            ("1e400", "unit"),
            ("99999999999999999999999999999999999999999", "too large"),
            ("18446744073709551616", "too large"),
            ("5124095576030432h", "too large"),
            ("1 s", "unit"),
            ("+1", "unit"),
            // Whole part fits a u128 of nanoseconds, the fraction tips it over.
            ("340282366920938463463374607431.9s", "too large"),
            ("340282366920938463463374607431768211.9ms", "too large"),
        ];
        for (input, why) in bad {
            let err = parse(input).expect_err(input);
            let msg = err.to_string();
            assert!(msg.contains(why), "{input}: {msg}");
            assert!(msg.contains(&format!("'{input}'")), "{input}: {msg}");
        }
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        const UNITS: [(&str, u128); 8] = [
            ("", 1_000_000_000),
            ("s", 1_000_000_000),
            ("sec", 1_000_000_000),
            ("ms", 1_000_000),
            ("m", 60_000_000_000),
            ("min", 60_000_000_000),
            ("h", 3_600_000_000_000),
            ("ms", 1_000_000),
        ];

        fn nanos(d: Duration) -> u128 {
            d.as_nanos()
        }

        proptest! {
            /// Whatever the input, the parser answers and never panics; what it
            /// accepts is a plain number with at most one unit.
            #[test]
            fn never_panics(s in "\\PC*") {
                if parse(&s).is_ok() {
                    let t = s.trim();
                    prop_assert!(t.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.'));
                }
            }

            /// Digits, dots, signs, units and exponents: the near misses.
            #[test]
            fn never_panics_on_near_misses(s in "[-+ 0-9.eEsmhinfaINF]{0,60}") {
                let _ = parse(&s);
            }

            /// `W.F<unit>` is exactly W.F units, to the nanosecond (finer digits dropped).
            #[test]
            fn exact(whole in 0u64..=u64::MAX, fraction in "[0-9]{0,12}", unit in 0usize..8) {
                let (name, scale) = UNITS[unit];
                let input = format!("{whole}.{fraction}{name}");
                let mut want = u128::from(whole) * scale;
                let mut place = scale;
                for b in fraction.bytes() {
                    place /= 10;
                    want += u128::from(b - b'0') * place;
                }
                match parse(&input) {
                    Ok(d) => prop_assert_eq!(nanos(d), want),
                    Err(e) => {
                        prop_assert!(want / 1_000_000_000 > u128::from(u64::MAX), "{}", e);
                        prop_assert!(e.to_string().contains("too large"));
                    }
                }
            }

            /// Whole parts at the edge of the arithmetic, with a fraction on top,
            /// are refused as too large: never a panic, never a wrapped value.
            #[test]
            fn no_wrap_at_the_edge(below in 0u128..3, fraction in "[0-9]{1,12}", unit in 0usize..8) {
                let (name, scale) = UNITS[unit];
                let whole = u128::MAX / scale - below;
                let err = parse(&format!("{whole}.{fraction}{name}")).expect_err("too large");
                prop_assert!(err.to_string().contains("too large"));
            }

            /// Any digits at all: accepted values are at least their whole part.
            #[test]
            fn no_wrap_anywhere(digits in "[1-9][0-9]{17,40}", fraction in "[0-9]{1,9}", unit in 0usize..8) {
                let (name, scale) = UNITS[unit];
                if let Ok(d) = parse(&format!("{digits}.{fraction}{name}")) {
                    let whole: u128 = digits.parse().unwrap_or(u128::MAX);
                    prop_assert!(nanos(d) >= whole.saturating_mul(scale));
                }
            }
        }
    }

    #[test]
    fn humane_rendering() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_400)), "12.4s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(7380)), "2h03m");
    }
}
