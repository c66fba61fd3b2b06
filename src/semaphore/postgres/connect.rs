//! Reaching the server: the URL completed as libpq would (the `PG*`
//! variables, then `~/.pgpass`), TLS with the certificate always verified,
//! TCP keepalives sized from `--lost-after`, and the refusal that must come
//! before anything runs of a standby or read-only server (a second primary
//! in all but name, whose slots nobody else sees), made by the session's
//! set-up (see `session`). A pooler in transaction mode is `pooler`'s.
//!
//! Messages name the server as `host:port/database`, never with the URL's
//! user information, so that no password reaches an error line.

use super::secrets;
use super::session::Session;
use anyhow::{Context, Result, anyhow, bail};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connect timeout unless the URL or `PGCONNECT_TIMEOUT` says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything needed to open a session, cloned into each holder's task.
#[derive(Clone)]
pub struct Connector {
    pg: tokio_postgres::Config,
    /// TLS for `sslmode=require` (or `verify-ca`, `verify-full`); `None`: plain.
    tls: Option<MakeRustlsConnect>,
    /// `host:port/database`, for messages (never the password).
    pub target: String,
    pub lost_after: Duration,
    pub keepalive: Keepalive,
}

impl Connector {
    /// Reads the URL, completed as libpq would by `PGHOST`, `PGPORT`, `PGUSER`,
    /// `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGCONNECT_TIMEOUT` and the
    /// password file.
    pub fn new(url: &str, lost_after: Duration) -> Result<Connector> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let parts = secrets::split_url(url);
        // qsem always verifies a server's certificate, so libpq's stricter
        // modes mean the same as `require` here.
        let rest = parts
            .rest
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        let mut pg: tokio_postgres::Config = rest.parse().map_err(|e| {
            anyhow!("invalid --backend URL (postgres://USER@HOST:PORT/DATABASE): {e}")
        })?;
        if let Some(user) = parts.user {
            pg.user(user);
        }
        if let Some(password) = parts.password {
            pg.password(password);
        }
        complete_from_env(&mut pg, &rest)?;
        let tls = match pg.get_ssl_mode() {
            SslMode::Require => Some(tls_connector()?),
            // Plain, as `prefer` is with a server that offers no TLS: a
            // certificate qsem cannot verify must not break a default setup.
            _ => {
                pg.ssl_mode(SslMode::Disable);
                None
            }
        };
        if pg.get_connect_timeout().is_none() {
            let secs = env("PGCONNECT_TIMEOUT").and_then(|s| s.parse::<u64>().ok());
            pg.connect_timeout(secs.map_or(CONNECT_TIMEOUT, Duration::from_secs));
        }
        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let db = pg.get_dbname().or(pg.get_user()).unwrap_or("?").to_string();
        if pg.get_password().is_none() {
            let user = pg.get_user().unwrap_or_default().to_string();
            if let Some(password) = secrets::pgpass(&host, port, &db, &user)? {
                pg.password(password);
            }
        }
        let keepalive = Keepalive::for_bound(lost_after);
        pg.application_name("qsem")
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(keepalive.idle))
            .keepalives_interval(Duration::from_secs(keepalive.interval))
            .keepalives_retries(keepalive.count)
            .tcp_user_timeout(keepalive.total());
        Ok(Connector {
            pg,
            tls,
            target: format!("{host}:{port}/{db}"),
            lost_after,
            keepalive,
        })
    }

    /// A new session, set up and checked: a standby or read-only server is
    /// refused here, before any slot is taken.
    pub async fn open(&self) -> Result<Session> {
        Session::open(&self.pg, self.tls.as_ref(), &self.target, &self.keepalive).await
    }

    /// The role that sessions log in as.
    pub fn user(&self) -> &str {
        self.pg.get_user().unwrap_or_default()
    }

    /// A new session whose set-up rides in its first query's message (see
    /// [`Session::connect`]): the refusals come with that answer.
    pub async fn connect(&self) -> Result<Session> {
        Session::connect(&self.pg, self.tls.as_ref(), &self.target, &self.keepalive).await
    }
}

