//! The runner's decisions, against the fake engine: real (tiny) commands,
//! no lock files, no server.

use super::*;
use crate::semaphore::fake::{Fake, Next};
use std::ffi::OsString;

fn config(extra: &[&str]) -> Config {
    let mut argv = vec!["qsem", "--dir", "/nonexistent/qsem-unit", "--id", "unit"];
    argv.extend_from_slice(extra);
    argv.extend_from_slice(&["--", "true"]);
    config::parse(argv.into_iter().map(OsString::from).collect()).expect("valid")
}

fn sh(script: &str) -> Command {
    Command::shell(script.into(), &[])
}

fn outcome(cfg: &Config, cmd: &Command, fake: &mut Fake) -> Outcome {
    execute(cfg, cmd, fake, None).expect("runs")
}

use crate::config;

#[test]
fn the_command_s_status_and_report_line() {
    let mut fake = Fake::default();
    let o = outcome(&config(&[]), &sh("exit 3"), &mut fake);
    assert_eq!(o.exit, Exit::code(3));
    let line = o.line.expect("a failure has a line");
    assert!(
        line.starts_with("/bin/sh -c 'exit 3' exited with status 3 after "),
        "{line}"
    );
    let o = outcome(&config(&[]), &sh("kill -USR1 $$"), &mut fake);
    assert_eq!(o.exit, Exit::signal(libc::SIGUSR1));
    assert!(o.line.unwrap().contains("was killed by SIGUSR1"));
    let o = outcome(&config(&[]), &sh("exit 0"), &mut fake);
    assert_eq!((o.exit, o.line), (Exit::OK, None));
    let log = fake.log.borrow();
    assert_eq!(log.started.len(), 3);
    assert_eq!(
        log.dropped, 3,
        "a foreground slot is released by dropping it"
    );
}

#[test]
fn an_expired_wait_or_a_full_backlog_starts_nothing_silently() {
    let cfg = config(&["-E", "75", "--wait", "1s", "--max-waiting", "2"]);
    let mut fake = Fake::answering([Next::TimedOut, Next::Crowded]);
    for _ in 0..2 {
        let o = outcome(&cfg, &sh("exit 0"), &mut fake);
        assert_eq!((o.exit, o.line), (Exit::code(75), None));
    }
    let log = fake.log.borrow();
    assert!(log.started.is_empty());
    assert_eq!(log.requests, [(1, Some(2), false, true); 2]);
}

#[test]
fn a_signal_while_waiting_ends_qsem_with_it() {
    let r = Received {
        signo: libc::SIGTERM,
        from_kernel: false,
    };
    let mut fake = Fake::answering([Next::Interrupted(r)]);
    let o = outcome(&config(&[]), &sh("exit 0"), &mut fake);
    assert_eq!(o.exit, Exit::signal(libc::SIGTERM));
    assert!(fake.log.borrow().started.is_empty());
}

#[test]
fn a_timeout_stops_the_job_and_says_what_was_sent() {
    let mut fake = Fake::default();
    let started = Instant::now();
    let o = outcome(&config(&["--timeout", "100ms"]), &sh("sleep 30"), &mut fake);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(o.exit, Exit::TIMED_OUT);
    let line = o.line.unwrap();
    assert!(line.ends_with("timed out after 100ms (SIGTERM)"), "{line}");
    // A job that ignores SIGTERM is killed --kill-after later.
    let cfg = config(&["--timeout", "100ms", "--kill-after", "200ms"]);
    let o = outcome(&cfg, &sh("trap '' TERM; sleep 30"), &mut fake);
    assert_eq!(o.exit, Exit::TIMED_OUT);
    let line = o.line.unwrap();
    assert!(
        line.ends_with("timed out after 100ms (SIGTERM; killed 200ms later)"),
        "{line}"
    );
    // One that ends first keeps its own status.
    let o = outcome(&config(&["--timeout", "10s"]), &sh("exit 4"), &mut fake);
    assert_eq!(o.exit, Exit::code(4));
}

