//! Every exit status qsem can return, and nothing else: no other file holds a
//! status number. The table mirrors SPEC §2 and the EXIT STATUS section of the
//! manual; keep the three in step.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// An outcome that ends qsem with a particular status and one line for the
/// user, such as "command not found" (127). `main` prints `message` as is.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The status qsem exits with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit(u8);

impl Exit {
    /// Everything went well (or `--help`/`--version`).
    pub const OK: Exit = Exit(0);
    /// `--wait-all` found failed background jobs since the previous `--wait-all`.
    pub const JOBS_FAILED: Exit = Exit(1);
    /// Bad usage: an unknown option, a bad value, no command.
    pub const USAGE: Exit = Exit(2);
    /// `--on-lost=kill`: the shared-server slot was lost while the command ran,
    /// so qsem stopped it.
    pub const SLOT_LOST: Exit = Exit(122);
    /// `--each`: some run exited with a status from 1 to 125 (as xargs).
    pub const EACH_SOME_FAILED: Exit = Exit(123);
    /// `--each`: a run exited with status 255 (as xargs).
    pub const EACH_255: Exit = Exit(124);
    /// qsem's own failure: the lock directory is unusable, no file descriptors, ...
    /// Also `--each`'s "a run was killed by a signal" (as xargs).
    pub const OWN_FAILURE: Exit = Exit(125);
    /// The command was found but could not be executed.
    pub const NOT_EXECUTABLE: Exit = Exit(126);
    /// The command was not found.
    pub const NOT_FOUND: Exit = Exit(127);

    /// A status chosen by the user (`-E`), or passed through from the child.
    pub const fn code(code: u8) -> Exit {
        Exit(code)
    }

    /// The shell's convention for "ended by signal `signo`": 128 + signo.
    pub fn signal(signo: i32) -> Exit {
        Exit(128u8.saturating_add(u8::try_from(signo).unwrap_or(127)))
    }

    /// The status that reports a child's `ExitStatus` to our caller.
    pub fn of_child(status: ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            // A status outside 0..=255 cannot come from wait(2) on Unix.
            (Some(code), _) => Exit(u8::try_from(code).unwrap_or(u8::MAX)),
            (None, Some(signo)) => Exit::signal(signo),
            (None, None) => Exit::OWN_FAILURE,
        }
    }

    pub fn as_u8(self) -> u8 {
        self.0
    }

    pub fn is_success(self) -> bool {
        self.0 == 0
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_statuses_map_like_a_shell() {
        assert_eq!(Exit::of_child(ExitStatus::from_raw(0)), Exit::OK);
        assert_eq!(Exit::of_child(ExitStatus::from_raw(3 << 8)), Exit::code(3));
        assert_eq!(
            Exit::of_child(ExitStatus::from_raw(255 << 8)),
            Exit::code(255)
        );
        assert_eq!(
            Exit::of_child(ExitStatus::from_raw(libc::SIGKILL)),
            Exit::code(137)
        );
        assert_eq!(
            Exit::of_child(ExitStatus::from_raw(libc::SIGTERM)),
            Exit::code(143)
        );
    }

    #[test]
    fn signal_statuses_saturate() {
        assert_eq!(Exit::signal(libc::SIGINT), Exit::code(130));
        assert_eq!(Exit::signal(200), Exit::code(255));
    }
}
