//! A bound on the connections one peer address holds open on a port, so that one client cannot
//! take every socket and task of a public port. A connection over the bound is closed as soon
//! as it is accepted, before any byte is read from it.
//!
//! [`PerPeer`] counts; [`incoming`] is the gated stream of accepted connections that tonic
//! serves, and [`GatedListener`] the same for axum.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The default bound on one address's open connections to a public port.
pub const DEFAULT_CONNECTIONS_PER_PEER: usize = 256;

/// Open connections per peer address, up to a limit.
#[derive(Debug)]
pub struct PerPeer {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<PerPeer>,
    ip: IpAddr,
}

impl PerPeer {
    /// At most `limit` open connections per address (at least 1).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`, unless it holds `limit` already.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            gate: Arc::clone(self),
            ip,
        })
    }

    /// Connections open from `ip` now.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .gate
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An accepted connection that holds its peer's place while it is open.
#[derive(Debug)]
pub struct Gated {
    io: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Gated {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The next connection `gate` admits (with TCP_NODELAY on); the others are closed at once.
/// Accept errors (a connection reset before accept, out of descriptors) pause and go on.
async fn accept(listener: &TcpListener, gate: &Arc<PerPeer>) -> (Gated, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((io, from)) => {
                let Some(slot) = gate.admit(from.ip()) else {
                    tracing::debug!(%from, "closed a connection over the per-peer limit");
                    continue;
                };
                // Without TCP_NODELAY, small responses wait for the peer's delayed ACK.
                let _ = io.set_nodelay(true);
                return (Gated { io, _slot: slot }, from);
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The connections of `listener` that `gate` admits, for tonic's `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    gate: Arc<PerPeer>,
) -> impl Stream<Item = io::Result<Gated>> + Send + 'static {
    futures::stream::unfold((listener, gate), |(listener, gate)| async move {
        let (io, _) = accept(&listener, &gate).await;
        Some((Ok(io), (listener, gate)))
    })
}

/// The connections of a listener that a [`PerPeer`] admits, for `axum::serve`.
#[derive(Debug)]
pub struct GatedListener {
    listener: TcpListener,
    gate: Arc<PerPeer>,
}

impl GatedListener {
    pub fn new(listener: TcpListener, gate: Arc<PerPeer>) -> Self {
        Self { listener, gate }
    }

    /// The next admitted connection.
    pub async fn next(&self) -> (Gated, SocketAddr) {
        accept(&self.listener, &self.gate).await
    }
}

impl axum::serve::Listener for GatedListener {
    type Io = Gated;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next().await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_address_and_freed_on_drop() {
        let gate = PerPeer::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = gate.admit(a).expect("first");
        let _second = gate.admit(a).expect("second");
        assert!(gate.admit(a).is_none(), "a third from one address");
        let _other = gate.admit(b).expect("another address has its own places");
        drop(first);
        assert_eq!(gate.open(a), 1);
        assert!(gate.admit(a).is_some());
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_is_closed_on_accept() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let gated = GatedListener::new(listener, PerPeer::new(2));
        // As a server does: each admitted connection is served until its client closes it.
        let server = tokio::spawn(async move {
            loop {
                let (mut io, _) = gated.next().await;
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = io.read_to_end(&mut sink).await;
                });
            }
        });
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.expect("connects"));
        }
        // The third is closed by the server: its read ends at once.
        let mut byte = [0u8; 1];
        let third = tokio::time::timeout(Duration::from_secs(5), clients[2].read(&mut byte))
            .await
            .expect("the third connection is closed within 5 s");
        assert!(matches!(third, Ok(0) | Err(_)), "{third:?}");
        // The first two stay open.
        let first =
            tokio::time::timeout(Duration::from_millis(300), clients[0].read(&mut byte)).await;
        assert!(first.is_err(), "the first connection was closed: {first:?}");
        // A connection served to its end frees its place for the next.
        drop(clients.remove(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fourth = TcpStream::connect(addr).await.expect("connects");
        let read = tokio::time::timeout(Duration::from_millis(300), fourth.read(&mut byte)).await;
        assert!(read.is_err(), "the fourth connection was closed: {read:?}");
        server.abort();
    }
}
