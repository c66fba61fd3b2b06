//! Taking a slot: one admission attempt under the mutex, and the waiting
//! between attempts — who watches what, who follows whom, and who passes a
//! waiter that does not take its turn. The rules themselves are in the
//! module's opening (`files/mod.rs`) and in `queue.rs`.

use super::super::{Acquired, Request};
use super::Files;
use super::census::Census;
use super::guard::{Guard, Watch};
use super::lockdir::IdDir;
use super::mutex::Locked;
use super::queue::{Older, Ticket, TicketName, Verdict};
use super::sleep::Woke;
use super::slots::SlotFile;
use super::watching::{DEPUTY_DELAY, Deputy, Watching};
use crate::signals::Signals;
use crate::sys;
use anyhow::Result;
use std::os::fd::AsFd;
use std::time::Instant;

/// Who is attempting.
enum Who<'a> {
    /// A newcomer, which joins the queue in the same critical section if it
    /// is not admitted (and may still wait).
    Newcomer,
    Waiting(&'a Ticket, &'a mut Older),
}

/// What an attempt decided.
enum Decision {
    Took(Box<SlotFile>),
    /// A newcomer found `--max-waiting` invocations waiting already.
    Crowded,
    Wait {
        held: u32,
        blocker: Option<TicketName>,
        /// A newcomer's place in the queue, if it may wait.
        queued: Option<(Ticket, Older)>,
    },
    /// The mutex could not be had in time, or a signal came.
    Ended(Acquired),
}

/// What a chain head's turn came to.
enum Turn {
    Took(Box<SlotFile>),
    Ended(Outcome),
    /// Look again at once.
    Again,
    /// Wait; with the waiter that may be passed if it leaves a free slot unused.
    Wait(Option<TicketName>),
}

/// How one acquisition in the current directories ended.
pub(super) enum Outcome {
    Done(Acquired),
    /// The directories were removed: start again in new ones.
    Vanished,
}

impl Files {
    /// One admission attempt under the mutex.
    fn attempt(
        &self,
        dir: &IdDir,
        req: &Request,
        who: Who,
        signals: &mut Signals,
    ) -> Result<Decision> {
        let _mutex = match dir.mutex(&self.dir, false, signals, req.deadline)? {
            Locked::Got(fd) => fd,
            Locked::TimedOut => return Ok(Decision::Ended(Acquired::TimedOut)),
            Locked::Signal(r) => return Ok(Decision::Ended(Acquired::Interrupted(r))),
        };
        let mut listed;
        let (before, older) = match who {
            Who::Newcomer => {
                listed = dir.older_than(u128::MAX)?;
                (u128::MAX, &mut listed)
            }
            Who::Waiting(me, older) => (me.me.arrived, older),
        };
        // With nobody ahead, the census's count may admit (never refuse): no
        // waiter's turn depends on it.
        let census = Census::open(dir, &self.dir);
        let marked = match &census {
            Some(c) if older.len() == 0 => Some(dir.scan_marked(&self.dir, c)?),
            _ => None,
        };
        let scan = match marked {
            Some(scan) if scan.held < req.jobs => scan,
            _ => dir.scan_fixing(&self.dir, census.as_ref())?,
        };
        let Verdict { blocker, stopped } = if scan.held < req.jobs {
            older.blocker(dir, before, scan.held, sys::monotonic_nanos())
        } else {
            Verdict::default()
        };
        for t in &stopped {
            self.say(req, &format!("passing waiter {} (stopped)", t.pid));
            dir.pass(t);
        }
        let held = scan.held;
        if held < req.jobs
            && blocker.is_none()
            && let Some(slot) = dir.take_lowest(&self.dir, req, scan, None, census)?
        {
            return Ok(Decision::Took(Box::new(slot)));
        }
        let newcomer = before == u128::MAX;
        if newcomer && req.max_waiting.is_some_and(|k| older.len() as u32 >= k) {
            let live = dir.count_waiters()?;
            if req.max_waiting.is_some_and(|k| live >= k) {
                return Ok(Decision::Crowded);
            }
        }
        let queued = if newcomer && req.deadline.is_none_or(|d| d > Instant::now()) {
            Some(dir.enqueue(&self.dir, req.jobs, std::mem::take(older))?)
        } else {
            None
        };
        Ok(Decision::Wait {
            held,
            blocker,
            queued,
        })
    }

