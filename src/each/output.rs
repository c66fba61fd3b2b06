//! `--each`'s output: each run's stdout and stderr pipes, passed on to
//! qsem's own whole lines at a time (a line longer than [`MAX_LINE`] in
//! pieces, a last line without a newline when its pipe ends), each batch in
//! one `write(2)`, so that lines of different runs never mix. A write error
//! on qsem's stdout is kept for the relay to count, as xargs would.

use crate::exit::Exit;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

/// Longest partial line kept back while waiting for its newline.
pub const MAX_LINE: usize = 1024 * 1024;

/// What one read of a pipe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    Data,
    Empty,
    Closed,
}

/// One of a run's output pipes, with its partial last line.
pub struct Pipe<P> {
    pub pipe: P,
    pub pending: Vec<u8>,
    to: Output,
}

/// Where a pipe's lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

impl<P: AsFd> Pipe<P> {
    pub fn new(pipe: P, to: Output) -> io::Result<Pipe<P>> {
        rustix::io::ioctl_fionbio(&pipe, true)?;
        Ok(Pipe {
            pipe,
            pending: Vec::new(),
            to,
        })
    }

    /// Reads what is there (once) and passes on the complete lines; at EOF,
    /// passes on the rest too.
    pub fn pump(&mut self, sink: &mut Sink) -> Pumped {
        let mut chunk = [0u8; 64 * 1024];
        let n = match rustix::io::retry_on_intr(|| rustix::io::read(&self.pipe, &mut chunk)) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN) => return Pumped::Empty,
            Err(_) => 0,
        };
        if n == 0 {
            self.emit(self.pending.len(), sink);
            return Pumped::Closed;
        }
        self.pending.extend_from_slice(&chunk[..n]);
        let whole = match self.pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if self.pending.len() >= MAX_LINE => self.pending.len(),
            None => 0,
        };
        self.emit(whole, sink);
        Pumped::Data
    }

    pub fn emit(&mut self, len: usize, sink: &mut Sink) {
        if len > 0 {
            let bytes: Vec<u8> = self.pending.drain(..len).collect();
            sink.write(self.to, &bytes);
        }
    }
}

/// qsem's own stdout and stderr, and what went wrong writing to them.
pub struct Sink {
    /// A write error on stdout not yet counted: 123, or 125 for a closed pipe.
    pub failed: Option<(Exit, io::Error)>,
    pub said: bool,
}

impl Sink {
    fn write(&mut self, to: Output, bytes: &[u8]) {
        let written = match to {
            Output::Stdout => write_all(rustix::stdio::stdout(), bytes),
            Output::Stderr => write_all(rustix::stdio::stderr(), bytes),
        };
        if let (Output::Stdout, Err(e), false) = (to, written, self.said) {
            let exit = if e.kind() == io::ErrorKind::BrokenPipe {
                Exit::EACH_KILLED
            } else {
                Exit::EACH_SOME_FAILED
            };
            self.failed = Some((exit, e));
        }
    }
}

/// Writes all of `bytes`, one `write(2)` when it fits, so that a line is not
/// split by the kernel.
fn write_all(fd: BorrowedFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = rustix::io::retry_on_intr(|| rustix::io::write(fd, bytes))?;
        bytes = &bytes[n..];
    }
    Ok(())
}