#[test]
fn a_lost_slot_warns_or_stops_the_job() {
    let lost = || Next::Slot(vec![SlotEvent::lost("the server is gone".into())]);
    let mut fake = Fake::answering([lost(), lost()]);
    let o = outcome(&config(&[]), &sh("sleep 0.2; exit 0"), &mut fake);
    assert_eq!(o.exit, Exit::OK, "--on-lost=warn lets the job run on");
    let started = Instant::now();
    let o = outcome(&config(&["--on-lost", "kill"]), &sh("sleep 30"), &mut fake);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(o.exit, Exit::SLOT_LOST);
    assert!(o.said, "the loss is said when it happens, not again");
}

#[test]
fn a_lost_slot_s_job_is_killed_within_the_engine_s_grace() {
    // A job that ignores SIGTERM must still be gone once the engine's grace
    // has passed: the engine may give the slot away soon after.
    let lost = SlotEvent::Lost {
        why: "cut off".into(),
        grace: Duration::from_millis(300),
    };
    let mut fake = Fake::answering([Next::Slot(vec![lost])]);
    let started = Instant::now();
    let cfg = config(&["--on-lost", "kill"]);
    let o = outcome(&cfg, &sh("trap '' TERM; sleep 30"), &mut fake);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "SIGKILL came after {:?}, not after the engine's 300ms",
        started.elapsed()
    );
    assert_eq!(o.exit, Exit::SLOT_LOST);
}

#[test]
fn a_background_job_records_its_failure_before_release() {
    let mut fake = Fake::default();
    let mut go = |_: &mut Signals| Ok(None);
    let cfg = config(&[]);
    let o = execute(&cfg, &sh("exit 4"), &mut fake, Some(&mut go)).unwrap();
    assert_eq!(o.exit, Exit::code(4));
    let cfg = config(&["--timeout", "100ms"]);
    let o = execute(&cfg, &sh("sleep 30"), &mut fake, Some(&mut go)).unwrap();
    assert_eq!(o.exit, Exit::TIMED_OUT);
    execute(&cfg, &sh("exit 0"), &mut fake, Some(&mut go)).unwrap();
    let log = fake.log.borrow();
    assert_eq!(log.requests.iter().filter(|r| r.2).count(), 3);
    assert_eq!(log.finished.len(), 3);
    assert!(
        log.finished[0]
            .as_deref()
            .unwrap()
            .contains("exited with status 4")
    );
    assert!(
        log.finished[1]
            .as_deref()
            .unwrap()
            .contains("timed out after 100ms")
    );
    assert_eq!(log.finished[2], None);
    assert_eq!(log.dropped, 0);
}

#[test]
fn a_launcher_that_gives_up_starts_nothing() {
    let mut fake = Fake::default();
    let mut give_up = |_: &mut Signals| Ok(Some(Exit::signal(libc::SIGTERM)));
    let o = execute(&config(&[]), &sh("exit 0"), &mut fake, Some(&mut give_up)).unwrap();
    assert_eq!(o.exit, Exit::signal(libc::SIGTERM));
    let log = fake.log.borrow();
    assert!(log.started.is_empty());
    assert_eq!(log.finished, [None]);
}

#[test]
fn the_job_knows_its_slot_and_fence() {
    let mut fake = Fake::default();
    let script = "[ \"$QSEM_ID $QSEM_SLOT $QSEM_JOBS $QSEM_FENCE\" = 'unit 1 3 7' ]";
    let o = outcome(&config(&["-j3"]), &sh(script), &mut fake);
    assert_eq!(o.exit, Exit::OK, "{:?}", o.line);
}

#[test]
fn a_missing_command_is_126_or_127_before_any_wait() {
    let mut fake = Fake::default();
    let cmd = Command {
        program: "no-such-command-qsem".into(),
        args: Vec::new(),
    };
    let err = execute(&config(&[]), &cmd, &mut fake, None).unwrap_err();
    let failure = Failure::from(err);
    assert_eq!(failure.exit, Exit::NOT_FOUND);
    assert!(fake.log.borrow().requests.is_empty());
}
