//! Opening authenticated sessions from a chosen source address.
//!
//! One source address has 64,512 ports (1024-65535; the harness picks
//! them itself, see [`SOURCE_PORTS`]), so the harness spreads sockets
//! over 127.0.0.2, 127.0.0.3, ... (all loopback), one per worker.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use chatgate_client::{Incoming, RawConnection};
use chatgate_protocol::payload::{Identify, Ready, Rooms};
use chatgate_protocol::{ClientFrame, Codec, SUBPROTOCOL, ServerFrame};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://host:port/ws`.
    pub url: String,
    /// Resolved server address.
    pub addr: SocketAddr,
}

impl Target {
    /// Parses a `ws://` URL with a numeric host.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url.strip_prefix("ws://").context("only ws:// URLs")?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr: SocketAddr = hostport
            .parse()
            .with_context(|| format!("need host:port with an IP in {url}"))?;
        if !addr.ip().is_loopback() {
            bail!("the load harness only targets loopback addresses (got {addr})");
        }
        Ok(Target {
            url: url.to_owned(),
            addr,
        })
    }
}

/// Client-side socket buffers: small, so one harness process holds many.
pub fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(4 << 20))
}

/// Connects from `source` (port chosen by [`bind_source`]) and upgrades.
pub async fn connect_from(target: &Target, source: IpAddr) -> anyhow::Result<RawConnection> {
    let socket =
        bind_source(source, target.addr.is_ipv4()).with_context(|| format!("binding {source}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(target.addr))
        .await
        .context("TCP connect timed out")??;
    stream.set_nodelay(true)?;
    let mut req = target.url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(
            req,
            MaybeTlsStream::Plain(stream),
            Some(client_ws_config()),
        ),
    )
    .await
    .context("WebSocket upgrade timed out")??;
    Ok(RawConnection::from_stream(ws, Codec::default()))
}

/// Source ports handed out by this process (each worker has its own
/// source address, so processes never compete for one port).
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);
const FIRST_PORT: u32 = 1024;
const PORTS: u32 = 65536 - FIRST_PORT;
/// Sockets one worker (one source address) can open to one gateway.
pub const SOURCE_PORTS: usize = PORTS as usize;

/// A socket bound to `source` on a port this process picks itself.
///
/// Binding to (address, port 0) makes the kernel search the bind table
/// for a port no other socket of that address holds, a search that grows
/// with every socket already open: at 50,000 sockets the harness spent
/// most of its time in the kernel there and connected ~900 sockets/s.
/// An explicit port is one hash lookup. Ports taken by someone else
/// (a listener, a connection still in TIME_WAIT) are skipped.
fn bind_source(source: IpAddr, v4: bool) -> std::io::Result<TcpSocket> {
    let offset = std::process::id();
    for _ in 0..1024 {
        let socket = if v4 {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST_PORT + n.wrapping_add(offset) % PORTS;
        match socket.bind(SocketAddr::new(source, port as u16)) {
            Ok(()) => return Ok(socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    let socket = if v4 {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket)
}

/// The server closed the connection (or it broke) while the harness still
/// needed it. A distinct type so that scenarios can count a connection
/// that ended early apart from other failures: both fail `--check`, but
/// they point at different causes.
#[derive(Debug)]
pub struct Closed(pub Option<(u16, String)>);

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((code, reason)) => write!(f, "closed by the server: {code} {reason}"),
            None => write!(f, "connection closed"),
        }
    }
}

impl std::error::Error for Closed {}

/// Waits for the reply to `rid`. Returns it and every other frame read
/// meanwhile, with its request id and in arrival order: the events that
/// came first and those that shared the reply's message (a batch), which
/// a caller that accounts deliveries must not lose.
pub async fn reply(
    c: &mut RawConnection,
    rid: u32,
    limit: Duration,
) -> anyhow::Result<(ServerFrame, Vec<(u32, ServerFrame)>)> {
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await? {
            Some(Incoming::Frames(frames)) => {
                let mut answer = None;
                for (r, f) in frames {
                    if r == rid && answer.is_none() {
                        answer = Some(f);
                    } else {
                        others.push((r, f));
                    }
                }
                if let Some(f) = answer {
                    return Ok((f, others));
                }
            }
            Some(Incoming::Closed(code)) => return Err(Closed(code).into()),
            None => bail!("no reply to request {rid} within {limit:?}"),
        }
    }
}

/// Connect + Identify (+ Join): returns the session and its Ready, whose
/// `rooms` also list the rooms joined here with their positions.
pub async fn session(
    target: &Target,
    source: IpAddr,
    token: String,
    rooms: &[String],
) -> anyhow::Result<(RawConnection, Ready)> {
    let mut c = connect_from(target, source).await?;
    c.send(
        1,
        &ClientFrame::Identify(Identify {
            token,
            resume: None,
        }),
    )
    .await?;
    let mut ready = match reply(&mut c, 1, Duration::from_secs(20)).await?.0 {
        ServerFrame::Ready(r) => r,
        other => bail!("expected Ready, got {:?}", other.opcode()),
    };
    let missing: Vec<String> = rooms
        .iter()
        .filter(|r| !ready.rooms.iter().any(|p| &p.room == *r))
        .cloned()
        .collect();
    if !missing.is_empty() {
        c.send(2, &ClientFrame::Join(Rooms { rooms: missing }))
            .await?;
        match reply(&mut c, 2, Duration::from_secs(20)).await?.0 {
            // Callers see every room's starting position in one place.
            ServerFrame::Joined(j) => ready.rooms.extend(j.rooms),
            other => bail!("expected Joined, got {:?}", other.opcode()),
        }
    }
    Ok((c, ready))
}

/// The i-th source address: 127.0.0.2, .3, ... (skipping .0/.255).
pub fn source_address(i: usize) -> IpAddr {
    let n = 2 + i as u32;
    IpAddr::from([
        127,
        ((n >> 16) & 0xff) as u8,
        ((n >> 8) & 0xff) as u8,
        (n & 0xff).max(1) as u8,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn source_ports_are_distinct_and_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let source = IpAddr::from([127, 0, 0, 7]);
        let mut ports = std::collections::HashSet::new();
        let mut held = Vec::new();
        for _ in 0..200 {
            let socket = bind_source(source, true).unwrap();
            let stream = socket.connect(to).await.unwrap();
            let local = stream.local_addr().unwrap();
            assert_eq!(local.ip(), source);
            assert!(
                ports.insert(local.port()),
                "port {} handed out twice",
                local.port()
            );
            held.push(stream);
        }
        accepting.abort();
    }
}
