//! The listener: accepts TCP connections, serves HTTP on each, and shuts
//! down gracefully.
//!
//! Two limits guard the door. A permit per TCP connection is taken
//! *before* `accept()` (`max_connections` + headroom for HTTP requests),
//! so the process never accepts its way into the open-files limit; and a
//! permit per WebSocket session is taken at upgrade time, past which
//! upgrades get `503` with `Retry-After`. Accept errors back off instead
//! of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::http;
use crate::node::Node;

/// HTTP connections allowed beyond `max_connections` (health checks,
/// scrapes, refused upgrades).
const HTTP_HEADROOM: usize = 256;

/// A listening socket on `addr`, shared with other processes on this host
/// when `reuse_port` (SO_REUSEPORT: the kernel spreads connections).
pub(crate) fn listen(
    addr: SocketAddr,
    reuse_port: bool,
    backlog: i32,
) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    TcpListener::from_std(socket.into())
}

/// A bound, not yet serving, gateway.
pub struct Server {
    node: Arc<Node>,
    listener: TcpListener,
    shutdown_tx: watch::Sender<bool>,
}

/// Stops a running server from elsewhere (signal handler, tests).
#[derive(Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Begins graceful shutdown.
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }

    /// Watches for shutdown (for listeners that stop with the gateway).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

impl Server {
    /// Binds the configured address.
    pub async fn bind(node: Arc<Node>) -> anyhow::Result<Server> {
        // A deep backlog absorbs connection bursts (thousands per second
        // when a fleet of clients reconnects at once).
        let listener = listen(node.config.listen, node.config.reuse_port, 4096)?;
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Server {
            node,
            listener,
            shutdown_tx,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that triggers graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown_tx.clone())
    }

    /// Serves until shutdown, then tells every client to reconnect
    /// elsewhere (4000) and waits up to the grace period for them to go.
    pub async fn run(self) -> anyhow::Result<()> {
        let Server {
            node,
            listener,
            shutdown_tx,
        } = self;
        let tcp_permits = Arc::new(Semaphore::new(node.config.max_connections + HTTP_HEADROOM));
        let mut shutdown = shutdown_tx.subscribe();
        let maintenance = {
            let node = node.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut n = 0u64;
                loop {
                    tick.tick().await;
                    node.check_backends().await;
                    if n.is_multiple_of(5) {
                        node.maintain();
                    }
                    n += 1;
                }
            })
        };
        let mut backoff = Duration::from_millis(5);
        loop {
            let permit = tokio::select! {
                p = tcp_permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = shutdown.changed() => break,
            };
            let (stream, _peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => {
                        backoff = Duration::from_millis(5);
                        s
                    }
                    Err(e) => {
                        // EMFILE and friends: wait for connections to close.
                        tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            let node = node.clone();
            let conn_shutdown = shutdown_tx.subscribe();
            tokio::spawn(async move {
                let _permit = permit;
                let timeout = node.config.connect_timeout;
                let svc =
                    service_fn(move |req| http::route(node.clone(), req, conn_shutdown.clone()));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    tracing::trace!(error = %e, "http connection ended with error");
                }
            });
        }
        drop(listener);
        maintenance.abort();
        tracing::info!(
            connections = node.connections(),
            "shutting down; closing sessions with 4000"
        );
        let all = node.config.max_connections as u32;
        let drained =
            tokio::time::timeout(node.config.shutdown_grace, node.sessions.acquire_many(all)).await;
        match drained {
            Ok(_) => tracing::info!("all sessions closed"),
            Err(_) => tracing::warn!(left = node.connections(), "grace period over; exiting"),
        }
        Ok(())
    }
}
