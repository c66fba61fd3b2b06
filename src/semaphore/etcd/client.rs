//! The one place that speaks to etcd: its v3 JSON gateway (`POST /v3/...`,
//! JSON bodies, keys and values in base64, 64-bit numbers as strings) over
//! ureq, a small blocking HTTP client. No HTTP is written here by hand.
//!
//! **Every request is bounded.** A call takes the instant it must be answered
//! by (a waiter's `--wait` deadline, or a short bound of its own), tries each
//! endpoint in turn for at most [`ATTEMPT`] and never past that instant, and
//! starts with the member that answered last, so that one member down costs
//! nothing after the first call. A member that answers "no leader" or
//! "unavailable" (an election under way) counts as down for that call
//! (`errors.rs` sorts the answers).
//! [`Client::call`] goes round the members until one answers, the instant
//! passes ([`CallError::Expired`]), or none has answered for [`UNREACHABLE`]
//! ([`CallError::Unreachable`], qsem's own failure).
//!
//! Watches, which are streams, are in `watch.rs`.

use super::errors::{Attempt, CallError, classify, cut, unanswered};
use super::wire::{error_of, http_date};
use crate::config::EtcdSettings;
use anyhow::{Result, anyhow};
use serde_json::{Value, json};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest one endpoint may take to answer one request.
pub const ATTEMPT: Duration = Duration::from_secs(2);
/// How long no member may be reachable before a call gives up.
pub const UNREACHABLE: Duration = Duration::from_secs(4);
/// How long members that are reachable but answer nothing useful (an
/// election, an overloaded cluster) are given before a call gives up.
pub const BUSY: Duration = Duration::from_secs(20);
/// The pause between two rounds of the members while none answers.
pub const ROUND_PAUSE: Duration = Duration::from_millis(100);

/// A connection to a cluster, shared by the threads of one process.
pub struct Client {
    pub(super) agent: ureq::Agent,
    /// The watches' own connections: a stream holds its connection for as
    /// long as it runs, and must not take the one a waiter's next call
    /// would reuse (a new connection on the handoff's path).
    pub(super) streams: ureq::Agent,
    /// `http://h:p` or `https://h:p`, one per member.
    pub(super) bases: Vec<String>,
    /// The member that answered last.
    pub(super) current: AtomicUsize,
    /// `USER`, `PASSWORD` if the cluster wants them.
    auth: Option<(String, String)>,
    /// The token from `/v3/auth/authenticate`.
    token: Mutex<Option<String>>,
    /// The cluster's clock: the `Date` of the last answer (Unix seconds),
    /// and when it came on this host's monotonic clock.
    date: Mutex<Option<(i64, Instant)>>,
    /// The id of the cluster that answered first: endpoints of two clusters
    /// in one URL would keep two limits, and views no transaction can check.
    cluster: Mutex<Option<String>>,
}

