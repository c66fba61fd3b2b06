//! Every exit status qsem can return, and nothing else: no other file holds a
//! status number. The table mirrors SPEC §2 and the EXIT STATUS section of the
//! manual; keep the three in step.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// qsem's one error type: an outcome that ends qsem with a particular status
/// and one line (or, for usage errors, clap's few lines) for the user, such as
/// "command not found" (127). `main` prints `message` as is, on stderr, or on
/// stdout for status 0 (`--help`, `--version`).
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl From<anyhow::Error> for Failure {
    /// A [`Failure`] carried through `anyhow` keeps its status; any other
    /// error is qsem's own failure (125), with its whole chain of context.
    fn from(err: anyhow::Error) -> Failure {
        match err.downcast::<Failure>() {
            Ok(failure) => failure,
            Err(err) => Failure {
                exit: Exit::OWN_FAILURE,
                message: format!("qsem: {err:#}"),
            },
        }
    }
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
    /// `--timeout` stopped the command (as timeout(1); the same number as
    /// [`Exit::EACH_255`]).
    pub const TIMED_OUT: Exit = Exit(124);
    /// qsem's own failure: the lock directory is unusable, no file descriptors, ...
    pub const OWN_FAILURE: Exit = Exit(125);
    /// `--each`: a run was killed by a signal, or stopped by `--timeout`,
    /// which sends one (as xargs; the same number as [`Exit::OWN_FAILURE`]).
    pub const EACH_KILLED: Exit = Exit(125);
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

    /// What one `--each` run contributes to qsem's status, as xargs counts it:
    /// 0; 123 for a status from 1 to 254; 124 for 255; 125 for a signal.
    pub fn of_each_run(status: ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            (Some(0), _) => Exit::OK,
            (Some(255), _) => Exit::EACH_255,
            (Some(_), _) => Exit::EACH_SOME_FAILED,
            (None, _) => Exit::EACH_KILLED,
        }
    }

    /// The graver of two `--each` outcomes. For these statuses the number is
    /// the gravity: 127 (not found) > 126 > 125 (killed) > 124 (255) > 123 > 0.
    pub fn graver(self, other: Exit) -> Exit {
        if other.0 > self.0 { other } else { self }
    }

    pub fn as_u8(self) -> u8 {
        self.0
    }

    pub fn is_success(self) -> bool {
        self.0 == 0
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
    fn each_runs_count_like_xargs() {
        let each = |raw| Exit::of_each_run(ExitStatus::from_raw(raw));
        assert_eq!(each(0), Exit::OK);
        assert_eq!(each(1 << 8), Exit::code(123));
        assert_eq!(each(125 << 8), Exit::code(123));
        assert_eq!(each(254 << 8), Exit::code(123));
        assert_eq!(each(255 << 8), Exit::code(124));
        assert_eq!(each(libc::SIGTERM), Exit::code(125));
        let worst = [
            Exit::OK,
            Exit::EACH_SOME_FAILED,
            Exit::NOT_FOUND,
            Exit::EACH_255,
        ]
        .into_iter()
        .fold(Exit::OK, Exit::graver);
        assert_eq!(worst, Exit::NOT_FOUND);
    }

    #[test]
    fn signal_statuses_saturate() {
        assert_eq!(Exit::signal(libc::SIGINT), Exit::code(130));
        assert_eq!(Exit::signal(200), Exit::code(255));
    }
}
