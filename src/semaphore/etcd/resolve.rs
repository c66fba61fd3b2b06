//! Endpoints written as IP addresses need no name lookup, and get none.
//!
//! ureq looks every request's host up again, in a thread of its own when the
//! request has a deadline (every request here has one), even for
//! `127.0.0.1:2379`: a thread started and joined on each call, which a
//! loaded host pays for on the handoff's path. Names are still looked up
//! by ureq's own resolver, every time, so a member that moves is followed.
//! The `Resolver` trait is in ureq's `unversioned` module, which changes
//! only with a minor version (Cargo.lock pins the one built here).

use std::net::{IpAddr, SocketAddr};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

#[derive(Debug, Default)]
pub struct Literal(DefaultResolver);

/// The address `uri` names directly, if its host is an IP address.
fn literal(uri: &Uri) -> Option<SocketAddr> {
    let authority = uri.authority()?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(SocketAddr::new(
        host.parse::<IpAddr>().ok()?,
        authority.port_u16()?,
    ))
}

impl Resolver for Literal {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let Some(addr) = literal(uri) else {
            return self.0.resolve(uri, config, timeout);
        };
        let mut addrs = self.empty();
        addrs.push(addr);
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_addresses_skip_the_lookup() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(
            literal(&uri("http://127.0.0.1:2379/v3/kv/txn")),
            Some("127.0.0.1:2379".parse().unwrap())
        );
        assert_eq!(
            literal(&uri("https://[::1]:2379/v3/watch")),
            Some("[::1]:2379".parse().unwrap())
        );
        assert_eq!(literal(&uri("http://etcd-1.example:2379/")), None);
    }
}
