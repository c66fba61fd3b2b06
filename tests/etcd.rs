//! The etcd engine against a real 3-member cluster that the tests start
//! (`tests/common/etcd.rs`): the contract of SPEC §1–§7 through
//! `--backend etcd://…`, and what a cluster adds: a member or the leader
//! lost, every member down, a holder cut off from the cluster.

mod common;
use common::etcd::{Cluster, Relay, shared};
use common::{Env, SOON, eventually, kill, run, wait_for_file};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn qsem(env: &Env, url: &str) -> Command {
    let mut cmd = env.qsem();
    cmd.args(["--backend", url]);
    cmd
}

/// A background qsem, killed if a test fails before it ends.
struct Job(Option<Child>);

impl Job {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// Waits for it: (status, stderr).
    fn end(mut self) -> (i32, String) {
        let out = self.0.take().unwrap().wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A job that marks `name.started` (with its slot and fence), then runs
/// until `stop` exists (or the test's directory goes).
fn script(env: &Env, name: &str) -> String {
    format!(
        "echo $QSEM_SLOT $QSEM_FENCE > {started}.tmp; mv {started}.tmp {started}; \
         echo {name} >> {order}; \
         while [ -d {root} ] && [ ! -e {stop} ]; do sleep 0.05; done",
        started = env.path(&format!("{name}.started")).display(),
        order = env.path("order").display(),
        root = env.root.display(),
        stop = env.path("stop").display()
    )
}

fn spawn(env: &Env, url: &str, args: &[&str], name: &str) -> Job {
    let child = qsem(env, url)
        .args(args)
        .args(["--", "sh", "-c", &script(env, name)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Job(Some(child))
}

/// A holder, once its job has started.
fn hold(env: &Env, url: &str, args: &[&str], name: &str) -> Job {
    let job = spawn(env, url, args, name);
    assert!(
        wait_for_file(&env.path(&format!("{name}.started")), SOON),
        "{name} did not start"
    );
    job
}

fn started(env: &Env, name: &str) -> bool {
    env.path(&format!("{name}.started")).exists()
}

/// (held, waiting) of an id, from `--status --json`.
fn counts(env: &Env, url: &str, id: &str) -> (usize, u32) {
    let (code, out, err) = run(qsem(env, url).args(["--status", "--json", "--id", id]));
    assert_eq!(code, 0, "{err}");
    let held = out.matches("\"slot\":").count();
    let waiting = out.split("\"waiting\":").nth(1).map_or(0, |w| {
        w.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    });
    (held, waiting)
}

/// A job that fails the test's check (a line in `violations`) if, as it
/// starts, more than `limit` jobs run (each has a file in `running/`).
fn counted(env: &Env, limit: u32, seconds: &str) -> String {
    let dir = env.path("running");
    std::fs::create_dir_all(&dir).unwrap();
    format!(
        "touch {d}/$$; k=$(ls {d} | wc -l); [ $k -le {limit} ] || echo $k >> {v}; sleep {seconds}; rm {d}/$$",
        d = dir.display(),
        v = env.path("violations").display()
    )
}

fn violations(env: &Env) -> String {
    std::fs::read_to_string(env.path("violations")).unwrap_or_default()
}

fn stop(env: &Env) {
    std::fs::write(env.path("stop"), "").unwrap();
}

#[test]
fn status_passes_through_and_expiry_is_silent() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "st", "-j1"], "h");
    let w = spawn(&env, &url, &["--id", "st", "-j1"], "w");
    assert!(eventually(SOON, || counts(&env, &url, "st") == (1, 1)));
    let (code, out, _) = run(qsem(&env, &url).args(["--status", "--id", "st"]));
    assert_eq!(code, 0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(out.contains(host.trim()), "{out}");
    assert!(out.contains("sh -c"), "{out}");
    assert!(out.contains("st: 1 held, 1 waiting"), "{out}");
    // The pid shown is the job's, which runs under qsem.
    let pid = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap();
    let parent = common::stat_fields(pid.parse().unwrap()).unwrap()[1].clone();
    assert_eq!(parent, h.pid().to_string(), "{out}");
    // An expired wait: the -E status, no output at all, on time.
    let t = Instant::now();
    let (code, out, err) =
        run(qsem(&env, &url).args(["--id", "st", "--wait", "0.5", "-E", "75", "true"]));
    assert_eq!((code, out.as_str(), err.as_str()), (75, "", ""));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let (code, _, err) =
        run(qsem(&env, &url).args(["--id", "st", "--wait", "0", "-E", "3", "true"]));
    assert_eq!((code, err.as_str()), (3, ""));
    stop(&env);
    assert_eq!(h.end(), (0, String::new()));
    assert_eq!(w.end(), (0, String::new()));
    assert_eq!(counts(&env, &url, "st"), (0, 0));
    // A failing job's report line and status pass through.
    let (code, _, err) = run(qsem(&env, &url).args(["--id", "st", "--", "sh", "-c", "exit 3"]));
    assert_eq!(code, 3);
    assert!(
        err.contains("qsem[st]: sh -c 'exit 3' exited with status 3"),
        "{err}"
    );
}

#[test]
fn mixed_jobs_admission() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let a = hold(&env, &url, &["--id", "mix", "-j2"], "a");
    let b = hold(&env, &url, &["--id", "mix", "-j2"], "b");
    // Two held: a -j2 must not start, a -j3 may.
    let (code, _, _) =
        run(qsem(&env, &url).args(["--id", "mix", "-j2", "--wait", "0", "-E", "9", "true"]));
    assert_eq!(code, 9);
    let c3 = hold(&env, &url, &["--id", "mix", "-j3"], "c");
    let slots: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| std::fs::read_to_string(env.path(&format!("{n}.started"))).unwrap())
        .map(|s| s.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(slots, ["1", "2", "3"]);
    let (code, _, _) =
        run(qsem(&env, &url).args(["--id", "mix", "-j3", "--wait", "0", "-E", "9", "true"]));
    assert_eq!(code, 9);
    assert_eq!(counts(&env, &url, "mix"), (3, 0));
    stop(&env);
    for j in [a, b, c3] {
        assert_eq!(j.end().0, 0);
    }
}

#[test]
fn waiters_go_first_come_first_served() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "fifo"], "h");
    let mut waiters = Vec::new();
    for (i, name) in ["w1", "w2", "w3", "w4"].iter().enumerate() {
        // Each job ends at once: the next in line starts after it.
        let child = qsem(&env, &url)
            .args(["--id", "fifo", "--", "sh", "-c"])
            .arg(format!("echo {name} >> {}", env.path("order").display()))
            .spawn()
            .unwrap();
        waiters.push(Job(Some(child)));
        assert!(eventually(SOON, || counts(&env, &url, "fifo").1 == i as u32 + 1));
    }
    stop(&env);
    assert_eq!(h.end().0, 0);
    for w in waiters {
        assert_eq!(w.end().0, 0);
    }
    let order = std::fs::read_to_string(env.path("order")).unwrap();
    assert_eq!(order, "h\nw1\nw2\nw3\nw4\n");
}

