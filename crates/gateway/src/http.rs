//! HTTP/1.1 on the gateway port: `GET /ws` upgrades to WebSocket,
//! `GET /health`, `/livez`, `/readyz` and `/metrics` serve operators,
//! `GET /` the chat page
//! (and `/dev/token` its development sign-in), anything else 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use chatgate_protocol::SUBPROTOCOL;
use chatgate_protocol::limits::MAX_CLIENT_FRAME_BYTES;

use crate::admission::Ticket;
use crate::connection;
use crate::node::Node;
use crate::page;
use crate::server::MAX_REQUESTS_PER_CONNECTION;

type Body = Full<Bytes>;

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// One accepted socket, shared by the requests it carries.
pub struct Socket {
    peer: SocketAddr,
    /// What the socket holds at the door; the upgrade takes it along.
    ticket: Mutex<Option<Ticket>>,
    requests: AtomicU32,
}

impl Socket {
    /// A socket from `peer`, admitted with `ticket`.
    pub fn new(peer: SocketAddr, ticket: Ticket) -> Socket {
        Socket {
            peer,
            ticket: Mutex::new(Some(ticket)),
            requests: AtomicU32::new(0),
        }
    }
}

/// Routes one request.
pub async fn route(
    node: Arc<Node>,
    req: Request<Incoming>,
    shutdown: watch::Receiver<bool>,
    socket: Arc<Socket>,
) -> Result<Response<Body>, Infallible> {
    let served = socket.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let mut response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(node, req, shutdown, &socket),
        (&Method::GET, "/health") => health_response(&node),
        (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => ready_response(&node, *shutdown.borrow()),
        (&Method::GET, "/metrics") => metrics_response(&node),
        (&Method::GET, "/dev/token") => {
            let forwarded = req.headers().contains_key("x-forwarded-for");
            page::dev_token(&node, req.uri().query(), forwarded)
        }
        (&Method::GET, path) => {
            page::asset(path).unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n"))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if served >= MAX_REQUESTS_PER_CONNECTION && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// `r` with `Connection: close`: the connection ends after it.
fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn unavailable(body: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, body);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// `/metrics`: Prometheus text (served on the public and the API port).
pub fn metrics_response(node: &Node) -> Response<Body> {
    let mut text = node.metrics.render();
    crate::metrics::render_statements(&mut text, &node.store.statement_counts());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn upgrade(
    node: Arc<Node>,
    mut req: Request<Incoming>,
    shutdown: watch::Receiver<bool>,
    socket: &Socket,
) -> Response<Body> {
    let h = req.headers();
    if !header_has_token(h, header::CONNECTION, "upgrade")
        || !header_has_token(h, header::UPGRADE, "websocket")
        || h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13")
    {
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        );
    }
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    // Subprotocol tokens are case-sensitive (RFC 6455 §4.1), unlike the
    // Connection and Upgrade values: `chat.V1` is not `chat.v1`.
    let offered = h.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim() == SUBPROTOCOL))
    });
    if !offered {
        return text(
            StatusCode::BAD_REQUEST,
            "offer the chat.v1 subprotocol in Sec-WebSocket-Protocol\n",
        );
    }
    if *shutdown.borrow() {
        return unavailable("shutting down\n");
    }
    // Early word when every session slot is taken; the slot itself is
    // claimed only once the client's token checks out.
    if node.sessions.available_permits() == 0 {
        node.metrics.refused_overload.inc();
        return unavailable("at connection capacity\n");
    }
    let Some(mut ticket) = socket.ticket.lock().take() else {
        return unavailable("one upgrade per connection\n");
    };
    if ticket.eviction().is_evicted() {
        return closing(unavailable("made room for a newer connection\n"));
    }
    // Behind a trusted proxy, the client this upgrade names is counted (a
    // proxy may have carried another client's request on this socket
    // first: the count moves to this one).
    let forwarded: Vec<&str> = h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let client = node.door.client_addr(socket.peer.ip(), &forwarded);
    if let Err(why) = ticket.attribute(client) {
        node.metrics.refused(why);
        // The socket keeps its permits until it closes, which it does
        // after this answer.
        *socket.ticket.lock() = Some(ticket);
        return closing(unavailable("too many connections from this address\n"));
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    // No request is larger than a resuming Identify (~148 KiB): reading
    // more from a client, authenticated or not, only holds memory.
    let read_cap = node.config.max_frame_bytes.min(MAX_CLIENT_FRAME_BYTES);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(node.config.ws_read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(read_cap))
        .max_frame_size(Some(read_cap));
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                connection::serve(node, ws, shutdown, ticket).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = r.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    if let Ok(v) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// Resident set size of this process, from /proc (Linux).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn fanout_up(node: &Node) -> bool {
    node.fanout_stats()
        .map(|s| s.connected.load(std::sync::atomic::Ordering::Relaxed))
        .unwrap_or(true)
}

/// Store, cache and fan-out all answering.
fn backends_up(node: &Node) -> bool {
    node.store_up() && node.cache_degraded() != Some(true) && fanout_up(node)
}

