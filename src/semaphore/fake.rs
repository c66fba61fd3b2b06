//! An in-memory engine for unit tests of the code around the semaphore (the
//! runner's decisions: statuses, report lines, timeouts, lost slots, what a
//! background job records), as hyperfine's `MockExecutor` is for its
//! benchmarks: no files, no server, milliseconds per test. It answers each
//! acquisition as its script says, and logs what was asked of it.

use super::{Acquired, IdStatus, Idle, Request, Semaphore, Slot, SlotEvent};
use crate::id::Id;
use crate::signals::{Received, Signals};
use anyhow::Result;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::Instant;

/// How the fake answers one acquisition.
#[derive(Debug, Clone)]
pub enum Next {
    /// A slot, whose events (if any) are news at once.
    Slot(Vec<SlotEvent>),
    TimedOut,
    Crowded,
    Interrupted(Received),
}

/// What was asked of the fake and its slots.
#[derive(Debug, Default)]
pub struct Log {
    /// Each request's (jobs, max_waiting, background, deadline given).
    pub requests: Vec<(u32, Option<u32>, bool, bool)>,
    /// The pids given to `Slot::started`.
    pub started: Vec<u32>,
    /// The failure lines given to `Slot::finish` (`None`: no failure).
    pub finished: Vec<Option<String>>,
    /// Slots dropped rather than finished.
    pub dropped: u32,
}

#[derive(Default)]
pub struct Fake {
    /// The answers, in order; once they run out, plain slots.
    pub script: VecDeque<Next>,
    pub log: Rc<RefCell<Log>>,
}

impl Fake {
    pub fn answering(script: impl IntoIterator<Item = Next>) -> Fake {
        Fake {
            script: script.into_iter().collect(),
            log: Rc::default(),
        }
    }
}

impl Semaphore for Fake {
    fn acquire(&mut self, req: &Request, _: &mut Signals) -> Result<Acquired> {
        self.log.borrow_mut().requests.push((
            req.jobs,
            req.max_waiting,
            req.background,
            req.deadline.is_some(),
        ));
        Ok(
            match self.script.pop_front().unwrap_or(Next::Slot(Vec::new())) {
                Next::Slot(events) => Acquired::Slot(Box::new(FakeSlot::new(events, &self.log)?)),
                Next::TimedOut => Acquired::TimedOut,
                Next::Crowded => Acquired::Crowded,
                Next::Interrupted(r) => Acquired::Interrupted(r),
            },
        )
    }

    fn status(&mut self, _: Option<&Id>) -> Result<Vec<IdStatus>> {
        Ok(Vec::new())
    }

    fn wait_idle(&mut self, _: &Id, _: Option<Instant>, _: &mut Signals) -> Result<Idle> {
        Ok(Idle::Reached)
    }

    fn take_failures(&mut self, _: &Id) -> Result<u32> {
        let log = self.log.borrow();
        Ok(log.finished.iter().filter(|f| f.is_some()).count() as u32)
    }
}

struct FakeSlot {
    log: Rc<RefCell<Log>>,
    events: Vec<SlotEvent>,
    /// Readable while `events` has news.
    news: Option<(OwnedFd, OwnedFd)>,
    finished: bool,
}

impl FakeSlot {
    fn new(events: Vec<SlotEvent>, log: &Rc<RefCell<Log>>) -> Result<FakeSlot> {
        let news = if events.is_empty() {
            None
        } else {
            let (read, write) = rustix::pipe::pipe()?;
            rustix::io::write(&write, b"!")?;
            Some((read, write))
        };
        Ok(FakeSlot {
            log: Rc::clone(log),
            events,
            news,
            finished: false,
        })
    }
}

impl Slot for FakeSlot {
    fn number(&self) -> u32 {
        1
    }

    fn inheritable(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn fence(&self) -> Option<u64> {
        Some(7)
    }

    fn started(&mut self, pid: u32) {
        self.log.borrow_mut().started.push(pid);
    }

    fn events(&self) -> Option<BorrowedFd<'_>> {
        self.news.as_ref().map(|(read, _)| read.as_fd())
    }

    fn take_events(&mut self) -> Vec<SlotEvent> {
        if let Some((read, _)) = &self.news {
            let _ = rustix::io::read(read, &mut [0u8; 8]);
        }
        self.news = None;
        std::mem::take(&mut self.events)
    }

    fn finish(mut self: Box<Self>, failure: Option<&str>) -> Result<()> {
        self.finished = true;
        let line = failure.map(str::to_string);
        self.log.borrow_mut().finished.push(line);
        Ok(())
    }
}

impl Drop for FakeSlot {
    fn drop(&mut self) {
        if !self.finished {
            self.log.borrow_mut().dropped += 1;
        }
    }
}