#[test]
fn fences_strictly_increase_over_runs_and_handoffs() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let mut fences = Vec::new();
    for _ in 0..3 {
        let (code, out, _) = run(qsem(&env, &url).args([
            "--id",
            "fence",
            "-j2",
            "--",
            "sh",
            "-c",
            "echo $QSEM_FENCE",
        ]));
        assert_eq!(code, 0);
        fences.push(out.trim().parse::<u64>().unwrap());
    }
    // A handoff: the waiter's grant comes after the holder's.
    let h = hold(&env, &url, &["--id", "fence"], "h");
    let w = spawn(&env, &url, &["--id", "fence"], "w");
    assert!(eventually(SOON, || counts(&env, &url, "fence").1 == 1));
    stop(&env);
    assert_eq!(h.end().0, 0);
    assert_eq!(w.end().0, 0);
    for name in ["h", "w"] {
        let s = std::fs::read_to_string(env.path(&format!("{name}.started"))).unwrap();
        fences.push(s.split_whitespace().nth(1).unwrap().parse().unwrap());
    }
    assert!(fences.windows(2).all(|p| p[0] < p[1]), "{fences:?}");
}

#[test]
fn a_killed_holder_frees_its_slot_within_the_ttl() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let h = hold(&env, &url, &["--id", "k9", "--lost-after", "3s"], "h");
    kill(h.pid(), libc::SIGKILL);
    let t = Instant::now();
    let (code, out, _) =
        run(qsem(&env, &url).args(["--id", "k9", "--wait", "20", "-E", "9", "echo", "ran"]));
    assert_eq!((code, out.as_str()), (0, "ran\n"));
    // The lease's TTL, plus its granularity, plus a slow machine's margin.
    assert!(t.elapsed() < Duration::from_secs(9), "{:?}", t.elapsed());
    stop(&env);
    drop(h);
}