impl Client {
    pub fn new(settings: &EtcdSettings) -> Result<Client> {
        let scheme = if settings.tls { "https" } else { "http" };
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(1)))
            .max_idle_connections_per_host(4);
        if settings.tls {
            config = config.tls_config(super::tls::config()?);
        }
        let password = settings
            .password
            .clone()
            .or_else(|| std::env::var("QSEM_ETCD_PASSWORD").ok());
        let auth = match (&settings.user, password) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            (Some(user), None) => {
                return Err(anyhow!(
                    "etcd user '{user}' given without a password: set QSEM_ETCD_PASSWORD"
                ));
            }
            (None, _) => None,
        };
        let config = config.build();
        Ok(Client {
            streams: agent(&config),
            agent: agent(&config),
            bases: settings
                .endpoints
                .iter()
                .map(|e| format!("{scheme}://{e}"))
                .collect(),
            current: AtomicUsize::new(0),
            auth,
            token: Mutex::new(None),
            date: Mutex::new(None),
            cluster: Mutex::new(None),
        })
    }

    /// Now on the cluster's clock (Unix seconds), as of the last answer;
    /// `None` before any.
    pub fn cluster_now(&self) -> Option<i64> {
        let date = *self.date.lock().unwrap_or_else(|e| e.into_inner());
        date.map(|(secs, at)| secs + at.elapsed().as_secs() as i64)
    }

    /// The endpoints, for messages.
    pub fn describe(&self) -> String {
        self.bases.join(",")
    }

    /// `POST path` with `body`, answered by any member, by `until` at the
    /// latest (`None`: within [`UNREACHABLE`] of silence).
    pub fn call(
        &self,
        path: &str,
        body: &Value,
        until: Option<Instant>,
    ) -> Result<Value, CallError> {
        let body = body.to_string();
        let mut silent_since: Option<Instant> = None;
        let mut last = String::new();
        let mut reauthenticated = false;
        let mut busy = false;
        loop {
            let n = self.bases.len();
            let first = self.current.load(Ordering::Relaxed);
            for i in (first..first + n).map(|i| i % n) {
                let Some(limit) = bound(until) else {
                    return Err(CallError::Expired);
                };
                match self.attempt(i, path, &body, limit) {
                    Attempt::Answer(v) => {
                        self.current.store(i, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Attempt::Down(why) => last = format!("{}: {why}", self.bases[i]),
                    Attempt::Busy(why) => {
                        busy = true;
                        last = format!("{}: {why}", self.bases[i]);
                    }
                    Attempt::Unauthenticated if !reauthenticated && self.auth.is_some() => {
                        reauthenticated = true;
                        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    Attempt::Unauthenticated => {
                        return Err(CallError::Refused(format!(
                            "etcd at {} refused qsem's credentials",
                            self.bases[i]
                        )));
                    }
                    Attempt::Refused(why) => return Err(CallError::Refused(why)),
                }
            }
            let since = *silent_since.get_or_insert_with(Instant::now);
            let patience = if busy { BUSY } else { UNREACHABLE };
            if since.elapsed() >= patience {
                return Err(CallError::Unreachable(format!(
                    "cannot reach etcd at {} (tried for {}s; last: {last})",
                    self.describe(),
                    patience.as_secs()
                )));
            }
            let pause = Instant::now() + ROUND_PAUSE;
            std::thread::sleep(
                until
                    .map_or(pause, |u| u.min(pause))
                    .saturating_duration_since(Instant::now()),
            );
        }
    }

    fn attempt(&self, i: usize, path: &str, body: &str, limit: Duration) -> Attempt {
        let token = match self.token(i, limit) {
            Ok(t) => t,
            Err(a) => return a,
        };
        let url = format!("{}{path}", self.bases[i]);
        let mut req = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(limit))
            .build()
            .header("content-type", "application/json");
        if let Some(t) = &token {
            req = req.header("authorization", t);
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => return unanswered(e),
        };
        let status = resp.status().as_u16();
        let date = resp.headers().get("date").and_then(|d| d.to_str().ok());
        if let Some(secs) = date.and_then(http_date) {
            *self.date.lock().unwrap_or_else(|e| e.into_inner()) = Some((secs, Instant::now()));
        }
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Attempt::Busy(e.to_string()),
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return Attempt::Busy(format!("HTTP {status}: not JSON: {}", cut(&text)));
        };
        match error_of(&v) {
            None if status == 200 => match self.same_cluster(&v, i) {
                Ok(()) => Attempt::Answer(v),
                Err(why) => Attempt::Refused(why),
            },
            None => Attempt::Busy(format!("HTTP {status}")),
            Some((code, message)) => classify(code, &message, &self.bases[i]),
        }
    }

    /// Whether an answer from member `i` comes from the cluster that
    /// answered first (the first answer decides); `Err` says why not.
    pub(super) fn same_cluster(&self, v: &Value, i: usize) -> Result<(), String> {
        let header = v.get("result").unwrap_or(v);
        let Some(id) = header["header"]["cluster_id"].as_str() else {
            return Ok(());
        };
        let mut first = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
        match first.as_deref() {
            None => {
                *first = Some(id.to_string());
                Ok(())
            }
            Some(known) if known == id => Ok(()),
            Some(known) => Err(format!(
                "etcd at {} belongs to another cluster (id {id}) than the members that answered before (id {known}): check --backend",
                self.bases[i]
            )),
        }
    }

    /// The auth token to send, fetched from member `i` the first time.
    pub(super) fn token(&self, i: usize, limit: Duration) -> Result<Option<String>, Attempt> {
        let Some((user, password)) = &self.auth else {
            return Ok(None);
        };
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = token.as_ref() {
            return Ok(Some(t.clone()));
        }
        let url = format!("{}/v3/auth/authenticate", self.bases[i]);
        let body = json!({"name": user, "password": password}).to_string();
        let answer = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(limit))
            .build()
            .send(&body)
            .map_err(unanswered)?
            .body_mut()
            .read_to_string()
            .map_err(|e| Attempt::Busy(e.to_string()))?;
        let v: Value = serde_json::from_str(&answer)
            .map_err(|_| Attempt::Busy(format!("not JSON: {}", cut(&answer))))?;
        if let Some((code, message)) = error_of(&v) {
            return Err(match classify(code, &message, &self.bases[i]) {
                a @ (Attempt::Down(_) | Attempt::Busy(_)) => a,
                _ => Attempt::Refused(format!(
                    "etcd at {} refused user '{user}': {message}",
                    self.bases[i]
                )),
            });
        }
        let t = v["token"]
            .as_str()
            .ok_or_else(|| Attempt::Busy("no token in the answer".into()))?
            .to_string();
        *token = Some(t.clone());
        Ok(Some(t))
    }
}

/// An agent that looks up no IP address (`resolve.rs`).
fn agent(config: &ureq::config::Config) -> ureq::Agent {
    let connector = ureq::unversioned::transport::DefaultConnector::new();
    ureq::Agent::with_parts(
        config.clone(),
        connector,
        super::resolve::Literal::default(),
    )
}

/// How long an attempt may take: at most [`ATTEMPT`], never past `until`;
/// `None` if `until` has passed.
fn bound(until: Option<Instant>) -> Option<Duration> {
    match until {
        None => Some(ATTEMPT),
        Some(u) => {
            let left = u.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(ATTEMPT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_must_come_from_the_first_cluster() {
        let settings = EtcdSettings {
            endpoints: vec!["a:1".into(), "b:2".into()],
            tls: false,
            user: None,
            password: None,
            lost_after: Duration::from_secs(30),
            kill_on_lost: false,
        };
        let c = Client::new(&settings).unwrap();
        let answer = |id: &str| json!({"header": {"cluster_id": id, "revision": "5"}});
        assert_eq!(c.same_cluster(&answer("11"), 0), Ok(()));
        assert_eq!(c.same_cluster(&json!({"result": answer("11")}), 1), Ok(()));
        let e = c.same_cluster(&answer("22"), 1).unwrap_err();
        assert!(
            e.contains("http://b:2") && e.contains("22") && e.contains("11"),
            "{e}"
        );
        assert_eq!(c.same_cluster(&json!({"kvs": []}), 1), Ok(()));
    }

    #[test]
    fn attempts_never_pass_the_callers_instant() {
        assert_eq!(bound(None), Some(ATTEMPT));
        assert_eq!(bound(Some(Instant::now())), None);
        let soon = bound(Some(Instant::now() + Duration::from_millis(300))).unwrap();
        assert!(soon <= Duration::from_millis(300), "{soon:?}");
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(bound(Some(later)), Some(ATTEMPT));
    }
}
