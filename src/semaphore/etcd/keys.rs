//! Where an id lives in etcd. Keys of an id are under `qsem/<hex of the
//! id's bytes>/` (injective, so two ids never share a key): `h/<slot>` per
//! holder and `q/<lease>` per waiter, both attached to their qsem's lease,
//! so that a crashed qsem's keys vanish with its lease; `r/<lease>` (a
//! running `--bg` job) and `f/<lease>` (its failure) have no lease, as they
//! must outlive it. `h/` and `q/` sort next to each other, so one range (and
//! one watch) covers both. The layout is an interface between qsem
//! versions: change it only with the major version.

use super::wire::b64;
use crate::id::Id;
use serde_json::{Value, json};
use std::fmt::Write as _;

/// The keys of one id.
pub struct Keys {
    /// `qsem/<hex>/`.
    base: Vec<u8>,
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Keys {
    pub fn new(id: &Id) -> Keys {
        let mut base = String::from("qsem/");
        for b in id.as_bytes() {
            let _ = write!(base, "{b:02x}");
        }
        base.push('/');
        Keys {
            base: base.into_bytes(),
        }
    }

    fn key(&self, kind: &str, name: &str) -> Vec<u8> {
        let mut k = self.base.clone();
        k.extend_from_slice(kind.as_bytes());
        k.push(b'/');
        k.extend_from_slice(name.as_bytes());
        k
    }

    pub fn holder(&self, slot: u32) -> Vec<u8> {
        self.key("h", &format!("{slot:07}"))
    }

    pub fn waiter(&self, lease: i64) -> Vec<u8> {
        self.key("q", &format!("{lease:016x}"))
    }

    pub fn running(&self, lease: i64) -> Vec<u8> {
        self.key("r", &format!("{lease:016x}"))
    }

    pub fn failure(&self, lease: i64) -> Vec<u8> {
        self.key("f", &format!("{lease:016x}"))
    }

    /// The prefix of one kind of key (`h`, `q`, `r`, `f`).
    pub fn kind(&self, kind: &str) -> Vec<u8> {
        self.key(kind, "")
    }

    /// Holders and waiters: `[h/, q/ end)`.
    pub fn queue_range(&self) -> (Vec<u8>, Vec<u8>) {
        (self.kind("h"), prefix_end(&self.kind("q")))
    }

    /// `{"key", "range_end"}` of the holders and waiters, for a range request.
    pub fn queue_request(&self) -> Value {
        let (key, end) = self.queue_range();
        json!({"key": b64(&key), "range_end": b64(&end)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_injective_and_ranges_cover_them() {
        let id = |s: &str| Id::new(std::ffi::OsStr::new(s)).unwrap();
        let (a, b) = (Keys::new(&id("a/b")), Keys::new(&id("a")));
        assert_eq!(a.holder(3), b"qsem/612f62/h/0000003");
        assert!(!a.holder(1).starts_with(&b.kind("h")));
        let (start, end) = a.queue_range();
        for k in [a.holder(1), a.holder(1_000_000), a.waiter(i64::MAX)] {
            assert!(k >= start && k < end, "{k:?}");
        }
        for k in [a.running(5), a.failure(5)] {
            assert!(k < start || k >= end, "{k:?}");
        }
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }
}
