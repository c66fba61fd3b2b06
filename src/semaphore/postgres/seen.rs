//! What a head saw at its last look, so that it leaves a slot to a holder
//! whose session an operator ended (see [`Seen`]).

use super::RECLAIM_GRACE;
use super::session::Session;
use super::turns::Turns;
use std::time::Instant;

/// The database's count of sessions ended by an operator, in SQL, for
/// [`Seen::saw`]: `NULL` on a server before PostgreSQL 14, which keeps none.
pub fn killed_sql(s: &Session) -> String {
    match s.major {
        14.. => format!("pg_stat_get_db_sessions_killed({})", s.db()),
        _ => "NULL::int8".into(),
    }
}

/// What a head saw at its last full look: the other heads, whose turns it
/// keeps ([`Turns`]), and what it needs so that it leaves a slot to a
/// holder whose session an operator ended (`pg_terminate_backend`): the
/// server frees that slot at once, as it frees a crashed holder's, while
/// the holder, alive, connects again to take it back (`recover`). On the
/// server the two differ only in the database's count of sessions ended by
/// an operator (`sessions_killed`, PostgreSQL 14 and later). A head that
/// sees that count change leaves the slots that were held at its last look
/// and are free now alone for [`RECLAIM_GRACE`], or until it sees them held
/// again; a crashed holder's slot (`kill -9` changes no such count) is
/// taken at the next look, as before. A newcomer's first look has no
/// earlier look to compare with: it can still come in during the few
/// milliseconds a terminated holder takes to connect again.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// The count of sessions ended by an operator at the last full look
    /// (`None`: no look yet, or a server before PostgreSQL 14).
    killed: Option<i64>,
    /// The slots held at the last full look.
    held: Vec<u32>,
    /// The slots left to their holders, each until when.
    left: Vec<(u32, Instant)>,
    /// The slots that releases gave back since the last look (their
    /// NOTIFYs name them): free, but not because a session was ended.
    released: Vec<u32>,
    /// The heads of the id, and this one's place among them.
    pub turns: Turns,
}

impl Seen {
    /// The condition that keeps the look from trying slot `g`, given the
    /// count now in SQL.
    pub(super) fn keep_off(&self, killed_now: &str) -> String {
        let now = Instant::now();
        let list = |slots: &mut dyn Iterator<Item = u32>| {
            slots.map(|s| s.to_string()).collect::<Vec<_>>().join(",")
        };
        let mut cond = String::new();
        let left = list(&mut self.left.iter().filter(|l| l.1 > now).map(|l| l.0));
        if !left.is_empty() {
            cond += &format!("OR g IN ({left}) ");
        }
        if let Some(before) = self.killed
            && !self.held.is_empty()
        {
            let held = list(&mut self.held.iter().copied());
            cond += &format!("OR (g IN ({held}) AND {killed_now} IS DISTINCT FROM {before}) ");
        }
        cond
    }

    /// Whether a slot is being left to its holder: `--wait-all` does not
    /// call the id idle meanwhile.
    pub(super) fn leaves_any(&self, now: Instant) -> bool {
        self.left.iter().any(|&(_, until)| until > now)
    }

    /// Notes the slots that releases gave back, as their NOTIFYs say.
    pub(super) fn released(&mut self, slots: impl Iterator<Item = u32>) {
        self.released.extend(slots);
    }

    /// Learns from an answer's two columns, as text: the slots held ("1,3",
    /// or `NULL` for none) and the count of sessions ended by an operator.
    pub(super) fn read(&mut self, held: Option<&str>, killed: Option<&str>) {
        let held = held.into_iter().flat_map(|l| l.split(','));
        let held = held.filter_map(|v| v.parse().ok()).collect();
        self.saw(held, killed.and_then(|v| v.parse().ok()), Instant::now());
    }

    /// Learns from a full look's answer, given at `now`: the slots held
    /// then and the count of sessions ended by an operator.
    fn saw(&mut self, held: Vec<u32>, killed: Option<i64>, now: Instant) {
        if let (Some(before), Some(after)) = (self.killed, killed)
            && before != after
        {
            let freed = self.held.iter().filter(|s| !held.contains(s));
            for &slot in freed.filter(|s| !self.released.contains(s)) {
                self.left.push((slot, now + RECLAIM_GRACE));
            }
        }
        self.released.clear();
        self.left
            .retain(|&(slot, until)| until > now && !held.contains(&slot));
        self.held = held;
        self.killed = killed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_answer_is_read_as_text() {
        let mut seen = Seen::default();
        seen.read(Some("1,3"), Some("7"));
        assert_eq!((seen.held.clone(), seen.killed), (vec![1, 3], Some(7)));
        seen.read(None, None);
        assert_eq!((seen.held, seen.killed), (vec![], None));
    }

    #[test]
    fn nothing_is_kept_off_before_a_look() {
        assert_eq!(Seen::default().keep_off("k()"), "");
    }

    #[test]
    fn the_next_look_keeps_off_the_held_slots_if_the_count_changes() {
        let mut seen = Seen::default();
        seen.saw(vec![1, 3], Some(7), Instant::now());
        assert_eq!(
            seen.keep_off("k()"),
            "OR (g IN (1,3) AND k() IS DISTINCT FROM 7) "
        );
    }

    #[test]
    fn a_slot_freed_by_an_operators_kill_is_left_alone_for_a_while() {
        let t = Instant::now();
        let mut seen = Seen::default();
        seen.saw(vec![1, 2], Some(7), t);
        // Slot 1's session was ended by an operator: 1 is left to its holder.
        seen.saw(vec![2], Some(8), t);
        assert_eq!(
            seen.keep_off("k()"),
            "OR g IN (1) OR (g IN (2) AND k() IS DISTINCT FROM 8) "
        );
        // Until it is seen held again...
        let mut back = seen.clone();
        back.saw(vec![1, 2], Some(8), t);
        assert_eq!(back.left, vec![]);
        // ... or RECLAIM_GRACE has passed.
        seen.saw(
            vec![2],
            Some(8),
            t + RECLAIM_GRACE + Duration::from_millis(1),
        );
        assert_eq!(seen.left, vec![]);
    }

    #[test]
    fn a_slot_a_release_gave_back_is_not_left_alone() {
        let t = Instant::now();
        let mut seen = Seen::default();
        seen.saw(vec![1, 2], Some(7), t);
        // Slot 2 was released (its NOTIFY named it) while another session
        // of the database was ended: only slot 1 could be the ended one's.
        seen.released([2].into_iter());
        seen.saw(vec![], Some(8), t);
        assert_eq!(seen.left, vec![(1, t + RECLAIM_GRACE)]);
    }

    #[test]
    fn a_crashed_holders_slot_is_not_left_alone() {
        let t = Instant::now();
        let mut seen = Seen::default();
        seen.saw(vec![1, 2], Some(7), t);
        seen.saw(vec![2], Some(7), t);
        assert_eq!(seen.left, vec![]);
        // A server that does not count kills (before PostgreSQL 14).
        let mut old = Seen::default();
        old.saw(vec![1], None, t);
        old.saw(vec![], None, t);
        assert_eq!(old.left, vec![]);
        assert_eq!(old.keep_off("NULL::int8"), "");
    }
}