/// What the URL leaves out, from `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
/// `PGDATABASE` and `PGSSLMODE`, as libpq takes them.
fn complete_from_env(pg: &mut tokio_postgres::Config, rest: &str) -> Result<()> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if pg.get_hosts().is_empty() {
        pg.host(env("PGHOST").as_deref().unwrap_or("localhost"));
    }
    if pg.get_ports().is_empty()
        && let Some(port) = env("PGPORT")
    {
        pg.port(
            port.parse()
                .with_context(|| format!("invalid PGPORT '{port}'"))?,
        );
    }
    if pg.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
            .context("no PostgreSQL user: put one in the URL, or set PGUSER")?;
        pg.user(user);
    }
    if pg.get_password().is_none()
        && let Some(password) = env("PGPASSWORD")
    {
        pg.password(password);
    }
    if pg.get_dbname().is_none()
        && let Some(db) = env("PGDATABASE")
    {
        pg.dbname(db);
    }
    if !rest.contains("sslmode=")
        && let Some(mode) = env("PGSSLMODE")
    {
        pg.ssl_mode(match mode.as_str() {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" | "verify-ca" | "verify-full" => SslMode::Require,
            other => bail!("invalid PGSSLMODE '{other}': expected disable, prefer or require"),
        });
    }
    Ok(())
}

/// The TLS client: the server's certificate is always verified, against the
/// PEM file in `PGSSLROOTCERT` if set, else the system's trusted roots.
fn tls_connector() -> Result<MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match std::env::var_os("PGSSLROOTCERT").filter(|p| !p.is_empty()) {
        Some(path) => {
            let shown = std::path::Path::new(&path).display().to_string();
            for cert in CertificateDer::pem_file_iter(&path)
                .with_context(|| format!("cannot read PGSSLROOTCERT {shown}"))?
            {
                let cert = cert.with_context(|| format!("cannot read PGSSLROOTCERT {shown}"))?;
                roots
                    .add(cert)
                    .with_context(|| format!("unusable certificate in PGSSLROOTCERT {shown}"))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        bail!("sslmode=require: no trusted certificates (set PGSSLROOTCERT to the server's CA)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// TCP keepalive settings whose sum stays within the bound: a silent peer is
/// dropped after `idle + interval * count` seconds after its last packet,
/// which is kept a second short of the bound (when it is 3s or more) for the
/// server's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: u64,
    pub interval: u64,
    pub count: u32,
}

impl Keepalive {
    /// The time after which a silent peer is dropped (`F`); also the
    /// `tcp_user_timeout`, because Linux lets that decide when keepalive
    /// probes have failed, once it is set. No server frees a silent
    /// holder's slot sooner after the last query it answered.
    pub fn total(&self) -> Duration {
        Duration::from_secs(self.idle + self.interval * u64::from(self.count))
    }

    pub fn for_bound(bound: Duration) -> Keepalive {
        let b = bound.as_secs().max(2);
        let b = if b >= 3 { b - 1 } else { b };
        let idle = (b / 2).max(1);
        let interval = ((b - idle) / 3).max(1);
        let count = ((b - idle) / interval).clamp(1, 3) as u32;
        Keepalive {
            idle,
            interval,
            count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_fit_the_bound() {
        for secs in [2u64, 3, 5, 10, 30, 60, 3600] {
            let ka = Keepalive::for_bound(Duration::from_secs(secs));
            assert!(ka.total() <= Duration::from_secs(secs), "{secs}: {ka:?}");
            assert!(ka.idle >= 1 && ka.interval >= 1 && ka.count >= 1, "{ka:?}");
        }
        assert_eq!(
            Keepalive::for_bound(Duration::from_secs(30)),
            Keepalive {
                idle: 14,
                interval: 5,
                count: 3
            }
        );
    }
}
