//! The journal (SPEC §9, issue 12 item 3): one record per invocation, whole
//! under concurrency, bounded by rotation, never a reason for a job to fail;
//! and its readings, `--history` and `--metrics` (checked by a real parser of
//! Prometheus's text format, tests/prometheus_check.py).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The journal files of `id` (a short id: one file per generation).
fn journals(env: &Env, id: &str) -> Vec<PathBuf> {
    let h = env.locks.join(".history");
    [h.join(".1").join(id), h.join(id)]
        .into_iter()
        .filter(|p| p.exists())
        .collect()
}

/// Every line of the journal files of `id`, checked to be a whole record:
/// the version, eight tab-separated fields, a newline at the end.
fn records(env: &Env, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    for path in journals(env, id) {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{path:?}: {text:?}"
        );
        for line in text.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            assert!(
                fields.len() == 8 && fields[0] == "q1" && fields[1].parse::<u64>().is_ok(),
                "torn or foreign record in {path:?}: {line:?}"
            );
            out.push(line.to_string());
        }
    }
    out
}

/// `qsem --history --json --id ID`: the number after `"key":`.
fn count(env: &Env, id: &str, key: &str) -> u64 {
    let (code, out, err) = run(env.qsem().args(["--history", "--json", "--id", id]));
    assert_eq!(code, 0, "{err}");
    let at = out.find(key).unwrap_or_else(|| panic!("{key} in {out}")) + key.len();
    out[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn every_outcome_is_recorded() {
    let env = Env::new();
    let q = |args: &[&str]| run(env.qsem().args(["--id", "proc"]).args(args));
    assert_eq!(q(&["true"]).0, 0);
    assert_eq!(q(&["-q", "sh", "-c", "exit 3"]).0, 3);
    assert_eq!(q(&["-q", "sh", "-c", "kill -9 $$"]).0, 137);
    assert_eq!(q(&["no-such-command-qsem"]).0, 127);
    // A holder, and two invocations that give up on it.
    let ready = env.path("ready");
    let holder = holder(&env, &["--id", "proc"], &ready);
    assert!(wait_for_file(&ready, SOON));
    assert_eq!(q(&["--wait", "0", "true"]).0, 0);
    assert_eq!(q(&["--wait", "0", "-E", "75", "true"]).0, 75);
    release(holder);
    // --each: one record per item; --bg: the supervisor's record.
    let mut each = env.qsem();
    each.args([
        "--id",
        "proc",
        "-j2",
        "--each",
        "-q",
        "sh",
        "-c",
        "exit \"$0\"",
    ]);
    let mut child = each.stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"0\n4\n").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(123));
    let done = env.path("bg-done");
    let script = format!("touch {}; exit 5", done.display());
    let (code, _, _) = run(env
        .qsem()
        .args(["--id", "proc", "-q", "--bg", "sh", "-c", &script]));
    assert_eq!(code, 0);
    assert!(wait_for_file(&done, SOON));
    assert!(eventually(SOON, || records(&env, "proc").len() == 10));
    let lines = records(&env, "proc");
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l.split('\t').nth(4).unwrap())
        .collect();
    for want in [
        "ok",
        "failed:status:3",
        "failed:signal:9",
        "failed:status:127",
        "skipped:expired",
        "failed:status:4",
        "failed:status:5",
    ] {
        assert!(outcomes.contains(&want), "{want} in {outcomes:?}");
    }
    assert_eq!(count(&env, "proc", "\"skipped\":{\"expired\":"), 2);
    assert_eq!(count(&env, "proc", "\"ok\":"), 2, "true, item 0");
    // 3, SIGKILL, 127, the holder's SIGTERM, item 4, the --bg job's 5.
    assert_eq!(count(&env, "proc", "\"failed\":"), 6);
    let (code, table, _) = run(env.qsem().arg("--history"));
    assert_eq!(code, 0);
    assert!(table.starts_with("ID  "), "{table}");
    assert!(table.contains("proc: last failure, started "), "{table}");
    // A record's line is the report line, without the `qsem[id]: ` prefix.
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("\tno-such-command-qsem: command not found")),
        "{lines:?}"
    );
}

