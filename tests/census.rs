//! The census (`<id>/queue/census`, a byte per slot that spares a newcomer
//! the probes of slots it knows are held) is only ever a shortcut: a stale,
//! garbled or missing census must neither let a newcomer in beside the
//! holders nor keep it out of a free slot.

mod common;
use common::{Env, SOON, flock, holder, release, run, wait_for_file};
use std::path::PathBuf;

fn census(env: &Env, id: &str) -> PathBuf {
    env.locks.join(id).join("queue/census")
}

/// `qsem --wait 0 -E 75 -- true` at `-j jobs`: 0 if admitted, 75 if not.
fn try_once(env: &Env, id: &str, jobs: &str) -> i32 {
    run(env.qsem().args([
        "--id", id, "-j", jobs, "--wait", "0", "-E", "75", "--", "true",
    ]))
    .0
}

#[test]
fn a_holder_marks_its_slot_while_it_runs_and_clears_it_after() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "c", "-j3"], &ready);
    assert!(wait_for_file(&ready, SOON));
    assert_eq!(std::fs::read(census(&env, "c")).unwrap(), [1]);
    release(h);
    assert_eq!(std::fs::read(census(&env, "c")).unwrap(), [0]);
}

/// Marks left by holders killed with their jobs (here, written by hand):
/// a newcomer that would be refused on their word looks at the slot files,
/// finds them free, is admitted and clears the marks.
#[test]
fn stale_marks_never_keep_a_newcomer_out() {
    let env = Env::new();
    // Two slot files, both free.
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "s", "-j2"], &ready);
    assert!(wait_for_file(&ready, SOON));
    assert_eq!(try_once(&env, "s", "2"), 0);
    release(h);
    std::fs::write(census(&env, "s"), [1, 1, 1]).unwrap();
    assert_eq!(try_once(&env, "s", "2"), 0, "refused on stale marks");
    assert_eq!(std::fs::read(census(&env, "s")).unwrap(), [0, 0, 1]);
}

/// A slot held by someone who keeps no census (an older qsem; here, a
/// flock(1)-style lock by hand) and a census garbled to zeros: the newcomer
/// probes every unmarked slot and counts them all.
#[test]
fn unmarked_holders_are_counted_all_the_same() {
    let env = Env::new();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "u", "-j2"], &ready);
    assert!(wait_for_file(&ready, SOON));
    // Slot 2, taken and let go, then held by hand without a mark.
    assert_eq!(try_once(&env, "u", "2"), 0);
    let by_hand = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.locks.join("u/2"))
        .unwrap();
    assert!(flock(&by_hand, libc::LOCK_EX | libc::LOCK_NB));
    assert_eq!(
        try_once(&env, "u", "2"),
        75,
        "admitted beside an unmarked holder"
    );
    std::fs::write(census(&env, "u"), [0, 0]).unwrap();
    assert_eq!(try_once(&env, "u", "2"), 75, "admitted on a zeroed census");
    assert_eq!(try_once(&env, "u", "3"), 0);
    drop(by_hand);
    release(h);
}

/// A census that is not a regular file of ours is not used, and costs
/// nothing but the probes.
#[test]
fn a_census_that_is_not_a_file_is_ignored() {
    let env = Env::new();
    assert_eq!(try_once(&env, "d", "1"), 0);
    let path = census(&env, "d");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
    let ready = env.path("ready");
    let h = holder(&env, &["--id", "d", "-j1"], &ready);
    assert!(wait_for_file(&ready, SOON));
    assert_eq!(try_once(&env, "d", "1"), 75);
    release(h);
    assert_eq!(try_once(&env, "d", "1"), 0);
    assert!(path.is_symlink(), "the symlink was replaced or followed");
}
