//! The gateway's encodings: gRPC's JSON mapping writes 64-bit numbers as
//! strings and leaves zero values out, bytes (keys, values) as base64, and
//! errors in two shapes; Go's HTTP server dates each answer, which is the
//! cluster's clock as qsem sees it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

/// A member's error answer: `{"error": …, "code": N, "message": …}`, or a
/// stream's `{"error": {"grpc_code": N, "message": …}}`.
pub fn error_of(v: &Value) -> Option<(i64, String)> {
    let e = v.get("error")?;
    let (code, message) = if e.is_object() {
        (&e["grpc_code"], &e["message"])
    } else {
        (&v["code"], &v["message"])
    };
    Some((
        code.as_i64().unwrap_or(2),
        message.as_str().unwrap_or("unknown error").to_string(),
    ))
}

/// An HTTP date (`Mon, 30 Nov 2026 01:35:42 GMT`, what Go's server sends)
/// as Unix seconds.
pub fn http_date(s: &str) -> Option<i64> {
    let mut f = s.split_whitespace().skip(1);
    let day: i64 = f.next()?.parse().ok()?;
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let name = f.next()?;
    let month = months.iter().position(|m| *m == name)? as i64 + 1;
    let year: i64 = f.next()?.parse().ok()?;
    let hms: Vec<i64> = f
        .next()?
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else { return None };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// A 64-bit number as the gateway writes it: a string, or absent for zero.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A base64 field (a key or value), or empty if absent or malformed.
pub fn unb64(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_bytes_and_errors_as_the_gateway_writes_them() {
        assert_eq!(int(&json!("9007199254740993")), 9_007_199_254_740_993);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&Value::Null), 0);
        assert_eq!(unb64(&json!(b64(b"qsem/\xff"))), b"qsem/\xff");
        let unary = json!({"error": "etcdserver: requested lease not found",
            "message": "etcdserver: requested lease not found", "code": 5});
        assert_eq!(
            error_of(&unary),
            Some((5, "etcdserver: requested lease not found".into()))
        );
        let stream = json!({"error": {"grpc_code": 14, "message": "no leader"}});
        assert_eq!(error_of(&stream), Some((14, "no leader".into())));
        assert_eq!(error_of(&json!({"header": {}})), None);
    }

    #[test]
    fn the_clusters_date() {
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            http_date("Mon, 30 Nov 2026 01:35:42 GMT"),
            Some(1_796_002_542)
        );
        assert_eq!(
            http_date("Tue, 29 Feb 2000 12:00:01 GMT"),
            Some(951_825_601)
        );
        assert_eq!(http_date("yesterday"), None);
    }
}
