use super::*;
use clap::Parser;

fn config(args: &[&str]) -> Result<Config> {
    let mut argv = vec!["qsem", "--dir", "/tmp/qsem-test"];
    argv.extend_from_slice(args);
    Config::from_cli(Cli::try_parse_from(argv).unwrap())
}

fn usage_message(args: &[&str]) -> String {
    let mut argv = vec!["qsem", "--dir", "/tmp/qsem-test"];
    argv.extend_from_slice(args);
    let err =
        parse(argv.into_iter().map(OsString::from).collect()).expect_err("should be rejected");
    assert_eq!(err.exit, Exit::USAGE, "{}", err.message);
    assert!(err.message.starts_with("qsem: "), "{}", err.message);
    assert!(err.message.contains("Usage: qsem"), "{}", err.message);
    err.message
}

#[test]
fn defaults() {
    let c = config(&["true"]).unwrap();
    assert_eq!(c.jobs, 1);
    assert_eq!(c.wait, Wait::Forever);
    assert_eq!(c.on_timeout, OnTimeout::Exit(0));
    assert_eq!(c.id.as_bytes(), b"default");
}

#[test]
fn bad_values_name_themselves() {
    for (args, needle) in [
        (&["-j", "0", "true"][..], "'0'"),
        (&["-j", "2000000", "true"], "'2000000'"),
        (&["-j", "abc", "true"], "'abc'"),
        (&["--wait", "1x", "true"], "'1x'"),
        (&["--wait", "-3", "true"], "'-3'"),
        (&["--wait", "99999999999999999999999h", "true"], "too large"),
        (&["--id", "", "true"], "empty"),
        (&["-E", "300", "true"], "'300'"),
        (&["-E", "-1", "true"], "'-1'"),
        (&["--st", "x", "true"], "'x'"),
        (&["--json", "true"], "--status"),
        (&["--timeout", "0", "true"], "more than 0"),
        (&["--timeout", "soon", "true"], "'soon'"),
        (&["--timeout", "1s", "--kill-after", "-1", "true"], "'-1'"),
        (&["--max-waiting", "-1", "true"], "'-1'"),
        (&["--max-waiting", "many", "true"], "'many'"),
        (&[][..], "no command"),
    ] {
        let msg = usage_message(args);
        assert!(msg.contains(needle), "{args:?}: {msg}");
    }
}

#[test]
fn semaphore_timeout_both_ways() {
    let c = config(&["--st", "-5", "true"]).unwrap();
    assert_eq!(c.wait, Wait::For(Duration::from_secs(5)));
    assert_eq!(c.on_timeout, OnTimeout::Exit(0));
    let c = config(&["--st", "5", "true"]).unwrap();
    assert_eq!(c.on_timeout, OnTimeout::RunAnyway);
}

#[test]
fn shell_command() {
    let c = config(&["-c", "echo hi | wc"]).unwrap();
    let Mode::Run(cmd) = c.mode else { panic!() };
    assert_eq!(cmd.program, "/bin/sh");
    assert_eq!(cmd.display(), "/bin/sh -c 'echo hi | wc'");
}

#[test]
fn pipeline_modes() {
    let c = config(&["--bg", "gzip", "a b"]).unwrap();
    let Mode::Background(cmd) = c.mode else {
        panic!()
    };
    assert_eq!(cmd.display(), "gzip 'a b'");
    assert!(matches!(
        config(&["--wait-all"]).unwrap().mode,
        Mode::WaitAll
    ));
    let c = config(&["--each", "-0", "gzip", "-9"]).unwrap();
    let Mode::Each { command, separator } = c.mode else {
        panic!()
    };
    assert_eq!((command.display().as_str(), separator), ("gzip -9", b'\0'));
    let c = config(&["--each", "-c", "echo \"$1\""]).unwrap();
    let Mode::Each { command, .. } = c.mode else {
        panic!()
    };
    assert_eq!(command.args.last().unwrap(), "sh");
    assert!(usage_message(&["--each"]).contains("no command"));
}

fn sem_config(args: &[&str]) -> Result<Config> {
    let mut argv = vec!["sem", "--dir", "/tmp/qsem-test"];
    argv.extend_from_slice(args);
    Config::from_sem_cli(SemCli::try_parse_from(argv).unwrap())
}

#[test]
fn sem_personality() {
    let c = sem_config(&["--id", "x", "-j2", "echo", "a  b", "$HOME"]).unwrap();
    let Mode::Background(cmd) = c.mode else {
        panic!()
    };
    assert_eq!(cmd.program, "/bin/sh");
    assert_eq!(cmd.args, ["-c", "echo a  b $HOME"]);
    assert!(c.bg_stdin);
    assert_eq!(c.jobs, 2);
    assert!(matches!(
        sem_config(&["--fg", "true"]).unwrap().mode,
        Mode::Run(_)
    ));
    assert!(matches!(
        sem_config(&["--wait"]).unwrap().mode,
        Mode::WaitAll
    ));
    assert_eq!(
        sem_config(&["-j", "0", "true"]).unwrap().jobs,
        jobs::MAX_JOBS
    );
    let c = sem_config(&["--st", "-2", "true"]).unwrap();
    assert_eq!(c.wait, Wait::For(Duration::from_secs(2)));
    assert_eq!(c.on_timeout, OnTimeout::Exit(1), "as GNU sem");
    assert!(c.st_warning);
    let c = sem_config(&["--st", "2", "true"]).unwrap();
    assert_eq!(c.on_timeout, OnTimeout::RunAnyway);
    for (args, needle) in [
        (&["--wait", "true"][..], "no command"),
        (&[][..], "no command"),
        (&["-j", "x", "true"], "'x'"),
    ] {
        let err = sem_config(args).expect_err("should be rejected");
        assert!(err.to_string().contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn backends() {
    assert_eq!(config(&["true"]).unwrap().backend, Backend::Files);
    let c = config(&["--backend", "postgresql://h/db", "--on-lost=kill", "true"]).unwrap();
    assert_eq!(
        c.backend,
        Backend::Postgres {
            url: "postgresql://h/db".into(),
            lost_after: DEFAULT_LOST_AFTER
        }
    );
    assert_eq!(c.on_lost, OnLost::Kill);
    for (args, needle) in [
        (&["--backend", "redis://h", "true"][..], "'redis://h'"),
        (&["--backend", "mysql://u:secret@h", "true"], "'h'"),
        (&["--on-lost", "ignore", "true"], "'ignore'"),
        (&["--lost-after", "1s", "true"], "'1s'"),
        (&["--lost-after", "soon", "true"], "'soon'"),
    ] {
        let msg = usage_message(args);
        assert!(msg.contains(needle), "{args:?}: {msg}");
        assert!(!msg.contains("secret"), "{msg}");
    }
}
