//! Optional TLS for allot's two servers, the calls between them and the admin CLI's calls.
//!
//! - **Servers**: `--tls-cert`/`--tls-key` ([`ServerTlsArgs`]) load a PEM certificate chain and
//!   key into a [`ServerTls`], whose [`ServerTls::listener`] wraps the bound `TcpListener` in a
//!   [`TlsListener`]: an axum [`Listener`](axum::serve::Listener) that hands axum only
//!   connections whose handshake completed. So each server keeps its `run(listener, shutdown)`
//!   shape and axum's graceful shutdown, TLS or not.
//! - **Clients**: `--ca-file` ([`CaArgs`]) adds a PEM bundle of CA certificates to the roots
//!   reqwest trusts (beside the platform's), for a private CA; [`Trust::client_builder`].
//! - **One crypto provider**: aws-lc-rs, the one sqlx and reqwest already use. Configurations
//!   built here name it explicitly, and [`install_crypto_provider`] makes it the process
//!   default, so no library ever has to guess between two providers (rustls panics then).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to complete its TLS handshake; a client that stalls is dropped,
/// so half-open handshakes cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Completed handshakes waiting for axum to take them.
const ACCEPTED_BACKLOG: usize = 128;
/// Most handshakes in progress at once; past it a new connection is closed at once (its client
/// retries), so a flood of idle connections costs bounded memory and accepting never stops.
const MAX_HANDSHAKES: usize = 1024;
/// Most handshakes in progress from one IP address: one flooding host cannot take all of
/// [`MAX_HANDSHAKES`] and starve every other client. Generous for a site behind one NAT address,
/// whose handshakes each last milliseconds.
const MAX_HANDSHAKES_PER_PEER: usize = 256;

/// Why TLS could not be set up. Shown to the operator at start, with the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no valid PEM of the expected kind.
    #[error("{path}: {message}")]
    File {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the certificate and key (e.g. a key that does not match).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsError {
    fn file(path: &Path, message: impl ToString) -> Self {
        Self::File {
            path: path.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Makes aws-lc-rs rustls's process-wide default provider. Idempotent; binaries call it first
/// thing so that any library building a rustls configuration without naming a provider finds
/// exactly one.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed: ours, by an earlier call.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// `--tls-cert` / `--tls-key`: serve HTTPS instead of HTTP.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain of this server (leaf first); with --tls-key it serves HTTPS.
    #[arg(long, env = "ALLOT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "ALLOT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The server's TLS configuration, or `None` when no certificate is configured.
    pub fn load(&self) -> Result<Option<ServerTls>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServerTls::load(cert, key).map(Some),
            _ => Ok(None),
        }
    }
}

/// `--ca-file`: trust a private CA for HTTPS calls.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CaArgs {
    /// PEM file of CA certificates trusted, besides the system's, for HTTPS calls (to the
    /// balancer or to metering servers), e.g. the private CA that signed their certificates.
    #[arg(long, env = "ALLOT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl CaArgs {
    /// The roots the arguments name.
    pub fn load(&self) -> Result<Trust, TlsError> {
        Trust::load(self.ca_file.as_deref())
    }
}

/// A server's certificate and key, ready to accept TLS connections.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(…)")
    }
}

