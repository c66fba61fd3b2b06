//! The heads of one id on many hosts take turns, so that what the server
//! spends on them does not grow with the fleet (bench/RESULTS.md: 100
//! heads each looking every 100 ms cost it 1.2 cores, and every release
//! woke all of them to look at once).
//!
//! - **The poll** that finds a crashed holder's slot (a crash sends no
//!   NOTIFY) is shared: a head looks again unasked every [`POLL`] times
//!   the number of heads (at most [`MAX_POLL`], each period drawn a
//!   quarter either way), so the fleet looks about every `POLL` up to 100
//!   heads, and 10 times a second per 100 heads beyond. A head counts the
//!   heads in its first look and then in a look it makes unasked, at most
//!   every [`COUNT_EVERY`] and every fourth period, never in one a NOTIFY
//!   calls for (reading the server's table of sessions costs in proportion
//!   to its connections, and would slow a handoff); in between, each
//!   release it hears counts as one head fewer (a release admits one).
//! - **A release's NOTIFY** is answered by the oldest head of each limit
//!   N (the order of their sessions' start: their arrival on the server):
//!   a head looks once it has heard more NOTIFYs since its last look than
//!   there are older heads of its N, so a second release wakes the
//!   second, and so on. A head that gives up at its deadline sends a
//!   NOTIFY too, so that the heads behind it move up. A head whose turn it
//!   was and that could not take the slot (stopped, killed, or hostile)
//!   holds nobody up for longer than the shared poll.
//!
//! Heads are counted by their sessions' `application_name` (`qsem w <key>
//! <jobs> …`), which any role could imitate: that paces the looks but never
//! admits anyone (see `admission`), so an imitation can slow a handoff to
//! the poll's pace, no more. Sessions of other roles whose start the
//! server does not show (without `pg_read_all_stats`) count as heads but
//! never as older ones.

use super::keys::Keys;
use super::session::lit;
use std::time::{Duration, Instant, SystemTime};

/// How often the fleet's heads of an id look again unasked, together.
pub const POLL: Duration = Duration::from_millis(100);
/// How often a head counts the heads, at most.
const COUNT_EVERY: Duration = Duration::from_secs(1);
/// The longest a head waits between its own looks: so long that a fleet
/// of heads costs the server little, so short that sessions posing as
/// heads cannot delay the finding of a crashed holder's slot by more.
const MAX_POLL: Duration = Duration::from_secs(10);

/// The heads of the id, and this head's place among them, as of its last
/// look, and the NOTIFYs heard since.
#[derive(Debug, Clone)]
pub struct Turns {
    /// Heads of the id on every host, this one included.
    heads: u32,
    /// Heads of the same N whose sessions started before this one's.
    older: u32,
    heard: u32,
    /// NOTIFYs heard since the heads were last counted.
    released: u32,
    /// Whether the next look counts the heads.
    count: bool,
    /// When a look last counted them.
    counted: Option<Instant>,
    /// The state of the period's jitter.
    seed: u64,
}

impl Default for Turns {
    fn default() -> Turns {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Turns {
            heads: 1,
            older: 0,
            heard: 0,
            released: 0,
            count: true,
            counted: None,
            seed: u64::from(std::process::id()) << 32 | u64::from(nanos) | 1,
        }
    }
}

impl Turns {
    /// The SQL of the look's column that [`Turns::looked`] reads: the
    /// heads of the id and the older heads of this N ("heads older"), this
    /// session's server process excluded (it may not be named a head yet);
    /// `NULL` when this look is not to count them.
    pub fn sql(&self, keys: &Keys, jobs: u32, db: &str) -> String {
        if !self.count {
            return "NULL".into();
        }
        let heads = lit(&format!("qsem w {} %", keys.hex()));
        let mine = lit(&format!("qsem w {} {jobs} %", keys.hex()));
        format!(
            "(SELECT (count(*) + 1) || ' ' || count(*) FILTER (WHERE \
             a.application_name LIKE {mine} AND a.backend_start < me.backend_start) \
             FROM pg_stat_get_activity(NULL) a, pg_stat_get_activity(pg_backend_pid()) me \
             WHERE a.datid = {db} AND a.application_name LIKE {heads} \
             AND a.pid <> me.pid)"
        )
    }

