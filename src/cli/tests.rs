use super::*;
use clap::CommandFactory;

#[test]
fn definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn options_stop_at_the_command() {
    let cli = Cli::try_parse_from(["qsem", "-j2", "grep", "-v", "x", "file"]).unwrap();
    assert_eq!(cli.jobs.as_deref(), Some("2"));
    assert_eq!(cli.command, ["grep", "-v", "x", "file"]);
    let cli = Cli::try_parse_from(["qsem", "--", "-weird", "--id"]).unwrap();
    assert_eq!(cli.command, ["-weird", "--id"]);
}

#[test]
fn value_forms() {
    for args in [
        &["qsem", "-j2", "true"][..],
        &["qsem", "-j", "2", "true"],
        &["qsem", "--jobs=2", "true"],
    ] {
        let cli = Cli::try_parse_from(args).unwrap();
        assert_eq!(cli.jobs.as_deref(), Some("2"), "{args:?}");
    }
    let cli = Cli::try_parse_from(["qsem", "-j", "-1", "--wait", "-3", "true"]).unwrap();
    assert_eq!(cli.jobs.as_deref(), Some("-1"));
    assert_eq!(cli.wait.as_deref(), Some("-3"));
    let cli = Cli::try_parse_from(["qsem", "--st", "-5", "true"]).unwrap();
    assert_eq!(cli.semaphore_timeout.as_deref(), Some("-5"));
}

#[test]
fn pipeline_options() {
    let cli = Cli::try_parse_from(["qsem", "--id", "gz", "-j4", "--bg", "gzip", "a"]).unwrap();
    assert!(cli.bg);
    let cli = Cli::try_parse_from(["qsem", "--id", "gz", "--wait-all", "--wait", "1s"]).unwrap();
    assert!(cli.wait_all);
    let cli = Cli::try_parse_from(["qsem", "-0", "--each", "--", "gzip", "-9"]).unwrap();
    assert!(cli.each && cli.null);
    assert_eq!(cli.command, ["gzip", "-9"]);
    for bad in [
        &["qsem", "--wait-all", "true"][..],
        &["qsem", "--bg", "--each", "true"],
        &["qsem", "-0", "true"],
        &["qsem", "--each", "-o", "true"],
    ] {
        assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn completions_offer_only_visible_options() {
    let cmd = completion_command();
    cmd.clone().debug_assert();
    let names: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
    for want in ["bg", "wait-all", "each", "null", "jobs", "status"] {
        assert!(names.contains(&want), "{want}: {names:?}");
    }
    for hidden in ["bg-supervisor", "completions"] {
        assert!(!names.contains(&hidden), "{hidden}");
    }
}

#[test]
fn sem_definition_is_consistent() {
    SemCli::command().debug_assert();
}

#[test]
fn sem_command_lines() {
    let cli = SemCli::try_parse_from(["sem", "--id", "x", "-j4", "sleep", "1"]).unwrap();
    assert_eq!(cli.jobs.as_deref(), Some("4"));
    assert_eq!(cli.command, ["sleep", "1"]);
    for (args, jobs) in [
        (&["sem", "-j", "2", "true"][..], "2"),
        (&["sem", "--jobs", "+1", "true"], "+1"),
        (&["sem", "--jobs=-1", "true"], "-1"),
        (&["sem", "-j", "-1", "true"], "-1"),
        (&["sem", "-j50%", "true"], "50%"),
        (&["sem", "-P", "3", "true"], "3"),
    ] {
        let cli = SemCli::try_parse_from(args).unwrap();
        assert_eq!(cli.jobs.as_deref(), Some(jobs), "{args:?}");
    }
    let cli = SemCli::try_parse_from(["sem", "--semaphorename", "a", "--wait"]).unwrap();
    assert!(cli.wait);
    assert_eq!(cli.id.as_deref(), Some(std::ffi::OsStr::new("a")));
    let cli = SemCli::try_parse_from(["sem", "--st", "-2", "--fg", "echo", "-n", "x"]).unwrap();
    assert_eq!(cli.semaphore_timeout.as_deref(), Some("-2"));
    assert_eq!(cli.command, ["echo", "-n", "x"]);
    let cli = SemCli::try_parse_from(["sem", "--semaphoretimeout", "3", "true"]).unwrap();
    assert_eq!(cli.semaphore_timeout.as_deref(), Some("3"));
}

#[test]
fn option_values_may_start_with_a_dash() {
    let cli = Cli::try_parse_from(["qsem", "--id", "-foo", "--", "true"]).unwrap();
    assert_eq!(cli.id.as_deref(), Some(std::ffi::OsStr::new("-foo")));
    let cli = Cli::try_parse_from(["qsem", "-c", "-x"]).unwrap();
    assert_eq!(
        cli.shell_command.as_deref(),
        Some(std::ffi::OsStr::new("-x"))
    );
    let cli = SemCli::try_parse_from(["sem", "--id", "-a", "--lb", "--will-cite", "x"]);
    assert_eq!(cli.unwrap().command, ["x"]);
}

#[test]
fn run_time_and_backlog_options() {
    let cli = Cli::try_parse_from([
        "qsem",
        "--timeout",
        "1h",
        "--kill-after",
        "5s",
        "--max-waiting",
        "0",
        "true",
    ])
    .unwrap();
    assert_eq!(cli.timeout.as_deref(), Some("1h"));
    assert_eq!(cli.kill_after.as_deref(), Some("5s"));
    assert_eq!(cli.max_waiting.as_deref(), Some("0"));
    assert!(Cli::try_parse_from(["qsem", "--kill-after", "5s", "true"]).is_err());
}

#[test]
fn unknown_options_are_errors() {
    assert!(Cli::try_parse_from(["qsem", "--bogus", "true"]).is_err());
    assert!(Cli::try_parse_from(["qsem", "-c", "x", "true"]).is_err());
}

#[test]
fn backend_options() {
    let cli = Cli::try_parse_from([
        "qsem",
        "--backend",
        "postgres://db/qsem",
        "--on-lost=kill",
        "--lost-after",
        "5s",
        "true",
    ])
    .unwrap();
    assert_eq!(cli.backend.as_deref(), Some("postgres://db/qsem"));
    assert_eq!(cli.on_lost.as_deref(), Some("kill"));
    assert_eq!(cli.lost_after.as_deref(), Some("5s"));
}
