//! Semaphore ids and their injective, reversible mapping onto lock-directory
//! paths.
//!
//! An id is any non-empty byte string of at most 255 bytes. Bytes in
//! `[A-Za-z0-9_.-]` stand for themselves, except a leading `.`; every other byte
//! (and a leading `.`) becomes `%XX`. `%` is always escaped, so the output never
//! contains `/`, NUL, or a `%` that is not followed by two hex digits, and it is
//! never `.`, `..` or hidden.
//!
//! The escaped form can be three times the id, longer than a file name may be
//! (255 bytes). No single-name encoding can be injective over all 255-byte ids,
//! so a long form is split into components: every component but the last is
//! `%+` and up to 240 escaped bytes, the last is `%-` and the rest. Short forms
//! never start with `%+` or `%-`, so the two families cannot meet, and no id's
//! directory can lie inside another's.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// The longest id, in bytes.
pub const MAX_ID_LEN: usize = 255;
/// The longest single path component the short form may use.
const NAME_MAX: usize = 255;
/// Escaped bytes in each non-final component of the long form.
const CHUNK: usize = 240;

/// A validated semaphore id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdError(String);

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdError {}

impl Id {
    pub fn new(raw: &OsStr) -> Result<Id, IdError> {
        let bytes = raw.as_bytes();
        if bytes.is_empty() {
            return Err(IdError("invalid id '': it is empty".into()));
        }
        if bytes.len() > MAX_ID_LEN {
            return Err(IdError(format!(
                "invalid id '{}…': it is {} bytes long, the limit is {MAX_ID_LEN}",
                String::from_utf8_lossy(&bytes[..32]),
                bytes.len()
            )));
        }
        if bytes.contains(&0) {
            return Err(IdError("invalid id: it contains a NUL byte".into()));
        }
        Ok(Id(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path components, relative to the lock directory, of this id's directory.
    pub fn components(&self) -> Vec<OsString> {
        encode(&self.0)
    }

    /// Recovers an id from the path components made by [`Id::components`].
    pub fn from_components(parts: &[&OsStr]) -> Option<Id> {
        decode(parts).map(Id)
    }

    /// Whether a top-level lock-directory entry starts a long-form id path.
    pub fn is_long_prefix(name: &OsStr) -> bool {
        name.as_bytes().starts_with(b"%+")
    }
}

impl fmt::Display for Id {
    /// Lossy and with control characters escaped: safe to print on a terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

fn escape(id: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len());
    for (i, &b) in id.iter().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

fn unescape(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

fn encode(id: &[u8]) -> Vec<OsString> {
    let escaped = escape(id);
    if escaped.len() <= NAME_MAX {
        return vec![OsString::from_vec(escaped)];
    }
    let mut parts = Vec::new();
    let mut rest = &escaped[..];
    while rest.len() + 2 > NAME_MAX {
        // Never split a %XX triple: back off to the start of one.
        let mut cut = CHUNK;
        if rest[cut - 1] == b'%' {
            cut -= 1;
        } else if rest[cut - 2] == b'%' {
            cut -= 2;
        }
        let mut part = b"%+".to_vec();
        part.extend_from_slice(&rest[..cut]);
        parts.push(OsString::from_vec(part));
        rest = &rest[cut..];
    }
    let mut last = b"%-".to_vec();
    last.extend_from_slice(rest);
    parts.push(OsString::from_vec(last));
    parts
}

fn decode(parts: &[&OsStr]) -> Option<Vec<u8>> {
    let (last, init) = parts.split_last()?;
    let last = last.as_bytes();
    if init.is_empty() {
        let id = unescape(last)?;
        // Only the canonical spelling decodes, so decode(encode(x)) is the only way back.
        return (encode(&id) == [OsStr::from_bytes(last)]).then_some(id);
    }
    let mut escaped = Vec::new();
    for part in init {
        escaped.extend_from_slice(part.as_bytes().strip_prefix(b"%+")?);
    }
    escaped.extend_from_slice(last.strip_prefix(b"%-")?);
    let id = unescape(&escaped)?;
    let again = encode(&id);
    let same = again.len() == parts.len() && again.iter().zip(parts).all(|(a, b)| a == b);
    same.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(id: &[u8]) -> Vec<OsString> {
        Id::new(OsStr::from_bytes(id)).unwrap().components()
    }

    #[test]
    fn short_ids() {
        let table: [(&[u8], &str); 9] = [
            (b"proc", "proc"),
            (b"a/b", "a%2Fb"),
            (b"../x", "%2E.%2Fx"),
            (b".", "%2E"),
            (b"..", "%2E."),
            (b"db.import", "db.import"),
            (b"100%", "100%25"),
            (b"\xff\n", "%FF%0A"),
            (b"%+x", "%25%2Bx"),
        ];
        for (id, want) in table {
            assert_eq!(enc(id), vec![OsString::from(want)], "{id:?}");
        }
    }

    #[test]
    fn long_ids_split_into_safe_components() {
        for len in [86, 100, 200, 255] {
            let id = vec![b'/'; len];
            let parts = enc(&id);
            assert!(parts.len() > 1, "{len}");
            for p in &parts {
                let p = p.as_bytes();
                assert!(p.len() <= NAME_MAX);
                assert!(!p.contains(&b'/'));
                assert!(p.starts_with(b"%+") || p.starts_with(b"%-"));
            }
            let refs: Vec<&OsStr> = parts.iter().map(|p| p.as_os_str()).collect();
            assert_eq!(Id::from_components(&refs).unwrap().as_bytes(), &id[..]);
        }
    }

    #[test]
    fn round_trips_and_rejects_foreign_names() {
        let ids: [&[u8]; 6] = [b"x", b"a b", b"\x01", b"..", b"-j", &[b'z'; 255]];
        for id in ids {
            let parts = enc(id);
            let refs: Vec<&OsStr> = parts.iter().map(|p| p.as_os_str()).collect();
            assert_eq!(Id::from_components(&refs).unwrap().as_bytes(), id);
        }
        for name in ["%2e", "a%2", "%zz", "a/b", ".x", "%-x", "%+x"] {
            assert_eq!(Id::from_components(&[OsStr::new(name)]), None, "{name}");
        }
    }

    #[test]
    fn validation() {
        assert!(Id::new(OsStr::new("")).is_err());
        assert!(
            Id::new(OsStr::from_bytes(&[b'a'; 256]))
                .unwrap_err()
                .to_string()
                .contains("256 bytes")
        );
        assert!(Id::new(OsStr::from_bytes(b"a\0b")).is_err());
        assert!(Id::new(OsStr::from_bytes(&[b'a'; 255])).is_ok());
    }

    mod fuzz {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Any valid id, with the bytes that matter to the encoding made common.
        fn id() -> impl Strategy<Value = Vec<u8>> {
            let byte = prop_oneof![1u8..=255, prop::sample::select(b"%./+-_Aa09\xff".to_vec()),];
            prop_oneof![vec(byte.clone(), 1..=20), vec(byte, 70..=MAX_ID_LEN)]
        }

        fn parts(id: &[u8]) -> Vec<OsString> {
            Id::new(OsStr::from_bytes(id)).unwrap().components()
        }

        fn refs(parts: &[OsString]) -> Vec<&OsStr> {
            parts.iter().map(|p| p.as_os_str()).collect()
        }

        proptest! {
            /// Every component is a safe single file name: not empty, not too
            /// long, no `/` or NUL, never `.`, `..` or hidden.
            #[test]
            fn components_are_safe(id in id()) {
                for p in parts(&id) {
                    let p = p.as_bytes();
                    prop_assert!(!p.is_empty() && p.len() <= NAME_MAX, "{:?}", p);
                    prop_assert!(!p.contains(&b'/') && !p.contains(&0), "{:?}", p);
                    prop_assert!(!p.starts_with(b"."), "{:?}", p);
                }
            }

            /// decode(encode(x)) == x.
            #[test]
            fn round_trips(id in id()) {
                let parts = parts(&id);
                let back = Id::from_components(&refs(&parts));
                prop_assert_eq!(back.map(|b| b.as_bytes().to_vec()), Some(id));
            }

            /// Injective, and no id's directory lies inside another's: the
            /// component lists of two different ids are never equal, nor one a
            /// prefix of the other.
            #[test]
            fn injective_and_prefix_free(a in id(), b in id()) {
                // (Not prop_assume: at a million cases its rejects add up.)
                if a != b {
                    let (pa, pb) = (parts(&a), parts(&b));
                    prop_assert!(!pb.starts_with(&pa) && !pa.starts_with(&pb), "{:?} {:?}", pa, pb);
                }
            }

            /// Near-identical ids (one byte changed) still differ when encoded.
            #[test]
            fn one_byte_apart(a in id(), at in any::<prop::sample::Index>(), to in 1u8..=254) {
                let mut b = a.clone();
                let i = at.index(b.len());
                // Any byte but NUL and the one there.
                b[i] = if to >= b[i] { to + 1 } else { to };
                prop_assert_ne!(parts(&a), parts(&b));
            }

            /// Whatever names are found in a lock directory, decoding never
            /// panics, and accepts only the canonical spelling of an id.
            #[test]
            fn decodes_only_canonical_names(names in vec("(%[+-])?[%0-9A-Fa-f.x/+-]{0,12}", 1..4)) {
                let names: Vec<OsString> = names.into_iter().map(OsString::from).collect();
                if let Some(id) = Id::from_components(&refs(&names)) {
                    prop_assert_eq!(id.components(), names);
                }
            }
        }
    }

    #[test]
    fn display_is_terminal_safe() {
        let id = Id::new(OsStr::from_bytes(b"a\x1b[2J\xff")).unwrap();
        assert_eq!(id.to_string(), "a\\u{1b}[2J\\xff");
    }
}
