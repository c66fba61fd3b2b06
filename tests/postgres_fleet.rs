//! The PostgreSQL backend as a fleet uses it (issue 11, findings 1, 3 and
//! 7): hosts are network namespaces with their own hostnames
//! (`tests/common/netns.rs`) reaching a server of the test's own through
//! real TCP; a host is cut off, or stalled mid-admission, with nft rules
//! inside its namespace. Skipped, with the reason, where the kernel does not
//! allow namespaces.
#![cfg(feature = "postgres")]

mod common;
use common::netns::Fleet;
use common::postgres::{Cluster, Job, Options};
use common::{Env, SOON, eventually, skipped, wait_for_file};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Three hosts and a server that listens on their bridge; `None` to skip.
fn fleet(max_connections: Option<u32>) -> Option<(Fleet, Cluster)> {
    let fleet = match Fleet::new(3) {
        Ok(f) => f,
        Err(why) => {
            skipped(&format!("network namespaces not available: {why}"));
            return None;
        }
    };
    let c = Cluster::start(&Options {
        max_connections,
        also_listen: Some((fleet.server_addr(), fleet.subnet())),
    })?;
    Some((fleet, c))
}

/// `qsem` on `host`, with that host's lock directory (`env`).
fn qsem_on(fleet: &Fleet, c: &Cluster, host: usize, env: &Env) -> Command {
    let mut cmd = fleet.command(host, env!("CARGO_BIN_EXE_qsem"));
    cmd.env("QSEM_DIR", &env.locks)
        .env_remove("QSEM_BACKEND")
        .arg("--backend")
        .arg(c.url_at(&fleet.server_addr()));
    cmd
}

/// Seconds since the epoch, as a job's shell writes them (once written).
fn stamp(path: &std::path::Path) -> f64 {
    let read = || std::fs::read_to_string(path).ok()?.trim().parse().ok();
    assert!(eventually(SOON, || read().is_some()), "{}", path.display());
    read().unwrap()
}

#[test]
fn a_stalled_or_cut_off_host_delays_nobody_past_their_wait() {
    let Some((fleet, c)) = fleet(None) else {
        return;
    };
    let envs: Vec<Env> = (0..3).map(|_| Env::new()).collect();
    // Host 0 holds the only slot.
    let script = common::postgres::hold_script(&envs[0], "holder");
    let holder = common::postgres::started(
        &envs[0],
        qsem_on(&fleet, &c, 0, &envs[0])
            .args(["--id", "stall", "--", "sh", "-c", &script])
            .spawn()
            .unwrap(),
        "holder",
    );
    // Host 1 stalls mid-admission: it reaches the server through a relay
    // that stops passing its traffic on at the first COMMIT (as a network
    // that drops those packets would), and, later, it is cut off entirely
    // while it waits for the slot.
    let relay = StallingRelay::start(&fleet.server_addr(), c.port);
    let stalled_url = format!(
        "postgres://postgres:{}@{}:{}/postgres",
        common::postgres::PASSWORD,
        fleet.server_addr(),
        relay.port
    );
    let on_host_1 = |args: &[&str]| {
        let mut cmd = fleet.command(1, env!("CARGO_BIN_EXE_qsem"));
        cmd.env("QSEM_DIR", &envs[1].locks)
            .arg("--backend")
            .arg(&stalled_url)
            .args(args)
            .stderr(Stdio::null());
        Job(Some(cmd.spawn().unwrap()))
    };
    let mut stalled: Vec<Job> = (0..2)
        .map(|_| on_host_1(&["--id", "stall", "--wait", "0", "--", "true"]))
        .collect();
    stalled.push(on_host_1(&["--id", "stall", "--", "true"]));
    // Until host 1 has stalled (in a transaction, or before its message
    // reached the server), or waits for the slot.
    assert!(eventually(SOON, || relay.stalled.load(Ordering::SeqCst)
        || c.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' \
             OR application_name LIKE 'qsem w %'"
        ) != "0"));
    fleet.cut(1);
    // Host 2 gives up at its --wait, not when host 1's session times out.
    let t = Instant::now();
    let (code, _, err) = common::run(qsem_on(&fleet, &c, 2, &envs[2]).args([
        "-v", "--id", "stall", "--wait", "1s", "-E", "75", "--", "true",
    ]));
    let took = t.elapsed();
    assert_eq!(code, 75, "{err}");
    assert!(
        took < Duration::from_secs(6),
        "--wait 1s returned after {took:?}: {err}"
    );
    // Once the slot is free, host 2 gets it within its --wait.
    common::postgres::finish(&envs[0], vec![holder]);
    let t = Instant::now();
    let ran = envs[2].path("ran");
    let (code, _, err) = common::run(
        qsem_on(&fleet, &c, 2, &envs[2])
            .args(["--id", "stall", "--wait", "2s", "-E", "75", "--", "touch"])
            .arg(&ran),
    );
    assert_eq!(code, 0, "{err} after {:?}", t.elapsed());
    assert!(ran.exists());
    fleet.heal(1);
    drop(stalled);
}

/// A TCP relay to the server that passes traffic on until a client sends a
/// message containing `COMMIT`, then holds that connection silently open.
struct StallingRelay {
    port: u16,
    /// Whether it has held a connection so.
    stalled: Arc<AtomicBool>,
}

