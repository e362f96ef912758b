//! The listener: accepts TCP connections, serves HTTP on each, and shuts
//! down gracefully.
//!
//! Every socket passes [`crate::admission`] first: a descriptor permit
//! taken *before* `accept()`, then the pending pool and the per-address
//! caps (a refused socket is answered 503 and closed at once). The HTTP
//! phase of a connection lasts at most the connect timeout and
//! [`MAX_REQUESTS_PER_CONNECTION`] requests, so keep-alive sockets cannot
//! hold the pending pool. Accept errors back off instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::PEEK_WAIT;
use crate::config::Config;
use crate::http;
use crate::node::Node;

/// Requests one HTTP connection may make before it is closed (the
/// answer to the last says `Connection: close`).
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 100;

/// The answer to a socket refused at the door, written without waiting.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nover limits\n";

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

/// Answers a socket refused at the door with 503 and closes it: write
/// side first, then what the client sent is read and dropped for a
/// moment, so the close is a FIN after the answer rather than a reset
/// that could destroy it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A fresh socket's send buffer is empty: this never waits.
    let _ = stream.try_write(REFUSED);
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
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

/// Binds the configured address, before the node exists: the port
/// answers while start-up waits for backends ([`crate::starting`]).
pub fn bind_listener(config: &Config) -> std::io::Result<TcpListener> {
    // A deep backlog absorbs connection bursts (thousands per second when
    // a fleet of clients reconnects at once).
    listen(config.listen, config.reuse_port, 4096)
}

impl Server {
    /// Binds the configured address.
    pub async fn bind(node: Arc<Node>) -> anyhow::Result<Server> {
        let listener = bind_listener(&node.config)?;
        Ok(Server::on(node, listener))
    }

    /// A server for `node` on a listener bound earlier.
    pub fn on(node: Arc<Node>, listener: TcpListener) -> Server {
        let (shutdown_tx, _) = watch::channel(false);
        Server {
            node,
            listener,
            shutdown_tx,
        }
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
                p = node.door.socket_permit() => match p {
                    Some(p) => p,
                    None => break,
                },
                _ = shutdown.changed() => break,
            };
            let (stream, peer) = tokio::select! {
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
            let node = node.clone();
            let conn_shutdown = shutdown_tx.subscribe();
            tokio::spawn(async move {
                // In the socket's own task: admission may wait a moment
                // for an evicted socket's slot, and accepting goes on.
                // Behind a trusted proxy the client is named in the
                // request: read it ahead, so the door counts the client
                // (not the proxy) before anyone is evicted for it.
                let peek = node
                    .door
                    .is_trusted(peer.ip())
                    .then(|| node.door.peek_permit())
                    .flatten();
                let forwarded = match peek {
                    Some(_permit) => {
                        let wait = PEEK_WAIT.min(node.config.connect_timeout);
                        http::peek_forwarded_for(&stream, wait).await
                    }
                    None => Vec::new(),
                };
                let forwarded: Vec<&str> = forwarded.iter().map(String::as_str).collect();
                let ticket = match node.door.admit(permit, peer.ip(), &forwarded).await {
                    Ok(t) => t,
                    Err(why) => {
                        node.metrics.refused(why);
                        refuse(stream).await;
                        return;
                    }
                };
                let _ = stream.set_nodelay(true);
                let evicted = ticket.eviction();
                let metrics = node.metrics.clone();
                let timeout = node.config.connect_timeout;
                let socket = Arc::new(http::Socket::new(peer, ticket));
                let svc = service_fn(move |req| {
                    http::route(node.clone(), req, conn_shutdown.clone(), socket.clone())
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                tokio::pin!(conn);
                // The HTTP phase (until an upgrade, or between keep-alive
                // requests) holds a pending slot: it ends with the connect
                // timeout, however the client paces its requests.
                let ended = tokio::select! {
                    r = conn.as_mut() => Some(r),
                    _ = tokio::time::sleep(timeout) => None,
                    // Made room for a newer socket: closed at once, so its
                    // slot is free while the newcomer waits for it.
                    _ = evicted.wait() => {
                        metrics.evicted.inc();
                        return;
                    }
                };
                let ended = match ended {
                    Some(r) => r,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        match tokio::time::timeout(Duration::from_secs(1), conn).await {
                            Ok(r) => r,
                            Err(_) => Ok(()),
                        }
                    }
                };
                if let Err(e) = ended {
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
