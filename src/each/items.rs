//! `--each`'s items: stdin split on newlines (or NULs with `-0`), read
//! without ever blocking in `read` more than once, so that the main thread
//! can wait for stdin and signals together.

use std::ffi::OsString;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStringExt;

/// Splits stdin into items without ever blocking in `read` more than once:
/// the caller waits, then [`Items::fill`] reads what is there.
pub struct Items {
    separator: u8,
    buf: Vec<u8>,
    /// Where the next item starts in `buf`.
    start: usize,
    eof: bool,
}

impl Items {
    pub fn new(separator: u8) -> Items {
        Items {
            separator,
            buf: Vec::new(),
            start: 0,
            eof: false,
        }
    }

    pub fn fill(&mut self, fd: BorrowedFd) -> io::Result<()> {
        self.buf.drain(..self.start);
        self.start = 0;
        let mut chunk = [0u8; 64 * 1024];
        let n = rustix::io::retry_on_intr(|| rustix::io::read(fd, &mut chunk))?;
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next complete item; empty items are skipped, as xargs skips blank lines.
    pub fn next(&mut self) -> Option<OsString> {
        loop {
            let rest = &self.buf[self.start..];
            let (len, used) = match rest.iter().position(|&b| b == self.separator) {
                Some(i) => (i, i + 1),
                None if self.eof && !rest.is_empty() => (rest.len(), rest.len()),
                None => return None,
            };
            let item = rest[..len].to_vec();
            self.start += used;
            if !item.is_empty() {
                return Some(OsString::from_vec(item));
            }
        }
    }

    pub fn at_end(&self) -> bool {
        self.eof && self.start == self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], separator: u8) -> Vec<String> {
        let mut items = Items::new(separator);
        items.buf = input.to_vec();
        items.eof = true;
        std::iter::from_fn(|| items.next())
            .map(|i| i.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn items() {
        assert_eq!(split(b"a\nb c\n", b'\n'), ["a", "b c"]);
        assert_eq!(split(b"a\n\n\nb", b'\n'), ["a", "b"]);
        assert_eq!(split(b"kept\r\n", b'\n'), ["kept\r"]);
        assert_eq!(split(b"a\nb\0c\r\0", b'\0'), ["a\nb", "c\r"]);
        assert_eq!(split(b"", b'\n'), Vec::<String>::new());
    }

    #[test]
    fn an_incomplete_item_waits_for_its_end() {
        let mut items = Items::new(b'\n');
        items.buf = b"one\ntw".to_vec();
        assert_eq!(items.next().unwrap(), "one");
        assert_eq!(items.next(), None);
        assert!(!items.at_end());
        items.eof = true;
        assert_eq!(items.next().unwrap(), "tw");
        assert!(items.at_end());
    }
}
