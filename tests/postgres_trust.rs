//! What the PostgreSQL backend must not trust, share or leak (issue 11,
//! findings 4, 6, 9 and 10): other sessions' names and locks, a read-only
//! server, ids whose short hashes collide, and the password.
#![cfg(feature = "postgres")]

mod common;
use common::postgres::{Cluster, PASSWORD, finish, fnv64, hold, qsem, shared};
use common::{Env, SOON, eventually, run, wait_for_file};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

fn setup() -> Option<(Env, &'static Cluster)> {
    Some((Env::new(), shared()?))
}

/// The advisory lock of `slot` of `id`.
fn slot_key(id: &str, slot: u64) -> i64 {
    ((fnv64(id) >> 20 << 20) | slot) as i64
}

/// The 32-bit key earlier versions used, as a signed int4.
fn old_key(id: &str) -> i32 {
    id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    }) as i32
}

#[test]
fn a_session_posing_as_a_waiter_blocks_nobody_and_foreign_locks_show() {
    let Some((env, c)) = setup() else { return };
    // A session named as an old waiter that is older and admissible.
    let mut poser = c.psql_session(&format!("qsem w {:08x} 1 99", old_key("hostile") as u32));
    // It also holds the old admission mutex, in an open transaction.
    writeln!(
        poser.stdin.as_mut().unwrap(),
        "BEGIN; SELECT pg_advisory_xact_lock({}, 0);",
        old_key("hostile")
    )
    .unwrap();
    assert!(eventually(SOON, || {
        c.sql(&format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = '{}'::oid AND objid = 0",
        old_key("hostile") as u32
    )) == "1"
    }));
    let (code, out, err) = run(qsem(&env, c).args([
        "--id", "hostile", "--wait", "2s", "-E", "75", "--", "echo", "ran",
    ]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ran\n", ""));
    // A foreign session that holds the slot's lock: the id is full, and
    // --status says who holds it.
    let mut holder = c.psql_session("not-qsem");
    writeln!(
        holder.stdin.as_mut().unwrap(),
        "SELECT pg_advisory_lock({});",
        slot_key("hostile", 1)
    )
    .unwrap();
    assert!(eventually(SOON, || {
        let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "hostile"]));
        out.contains("hostile: 1 held")
    }));
    let (_, out, _) = run(qsem(&env, c).args(["--status", "--id", "hostile"]));
    assert!(
        out.contains("foreign session: user postgres, application 'not-qsem'"),
        "{out}"
    );
    let (code, _, err) =
        run(qsem(&env, c).args(["--id", "hostile", "--wait", "0", "-E", "75", "--", "true"]));
    assert_eq!(code, 75, "{err}");
    let _ = poser.kill();
    let _ = holder.kill();
    let _ = (poser.wait(), holder.wait());
}

#[test]
fn ids_whose_short_keys_collide_do_not_share_a_semaphore() {
    let Some((env, c)) = setup() else { return };
    assert_eq!(old_key("job-439599"), old_key("job-622382"));
    let a = hold(&env, c, &["--id", "job-439599"], "a");
    let (code, out, err) = run(qsem(&env, c).args([
        "--id",
        "job-622382",
        "--wait",
        "0",
        "-E",
        "75",
        "--",
        "echo",
        "ran",
    ]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ran\n", ""));
    finish(&env, vec![a]);
}

#[test]
fn a_read_only_server_is_refused_before_the_command_runs() {
    let Some((env, c)) = setup() else { return };
    c.sql("CREATE ROLE qsem_ro LOGIN SUPERUSER PASSWORD 'ro-pw'; ALTER ROLE qsem_ro SET default_transaction_read_only = on");
    let url = format!("postgres://qsem_ro:ro-pw@127.0.0.1:{}/postgres", c.port);
    let marker = env.path("ran");
    let (code, out, err) = run(env
        .qsem()
        .args(["--backend", &url, "--id", "ro", "--", "touch"])
        .arg(&marker));
    assert_eq!((code, out.as_str()), (125, ""), "{err}");
    assert!(err.contains("is read-only"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!marker.exists());
}

/// The NUL-separated command line of `pid`, as `ps` shows it.
fn cmdline(pid: &str) -> String {
    std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[test]
fn the_password_stays_out_of_ps_the_job_and_error_lines() {
    let Some((env, c)) = setup() else { return };
    // The job writes its parent's (qsem's, or the --bg supervisor's) command
    // line and its own QSEM_BACKEND, then waits to be stopped.
    let script = |name: &str| {
        format!(
            "echo $PPID > {p}; echo \"$QSEM_BACKEND\" > {e}; touch {s}; \
             while [ ! -e {stop} ] && [ -d {root} ]; do sleep 0.05; done",
            p = env.path(&format!("{name}.ppid")).display(),
            e = env.path(&format!("{name}.env")).display(),
            s = env.path(&format!("{name}.started")).display(),
            stop = env.path("stop").display(),
            root = env.root.display()
        )
    };
    let url = c.url();
    let args = ["--backend", url.as_str(), "--id", "secret", "-j2"];
    let fg = env
        .qsem()
        .env("QSEM_BACKEND", &url)
        .args(args)
        .args(["--", "sh", "-c", &script("fg")])
        .spawn()
        .unwrap();
    // The supervisor keeps the launcher's stdout and stderr: not pipes here.
    let launched = env
        .qsem()
        .args(args)
        .args(["--bg", "--", "sh", "-c", &script("bg")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(launched.success());
    for name in ["fg", "bg"] {
        assert!(wait_for_file(&env.path(&format!("{name}.started")), SOON));
        let parent = std::fs::read_to_string(env.path(&format!("{name}.ppid"))).unwrap();
        let line = cmdline(&parent);
        assert!(line.contains("--id secret"), "{name}: {line}");
        assert!(!line.contains(PASSWORD), "{name}: {line}");
    }
    let job_env = std::fs::read_to_string(env.path("fg.env")).unwrap();
    assert!(
        job_env.contains("postgres://postgres@127.0.0.1"),
        "{job_env}"
    );
    assert!(!job_env.contains(PASSWORD), "{job_env}");
    std::fs::write(env.path("stop"), "").unwrap();
    let mut fg = fg;
    assert!(fg.wait().unwrap().success());
    // The password file is the documented way; a group-readable one is ignored.
    let pgpass = env.path("pgpass");
    std::fs::write(
        &pgpass,
        format!("127.0.0.1:{}:postgres:postgres:{PASSWORD}\n", c.port),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bare = format!("postgres://postgres@127.0.0.1:{}/postgres", c.port);
    let through_file = |mode: u32| {
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(mode)).unwrap();
        run(env
            .qsem()
            .env("PGPASSFILE", &pgpass)
            .env_remove("PGPASSWORD")
            .args(["--backend", &bare, "--id", "pgpass", "--", "echo", "ran"]))
    };
    assert_eq!(through_file(0o600), (0, "ran\n".into(), String::new()));
    assert_eq!(through_file(0o640).0, 125);
    // A wrong password with an `@` in it: no part of it in the error line.
    let wrong = format!(
        "postgres://postgres:wr0ng@pa55@127.0.0.1:{}/postgres",
        c.port
    );
    let (code, _, err) =
        run(env
            .qsem()
            .stderr(Stdio::piped())
            .args(["--backend", &wrong, "--", "true"]));
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("wr0ng") && !err.contains("pa55"), "{err}");
}