impl ServerTls {
    /// Loads a PEM certificate chain and its private key; TLS 1.2 and 1.3, HTTP/1.1.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| TlsError::file(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::file(cert, e))?;
        if chain.is_empty() {
            return Err(TlsError::file(cert, "no PEM certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::file(key, e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // Both servers speak HTTP/1.1 only (axum's `http1` feature).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Serves TLS on an already bound listener.
    pub fn listener(&self, tcp: TcpListener) -> std::io::Result<TlsListener> {
        TlsListener::new(tcp, self.acceptor.clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// An axum listener that yields TLS streams whose handshake has completed.
///
/// Handshakes run in tasks of their own, not in `accept`: a slow or malicious client must not
/// hold up everyone else's connections. A failed handshake (a client that does not trust the
/// certificate, a port scanner) is logged at debug level and dropped.
pub struct TlsListener {
    local_addr: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local_addr = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
        let acceptor_task = tokio::spawn(accept_loop(tcp, acceptor, tx));
        Ok(Self {
            local_addr,
            accepted,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    /// Stops accepting when axum lets go of the listener (graceful shutdown began).
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let peers = PeerHandshakes::default();
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Past either bound the connection is closed now rather than left in the kernel's
        // backlog: accepting goes on, so a flood delays nobody else's connection.
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
            continue;
        };
        let Some(slot) = peers.take(peer.ip()) else {
            tracing::debug!(%peer, "too many TLS handshakes in progress from this address; connection closed");
            continue;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            drop((slot, permit));
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Handshakes in progress per peer address.
#[derive(Clone, Default)]
struct PeerHandshakes(Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>);

impl PeerHandshakes {
    /// A slot for one more handshake from `ip`, or `None` at [`MAX_HANDSHAKES_PER_PEER`].
    fn take(&self, ip: IpAddr) -> Option<PeerSlot> {
        let mut counts = self.0.lock().expect("peer handshakes");
        let count = counts.entry(ip).or_default();
        if *count >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

/// One handshake in progress from `ip`; its count drops when the handshake ends either way.
struct PeerSlot {
    peers: PeerHandshakes,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.peers.0.lock().expect("peer handshakes");
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Errors of one connection, not of the listener (as axum's own listener treats them).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop never ends by itself; if it was aborted, nothing comes again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Extra CA certificates a client trusts, beside the platform's roots.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    roots: Vec<reqwest::Certificate>,
}

impl Trust {
    /// The certificates of a PEM bundle, or none without a file.
    pub fn load(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        let Some(path) = ca_file else {
            return Ok(Self::default());
        };
        let pem = std::fs::read(path).map_err(|e| TlsError::file(path, e))?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| TlsError::file(path, format!("not a PEM bundle of certificates: {e}")))?;
        if roots.is_empty() {
            return Err(TlsError::file(path, "no PEM certificate in the file"));
        }
        Ok(Self { roots })
    }

    /// A reqwest client builder that trusts these roots too.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder();
        if self.roots.is_empty() {
            builder
        } else {
            builder.tls_certs_merge(self.roots.iter().cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_certificate_and_its_key_load_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = write(dir.path(), "cert.pem", &cert.pem());
        let key_file = write(dir.path(), "key.pem", &key.serialize_pem());
        ServerTls::load(&cert_file, &key_file).expect("a valid pair loads");

        let missing = dir.path().join("missing.pem");
        let empty = write(dir.path(), "empty.pem", "");
        let garbage = write(dir.path(), "garbage.pem", "not PEM at all");
        for (cert, key) in [
            (&missing, &key_file),
            (&empty, &key_file),
            (&cert_file, &missing),
            (&cert_file, &garbage),
        ] {
            let err = ServerTls::load(cert, key).expect_err("a bad file is refused");
            let TlsError::File { path, .. } = &err else {
                panic!("{err}")
            };
            assert!(path == cert || path == key, "{err}");
        }
        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        let other_file = write(dir.path(), "other.pem", &other.serialize_pem());
        assert!(matches!(
            ServerTls::load(&cert_file, &other_file),
            Err(TlsError::Config(_))
        ));
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Trust::load(None).unwrap().roots.is_empty());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ca = write(dir.path(), "ca.pem", &cert.pem());
        assert_eq!(Trust::load(Some(&ca)).unwrap().roots.len(), 1);
        for bad in [
            write(dir.path(), "empty.pem", ""),
            write(dir.path(), "key.pem", &key.serialize_pem()),
            dir.path().join("missing.pem"),
        ] {
            assert!(
                matches!(Trust::load(Some(&bad)), Err(TlsError::File { .. })),
                "{}",
                bad.display()
            );
        }
    }
}
