//! The command qsem runs: its program and arguments, how it is shown to a
//! person (shell-quoted, in report lines and `--status`), and how its program
//! is found. Finding it is done once, before any waiting: nobody wants to wait
//! an hour for a slot to learn of a typo.

use crate::exit::Exit;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The program to run and its arguments.
#[derive(Debug, Clone)]
pub struct Command {
    /// What to execute: a name looked up in PATH, or a path.
    pub program: OsString,
    /// Its arguments, not including argv[0].
    pub args: Vec<OsString>,
}

impl Command {
    /// `/bin/sh -c SCRIPT` followed by `extra` (the script's `$0`, `$1`, …).
    pub fn shell(script: OsString, extra: &[&str]) -> Command {
        let mut args = vec!["-c".into(), script];
        args.extend(extra.iter().map(OsString::from));
        Command {
            program: "/bin/sh".into(),
            args,
        }
    }

    /// The command as one line, shell-quoted where needed, for humans.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The program's path, found as execvp(3) would; an error is the status
    /// qsem exits with (126/127) and the reason.
    pub fn resolve(&self) -> Result<PathBuf, (Exit, &'static str)> {
        resolve(&self.program)
    }
}

/// Quotes a word the way a POSIX shell would read it back.
pub fn shell_quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if plain {
        s.into_owned()
    } else {
        let escaped: String = s
            .chars()
            .map(|c| match c {
                '\'' => "'\\''".to_string(),
                c if c.is_control() => c.escape_default().to_string(),
                c => c.to_string(),
            })
            .collect();
        format!("'{escaped}'")
    }
}

/// Whether `p` is a file this process may execute: `None` if it does not
/// exist, `Some(false)` for a directory or a file without permission.
fn executable(p: &Path) -> Option<bool> {
    let meta = std::fs::metadata(p).ok()?;
    Some(!meta.is_dir() && rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok())
}

/// Finds the program as execvp(3) would: a name with a slash as is, else the
/// first executable file of that name in PATH.
fn resolve(program: &OsStr) -> Result<PathBuf, (Exit, &'static str)> {
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match executable(&path) {
            Some(true) => Ok(path),
            Some(false) => Err((Exit::NOT_EXECUTABLE, "permission denied, or a directory")),
            None => Err((Exit::NOT_FOUND, "no such file")),
        };
    }
    let search =
        std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = false;
    for dir in std::env::split_paths(&search) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        match executable(&candidate) {
            Some(true) => return Ok(candidate),
            Some(false) => denied = true,
            None => {}
        }
    }
    if denied {
        Err((Exit::NOT_EXECUTABLE, "permission denied"))
    } else {
        Err((Exit::NOT_FOUND, "command not found"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(OsStr::new("plain-1.txt")), "plain-1.txt");
        assert_eq!(shell_quote(OsStr::new("it's")), "'it'\\''s'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
        assert_eq!(shell_quote(OsStr::new("a\nb")), "'a\\nb'");
    }

    #[test]
    fn resolution() {
        assert!(resolve(OsStr::new("sh")).is_ok());
        assert_eq!(
            resolve(OsStr::new("no-such-command-qsem")).unwrap_err().0,
            Exit::NOT_FOUND
        );
        assert_eq!(
            resolve(OsStr::new("/no/such/file")).unwrap_err().0,
            Exit::NOT_FOUND
        );
        assert_eq!(
            resolve(OsStr::new("/")).unwrap_err().0,
            Exit::NOT_EXECUTABLE
        );
    }
}
