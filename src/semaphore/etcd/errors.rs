//! How a request to a member can end without an answer, and which of
//! those endings are worth another try (another member, or the same one
//! after an election): gRPC's status codes and messages as the gateway
//! passes them on, and ureq's errors.

use serde_json::Value;

/// Why a call got no answer.
#[derive(Debug)]
pub enum CallError {
    /// The caller's instant passed first.
    Expired,
    /// No member answered for [`UNREACHABLE`]; the text says what was tried.
    Unreachable(String),
    /// A member answered with an error that asking again will not mend
    /// (permission denied, a bad request).
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Expired => f.write_str("no answer from etcd in time"),
            CallError::Unreachable(why) | CallError::Refused(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for CallError {}

/// One attempt's outcome against one member.
pub enum Attempt {
    Answer(Value),
    /// No connection: try another member (or this one again later).
    Down(String),
    /// Connected, but no answer in time, or "no leader": likewise, with
    /// more patience.
    Busy(String),
    /// The token expired: authenticate again.
    Unauthenticated,
    Refused(String),
}

/// gRPC status codes: 14 unavailable, 4 deadline exceeded, 16 unauthenticated.
pub fn classify(code: i64, message: &str, base: &str) -> Attempt {
    let transient = [
        "leader",
        "timed out",
        "timeout",
        "too many requests",
        "not capable",
    ];
    match code {
        14 | 4 | 8 | 10 => Attempt::Busy(message.to_string()),
        16 if message.contains("token") => Attempt::Unauthenticated,
        _ if transient.iter().any(|t| message.contains(t)) => Attempt::Busy(message.to_string()),
        _ => Attempt::Refused(format!("etcd at {base}: {message}")),
    }
}

/// A request that got no answer: no connection at all (the member is down,
/// or its host unreachable), or a connection that answered nothing in time.
pub fn unanswered(e: ureq::Error) -> Attempt {
    use ureq::Timeout;
    match e {
        ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Io(_)
        // A certificate this member cannot prove: as good as down.
        | ureq::Error::Tls(_)
        | ureq::Error::Rustls(_) => Attempt::Down(e.to_string()),
        _ => Attempt::Busy(e.to_string()),
    }
}

pub fn cut(s: &str) -> &str {
    let end = s.char_indices().nth(120).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_errors_are_worth_another_try() {
        assert!(matches!(classify(14, "x", "b"), Attempt::Busy(_)));
        assert!(matches!(
            classify(2, "etcdserver: leader changed", "b"),
            Attempt::Busy(_)
        ));
        assert!(matches!(
            classify(16, "etcdserver: invalid auth token", "b"),
            Attempt::Unauthenticated
        ));
        assert!(matches!(
            classify(7, "etcdserver: permission denied", "b"),
            Attempt::Refused(_)
        ));
    }
}
