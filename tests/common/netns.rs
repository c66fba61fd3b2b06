//! Simulated hosts for the PostgreSQL backend's fleet tests: network
//! namespaces, each with its own hostname (a UTS namespace per command),
//! joined by veth pairs to one bridge on a private /24 that exists only for
//! the test; nft rules inside a namespace cut that host off. Every name
//! starts with `qsem-pg-`; [`Fleet`]'s drop removes everything, even when a
//! test fails. Where the kernel does not allow namespaces (no root, a
//! container without the capability) [`Fleet::new`] says why, and the test
//! skips with that reason.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Simulated hosts on one bridge.
pub struct Fleet {
    bridge: String,
    /// The /24's first three octets, e.g. `10.213.42`.
    net: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Fleet {
    /// `hosts` namespaces named `qsem-pg-<pid>-<n>-<i>`, with hostnames
    /// `qsem-pg-h<i>`, at `NET.10 + i`; the host side of the bridge is
    /// [`Fleet::server_addr`].
    pub fn new(hosts: usize) -> Result<Fleet, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{:05x}{}", pid & 0xfffff, n % 10);
        let mut fleet = Fleet {
            bridge: format!("qsem-pg-b{tag}"),
            net: format!("10.213.{}", (pid % 50) * 5 + n % 5 + 1),
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        ip(&["link", "add", &fleet.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", fleet.net),
            "dev",
            &fleet.bridge,
        ])?;
        ip(&["link", "set", &fleet.bridge, "up"])?;
        for i in 0..hosts {
            let ns = format!("qsem-pg-{pid}-{n}-{i}");
            ip(&["netns", "add", &ns])?;
            fleet.namespaces.push(ns.clone());
            let veth = format!("qsem-pg-{tag}{i}");
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            fleet.veths.push(veth.clone());
            ip(&["link", "set", &veth, "master", &fleet.bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            let addr = format!("{}.{}/24", fleet.net, 10 + i);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        fleet.remove_with_this_process();
        Ok(fleet)
    }

    /// Removes everything when this test process ends, even if it is killed
    /// and no drop runs (the drop usually comes first; then this finds
    /// nothing left).
    fn remove_with_this_process(&self) {
        let mut script = format!(
            "while [ -d /proc/{} ]; do sleep 1; done",
            std::process::id()
        );
        for link in self.veths.iter().chain([&self.bridge]) {
            script.push_str(&format!("; ip link del {link} 2>/dev/null"));
        }
        for ns in &self.namespaces {
            script.push_str(&format!("; ip netns del {ns} 2>/dev/null"));
        }
        // It outlives this process by design; nobody here waits for it.
        #[allow(clippy::zombie_processes)]
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// The server's address as the hosts reach it.
    pub fn server_addr(&self) -> String {
        format!("{}.1", self.net)
    }

    /// The /24, for pg_hba.conf.
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.net)
    }

    pub fn hostname(&self, host: usize) -> String {
        format!("qsem-pg-h{host}")
    }

    /// `program` run on `host`: in its network namespace, under its hostname.
    pub fn command(&self, host: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.namespaces[host],
            "unshare",
            "--uts",
            "sh",
            "-c",
        ])
        .arg(format!(
            "hostname {} && exec \"$0\" \"$@\"",
            self.hostname(host)
        ))
        .arg(program);
        c
    }

    /// Applies nft `rules` (a whole `table inet qsem-pg-cut { … }` body) on `host`.
    pub fn nft(&self, host: usize, rules: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[host], "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft {rules}");
    }

    /// Cuts `host` off: every packet in or out is dropped.
    pub fn cut(&self, host: usize) {
        self.nft(
            host,
            "table inet qsem-pg-cut { chain in { type filter hook input priority -10; policy drop; }; \
             chain out { type filter hook output priority -10; policy drop; }; }",
        );
    }

    /// Undoes [`Fleet::cut`] and [`Fleet::nft`].
    pub fn heal(&self, host: usize) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[host]])
            .args(["nft", "delete", "table", "inet", "qsem-pg-cut"])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for v in &self.veths {
            let _ = ip(&["link", "del", v]);
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