/// `/readyz`: 200 while this node should get new clients (backends up,
/// not draining), else 503. Liveness is `/livez`: a node waiting for a
/// backend is alive, and restarting it would not bring the backend back.
pub fn ready_response(node: &Node, draining: bool) -> Response<Body> {
    match (draining, backends_up(node)) {
        (false, true) => text(StatusCode::OK, "ready\n"),
        (true, _) => unavailable("draining\n"),
        (false, false) => unavailable("a backend is unreachable (see /health)\n"),
    }
}

/// `/health`: status and backends as JSON (public and API port).
pub fn health_response(node: &Node) -> Response<Body> {
    let store = if node.store_up() { "ok" } else { "degraded" };
    let cache = match node.cache_degraded() {
        None => serde_json::Value::Null,
        Some(false) => serde_json::json!({ "engine": "redis", "status": "ok" }),
        Some(true) => serde_json::json!({ "engine": "redis", "status": "degraded" }),
    };
    let fanout_up = fanout_up(node);
    let degraded = !backends_up(node);
    let cluster = node
        .cluster
        .as_ref()
        .map(|c| serde_json::json!({ "node_id": c.node_id(), "live_nodes": c.live_nodes() }));
    let lag = node
        .fanout_stats()
        .map(|s| s.lag_ms.load(std::sync::atomic::Ordering::Relaxed));
    let body = serde_json::json!({
        "status": if degraded { "degraded" } else { "ok" },
        "connections": node.connections(),
        "pending": node.door.pending(),
        "rooms": node.hub.room_count(),
        "users": node.users.len(),
        "uptime_secs": node.started.elapsed().as_secs(),
        "memory_rss_bytes": rss_bytes(),
    "max_connections": node.config.max_connections,
        "node_id": node.config.node_id,
        "cluster": cluster,
        "backends": {
            "store": { "engine": node.store.engine(), "status": store },
            "cache": cache,
    "fanout": {
                "engine": node.fanout.engine(),
                "status": if fanout_up { "ok" } else { "degraded" },
                "lag_ms": lag,
            },
        },
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Longest request head read ahead for [`peek_forwarded_for`].
const PEEK_HEAD_BYTES: usize = 8 * 1024;

/// The `X-Forwarded-For` values of the first request on `stream`, read
/// ahead without consuming it (hyper reads the request afterwards). For
/// sockets from a trusted proxy, so the door can count the client before
/// admitting the socket. Only a complete head counts: at `wait`, at a
/// head longer than 8 KiB, or when the peer closes, the answer is empty
/// (a line cut off at the buffer's end could name another address) and
/// the upgrade attributes the socket instead.
pub async fn peek_forwarded_for(stream: &tokio::net::TcpStream, wait: Duration) -> Vec<String> {
    let mut buf = vec![0u8; PEEK_HEAD_BYTES];
    let read_ahead = async {
        let mut seen = 0;
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end + 4);
            }
            if n == buf.len() {
                return None;
            }
            if n == seen {
                // Part of a head: peeking again returns the same bytes at
                // once, so wait a little for the rest.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen = n;
        }
    };
    match tokio::time::timeout(wait, read_ahead).await {
        Ok(Some(head)) => forwarded_for_of(&buf[..head]),
        _ => Vec::new(),
    }
}

/// `X-Forwarded-For` header values of a request head, in order.
fn forwarded_for_of(head: &[u8]) -> Vec<String> {
    let head = String::from_utf8_lossy(head);
    head.split("\r\n")
        .skip(1)
        .take_while(|line| !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("x-forwarded-for")
                .then(|| value.trim().to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a complete head names a client: one cut off at the buffer's
    /// end (a padded request line pushing the header to the boundary)
    /// could name a prefix of the real address.
    #[tokio::test]
    async fn an_incomplete_head_names_nobody() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peek = |head: Vec<u8>| {
            let listener = &listener;
            async move {
                let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
                client.write_all(&head).await.unwrap();
                let (server, _) = listener.accept().await.unwrap();
                let got = peek_forwarded_for(&server, Duration::from_millis(300)).await;
                drop(client);
                got
            }
        };
        let whole = b"GET /ws HTTP/1.1\r\nX-Forwarded-For: 192.0.2.123\r\n\r\n".to_vec();
        assert_eq!(peek(whole).await, ["192.0.2.123"]);
        // The header line cut at the 8 KiB boundary after "192.0.2.12".
        let mut cut = b"GET /ws?".to_vec();
        let line = b"\r\nX-Forwarded-For: 192.0.2.12";
        cut.resize(PEEK_HEAD_BYTES - line.len(), b'p');
        cut.extend_from_slice(line);
        cut.extend_from_slice(b"3\r\n\r\n");
        assert!(peek(cut).await.is_empty());
        // No end of head within the wait.
        let open = b"GET /ws HTTP/1.1\r\nX-Forwarded-For: 192.0.2.1\r\n".to_vec();
        assert!(peek(open).await.is_empty());
    }

    #[test]
    fn forwarded_for_is_read_from_the_head_only() {
        let head = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\
                     x-forwarded-for:9.9.9.9\r\n\r\nX-Forwarded-For: 6.6.6.6\r\n";
        assert_eq!(forwarded_for_of(head), ["1.2.3.4, 5.6.7.8", "9.9.9.9"]);
        assert!(forwarded_for_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_empty());
        assert!(forwarded_for_of(b"").is_empty());
    }
}
