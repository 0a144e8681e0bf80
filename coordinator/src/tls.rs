//! TLS for every connection of a cluster: one certificate and key per part, and the cluster's
//! CA that signed them all.
//!
//! - Between parts (router → worker, coordinator → worker, operator → coordinator, every part
//!   → etcd) TLS is mutual: a server asks for a client certificate signed by the CA and refuses
//!   a peer without one, and a client checks the server's certificate against the same CA.
//! - The router's public ports (gRPC and HTTP) and the metrics ports use the part's certificate
//!   without asking clients for one: clients of the public API prove who they are with an API
//!   key instead.
//!
//! [`Tls`] holds the PEM files once read and checked; it builds tonic's configurations for
//! servers and clients, etcd-client's options and a rustls acceptor for the HTTP ports. The
//! crypto provider is *ring*, chosen explicitly, so nothing depends on a process-wide default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::peers::{Gated, GatedListener};

/// How long a client may take over its TLS handshake on an HTTP port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once on one HTTP port; more connections wait in the
/// kernel's backlog.
const MAX_HANDSHAKES: usize = 64;

/// Where a part's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This part's certificate chain (PEM), served on its ports and shown to the parts it
    /// dials.
    pub cert: PathBuf,
    /// The private key of `cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster's CA (PEM): every peer's certificate must chain to it.
    pub ca: PathBuf,
    /// The name checked in the certificates of the parts this one dials, instead of the host
    /// it dials: for certificates issued to a service name rather than to each address.
    pub server_name: Option<String>,
}

/// Why TLS material could not be used; each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {path}: {message}")]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// A part's certificate, key and the cluster's CA, read and checked.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    cert_pem: Arc<Vec<u8>>,
    key_pem: Arc<Vec<u8>>,
    ca_pem: Arc<Vec<u8>>,
    /// For the HTTP ports: the certificate without client authentication.
    http: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clients {
    /// Parts of the cluster only: a client certificate signed by the CA is required.
    Components,
    /// Anyone who trusts our certificate (the public API, metrics).
    Anyone,
}

/// *ring*, the provider tonic's `tls-ring` uses too. rustls marks it deprecated for want of
/// post-quantum key exchange; aws-lc-rs has that but needs a C and CMake build on every
/// machine that compiles Moebius.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads the files and checks that they parse, that the key belongs to the certificate and
    /// that the CA holds at least one certificate.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                flag,
                path: path.to_path_buf(),
                source,
            })
        };
        let invalid = |flag: &'static str, path: &Path, message: String| TlsError::Invalid {
            flag,
            path: path.to_path_buf(),
            message,
        };
        let cert_pem = read("--tls-cert", &files.cert)?;
        let key_pem = read("--tls-key", &files.key)?;
        let ca_pem = read("--tls-ca", &files.ca)?;
        let certs = pem_certs(&cert_pem).map_err(|m| invalid("--tls-cert", &files.cert, m))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            invalid(
                "--tls-key",
                &files.key,
                format!("no private key in PEM form ({e})"),
            )
        })?;
        let roots = pem_certs(&ca_pem).map_err(|m| invalid("--tls-ca", &files.ca, m))?;
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store
                .add(root)
                .map_err(|e| invalid("--tls-ca", &files.ca, format!("not a usable CA: {e}")))?;
        }
        let mut http = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("--tls-cert", &files.cert, e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                invalid(
                    "--tls-key",
                    &files.key,
                    format!("does not fit the certificate {}: {e}", files.cert.display()),
                )
            })?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            files: files.clone(),
            cert_pem: Arc::new(cert_pem),
            key_pem: Arc::new(key_pem),
            ca_pem: Arc::new(ca_pem),
            http: Arc::new(http),
        })
    }

    /// The files this was read from (to hand them on to child processes).
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&*self.cert_pem, &*self.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&*self.ca_pem)
    }

    /// A gRPC server's TLS: our certificate, and for [`Clients::Components`] a required client
    /// certificate from the CA.
    pub fn grpc_server(&self, clients: Clients) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(self.identity())
            .timeout(HANDSHAKE_TIMEOUT);
        match clients {
            Clients::Components => config.client_ca_root(self.ca()),
            Clients::Anyone => config,
        }
    }

    /// A gRPC client's TLS towards other parts: the CA to check them with, our certificate to
    /// show, and the configured server name to check in theirs; without one, tonic checks the
    /// host each endpoint dials.
    pub fn grpc_client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.files.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }

    /// etcd-client's TLS options: the same CA and certificate (etcd checks client certificates
    /// when started with `--client-cert-auth`), for every endpoint.
    pub fn etcd(&self) -> etcd_client::TlsOptions {
        self.grpc_client()
    }

    /// The acceptor of the HTTP ports: our certificate, HTTP/1.1, no client certificate.
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.http))
    }
}

/// The certificates of a PEM file, or why there are none.
fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err("holds no certificate (no BEGIN CERTIFICATE block)".into());
    }
    Ok(certs)
}

/// The URI of a part at `address` (`host:port`, or already a URI): `https://` with TLS,
/// `http://` without.
pub fn uri(address: &str, tls: Option<&Tls>) -> String {
    if address.contains("://") {
        return address.to_string();
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{address}")
}

/// A gRPC endpoint for the part at `address`: over mutual TLS with `tls`, checking the name
/// the part's certificate must carry.
pub fn endpoint(
    address: &str,
    tls: Option<&Tls>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(uri(address, tls))?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.grpc_client()),
        None => Ok(endpoint),
    }
}

/// A TCP listener whose connections arrive with their TLS handshake done, for `axum::serve`.
/// Handshakes run on tasks of their own (at most [`MAX_HANDSHAKES`] at once, each bounded in
/// time), so a client that stalls in its handshake delays nobody else.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<Gated>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: GatedListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = axum::serve::Listener::local_addr(&listener)?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let (tcp, from) = listener.next().await;
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, from)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%from, error = %e, "TLS handshake failed on an HTTPS port")
                        }
                        Err(_) => {
                            tracing::debug!(%from, "TLS handshake timed out on an HTTPS port")
                        }
                    }
                });
            }
        });
        Ok(Self {
            local,
            ready,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Gated>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task only ends when it is aborted, with the listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(uri("10.0.0.1:1", Some(&tls())), "https://10.0.0.1:1");
        assert_eq!(uri("10.0.0.1:1", None), "http://10.0.0.1:1");
        assert_eq!(uri("http://a:1", None), "http://a:1");
    }

    /// A CA and a certificate it signs, written into a folder that lives as long as the
    /// process (tests only).
    fn tls() -> Tls {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, &rcgen::Issuer::new(ca, ca_key))
            .expect("leaf");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(dir.join("cert.pem"), leaf.pem()).expect("write");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
        Tls::load(&TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            server_name: None,
        })
        .expect("the files load")
    }

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty.clone(),
            ca: dir.path().join("nope.pem"),
            server_name: None,
        };
        let err = Tls::load(&files)
            .expect_err("the CA is missing")
            .to_string();
        assert!(err.starts_with("cannot read --tls-ca"), "{err}");
        std::fs::write(dir.path().join("nope.pem"), "x").expect("write");
        let err = Tls::load(&files).expect_err("nothing is PEM").to_string();
        assert!(
            err.contains("--tls-cert") && err.contains("no certificate"),
            "{err}"
        );
    }
}
