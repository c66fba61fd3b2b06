//! Watches: etcd streams a watch's changes as lines of one HTTP response.
//! One thread per watch reads them, keeps the events for the waiter, and
//! writes a byte to a pipe, so that a waiter sleeps in `Signals::wait` on
//! its signal pipe and this pipe at once, and then brings its view up to
//! date from the events without asking the cluster again. A broken stream
//! is resumed from the revision after the last one seen, so no change is
//! missed, but the waiter is told, and reads afresh; an idle stream is
//! reopened every [`WATCH_IDLE`], which is also how a thread whose waiter
//! has gone notices and ends.

use super::client::{ATTEMPT, Client, ROUND_PAUSE};
use super::wire::{b64, error_of, int};
use crate::sys;
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::io::BufRead;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a watch stream may stay silent before it is reopened.
const WATCH_IDLE: Duration = Duration::from_secs(60);

/// What a watch has seen since the waiter last looked.
#[derive(Default)]
struct News {
    /// The events (`{"type", "kv"}`), in revision order.
    events: Vec<Value>,
    /// The stream broke or was refused since: the events may not say all.
    broken: bool,
}

impl Client {
    /// Watches keys from `key` up to `range_end` from revision `start` on:
    /// the returned pipe becomes readable at each change after `start - 1`.
    pub fn watch(self: &Arc<Self>, key: &[u8], range_end: &[u8], start: i64) -> Result<Watch> {
        let (read, write) = sys::pipe().context("cannot create a pipe for an etcd watch")?;
        let gone = Arc::new(AtomicBool::new(false));
        let news = Arc::new(Mutex::new(News::default()));
        let stream = WatchStream {
            news: Arc::clone(&news),
            client: Arc::clone(self),
            key: b64(key),
            range_end: b64(range_end),
            next: start,
            wake: write,
            gone: Arc::clone(&gone),
        };
        std::thread::Builder::new()
            .name("qsem-etcd-watch".into())
            .spawn(move || stream.run())
            .context("cannot start a thread for an etcd watch")?;
        Ok(Watch { read, gone, news })
    }
}

/// A running watch: its pipe's read end. Dropping it tells the thread to end.
pub struct Watch {
    read: OwnedFd,
    gone: Arc<AtomicBool>,
    news: Arc<Mutex<News>>,
}

impl Watch {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Empties the pipe, after a wake-up.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        while rustix::io::read(self.read.as_fd(), &mut buf).is_ok_and(|n| n > 0) {}
    }

    /// The events since the last call, and whether they may be incomplete
    /// (the stream broke meanwhile: read afresh).
    pub fn take(&self) -> (Vec<Value>, bool) {
        self.drain();
        let mut news = self.news.lock().unwrap_or_else(|e| e.into_inner());
        let news = std::mem::take(&mut *news);
        (news.events, news.broken)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
    }
}

/// The thread behind a [`Watch`].
struct WatchStream {
    client: Arc<Client>,
    key: String,
    range_end: String,
    /// The first revision not seen yet.
    next: i64,
    wake: OwnedFd,
    gone: Arc<AtomicBool>,
    news: Arc<Mutex<News>>,
}

impl WatchStream {
    fn run(mut self) {
        let mut member = self.client.current.load(Ordering::Relaxed);
        while !self.gone.load(Ordering::Relaxed) {
            if self.stream(member).is_err() {
                // The waiter has gone (its pipe is closed).
                return;
            }
            // Broken, refused or idle: a waiter looks again, in case what
            // broke the stream was a change; then the next member.
            self.news.lock().unwrap_or_else(|e| e.into_inner()).broken = true;
            if self.tell().is_err() {
                return;
            }
            member = (member + 1) % self.client.bases.len();
            std::thread::sleep(ROUND_PAUSE);
        }
    }

    /// Reads one stream until it ends; `Err` only if the waiter has gone.
    fn stream(&mut self, member: usize) -> Result<(), ()> {
        let body = json!({"create_request": {
            "key": self.key, "range_end": self.range_end, "start_revision": self.next.to_string(),
        }})
        .to_string();
        let token = self.client.token(member, ATTEMPT).unwrap_or(None);
        let mut req = self
            .client
            .streams
            .post(&format!("{}/v3/watch", self.client.bases[member]))
            .config()
            .timeout_per_read(Some(WATCH_IDLE))
            .build();
        if let Some(t) = &token {
            req = req.header("authorization", t);
        }
        let Ok(resp) = req.send(&body) else {
            return Ok(());
        };
        let mut lines = std::io::BufReader::new(resp.into_body().into_reader());
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                return Ok(());
            };
            let r = &v["result"];
            if self.client.same_cluster(&v, member).is_err() {
                // Not the cluster the waiter reads: its events would lie.
                return Ok(());
            }
            if error_of(&v).is_some() || r["canceled"].as_bool() == Some(true) {
                // Compacted past `next`, or refused: start again from now.
                self.next = int(&r["header"]["revision"]).max(self.next - 1) + 1;
                return Ok(());
            }
            if let Some(events) = r["events"].as_array().filter(|e| !e.is_empty()) {
                let last = events.iter().map(|e| int(&e["kv"]["mod_revision"])).max();
                self.next = self.next.max(last.unwrap_or(0) + 1);
                let mut news = self.news.lock().unwrap_or_else(|e| e.into_inner());
                news.events.extend(events.iter().cloned());
                drop(news);
                self.tell().map_err(drop)?;
            }
            if self.gone.load(Ordering::Relaxed) {
                return Err(());
            }
        }
    }

    /// One byte to the waiter; a full pipe means it is readable already.
    fn tell(&self) -> std::io::Result<()> {
        match rustix::io::write(&self.wake, b"w")
            .map(drop)
            .map_err(std::io::Error::from)
        {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}
