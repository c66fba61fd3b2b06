//! `etcds://`: the TLS settings of the client. The server's certificate is
//! verified against `QSEM_ETCD_CACERT` (a PEM file, for a cluster with its
//! own CA, as etcd deployments usually have) or else the system's roots; a
//! client certificate (`QSEM_ETCD_CERT` and `QSEM_ETCD_KEY`, PEM) is sent if
//! given, for a cluster started with `--client-cert-auth`.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::sync::Arc;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

pub fn config() -> Result<TlsConfig> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let roots = match var("QSEM_ETCD_CACERT") {
        Some(path) => {
            let certs = certificates(&read(&path)?);
            if certs.is_empty() {
                bail!(
                    "QSEM_ETCD_CACERT {}: no PEM certificate in it",
                    path.display()
                );
            }
            certs
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                bail!(
                    "etcds://: no system CA certificates found; set QSEM_ETCD_CACERT to the cluster's CA (PEM)"
                );
            }
            found
                .certs
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect()
        }
    };
    let client = match (var("QSEM_ETCD_CERT"), var("QSEM_ETCD_KEY")) {
        (Some(cert), Some(key)) => {
            let chain = certificates(&read(&cert)?);
            if chain.is_empty() {
                bail!(
                    "QSEM_ETCD_CERT {}: no PEM certificate in it",
                    cert.display()
                );
            }
            let key = PrivateKey::from_pem(&read(&key)?)
                .with_context(|| format!("QSEM_ETCD_KEY {}: no PEM private key", key.display()))?;
            Some(ClientCert::new_with_certs(&chain, key))
        }
        (None, None) => None,
        _ => bail!("set both QSEM_ETCD_CERT and QSEM_ETCD_KEY, or neither"),
    };
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .client_cert(client)
        .build())
}

fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn certificates(pem: &[u8]) -> Vec<Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}
