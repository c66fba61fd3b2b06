//! The password: where it is read from, and where it must not stay.
//!
//! The documented way is the password file (`PGPASSFILE`, else
//! `~/.pgpass`, in libpq's format and with its rule that a file others may
//! read is ignored). A password in the `--backend` URL still works, but once
//! it is read qsem writes `x` over it in its own argv (as mysql(1) does, so
//! that `ps` and `/proc/PID/cmdline` show none) and removes it from
//! `QSEM_BACKEND` (so that the job's environment does not carry it).
//! The URL's user information is split off before anything parses it, at
//! its last `@`, so that a password containing `@` cannot leak its tail into
//! a host name and an error line.

use anyhow::{Context, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

/// A URL with its user information taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    pub user: Option<String>,
    pub password: Option<String>,
    /// The password as written in the URL (still percent-encoded).
    pub raw_password: Option<String>,
    /// The URL without user information.
    pub rest: String,
}

pub fn split_url(url: &str) -> UrlParts {
    let none = || UrlParts {
        user: None,
        password: None,
        raw_password: None,
        rest: url.to_string(),
    };
    let Some((scheme, after)) = url.split_once("://") else {
        return none();
    };
    let Some(at) = after.rfind('@') else {
        return none();
    };
    let (info, host) = (&after[..at], &after[at + 1..]);
    let (user, raw_password) = match info.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (info, None),
    };
    UrlParts {
        user: Some(decode(user)).filter(|u| !u.is_empty()),
        password: raw_password.map(decode),
        raw_password: raw_password.map(str::to_string),
        rest: format!("{scheme}://{host}"),
    }
}

/// Percent-decoding, leaving malformed escapes as they are.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = || u8::from_str_radix(std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?, 16).ok();
        match (b[i], hex()) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The password for `host:port/db` as `user` from the password file, if
/// any line matches (the first that does, `*` matching anything).
pub fn pgpass(host: &str, port: u16, db: &str, user: &str) -> Result<Option<String>> {
    let path = match std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(home) => std::path::Path::new(&home).join(".pgpass"),
            None => return Ok(None),
        },
    };
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(None);
    };
    // As libpq: a file that others may read or write is not used.
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the password file {}", path.display()))?;
    let port = port.to_string();
    let host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(fields)
        .find(|f| {
            f.len() == 5
                && [host, &port, db, user]
                    .iter()
                    .zip(f)
                    .all(|(want, have)| have == "*" || have == want)
        })
        .map(|mut f| f.remove(4)))
}

/// A password-file line's fields: `:` separates, `\` escapes the next byte.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.last_mut().expect("one").extend(chars.next()),
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().expect("one").push(c),
        }
    }
    out
}

/// Wipes the URL's password from qsem's argv and from `QSEM_BACKEND`, once
/// the engine has read it. Call before any thread starts.
pub fn scrub_password(url: &str) {
    let parts = split_url(url);
    let Some(raw) = parts.raw_password.filter(|p| !p.is_empty()) else {
        return;
    };
    // Best effort: a qsem whose argv cannot be rewritten still runs.
    let _ = scrub_argv(raw.as_bytes());
    if let Some(env) = std::env::var_os("QSEM_BACKEND")
        && let Some(clean) = env.to_str().and_then(without_password)
    {
        // SAFETY: called while the process has one thread (before the
        // engine's runtime starts), so no other thread reads the environment.
        unsafe { std::env::set_var("QSEM_BACKEND", clean) };
    }
}

/// The URL with its password taken out, if it has one.
fn without_password(url: &str) -> Option<String> {
    let (scheme, after) = url.split_once("://")?;
    let at = after.rfind('@')?;
    let (user, _) = after[..at].split_once(':')?;
    Some(format!("{scheme}://{user}@{}", &after[at + 1..]))
}

/// Writes `x` over every `:PASSWORD@` in the memory the kernel shows as
/// `/proc/self/cmdline`, through `/proc/self/mem` (no `unsafe`: the kernel
/// does the write).
fn scrub_argv(raw: &[u8]) -> std::io::Result<()> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // proc(5): arg_start is field 48; the fields after the name start at 3.
    let arg_start: u64 = fields
        .get(45)
        .and_then(|f| f.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let mut cmdline = Vec::new();
    std::fs::File::open("/proc/self/cmdline")?.read_to_end(&mut cmdline)?;
    let mut needle = vec![b':'];
    needle.extend_from_slice(raw);
    needle.push(b'@');
    let mut mem = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/proc/self/mem")?;
    let mut from = 0;
    while let Some(pos) = cmdline[from..]
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
    {
        let at = from + pos + 1;
        mem.seek(SeekFrom::Start(arg_start + at as u64))?;
        mem.write_all(&vec![b'x'; raw.len()])?;
        from = at + raw.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_information_splits_at_the_last_at() {
        let p = split_url("postgres://me:p%40ss@w@db.example:5433/app?sslmode=require");
        assert_eq!(p.user.as_deref(), Some("me"));
        assert_eq!(p.password.as_deref(), Some("p@ss@w"));
        assert_eq!(p.raw_password.as_deref(), Some("p%40ss@w"));
        assert_eq!(p.rest, "postgres://db.example:5433/app?sslmode=require");
        let p = split_url("postgres://db/app");
        assert_eq!((p.user, p.password), (None, None));
        assert_eq!(p.rest, "postgres://db/app");
        assert_eq!(
            without_password("postgres://me:p@w@h/d").as_deref(),
            Some("postgres://me@h/d")
        );
        assert_eq!(without_password("postgres://me@h/d"), None);
        let p = split_url("postgresql://u@h/d");
        assert_eq!((p.user.as_deref(), p.password), (Some("u"), None));
    }

    #[test]
    fn password_file_lines() {
        assert_eq!(fields("h:5432:db:u:pw"), ["h", "5432", "db", "u", "pw"]);
        assert_eq!(
            fields(r"h:*:d\:b:u:p\\w:x"),
            ["h", "*", "d:b", "u", r"p\w:x"]
        );
    }
}
