//! The lock directory: `--dir`, else `$QSEM_DIR`, else
//! `$XDG_STATE_HOME/qsem`, else `$HOME/.local/state/qsem` (the home directory
//! found in the password database if `HOME` is unset), so that a user's cron
//! jobs and shells share it.

use super::usage;
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::path::PathBuf;

/// `--dir` (or `QSEM_DIR`) if given, else the default.
pub fn lock_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(d) if d.as_os_str().is_empty() => Err(usage("--dir / QSEM_DIR is empty")),
        Some(d) => Ok(d),
        None => default_dir(),
    }
}

/// `$XDG_STATE_HOME/qsem`, else `$HOME/.local/state/qsem`: the same for a user's
/// cron jobs and shells.
fn default_dir() -> Result<PathBuf> {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from)
        && state.is_absolute()
    {
        return Ok(state.join("qsem"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(home_from_passwd)
        .context("cannot find a lock directory: set QSEM_DIR, or HOME")?;
    Ok(home.join(".local/state/qsem"))
}

fn home_from_passwd() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data; getpwuid_r writes only within `buf`, and
    // `pw_dir` points into it while `buf` lives.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut out = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        );
        if rc != 0 || out.is_null() || pwd.pw_dir.is_null() {
            return None;
        }
        let dir = std::ffi::CStr::from_ptr(pwd.pw_dir).to_bytes().to_vec();
        (!dir.is_empty()).then(|| PathBuf::from(OsString::from_vec(dir)))
    }
}