    /// A taken slot, with a guard that puts it back should its file be removed.
    fn guarded(&self, mut slot: SlotFile, req: &Request) -> Acquired {
        if let Ok(st) = sys::fstat(slot.file.as_fd()) {
            slot.guard = Guard::new(Watch {
                lock_path: self.dir.path.clone(),
                id: req.id.clone(),
                jobs: req.jobs,
                command: req.command.to_string(),
                started: slot.record.started,
                number: slot.number,
                path: slot.path.clone(),
                dev: st.st_dev,
                ino: st.st_ino,
            })
            .ok();
        }
        Acquired::Slot(Box::new(slot))
    }

    /// One acquisition in the current directories.
    pub(super) fn acquire_here(&mut self, req: &Request, signals: &mut Signals) -> Result<Outcome> {
        let dir = match self.dir.id_dir(req.id, true) {
            Ok(dir) => dir.expect("created"),
            Err(_) if self.dir.vanished() => return Ok(Outcome::Vanished),
            Err(e) => return Err(e),
        };
        loop {
            let Some(decision) =
                unless_vanished(&dir, self.attempt(&dir, req, Who::Newcomer, signals))?
            else {
                return Ok(Outcome::Vanished);
            };
            let (held, queued) = match decision {
                Decision::Took(slot) => return Ok(Outcome::Done(self.guarded(*slot, req))),
                Decision::Crowded => return Ok(Outcome::Done(Acquired::Crowded)),
                Decision::Ended(how) => return Ok(Outcome::Done(how)),
                Decision::Wait { held, queued, .. } => (held, queued),
            };
            let Some((ticket, older)) = queued else {
                self.say(req, "no free slot; giving up at once");
                return Ok(Outcome::Done(Acquired::TimedOut));
            };
            self.say(
                req,
                &format!("waiting for a slot ({held} held, limit {})", req.jobs),
            );
            match self.wait_in_line(&dir, req, ticket, older, signals)? {
                Some(outcome) => return Ok(outcome),
                None => self.say(req, "passed over while not running; queueing again"),
            }
        }
    }

    /// Waits in the queue until admitted; `None` if this waiter was passed
    /// (see `queue.rs`) and must queue again.
    fn wait_in_line(
        &self,
        dir: &IdDir,
        req: &Request,
        ticket: Ticket,
        mut older: Older,
        signals: &mut Signals,
    ) -> Result<Option<Outcome>> {
        let since = Instant::now();
        let mut w = Watching::new();
        loop {
            if dir.vanished() {
                return Ok(Some(Outcome::Vanished));
            }
            if ticket.passed() {
                return Ok(None);
            }
            let pred = older.nearest(dir, req.jobs, ticket.me.arrived);
            let head = pred.is_none();
            // The waiter that may be passed if it leaves a free slot unused.
            let first_in_line = match pred {
                Some((p, pfd)) => self.behind(dir, req, &mut older, p, pfd, &mut w)?,
                None => match self.head_turn(dir, req, &ticket, &mut older, &mut w, signals)? {
                    Turn::Took(mut slot) => {
                        drop(ticket);
                        slot.watcher = std::mem::take(&mut w.spare);
                        return Ok(Some(Outcome::Done(self.guarded(*slot, req))));
                    }
                    Turn::Ended(outcome) => return Ok(Some(outcome)),
                    Turn::Again => continue,
                    Turn::Wait(first) => first,
                },
            };
            let pass_at = w.pass_at(first_in_line.as_ref());
            if let (Some(t), Some(at)) = (&first_in_line, pass_at)
                && Instant::now() >= at
            {
                if !self.pass_if_still(dir, req, t)? {
                    w.passing_failed();
                }
                continue;
            }
            match w.sleep(head, pass_at, signals, req.deadline)? {
                Woke::Changed | Woke::Due => {}
                Woke::TimedOut => {
                    let waited = since.elapsed().as_secs_f64();
                    self.say(req, &format!("no slot within {waited:.3}s; giving up"));
                    return Ok(Some(Outcome::Done(Acquired::TimedOut)));
                }
                Woke::Signal(r) => return Ok(Some(Outcome::Done(Acquired::Interrupted(r)))),
            }
        }
    }

