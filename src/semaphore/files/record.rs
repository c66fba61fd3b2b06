//! The holder's record in its slot file: who holds the slot (pid, host,
//! start, `-j`, command), for `--status` only. Admission never reads it, so
//! a record that is missing, cut short or garbled changes nothing but what
//! `--status` shows; parsing takes what it can and fills in the rest.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the holder of a slot writes into it.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub pid: u32,
    pub host: String,
    pub started: SystemTime,
    pub jobs: u32,
    pub command: String,
}

impl Record {
    pub fn render(&self) -> String {
        let started = self.started.duration_since(UNIX_EPOCH).unwrap_or_default();
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        format!(
            "qsem-slot 1\npid {}\nhost {}\nstarted {}.{:03}\njobs {}\ncommand {}\n",
            self.pid,
            one_line(&self.host),
            started.as_secs(),
            started.subsec_millis(),
            self.jobs,
            one_line(&self.command)
        )
    }

    pub fn parse(text: &str) -> Record {
        let mut r = Record {
            pid: 0,
            host: "?".into(),
            started: UNIX_EPOCH,
            jobs: 0,
            command: "?".into(),
        };
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "pid" => r.pid = value.parse().unwrap_or(0),
                "host" => r.host = value.to_string(),
                "started" => {
                    if let Ok(secs) = value.parse::<f64>() {
                        r.started = UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0));
                    }
                }
                "jobs" => r.jobs = value.parse().unwrap_or(0),
                "command" => r.command = value.to_string(),
                _ => {}
            }
        }
        r
    }
}