    /// Learns from a look's answer: the heads and this head's place, if
    /// it counted them ("heads older"). The NOTIFYs heard are counted
    /// again from this look.
    pub fn looked(&mut self, counted: Option<&str>) {
        let mut n = counted.into_iter().flat_map(str::split_whitespace);
        if let (Some(Ok(heads)), Some(Ok(older))) = (
            n.next().map(str::parse::<u32>),
            n.next().map(str::parse::<u32>),
        ) {
            self.heads = heads.max(1);
            self.older = older;
            self.released = 0;
            self.counted = Some(Instant::now());
        }
        self.heard = 0;
        self.count = false;
    }

    /// Whether `n` more NOTIFYs make it this head's turn to look.
    pub fn heard(&mut self, n: u32) -> bool {
        self.heard = self.heard.saturating_add(n);
        self.released = self.released.saturating_add(n);
        self.heard > self.older
    }

    /// The head looks again unasked: that look counts the heads if the
    /// last count is [`COUNT_EVERY`] and four periods old.
    pub fn polled(&mut self) {
        let every = COUNT_EVERY.max(self.period() * 4);
        self.count = self.counted.is_none_or(|t| t.elapsed() >= every * 7 / 8);
    }

    /// The poll's period before its jitter: for the heads last counted,
    /// less those that releases since have admitted.
    fn period(&self) -> Duration {
        (POLL * self.heads.saturating_sub(self.released).max(1)).min(MAX_POLL)
    }

    /// How long to wait before looking again unasked.
    pub fn poll(&mut self) -> Duration {
        let base = self.period();
        // xorshift64: a quarter either way, so that heads that looked
        // together drift apart.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let quarter = base.as_micros() as u64 / 4;
        let micros = base.as_micros() as u64 - quarter + self.seed % (2 * quarter + 1);
        Duration::from_micros(micros).max(POLL * 3 / 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_head_polls_every_poll_and_answers_every_notify() {
        let mut t = Turns::default();
        t.looked(Some("1 0"));
        for _ in 0..100 {
            let p = t.poll();
            assert!(p >= POLL * 3 / 4 && p <= POLL * 5 / 4, "{p:?}");
        }
        assert!(t.heard(1));
    }

    #[test]
    fn many_heads_share_the_poll() {
        let mut t = Turns::default();
        t.looked(Some("10 3"));
        let mean = (0..1000).map(|_| t.poll()).sum::<Duration>() / 1000;
        assert!(mean > POLL * 9 && mean < POLL * 11, "{mean:?}");
        t.looked(Some("1000 3"));
        assert!((0..100).all(|_| t.poll() <= MAX_POLL * 5 / 4));
    }

    #[test]
    fn each_release_heard_is_one_head_fewer_until_the_next_count() {
        let mut t = Turns::default();
        t.looked(Some("10 0"));
        assert_eq!(t.period(), POLL * 10);
        t.heard(3);
        t.looked(None);
        assert_eq!(t.period(), POLL * 7);
        t.heard(20);
        assert_eq!(t.period(), POLL);
        t.looked(Some("4 0"));
        assert_eq!(t.period(), POLL * 4);
    }

    #[test]
    fn the_older_heads_answer_first() {
        let mut t = Turns::default();
        t.looked(Some("3 2"));
        assert!(!t.heard(1));
        assert!(!t.heard(1));
        assert!(t.heard(1));
        // A look starts the count again.
        t.looked(Some("2 1"));
        assert!(!t.heard(1));
        assert!(t.heard(2));
    }

    #[test]
    fn only_the_first_look_and_those_unasked_count_the_heads() {
        let keys = Keys::of(&crate::id::Id::new(std::ffi::OsStr::new("x")).unwrap());
        let mut t = Turns::default();
        assert!(t.sql(&keys, 2, "1").contains("pg_stat_get_activity"));
        t.looked(Some("4 1"));
        // A look a NOTIFY called for keeps what the last count found.
        assert_eq!(t.sql(&keys, 2, "1"), "NULL");
        t.looked(None);
        assert!(!t.heard(1));
        assert!(t.poll() > POLL * 2);
        t.polled();
        assert_eq!(t.sql(&keys, 2, "1"), "NULL", "counted a moment ago");
        t.counted = Some(Instant::now() - MAX_POLL * 4);
        t.polled();
        assert!(t.sql(&keys, 2, "1").contains("qsem w "));
    }

    #[test]
    fn an_answer_without_the_counts_is_a_lone_head() {
        let mut t = Turns::default();
        t.looked(None);
        assert!(t.heard(1));
        assert!(t.poll() <= POLL * 5 / 4);
        t.looked(Some("garbage"));
        assert!(t.heard(1));
    }
}
