//! `EtcdServer`: a throwaway single-member etcd for tests and local development.
//!
//! It starts the `etcd` binary found on `PATH` on two free loopback ports with a temporary data
//! directory, waits until `/health` answers, and kills the process (and removes the directory)
//! when dropped. [`EtcdServer::start_tls`] serves clients over TLS and asks them for a
//! certificate from the CA, as a secured cluster's etcd does; `/health` then answers on a third,
//! plaintext port. Not for production: the data lives in a temp dir and fsync settings are etcd's
//! defaults for a one-member cluster.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::TlsFiles;

/// How long `start` waits for etcd to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd process, killed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    binary: PathBuf,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    /// Where `/health` answers in plain HTTP: the client port, or with TLS a metrics port.
    health_addr: SocketAddr,
    /// Client TLS: etcd serves this certificate and asks clients for one from the CA.
    tls: Option<TlsFiles>,
    endpoint: String,
    log: PathBuf,
    /// Removed on drop, after the process is gone.
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts `etcd` from `PATH`. Blocks (up to 30 s) until it answers its health check.
    ///
    /// Fails with `NotFound` and an install hint when there is no `etcd` binary.
    pub fn start() -> io::Result<Self> {
        Self::start_binary(Path::new("etcd"))
    }

    /// Starts the given etcd binary.
    pub fn start_binary(binary: &Path) -> io::Result<Self> {
        Self::start_with(binary, None)
    }

    /// Starts `etcd` from `PATH` serving clients over TLS with `tls`'s certificate, and
    /// refusing clients without a certificate from its CA (`--client-cert-auth`).
    pub fn start_tls(tls: &TlsFiles) -> io::Result<Self> {
        Self::start_with(Path::new("etcd"), Some(tls))
    }

    fn start_with(binary: &Path, tls: Option<&TlsFiles>) -> io::Result<Self> {
        // Free ports are found by binding :0 and releasing them; another process may grab one
        // in between, so retry a few times when etcd exits early.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(binary, tls) {
                Ok(server) => return Ok(server),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn try_start(binary: &Path, tls: Option<&TlsFiles>) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("moebius-etcd-").tempdir()?;
        let client_addr = free_port()?;
        let peer_addr = free_port()?;
        let health_addr = match tls {
            Some(_) => free_port()?,
            None => client_addr,
        };
        let log = dir.path().join("etcd.log");
        let ports = Ports {
            client: client_addr,
            peer: peer_addr,
            health: health_addr,
        };
        let mut server = Self {
            child: spawn(binary, dir.path(), ports, tls, &log, "new")?,
            binary: binary.to_path_buf(),
            client_addr,
            peer_addr,
            health_addr,
            tls: tls.cloned(),
            endpoint: format!(
                "{}://{client_addr}",
                if tls.is_some() { "https" } else { "http" }
            ),
            log,
            _dir: dir,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    /// Kills the process (as a crash would), keeping its data directory and ports.
    pub fn kill(&mut self) {
        // Ignore errors: the process may already be gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again on the same data directory and ports (killing it first if it still
    /// runs): the keys and leases are still there. Blocks until it answers its health check.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let ports = Ports {
            client: self.client_addr,
            peer: self.peer_addr,
            health: self.health_addr,
        };
        self.child = spawn(
            &self.binary,
            self._dir.path(),
            ports,
            self.tls.as_ref(),
            &self.log,
            "existing",
        )?;
        self.wait_healthy()
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The client URL as the one-element endpoint list `EtcdStore::connect` takes.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint.clone()]
    }

    fn wait_healthy(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "etcd exited with {status} before answering; its log:\n{}",
                    self.log_tail()
                )));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd did not answer on {} within {START_TIMEOUT:?}; its log:\n{}",
                        self.endpoint,
                        self.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `GET /health` says the member is healthy (it has a leader).
    fn healthy(&self) -> bool {
        let probe = || -> io::Result<bool> {
            let mut conn = TcpStream::connect_timeout(&self.health_addr, Duration::from_secs(1))?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(
                conn,
                "GET /health HTTP/1.0\r\nHost: {}\r\n\r\n",
                self.health_addr
            )?;
            let mut body = String::new();
            conn.read_to_string(&mut body)?;
            Ok(body.contains("\"health\":\"true\""))
        };
        probe().unwrap_or(false)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The ports of one etcd member.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: SocketAddr,
    peer: SocketAddr,
    /// Plain-HTTP `/health` (and `/metrics`) when clients speak TLS.
    health: SocketAddr,
}

/// Starts a one-member etcd in `dir` on the given ports, logging to `log` (appending, so that
/// a restart keeps the earlier log).
fn spawn(
    binary: &Path,
    dir: &Path,
    ports: Ports,
    tls: Option<&TlsFiles>,
    log: &Path,
    state: &str,
) -> io::Result<Child> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", ports.client);
    let peer = format!("http://{}", ports.peer);
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = Command::new(binary);
    if let Some(tls) = tls {
        command
            .arg("--cert-file")
            .arg(&tls.cert)
            .arg("--key-file")
            .arg(&tls.key)
            .arg("--trusted-ca-file")
            .arg(&tls.ca)
            .arg("--client-cert-auth")
            .arg("--listen-metrics-urls")
            .arg(format!("http://{}", ports.health));
    }
    command
        .arg("--name")
        .arg("moebius-test")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen-client-urls")
        .arg(&endpoint)
        .arg("--advertise-client-urls")
        .arg(&endpoint)
        .arg("--listen-peer-urls")
        .arg(&peer)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer)
        .arg("--initial-cluster")
        .arg(format!("moebius-test={peer}"))
        .arg("--initial-cluster-state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "cannot run `{}`: not found. Install etcd (on Debian/Ubuntu: \
                         `apt-get install etcd-server etcd-client`) or put it on PATH",
                        binary.display()
                    ),
                )
            } else {
                io::Error::new(e.kind(), format!("cannot run `{}`: {e}", binary.display()))
            }
        })
}

fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}