    /// A waiter behind `p` in its chain follows `p` and the one before; the
    /// deputy (second in the chain) also keeps an eye on `p`: the head, if a
    /// free slot waits for it, as at the deputy's last look.
    fn behind(
        &self,
        dir: &IdDir,
        req: &Request,
        older: &mut Older,
        p: TicketName,
        pfd: std::fs::File,
        w: &mut Watching,
    ) -> Result<Option<TicketName>> {
        let grand = older.nearest(dir, req.jobs, p.arrived);
        let is_deputy = grand.is_none();
        let mut follow = vec![(p.name.clone(), pfd)];
        follow.extend(grand.map(|(g, fd)| (g.name, fd)));
        w.followed.set(follow)?;
        if !is_deputy {
            w.deputy = Deputy::No;
            w.head_ready = None;
            return Ok(None);
        }
        w.deputy = match w.deputy {
            // Just became the deputy: the first look can wait.
            Deputy::No => {
                w.watch_slots(dir);
                Deputy::LookAt(Instant::now() + DEPUTY_DELAY)
            }
            Deputy::LookAt(t) if Instant::now() >= t => {
                w.head_ready = self.head_if_ready(dir, older, p)?;
                Deputy::Looked(Instant::now())
            }
            other => other,
        };
        Ok(w.head_ready.clone())
    }

    /// A chain head's attempt, and what it then waits for.
    fn head_turn(
        &self,
        dir: &IdDir,
        req: &Request,
        ticket: &Ticket,
        older: &mut Older,
        w: &mut Watching,
        signals: &mut Signals,
    ) -> Result<Turn> {
        w.followed.set(Vec::new())?;
        w.watch_slots(dir);
        let attempt = self.attempt(dir, req, Who::Waiting(ticket, older), signals);
        Ok(match unless_vanished(dir, attempt)? {
            None => Turn::Ended(Outcome::Vanished),
            Some(Decision::Took(slot)) => Turn::Took(slot),
            Some(Decision::Ended(how)) => Turn::Ended(Outcome::Done(how)),
            Some(Decision::Wait {
                held,
                blocker: Some(b),
                ..
            }) => {
                w.watch_ticket(dir, &b.name);
                // It may have left before the watch was set: look again at once.
                if dir.open_live_ticket(&b.name).is_none() {
                    return Ok(Turn::Again);
                }
                w.relook.restart();
                Turn::Wait((b.jobs > held).then_some(b))
            }
            Some(Decision::Wait {
                held,
                blocker: None,
                ..
            }) => {
                if held < req.jobs {
                    // Admitted, but a prober held the free slot: look again soon.
                    w.relook.restart();
                }
                Turn::Wait(None)
            }
            Some(Decision::Crowded) => Turn::Wait(None),
        })
    }

    /// A deputy's look at its chain's head `p`: `p` if a free slot waits
    /// for it now (a moment's snapshot, without the mutex).
    fn head_if_ready(
        &self,
        dir: &IdDir,
        older: &mut Older,
        p: TicketName,
    ) -> Result<Option<TicketName>> {
        let held = dir.scan(&self.dir)?.held;
        let now = sys::monotonic_nanos();
        let ready = p.jobs > held && older.blocker(dir, p.arrived, held, now).blocker.is_none();
        Ok(ready.then_some(p))
    }

    /// Passes `t`, first in line for a free slot it has not taken, if under
    /// the mutex that is still so; whether it did. If the mutex is busy, a
    /// later look tries again.
    fn pass_if_still(&self, dir: &IdDir, req: &Request, t: &TicketName) -> Result<bool> {
        let Some(_mutex) = dir.try_mutex(&self.dir, false)? else {
            return Ok(false);
        };
        let held = dir.scan(&self.dir)?.held;
        let mut older = dir.older_than(t.arrived)?;
        let now = sys::monotonic_nanos();
        if t.jobs > held
            && dir.open_live_ticket(&t.name).is_some()
            && older.blocker(dir, t.arrived, held, now).blocker.is_none()
        {
            self.say(
                req,
                &format!("passing waiter {}, which left a free slot untaken", t.pid),
            );
            dir.pass(t);
            return Ok(true);
        }
        Ok(false)
    }
}

/// `Ok(None)` for an error explained by the directories having vanished.
fn unless_vanished<T>(dir: &IdDir, r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(_) if dir.vanished() => Ok(None),
        Err(e) => Err(e),
    }
}
