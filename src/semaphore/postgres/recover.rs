//! A holder's way back after its session ended (a restart,
//! `pg_terminate_backend`, a cut): taking its own slot back within
//! [`TAKE_BACK`], reporting it lost when it cannot, and then taking one
//! again by the ordinary rule. The holder's task (`holder.rs`) calls these
//! from its loop; each returns the holder's next [`State`].

use super::TAKE_BACK;
use super::admission::{Asker, Attempt, Beat, attempt, heartbeat};
use super::holder::{Holding, State};
use super::session::Session;
use crate::semaphore::{LOST_GRACE, SlotEvent};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

/// How often a holder whose session ended tries to connect again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

impl Holding {
    /// The state after the session ended with the slot last confirmed by a
    /// heartbeat sent at `confirmed`.
    pub(super) fn reclaiming(&self, why: String, confirmed: Instant) -> State {
        let fenced = confirmed + self.bound() / 2;
        let grace = Instant::now() + TAKE_BACK;
        State::Reclaiming {
            why,
            until: fenced.min(grace),
        }
    }

    /// Reports the slot lost. It is reported no later than `F/2` after the
    /// last confirmed heartbeat was sent, so the server keeps the slot for at
    /// least `F/2` more: the job's SIGKILL must come half a second before
    /// that (and no later than the runner's usual grace).
    pub(super) fn lose(&self, slot: u32, why: String) -> State {
        let grace = (self.bound() / 2)
            .saturating_sub(Duration::from_millis(500))
            .min(LOST_GRACE);
        self.tell(SlotEvent::Lost {
            why: format!("lost slot {slot} on PostgreSQL at {}: {why}", self.c.target),
            grace,
        });
        State::Lost(None)
    }

    /// One try at taking our own slot back in a new session.
    pub(super) async fn reclaim(&self, slot: u32, why: String, until: Instant) -> State {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return self.lose(
                slot,
                format!("{why}, and it could not be taken back in time"),
            );
        }
        let back = async {
            let mut s = self.c.connect().await?;
            let got = attempt(
                &mut s,
                &self.keys,
                &self.rec,
                Asker::Reclaim(slot),
                false,
                None,
            )
            .await?;
            anyhow::Ok((s, got))
        };
        match tokio::time::timeout(left, back).await {
            Ok(Ok((s, Attempt::Took(..)))) => {
                match heartbeat(&s, &self.keys, slot, &self.rec).await {
                    Ok(Beat::Held) => {
                        self.tell(SlotEvent::Regained(format!("{why}; took slot {slot} back")));
                        State::Held(Box::new(s), Instant::now())
                    }
                    _ => State::Reclaiming { why, until },
                }
            }
            Ok(Ok((_, _))) => self.lose(slot, format!("{why}, and another holder has it now")),
            Ok(Err(_)) => {
                tokio::time::sleep(RECONNECT_PAUSE.min(left)).await;
                State::Reclaiming { why, until }
            }
            Err(_) => State::Reclaiming { why, until },
        }
    }

    /// The state after one try to take a slot again by the ordinary rule
    /// (see [`Holding::retake`]); `slot` becomes the one taken.
    pub(super) async fn again(&self, kept: Option<Box<Session>>, slot: &mut u32) -> State {
        match self.retake(kept).await {
            Ok((s, k)) => {
                let note = if k == *slot {
                    String::new()
                } else {
                    format!(" (the command's QSEM_SLOT still says {slot})")
                };
                self.tell(SlotEvent::Regained(format!("took slot {k} again{note}")));
                *slot = k;
                State::Held(Box::new(s), Instant::now())
            }
            Err(kept) => State::Lost(kept),
        }
    }

    /// One try to take a slot by the ordinary rule, in the session kept from
    /// the last try or a new one. Refused, the session is kept, named as a
    /// holder without a slot, so that `--status` shows the job running.
    pub(super) async fn retake(
        &self,
        kept: Option<Box<Session>>,
    ) -> Result<(Session, u32), Option<Box<Session>>> {
        let mut s = match kept {
            Some(s) => *s,
            None => match tokio::time::timeout(self.c.lost_after, self.c.connect()).await {
                Ok(Ok(s)) => s,
                _ => return Err(None),
            },
        };
        let once = async {
            match attempt(&mut s, &self.keys, &self.rec, Asker::Lost, false, None).await? {
                Attempt::Took(k, _) => match heartbeat(&s, &self.keys, k, &self.rec).await? {
                    Beat::Held => Ok(Some(k)),
                    _ => bail!("slot {k} taken but not kept"),
                },
                Attempt::Wait { .. } | Attempt::Shared => anyhow::Ok(None),
            }
        };
        match tokio::time::timeout(self.c.lost_after, once).await {
            Ok(Ok(Some(k))) => Ok((s, k)),
            Ok(Ok(None)) => Err(Some(Box::new(s))),
            _ => Err(None),
        }
    }
}