#[test]
fn since_keeps_only_recent_invocations() {
    let env = Env::new();
    assert_eq!(run(env.qsem().args(["--id", "s", "true"])).0, 0);
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(run(env.qsem().args(["--id", "s", "true"])).0, 0);
    let (code, out, _) = run(env.qsem().args(["--history", "--json", "--since", "3s"]));
    assert_eq!(code, 0);
    assert!(out.contains("\"id\":\"s\",\"invocations\":1,"), "{out}");
    let (code, _, err) = run(env.qsem().args(["--history", "--since", "soon"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'soon'"), "{err}");
    let (code, _, err) = run(env.qsem().args(["--json", "true"]));
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = run(env.qsem().args(["--history"]));
    assert_eq!(code, 0);
    assert!(out.contains("\ns  "), "{out}");
}

/// Starts `n` qsem processes of `id` at once, each running `args`.
fn swarm(env: &Env, n: usize, id: &str, args: &[&str], extra_env: &[(&str, &str)]) {
    let children: Vec<_> = (0..n)
        .map(|_| {
            env.qsem()
                .envs(extra_env.iter().copied())
                .args(["--id", id, "-j", "1000", "-q"])
                .args(args)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("history"), "{err}");
    }
}

#[test]
fn concurrent_writers_neither_tear_nor_lose_records() {
    let env = Env::new();
    // Long records (a long command line in the report line) make a torn
    // write likelier to show.
    let long = "x".repeat(600);
    let n = env_num("QSEM_HISTORY_WRITERS", 48) as usize;
    swarm(&env, n, "crowd", &["sh", "-c", "exit 1", &long], &[]);
    // Plus --each runs from a few processes, and plain ones, all at once.
    let items: String = (0..25).map(|i| format!("{i}\n")).collect();
    let feeders: Vec<_> = (0..4)
        .map(|_| {
            let mut c = env
                .qsem()
                .args(["--id", "crowd", "-j", "1000", "--each", "true"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut c.stdin.take().unwrap(), items.as_bytes()).unwrap();
            c
        })
        .collect();
    swarm(&env, n, "crowd", &["true"], &[]);
    for mut f in feeders {
        assert_eq!(f.wait().unwrap().code(), Some(0));
    }
    let lines = records(&env, "crowd");
    assert_eq!(lines.len(), 2 * n + 100, "every record, whole");
    let failed = lines
        .iter()
        .filter(|l| l.contains("\tfailed:status:1\t"))
        .count();
    assert_eq!(failed, n);
    // The report line, whole (its command cut at 200 characters, as always).
    let (command, exited) = (
        "\tsh -c 'exit 1' xxxxxxxxxx",
        "… exited with status 1 after ",
    );
    let mut failures = lines.iter().filter(|l| l.contains("\tfailed:"));
    assert!(
        failures.all(|l| l.contains(command) && l.contains(exited)),
        "{lines:#?}"
    );
}

#[test]
fn rotation_bounds_the_journal_and_keeps_two_generations() {
    let env = Env::new();
    let limit = 4096;
    let size = limit.to_string();
    let long = "y".repeat(500);
    let args = ["sh", "-c", "exit 2", long.as_str()];
    // Sequentially: each generation holds what fits, the oldest go.
    for _ in 0..40 {
        swarm(&env, 1, "rot", &args, &[("QSEM_HISTORY_SIZE", &size)]);
    }
    let files = journals(&env, "rot");
    assert_eq!(files.len(), 2, "{files:?}");
    let record = records(&env, "rot")[0].len() as u64 + 1;
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len < limit + record, "{f:?}: {len} bytes");
    }
    let kept = records(&env, "rot").len();
    assert!(
        kept < 40 && kept as u64 >= limit / record,
        "{kept} records of {record} bytes"
    );
    assert_eq!(count(&env, "rot", "\"invocations\":"), kept as u64);
    // --metrics still counts every one: the dropped generations are carried.
    assert_eq!(failed_runs(&env, "rot"), 40);
    assert_eq!(sample(&env, "qsem_run_seconds_count{id=\"rot\"}"), 40);
    // Concurrently: rotations race, records stay whole, files bounded, and
    // the counter never falls (a writer that sleeps through two rotations
    // could lose its record, so not all 40 need be there).
    swarm(&env, 40, "rot", &args, &[("QSEM_HISTORY_SIZE", &size)]);
    records(&env, "rot");
    for f in journals(&env, "rot") {
        let len = std::fs::metadata(&f).unwrap().len();
        assert!(len < 3 * limit, "{f:?}: {len} bytes");
    }
    let total = failed_runs(&env, "rot");
    assert!((60..=80).contains(&total), "{total}");
}

/// The value of one sample of `qsem --metrics`, named with its labels.
fn sample(env: &Env, series: &str) -> u64 {
    let (code, text, err) = run(env.qsem().arg("--metrics"));
    assert_eq!(code, 0, "{err}");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} in {text}"));
    line.parse().unwrap()
}

fn failed_runs(env: &Env, id: &str) -> u64 {
    sample(
        env,
        &format!("qsem_runs_total{{id=\"{id}\",outcome=\"failed\"}}"),
    )
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn journal_files_have_the_lock_directory_modes() {
    let env = Env::new();
    assert_eq!(run(env.qsem().args(["--id", "m", "true"])).0, 0);
    assert_eq!(mode(&env.locks.join(".history")), 0o700);
    assert_eq!(mode(&env.locks.join(".history/m")), 0o600);
    // A group-shared lock directory: group read-write, whatever the umask.
    let shared = env.path("shared");
    std::fs::create_dir(&shared).unwrap();
    let status = Command::new("chmod")
        .arg("2770")
        .arg(&shared)
        .status()
        .unwrap();
    assert!(status.success());
    let (code, _, err) = run(env
        .qsem()
        .env("QSEM_DIR", &shared)
        .args(["--id", "m", "true"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&shared.join(".history")), 0o2770);
    assert_eq!(mode(&shared.join(".history/m")), 0o660);
}

#[test]
fn a_journal_that_cannot_be_written_never_fails_the_job() {
    let env = Env::new();
    assert_eq!(run(env.qsem().args(["--id", "j", "true"])).0, 0);
    // The journal replaced by a symlink to a file of someone's: not followed.
    let victim = env.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let journal = env.locks.join(".history/j");
    std::fs::remove_file(&journal).unwrap();
    std::os::unix::fs::symlink(&victim, &journal).unwrap();
    let (code, _, err) = run(env.qsem().args(["--id", "j", "sh", "-c", "exit 6"]));
    assert_eq!(code, 6, "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(err.matches("cannot write history").count(), 1, "{err}");
    assert!(err.starts_with("qsem[j]: "), "{err}");
    // --each of three items: the job's outputs, and the warning once.
    let mut each = env.qsem();
    each.args(["--id", "j", "--each", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = each.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"a\nb\nc\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("cannot write history").count(), 1, "{err}");
    // A FIFO in the journal's place: refused at once, not waited on.
    std::fs::remove_file(&journal).unwrap();
    let made = Command::new("mkfifo").arg(&journal).status().unwrap();
    assert!(made.success());
    let (code, _, err) = run(env.qsem().args(["--id", "j", "true"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("cannot write history").count(), 1, "{err}");
    // QSEM_HISTORY_SIZE=0: no journal, nothing said.
    let (code, _, err) = run(env
        .qsem()
        .env("QSEM_HISTORY_SIZE", "0")
        .args(["--id", "j", "true"]));
    assert_eq!((code, err.as_str()), (0, ""));
}

/// `qsem --metrics` through tests/prometheus_check.py: its samples, one
/// `NAME<TAB>LABELS-AS-JSON<TAB>VALUE` line each.
fn parsed_metrics(env: &Env) -> Vec<String> {
    let (code, text, err) = run(env.qsem().arg("--metrics"));
    assert_eq!(code, 0, "{err}");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/prometheus_check.py");
    let mut python = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (bash .ci/prometheus.sh installs it)");
    std::io::Write::write_all(&mut python.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = python.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the parser refused:\n{err}\n{text}\n(bash .ci/prometheus.sh installs prometheus_client)"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn metrics_are_read_by_prometheus_own_parser() {
    let env = Env::new();
    let weird = "a \"quoted\" \\ back\nslash";
    assert_eq!(run(env.qsem().args(["--id", weird, "true"])).0, 0);
    assert_eq!(
        run(env.qsem().args(["--id", weird, "-q", "sh", "-c", "exit 1"])).0,
        1
    );
    let ready = env.path("ready");
    let holder = holder(&env, &["--id", "busy"], &ready);
    assert!(wait_for_file(&ready, SOON));
    assert_eq!(
        run(env.qsem().args(["--id", "busy", "--wait", "0", "true"])).0,
        0
    );
    let samples = parsed_metrics(&env);
    release(holder);
    let label = serde_like(weird);
    for want in [
        format!("qsem_runs_total\t{{\"id\": {label}, \"outcome\": \"ok\"}}\t1"),
        format!("qsem_runs_total\t{{\"id\": {label}, \"outcome\": \"failed\"}}\t1"),
        "qsem_runs_total\t{\"id\": \"busy\", \"outcome\": \"skipped\"}\t1".into(),
        "qsem_holders\t{\"id\": \"busy\"}\t1".into(),
        format!("qsem_holders\t{{\"id\": {label}}}\t0"),
        format!("qsem_run_seconds_count\t{{\"id\": {label}}}\t2"),
        "qsem_wait_seconds_bucket\t{\"id\": \"busy\", \"le\": \"+Inf\"}\t1".into(),
    ] {
        assert!(samples.contains(&want), "{want} in {samples:#?}");
    }
}

/// A string as Python's json.dumps writes it (for the ids used here).
fn serde_like(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

#[test]
fn timeouts_and_the_backlog_are_recorded_as_such() {
    let env = Env::new();
    let q = |args: &[&str]| run(env.qsem().args(["--id", "lim"]).args(args));
    assert_eq!(q(&["-q", "--timeout", "200ms", "sleep", "30"]).0, 124);
    // --each: a run stopped at its timeout is recorded as timed out too.
    let mut each = env.qsem();
    each.args(["--id", "lim", "-q", "--timeout", "200ms", "--each", "sleep"]);
    let mut child = each.stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"30\n").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(125));
    // A holder, a queued waiter, and a newcomer turned away by the backlog.
    let ready = env.path("ready");
    let holder = holder(&env, &["--id", "lim"], &ready);
    assert!(wait_for_file(&ready, SOON));
    let mut waiter = env.qsem().args(["--id", "lim", "true"]).spawn().unwrap();
    assert!(eventually(SOON, || {
        let (_, out, _) = run(env.qsem().args(["--status", "--id", "lim", "--json"]));
        out.contains("\"waiting\":1")
    }));
    assert_eq!(q(&["--max-waiting", "1", "-E", "9", "true"]).0, 9);
    release(holder);
    assert_eq!(waiter.wait().unwrap().code(), Some(0));
    let outcomes: Vec<String> = records(&env, "lim")
        .iter()
        .map(|l| l.split('\t').nth(4).unwrap().to_string())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "timed_out").count(),
        2,
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|o| o == "skipped:crowded"),
        "{outcomes:?}"
    );
}

#[test]
fn metrics_of_one_id_leave_the_others_out() {
    let env = Env::new();
    assert_eq!(run(env.qsem().args(["--id", "mine", "true"])).0, 0);
    assert_eq!(run(env.qsem().args(["--id", "other", "true"])).0, 0);
    let (code, text, err) = run(env.qsem().args(["--metrics", "--id", "mine"]));
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("id=\"mine\""), "{text}");
    assert!(!text.contains("id=\"other\""), "{text}");
}
