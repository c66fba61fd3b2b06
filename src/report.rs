//! qsem's own lines on stderr, all prefixed `qsem[<id>]: `, so that cron's mail
//! says which semaphore spoke. Written unbuffered, one `write` per line.

use crate::id::Id;
use std::io::Write;

pub fn line(id: &Id, msg: &str) {
    let text = format!("qsem[{id}]: {msg}\n");
    // Nothing sensible can be done if stderr is gone.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
