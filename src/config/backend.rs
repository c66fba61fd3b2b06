//! `--backend` (or `QSEM_BACKEND`) and `--lost-after`: which engine, and the
//! settings that belong to it alone. A URL's password never appears in an
//! error line.

use super::{Backend, DEFAULT_LOST_AFTER, usage};
use crate::duration;
use anyhow::Result;
use std::time::Duration;

/// Where and how to reach an etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// `host:port` of every member to try, in the order given.
    pub endpoints: Vec<String>,
    /// `etcds://`: TLS, verified against the system's roots or `QSEM_ETCD_CACERT`.
    pub tls: bool,
    /// The etcd user, if the cluster has authentication on.
    pub user: Option<String>,
    /// The user's password if the URL had one (else `QSEM_ETCD_PASSWORD`).
    pub password: Option<String>,
    /// The TTL of the holders' leases: how soon a crashed or cut-off
    /// holder's slot frees.
    pub lost_after: Duration,
    /// `--on-lost=kill`: a watchdog process stops the job even if qsem
    /// itself is stopped (set by [`super::Config`]'s parser).
    pub kill_on_lost: bool,
}

/// `--backend` / `QSEM_BACKEND`: empty or absent means lock files.
/// The engine: a shared server if `url` names one, else lock files.
pub fn parse_backend(url: Option<&str>, lost_after: Option<&str>) -> Result<Backend> {
    // Checked whatever the engine: a bad value is a mistake to point out.
    let lost_after = parse_lost_after(lost_after)?;
    let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
        return Ok(Backend::Files);
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres {
            url: url.to_string(),
            lost_after,
        })
    } else if url.starts_with("etcd://") || url.starts_with("etcds://") {
        parse_etcd(url, lost_after).map(Backend::Etcd)
    } else {
        let shown = url.split_once('@').map_or(url, |(_, host)| host);
        Err(usage(format!(
            "unsupported backend '{shown}': expected postgres://[USER@]HOST[:PORT]/DATABASE or etcd://HOST:PORT[,HOST:PORT...]"
        )))
    }
}

/// `--lost-after`: at least 2s, as TCP keepalives count in seconds.
fn parse_lost_after(given: Option<&str>) -> Result<Duration> {
    let Some(given) = given else {
        return Ok(DEFAULT_LOST_AFTER);
    };
    let d = duration::parse(given).map_err(|e| usage(format!("invalid --lost-after: {e}")))?;
    if d < Duration::from_secs(2) {
        return Err(usage(format!(
            "invalid --lost-after '{given}': at least 2s (TCP keepalives count in seconds)"
        )));
    }
    Ok(d)
}

/// `etcd[s]://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...][/]`; the port
/// defaults to etcd's 2379. The error never shows a password.
fn parse_etcd(url: &str, lost_after: Duration) -> Result<EtcdSettings> {
    let (tls, rest) = match url.strip_prefix("etcds://") {
        Some(rest) => (true, rest),
        None => (false, url.trim_start_matches("etcd://")),
    };
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some(("", _)) => return Err(usage("etcd URL: empty user name")),
        Some((user, password)) => (
            Some(user.to_string()),
            (!password.is_empty()).then(|| password.to_string()),
        ),
        None => (None, None),
    };
    let bad = |what: &str, why: &str| {
        usage(format!(
            "invalid etcd endpoint '{what}' in --backend: {why} (expected etcd://HOST:PORT[,HOST:PORT...])"
        ))
    };
    let mut endpoints = Vec::new();
    for member in hosts.trim_end_matches('/').split(',') {
        let (host, port) = match member.rsplit_once(':') {
            // An IPv6 address without a port: `[::1]`.
            Some((h, p)) if !p.contains(']') => (h, p),
            _ => (member, "2379"),
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad(member, "no host"));
        }
        port.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad(member, "the port is not a number from 1 to 65535"))?;
        endpoints.push(format!("{host}:{port}"));
    }
    Ok(EtcdSettings {
        endpoints,
        tls,
        user,
        password,
        lost_after,
        kill_on_lost: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_urls() {
        let etcd = |url: &str| match parse_backend(Some(url), Some("20s")) {
            Ok(Backend::Etcd(s)) => Ok(s),
            Ok(other) => panic!("{url}: {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let s = etcd("etcd://10.0.0.1:2379,10.0.0.2:2380,node3").unwrap();
        assert_eq!(
            s.endpoints,
            ["10.0.0.1:2379", "10.0.0.2:2380", "node3:2379"]
        );
        assert_eq!((s.tls, s.user, s.password), (false, None, None));
        assert_eq!(s.lost_after, Duration::from_secs(20));
        let s = etcd("etcds://qsem:s3cret@[::1]:2379,[::2]/").unwrap();
        assert_eq!(s.endpoints, ["[::1]:2379", "[::2]:2379"]);
        assert!(s.tls);
        assert_eq!(s.user.as_deref(), Some("qsem"));
        assert_eq!(s.password.as_deref(), Some("s3cret"));
        let s = etcd("etcd://qsem@h:1").unwrap();
        assert_eq!((s.user.as_deref(), s.password), (Some("qsem"), None));
        assert!(!s.kill_on_lost);
        for (url, needle) in [
            ("etcd://h:x", "'h:x'"),
            ("etcd://h:0", "'h:0'"),
            ("etcd://a:1,,b:2", "''"),
            ("etcd://", "no host"),
            ("etcd://:pw@h:1", "empty user"),
            ("etcd://u:secret@h:99999", "'h:99999'"),
        ] {
            let msg = etcd(url).expect_err(url);
            assert!(msg.contains(needle), "{url}: {msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
    }
}