#[test]
fn never_more_than_n_at_once_with_kill_9() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let job = counted(&env, 3, "0.2");
    let mut jobs: Vec<Job> = (0..40)
        .map(|_| {
            let child = qsem(&env, &url)
                .args([
                    "--id",
                    "storm",
                    "-j3",
                    "--lost-after",
                    "3s",
                    "--",
                    "sh",
                    "-c",
                    &job,
                ])
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            Job(Some(child))
        })
        .collect();
    // Kill every fifth qsem, holders and waiters alike, while they run.
    let mut seed = std::process::id();
    for j in jobs.iter().step_by(5) {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        std::thread::sleep(Duration::from_millis(u64::from(seed % 300)));
        kill(j.pid(), libc::SIGKILL);
    }
    for j in jobs.drain(..) {
        let (code, _) = j.end();
        assert!(code == 0 || code == -1, "exit {code}");
    }
    assert_eq!(violations(&env), "", "more than 3 jobs at once");
    assert!(eventually(SOON, || counts(&env, &url, "storm") == (0, 0)));
}

#[test]
fn mixed_limits_hold_at_every_instant_under_contention() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    let jobs: Vec<Job> = (0..30)
        .map(|i| {
            let n = if i % 2 == 0 { 2 } else { 4 };
            let job = counted(&env, n, "0.1");
            let child = qsem(&env, &url)
                .args([
                    "--id",
                    "mixstorm",
                    &format!("-j{n}"),
                    "--",
                    "sh",
                    "-c",
                    &job,
                ])
                .spawn()
                .unwrap();
            Job(Some(child))
        })
        .collect();
    for j in jobs {
        assert_eq!(j.end().0, 0);
    }
    assert_eq!(violations(&env), "", "a limit was passed");
}

#[test]
fn background_failures_are_kept_for_the_next_wait_all() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    let url = c.url();
    for code in ["3", "0", "4"] {
        let (rc, _, _) = run(qsem(&env, &url)
            .args(["--id", "bg", "-j2", "--bg", "--", "sh", "-c"])
            .arg(format!("sleep 0.3; exit {code}")));
        assert_eq!(rc, 0);
    }
    let (code, _, err) = run(qsem(&env, &url).args(["--id", "bg", "--wait-all"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains('2'), "{err}");
    let (code, _, err) = run(qsem(&env, &url).args(["--id", "bg", "--wait-all"]));
    assert_eq!((code, err.as_str()), (0, ""));
}

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

#[test]
fn a_cut_off_holder_is_stopped_before_anyone_else_starts() {
    let Some(c) = shared() else { return };
    let env = Env::new();
    // The holder reaches the cluster through a relay to one member, which
    // the test then cuts; the waiter reaches it directly.
    let relay = Relay::to(c.members[1].client_port);
    let cut_url = format!("etcd://127.0.0.1:{}", relay.port);
    // The job ignores SIGTERM: only SIGKILL, the grace later, ends it.
    let job = format!(
        "trap '' TERM; echo $$ > {p}.tmp; mv {p}.tmp {p}; while [ -d {root} ]; do sleep 0.1; done",
        p = env.path("holder.pid").display(),
        root = env.root.display()
    );
    let holder = qsem(&env, &cut_url)
        .args([
            "--id",
            "cut",
            "--lost-after",
            "15s",
            "--on-lost=kill",
            "--",
            "sh",
            "-c",
            &job,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let holder = Job(Some(holder));
    assert!(wait_for_file(&env.path("holder.pid"), SOON));
    let job_pid = std::fs::read_to_string(env.path("holder.pid")).unwrap();
    relay.cut();
    // The waiter's job checks, as it starts, that the holder's job is gone.
    let check = format!(
        "if kill -0 {} 2>/dev/null; then echo overlap; else echo alone; fi",
        job_pid.trim()
    );
    let (code, out, err) =
        run(qsem(&env, &c.url()).args(["--id", "cut", "--wait", "60", "--", "sh", "-c", &check]));
    assert_eq!((code, out.as_str()), (0, "alone\n"), "{err}");
    let (code, err) = holder.end();
    assert_eq!(code, 122, "{err}");
    assert!(err.contains("stopping the command"), "{err}");
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