impl StallingRelay {
    /// Listens on `addr` (a free port) and relays to `addr:port`.
    fn start(addr: &str, port: u16) -> StallingRelay {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind((addr, 0)).unwrap();
        let relay = StallingRelay {
            port: listener.local_addr().unwrap().port(),
            stalled: Arc::new(AtomicBool::new(false)),
        };
        let stalled = relay.stalled.clone();
        let upstream = (addr.to_string(), port);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(upstream.clone()) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_in, mut c_out) = (server, client);
                let stalled = stalled.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = c_in.read(&mut buf) {
                        if n == 0 || buf[..n].windows(6).any(|w| w == b"COMMIT") {
                            // Stalled: nothing more reaches the server.
                            if n > 0 {
                                stalled.store(true, Ordering::SeqCst);
                            }
                            std::thread::park();
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = s_in.read(&mut buf) {
                        if n == 0 || c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        relay
    }
}

#[test]
fn on_lost_kill_stops_a_cut_off_job_before_the_next_one_starts() {
    let Some((fleet, c)) = fleet(None) else {
        return;
    };
    let (a, b) = (Env::new(), Env::new());
    let (started, ended) = (a.path("started"), a.path("ended"));
    // The job stops on SIGTERM, writing when.
    let script = format!(
        "trap 'date +%s.%N > {ended}; exit 0' TERM; touch {started}; \
         while [ -d {root} ]; do sleep 0.05; done",
        ended = ended.display(),
        started = started.display(),
        root = a.root.display()
    );
    let holder = Job(Some(
        qsem_on(&fleet, &c, 0, &a)
            .args(["--id", "fence", "--lost-after", "5s", "--on-lost=kill"])
            .args(["--", "sh", "-c", &script])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    assert!(wait_for_file(&started, SOON));
    let next = b.path("next");
    let waiter = Job(Some(
        qsem_on(&fleet, &c, 1, &b)
            .args(["--id", "fence", "--wait", "30", "--", "sh", "-c"])
            .arg(format!("date +%s.%N > {}", next.display()))
            .spawn()
            .unwrap(),
    ));
    // Until the waiter waits on the server.
    assert!(eventually(SOON, || c.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'qsem w %'"
    ) == "1"));
    fleet.cut(0);
    assert!(
        wait_for_file(&next, Duration::from_secs(20)),
        "the waiter never ran"
    );
    assert!(
        wait_for_file(&ended, SOON),
        "the cut-off job was not stopped"
    );
    let (stopped, next_began) = (stamp(&ended), stamp(&next));
    assert!(
        stopped < next_began,
        "the next job began {:.3}s before the cut-off one was stopped",
        stopped - next_began
    );
    fleet.heal(0);
    let mut holder = holder;
    let out = holder.0.take().unwrap().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lost slot 1") && err.contains("stopping the command"),
        "{err}"
    );
    drop(waiter);
}

#[test]
fn waiting_costs_one_connection_per_host_and_id() {
    let Some((fleet, c)) = fleet(Some(30)) else {
        return;
    };
    let envs: Vec<Env> = (0..3).map(|_| Env::new()).collect();
    // A job on each host first: its check for a pooler is then remembered,
    // and no waiter below opens a second session for one.
    for (host, env) in envs.iter().enumerate() {
        let out = qsem_on(&fleet, &c, host, env)
            .args(["--id", "warm", "--", "true"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let order = envs[0].path("order");
    // The slot is held while the waiters queue, so that all of them wait;
    // one slot, so that the order the jobs write in is the order admitted.
    let script = common::postgres::hold_script(&envs[0], "h");
    let holders = vec![common::postgres::started(
        &envs[0],
        qsem_on(&fleet, &c, 0, &envs[0])
            .args(["--id", "crowd", "--", "sh", "-c", &script])
            .spawn()
            .unwrap(),
        "h",
    )];
    let mut waiters = Vec::new();
    for n in 0..20 {
        for (host, env) in envs.iter().enumerate() {
            let line = format!("{host} {n}");
            waiters.push(Job(Some(
                qsem_on(&fleet, &c, host, env)
                    .args(["--id", "crowd", "--", "sh", "-c"])
                    .arg(format!("echo {line} >> {}; sleep 0.02", order.display()))
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )));
        }
        // Each host's waiters queue in the order they came.
        assert!(eventually(SOON, || envs.iter().all(|e| queued(e) == n + 1)));
    }
    let sessions =
        c.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'");
    let sessions: u32 = sessions.parse().unwrap();
    // One holder, three heads and psql, and room for one session still
    // closing (a head's first look checked for a pooler with a second one,
    // long before this count).
    assert!(
        sessions <= 1 + 3 + 1 + 1,
        "{sessions} sessions for 1 holder and 3 hosts"
    );
    common::postgres::finish(&envs[0], holders);
    for mut w in waiters {
        let out = w.0.take().unwrap().wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
    }
    let text = std::fs::read_to_string(&order).unwrap();
    for host in 0..3 {
        let seen: Vec<u32> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(h, _)| h.parse() == Ok(host))
            .map(|(_, n)| n.parse().unwrap())
            .collect();
        assert_eq!(seen, (0..20).collect::<Vec<_>>(), "host {host}: {text}");
    }
}

/// How many of a host's qsems are in its queue (the head and those behind
/// it), from its lock directory, counted by pid.
fn queued(env: &Env) -> u32 {
    let (_, out, _) = common::run(env.qsem().args(["--status", "--json"]));
    let pids: std::collections::BTreeSet<&str> = out
        .split("\"pid\":")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .collect();
    pids.len() as u32
}
