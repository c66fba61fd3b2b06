//! The etcd engine when the cluster or the network fails: a member or the
//! leader lost, every member down, a holder cut off from the cluster; and
//! TLS and users. Against real clusters the tests start.

mod common;
use common::etcd::*;
use common::{Env, SOON, eventually, kill, run, wait_for_file};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn one_member_down_before_start_is_invisible() {
    let Some(mut c) = Cluster::start("one-down") else {
        return;
    };
    let env = Env::new();
    c.signal(0, libc::SIGKILL);
    let url = c.url();
    let t = Instant::now();
    let (code, out, err) = run(qsem(&env, &url).args(["--id", "one", "echo", "ran"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ran\n", ""));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (code, _, err) = run(qsem(&env, &url).args(["--status"]));
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn every_member_down_is_125_with_one_line() {
    let env = Env::new();
    // Ports that nothing listens on.
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let url = format!(
        "etcd://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    let t = Instant::now();
    let (code, out, err) = run(qsem(&env, &url).args(["--id", "down", "echo", "ran"]));
    assert_eq!(code, 125, "{err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach etcd"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // With a --wait shorter than that: on time, and still loud.
    let t = Instant::now();
    let (code, _, err) =
        run(qsem(&env, &url).args(["--id", "down", "--wait", "0.3", "echo", "ran"]));
    assert_eq!(code, 125, "{err}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn the_leader_killed_while_holders_run_and_waiters_wait() {
    let Some(mut c) = Cluster::start("leader") else {
        return;
    };
    let env = Env::new();
    let url = c.url();
    let dir = env.path("running");
    std::fs::create_dir_all(&dir).unwrap();
    let job = |name: &str| {
        format!(
            "touch {d}/{name}; n=$(ls {d} | wc -l); [ $n -le 2 ] || echo $n >> {v}; \
             touch {s}; while [ ! -e {stop} ] && [ -d {root} ]; do sleep 0.05; done; rm {d}/{name}",
            d = dir.display(),
            v = env.path("violations").display(),
            s = env.path(&format!("{name}.started")).display(),
            stop = env.path("stop").display(),
            root = env.root.display()
        )
    };
    let start = |name: &str| {
        let child = qsem(&env, &url)
            .args(["--id", "lead", "-j2", "--", "sh", "-c", &job(name)])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Job(Some(child))
    };
    let holders = [start("h1"), start("h2")];
    assert!(
        wait_for_file(&env.path("h1.started"), SOON)
            && wait_for_file(&env.path("h2.started"), SOON)
    );
    let waiters: Vec<Job> = ["w1", "w2", "w3"].iter().map(|n| start(n)).collect();
    assert!(eventually(SOON, || counts(&env, &url, "lead") == (2, 3)));
    let leader = c.leader().expect("a leader");
    c.signal(leader, libc::SIGKILL);
    // Holders keep their slots, nobody else starts.
    std::thread::sleep(Duration::from_secs(3));
    assert!(eventually(SOON, || counts(&env, &url, "lead") == (2, 3)));
    assert!(!["w1", "w2", "w3"].iter().any(|n| started(&env, n)));
    stop(&env);
    for j in holders.into_iter().chain(waiters) {
        assert_eq!(j.end(), (0, String::new()));
    }
    assert!(["w1", "w2", "w3"].iter().all(|n| started(&env, n)));
    assert_eq!(violations(&env), "");
}

/// A `--on-lost=kill` holder through `url` whose job ignores SIGTERM (only
/// SIGKILL, the grace later, ends it): the qsem, and the job's pid.
fn stubborn_holder(env: &Env, url: &str, id: &str) -> (Job, String) {
    let job = format!(
        "trap '' TERM; echo $$ > {p}.tmp; mv {p}.tmp {p}; while [ -d {root} ]; do sleep 0.1; done",
        p = env.path("holder.pid").display(),
        root = env.root.display()
    );
    let args = [
        "--id",
        id,
        "--lost-after",
        "15s",
        "--on-lost=kill",
        "--",
        "sh",
        "-c",
        &job,
    ];
    let holder = Job(Some(
        qsem(env, url)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    assert!(wait_for_file(&env.path("holder.pid"), SOON));
    let pid = std::fs::read_to_string(env.path("holder.pid")).unwrap();
    (holder, pid.trim().to_string())
}

/// Takes the next slot of `id`; its job says whether the process `pid`
/// still ran when it started (a zombie has ended).
fn next_job_sees(env: &Env, c: &Cluster, id: &str, pid: &str) -> String {
    let check = format!(
        "s=$(cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null); \
         if [ -z \"$s\" ] || [ \"$s\" = Z ]; then echo alone; else echo overlap; fi"
    );
    let (code, out, err) =
        run(qsem(env, &c.url()).args(["--id", id, "--wait", "60", "--", "sh", "-c", &check]));
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn a_cut_off_holder_is_stopped_before_anyone_else_starts() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    // The holder reaches the cluster through a relay to one member, which
    // the test then cuts; the next one reaches it directly.
    let relay = Relay::to(c.members[1].client_port);
    let (holder, pid) = stubborn_holder(&env, &format!("etcd://127.0.0.1:{}", relay.port), "cut");
    relay.cut();
    assert_eq!(next_job_sees(&env, c, "cut", &pid), "alone\n");
    let (code, err) = holder.end();
    assert_eq!(code, 122, "{err}");
    assert!(err.contains("stopping the command"), "{err}");
}

#[test]
fn a_stopped_holders_job_is_stopped_before_anyone_else_starts() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let (holder, pid) = stubborn_holder(&env, &c.url(), "frozen");
    // qsem itself can do nothing now: its watchdog must.
    kill(holder.pid(), libc::SIGSTOP);
    assert_eq!(next_job_sees(&env, c, "frozen", &pid), "alone\n");
    kill(holder.pid(), libc::SIGCONT);
    let (code, err) = holder.end();
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("qsem does not answer; stopping the command"),
        "{err}"
    );
}

#[test]
fn tls_with_the_clusters_ca_and_nothing_else() {
    let Some(c) = Cluster::start_with("tls", 1, true) else {
        return;
    };
    let env = Env::new();
    let url = c.url();
    assert!(url.starts_with("etcds://"), "{url}");
    let ca = c.ca.clone().unwrap();
    let (code, out, err) = run(qsem(&env, &url)
        .env("QSEM_ETCD_CACERT", &ca)
        .args(["--id", "tls", "echo", "ran"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ran\n", ""));
    // The system's roots do not vouch for the test CA: refused, loudly.
    let (code, out, err) = run(qsem(&env, &url).args(["--id", "tls", "echo", "ran"]));
    assert_eq!((code, out.as_str()), (125, ""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn a_cluster_with_users_wants_the_password() {
    let Some(c) = Cluster::start_with("auth", 1, false) else {
        return;
    };
    let env = Env::new();
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "qsem"],
        &[
            "role",
            "grant-permission",
            "qsem",
            "--prefix=true",
            "readwrite",
            "qsem/",
        ],
        &["user", "add", "qsem:s3cret-pw"],
        &["user", "grant-role", "qsem", "qsem"],
        &["auth", "enable"],
    ] {
        let (ok, out) = c.etcdctl(&[&["--user=root:rootpw"][..], args].concat());
        assert!(ok, "etcdctl {args:?}: {out}");
    }
    let url = c.url().replace("etcd://", "etcd://qsem@");
    let (code, out, err) = run(qsem(&env, &url)
        .env("QSEM_ETCD_PASSWORD", "s3cret-pw")
        .args(["--id", "auth", "echo", "ran"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ran\n", ""));
    let (code, _, err) = run(qsem(&env, &url)
        .env("QSEM_ETCD_PASSWORD", "wrong-pw")
        .args(["--id", "auth", "echo", "ran"]));
    assert_eq!(code, 125, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("'qsem'") && !err.contains("wrong-pw"), "{err}");
    // Without any password: said before anything is tried.
    let (code, _, err) = run(qsem(&env, &url)
        .env_remove("QSEM_ETCD_PASSWORD")
        .args(["--id", "auth", "echo", "ran"]));
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("QSEM_ETCD_PASSWORD"), "{err}");
}

#[test]
fn a_holder_whose_lease_expired_says_so_and_takes_a_slot_again() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let relay = Relay::to(c.members[2].client_port);
    let cut_url = format!("etcd://127.0.0.1:{}", relay.port);
    let h = hold(
        &env,
        &cut_url,
        &["--id", "again", "--lost-after", "3s"],
        "h",
    );
    relay.cut();
    // The lease expires on the cluster: the slot is free meanwhile.
    let (code, out, _) =
        run(qsem(&env, &c.url()).args(["--id", "again", "--wait", "20", "echo", "ran"]));
    assert_eq!((code, out.as_str()), (0, "ran\n"));
    relay.restore();
    // Renewals get through again: the holder finds its lease gone, and
    // takes the free slot again by the ordinary rule.
    assert!(eventually(SOON, || counts(&env, &c.url(), "again").0 == 1));
    stop(&env);
    let (code, err) = h.end();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("has not confirmed slot 1"), "{err}");
    assert!(err.contains("took slot 1 again"), "{err}");
}
