//! The per-connection task: frames in, frames out, nothing else.
//!
//! One task per WebSocket. It waits for Identify (within the connect
//! timeout), then loops over: the next client frame, the outbox having
//! something to write, storage-bound requests finishing, the heartbeat
//! deadline, and shutdown. Decoding and the request rules live in
//! [`crate::session`]; this file only frames, dispatches and closes with
//! the right code.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

use chatgate_protocol::{ClientFrame, CloseCode};

use crate::admission::{Eviction, Ticket};
use crate::node::Node;
use crate::outbox::Outbox;
use crate::session::{Pending, Session};

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Storage-bound requests one connection may have running at once; past
/// it the connection stops reading (backpressure on the client).
const MAX_IN_FLIGHT: usize = 32;
/// Frames moved from the outbox per wake-up.
const DRAIN_FRAMES: usize = 256;
/// Largest batch frame assembled from queued frames. tungstenite's write
/// buffer grows to the largest message written and keeps that capacity,
/// so batches stay small enough that a burst leaves idle connections
/// cheap; 4 KiB still carries ~30 typical events per write.
const MAX_BATCH_BYTES: usize = 4 * 1024;
/// How long a write cut short by a close may take to finish its frames.
const WRITE_FINISH: Duration = Duration::from_secs(1);
/// Messages per vectored write (header and payload slices on the stack).
const WRITE_CHUNK: usize = 8;

/// How a read ended when it did not yield a frame.
enum Ended {
    /// Close with this code.
    Close(CloseCode),
    /// The peer sent a Close: answer it (RFC 6455 §5.5.1) and stop.
    PeerClosed,
    /// The socket failed; nothing more to say.
    Gone,
    /// Closed for this reason while a frame was half written: no close
    /// frame can follow, the socket is dropped.
    Abandoned(CloseCode),
}

/// Serves one upgraded WebSocket until it closes.
pub async fn serve(
    node: Arc<Node>,
    mut ws: Ws,
    mut shutdown: watch::Receiver<bool>,
    mut ticket: Ticket,
) {
    node.metrics.connections.inc();
    node.metrics.connections_total.inc();
    let conn = node.next_conn_id();
    let outbox = Arc::new(Outbox::new(
        node.config.outbound_queue_frames,
        node.config.outbound_queue_bytes,
    ));

    let evicted = ticket.eviction();
    let deadline = ticket.admitted() + node.config.connect_timeout;
    let opened = tokio::select! {
        r = Box::pin(identify(&node, &mut ws, conn, &outbox, &evicted, deadline)) => r,
        _ = shutdown.changed() => Err(Ended::Close(CloseCode::ShuttingDown)),
    };
    match opened {
        Ok(mut session) => {
            // A session now: its pending slot goes back to the door.
            ticket.identified();
            let end = run(&node, &mut ws, &mut session, &outbox, &mut shutdown).await;
            drop(session);
            finish(&node, &mut ws, end, outbox.reason()).await;
        }
        Err(end) => finish(&node, &mut ws, end, None).await,
    }
    node.metrics.connections.dec();
}

/// How long opening a session (store, fan-out and limit calls, each with
/// its own timeout) may take before the client is told to come back.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the first frame, which must be Identify, and opens the session.
/// Only the client's part is its connect timeout (4104), counted from the
/// TCP accept: the upgrade and the Identify frame must both arrive by
/// `deadline`, so an unidentified socket holds a pending slot for one
/// timeout, not two. A slow backend while opening is the server's
/// trouble (4003, reconnect).
async fn identify(
    node: &Arc<Node>,
    ws: &mut Ws,
    conn: u64,
    outbox: &Arc<Outbox>,
    evicted: &Eviction,
    deadline: Instant,
) -> Result<Session, Ended> {
    let first = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => return Ok(data),
                Some(Ok(Message::Text(_))) => return Err(Ended::Close(CloseCode::TextFrame)),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) => return Err(Ended::PeerClosed),
                None => return Err(Ended::Gone),
                Some(Err(e)) => return Err(ws_error(e)),
            }
        }
    };
    // Waiting for Identify ends with the connect timeout, or sooner when
    // the pending pool is full and this socket the oldest in it.
    let data = tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), first) => {
            r.map_err(|_| Ended::Close(CloseCode::IdentifyTimeout))??
        }
        // Capacity, not the client's fault: 4004 says come back (a
        // client that sends Identify at once is never the oldest).
        _ = evicted.wait() => {
            node.metrics.evicted.inc();
            return Err(Ended::Close(CloseCode::Overloaded));
        }
    };
    count_in(node, &data);
    let (rid, frame) = node
        .codec
        .decode_client(&data)
        .map_err(|e| Ended::Close(e.close_code()))?;
    let ClientFrame::Identify(identify) = frame else {
        return Err(Ended::Close(CloseCode::ProtocolViolation));
    };
    // A token that cannot be one (empty, too long) is a bad token; any
    // other field out of its §6 limits is a broken client.
    if let Err(invalid) = ClientFrame::Identify(identify.clone()).validate() {
        tracing::debug!(%invalid, "invalid Identify");
        return Err(Ended::Close(if invalid.field == "token" {
            CloseCode::InvalidToken
        } else {
            CloseCode::ProtocolViolation
        }));
    }
    // Still the one to make room while its token is checked (a JWKS
    // refetch can take seconds); spared once it is known to be a user.
    let claims = tokio::select! {
        r = tokio::time::timeout(OPEN_TIMEOUT, Session::verify(node, &identify)) => {
            r.map_err(|_| Ended::Close(CloseCode::ServerError))?.map_err(Ended::Close)?
        }
        _ = evicted.wait() => {
            node.metrics.evicted.inc();
            return Err(Ended::Close(CloseCode::Overloaded));
        }
    };
    evicted.spare();
    let open = Session::open_verified(node.clone(), conn, outbox.clone(), rid, identify, claims);
    let (session, first) = tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .map_err(|_| {
            tracing::warn!("opening a session timed out on its backends");
            Ended::Close(CloseCode::ServerError)
        })?
        .map_err(Ended::Close)?;
    // Bounded like any write: a client that stops reading here must not
    // hold its slots.
    let write = async {
        for frame in first {
            count_out(node, &frame);
            node.metrics.frame_out(frame[0]);
            ws.feed(Message::Binary(frame)).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(node.config.heartbeat_timeout, write).await {
        Ok(Ok(())) => Ok(session),
        Ok(Err(_)) => Err(Ended::Gone),
        Err(_) => Err(Ended::Abandoned(CloseCode::SlowConsumer)),
    }
}

/// The identified session's loop.
///
/// This future is what an idle connection costs, so everything large that
/// only runs briefly (Identify, request handling, writing) is boxed and
/// lives only while it runs: the idle state stays a few hundred bytes.
async fn run(
    node: &Arc<Node>,
    ws: &mut Ws,
    session: &mut Session,
    outbox: &Arc<Outbox>,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    // Created at the first storage-bound request: FuturesUnordered
    // allocates even when empty, and most idle sockets never need it.
    let mut in_flight: Option<FuturesUnordered<Pending>> = None;
    let running = |f: &Option<FuturesUnordered<Pending>>| f.as_ref().map_or(0, |f| f.len());
    let mut queued: Vec<Bytes> = Vec::new();
    let silence_limit = node.config.heartbeat_interval + node.config.heartbeat_timeout;
    let mut last_seen = Instant::now();
    let heartbeat = tokio::time::sleep(silence_limit);
    tokio::pin!(heartbeat);
    // Set while reading is paused (a client over its request budget that
    // keeps sending); boxed because most connections never pause.
    let mut paused: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Set once shutdown begins: no more frames are read, requests in
    // flight finish (their acks queued), the outbox is written out, then
    // the close (4000). Bounded by most of the grace period.
    let mut draining: Option<Pin<Box<tokio::time::Sleep>>> = None;

    loop {
        if draining.is_some() && running(&in_flight) == 0 {
            return drain_and_close(node, ws, session, outbox, &mut queued).await;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed(), if draining.is_none() => {
                draining = Some(Box::pin(tokio::time::sleep(node.config.shutdown_grace.mul_f32(0.8))));
                continue;
            }
            _ = async { if let Some(d) = draining.as_mut() { d.await } }, if draining.is_some() => {
                tracing::warn!(in_flight = running(&in_flight), "requests still running at the end of the drain");
                return Ended::Close(CloseCode::ShuttingDown);
            }
            _ = outbox.ready() => {
                // Drain until the queue is seen empty: pushes only wake
                // the task on the empty -> non-empty transition.
                loop {
                    let oldest = match outbox.drain(&mut queued, DRAIN_FRAMES) {
                        Ok(oldest) => oldest,
                        Err(code) => return Ended::Close(code),
                    };
                    if let Some(at) = oldest {
                        node.metrics.delivery_latency.observe(at.elapsed().as_secs_f64());
                    }
                    if queued.is_empty() {
                        if queued.capacity() > 16 {
                            // A burst grew it; an idle connection gives it back.
                            queued = Vec::new();
                        }
                        break;
                    }
                    if let Err(end) = Box::pin(write_queued(node, ws, session, outbox, &mut queued)).await {
                        return end;
                    }
                }
            }
            Some(()) = async { in_flight.as_mut()?.next().await }, if running(&in_flight) > 0 => {}
            _ = async { if let Some(p) = paused.as_mut() { p.await } }, if paused.is_some() => {
                paused = None;
            }
            msg = ws.next(), if running(&in_flight) < MAX_IN_FLIGHT && paused.is_none() && draining.is_none() => {
                last_seen = Instant::now();
                let data = match msg {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Text(_))) => return Ended::Close(CloseCode::TextFrame),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) => return Ended::PeerClosed,
                    None => return Ended::Gone,
                    Some(Err(e)) => return ws_error(e),
                };
                count_in(node, &data);
                // Charged before decoding: a refused frame costs its
                // header, never an inflate.
                let header = match node.codec.header(&data) {
                    Ok(h) => h,
                    Err(e) => return Ended::Close(e.close_code()),
                };
                if let Err(pause) = session.admit(header.request_id) {
                    paused = pause.map(|d| Box::pin(tokio::time::sleep(d)));
                    continue;
                }
                let (rid, frame) = match node.codec.decode_client(&data) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!(error = %e, "undecodable frame");
                        return Ended::Close(e.close_code());
                    }
                };
                drop(data);
                let opcode = frame.opcode();
                let started = Instant::now();
                match Box::pin(session.handle(rid, frame)).await {
                    Ok(Some(pending)) => in_flight.get_or_insert_with(FuturesUnordered::new).push(pending),
                    Ok(None) => node.metrics.request(opcode, started.elapsed().as_secs_f64()),
                    Err(code) => return Ended::Close(code),
                }
            }
            _ = &mut heartbeat => {
                let deadline = last_seen + silence_limit;
                if Instant::now() >= deadline {
                    return Ended::Close(CloseCode::HeartbeatTimeout);
                }
                heartbeat.as_mut().reset(deadline.into());
            }
        }
    }
}

/// The end of a drain: writes what the outbox holds (the acks of the
/// requests that just finished among it), at most one outbox's worth so
/// a busy room cannot keep it going, then closes with 4000.
async fn drain_and_close(
    node: &Arc<Node>,
    ws: &mut Ws,
    session: &mut Session,
    outbox: &Arc<Outbox>,
    queued: &mut Vec<Bytes>,
) -> Ended {
    let mut left = node.config.outbound_queue_frames;
    loop {
        match outbox.drain(queued, DRAIN_FRAMES.min(left)) {
            Ok(_) => {}
            Err(code) => return Ended::Close(code),
        }
        if queued.is_empty() {
            return Ended::Close(CloseCode::ShuttingDown);
        }
        left = left.saturating_sub(queued.len());
        if let Err(end) = Box::pin(write_queued(node, ws, session, outbox, queued)).await {
            return end;
        }
    }
}

/// Writes drained frames: consecutive uncompressed frames travel as one
/// Batch message, compressed ones alone (the protocol keeps batch members
/// uncompressed, and re-compressing per recipient is what we avoid).
async fn write_queued(
    node: &Arc<Node>,
    ws: &mut Ws,
    session: &mut Session,
    outbox: &Arc<Outbox>,
    queued: &mut Vec<Bytes>,
) -> Result<(), Ended> {
    let mut batch: Vec<Bytes> = Vec::with_capacity(queued.len());
    let mut batch_bytes = 0;
    let mut messages: Vec<Bytes> = Vec::with_capacity(1);
    for frame in queued.drain(..) {
        if !session.should_deliver(&frame) {
            continue;
        }
        node.metrics.frame_out(frame[0]);
        let compressed = frame.get(1).is_some_and(|f| f & 1 != 0);
        if compressed || batch_bytes + frame.len() > MAX_BATCH_BYTES {
            flush_batch(node, &mut batch, &mut batch_bytes, &mut messages);
        }
        if compressed {
            messages.push(frame);
        } else {
            batch_bytes += frame.len();
            batch.push(frame);
        }
    }
    flush_batch(node, &mut batch, &mut batch_bytes, &mut messages);
    if messages.is_empty() {
        return Ok(());
    }
    for frame in &messages {
        count_out(node, frame);
    }
    let write = write_direct(ws, &messages);
    tokio::pin!(write);
    // Most writes complete at once (the socket buffer has room): try
    // before arming the deadline, so a delivery costs no timer.
    if let Poll::Ready(r) = futures_util::poll!(&mut write) {
        return r.map_err(|_| Ended::Gone);
    }
    // A client that stops reading blocks this write; the outbox closing
    // (slow consumer) or the write timeout ends it.
    let deadline = tokio::time::sleep(node.config.heartbeat_timeout);
    let code = tokio::select! {
        r = &mut write => return r.map_err(|_| Ended::Gone),
        code = outbox.closing() => code,
        _ = deadline => CloseCode::SlowConsumer,
    };
    // The close frame can only follow whole frames: give the write in
    // progress a moment to finish (a client that reads again gets the
    // code); one that still cannot is dropped without a close frame
    // rather than sent one in the middle of a frame.
    match tokio::time::timeout(WRITE_FINISH, &mut write).await {
        Ok(Ok(())) => Err(Ended::Close(code)),
        Ok(Err(_)) => Err(Ended::Gone),
        Err(_) => Err(Ended::Abandoned(code)),
    }
}

fn flush_batch(node: &Arc<Node>, batch: &mut Vec<Bytes>, bytes: &mut usize, out: &mut Vec<Bytes>) {
    match batch.len() {
        0 => {}
        1 => out.append(batch),
        _ => match node.batch_codec.encode_batch(batch) {
            Ok(frame) => {
                out.push(frame);
                batch.clear();
            }
            // Cannot happen for frames this node encoded; send them singly.
            Err(_) => out.append(batch),
        },
    }
    *bytes = 0;
}

fn count_in(node: &Node, data: &[u8]) {
    node.metrics.bytes_in.inc_by(data.len() as u64);
    node.metrics.frame_in(data.first().copied().unwrap_or(0));
}

fn count_out(node: &Node, frame: &Bytes) {
    node.metrics.bytes_out.inc_by(frame.len() as u64);
}

/// Writes binary messages straight to the socket, one vectored write for
/// many frames, without copying payloads into tungstenite's write buffer
/// (which would keep the capacity of the largest write forever — a
/// burst would leave every idle connection holding kilobytes).
///
/// Safe to interleave with tungstenite: its own pending output (a pong,
/// say) is flushed first, so frames never interleave mid-frame, and the
/// task never polls a read concurrently with this write.
async fn write_direct(ws: &mut Ws, messages: &[Bytes]) -> Result<(), WsError> {
    use std::io::IoSlice;
    use tokio::io::AsyncWriteExt;
    ws.flush().await?;
    let io = ws.get_mut();
    // Header and payload slices live on the stack, a few messages per
    // system call: a delivery allocates nothing here.
    for chunk in messages.chunks(WRITE_CHUNK) {
        let mut headers = [([0u8; 10], 0usize); WRITE_CHUNK];
        for (h, m) in headers.iter_mut().zip(chunk) {
            *h = frame_header(m.len());
        }
        let mut slices = [IoSlice::new(&[]); 2 * WRITE_CHUNK];
        for (i, (m, (h, n))) in chunk.iter().zip(&headers).enumerate() {
            slices[2 * i] = IoSlice::new(&h[..*n]);
            slices[2 * i + 1] = IoSlice::new(m);
        }
        let mut rest: &mut [IoSlice<'_>] = &mut slices[..2 * chunk.len()];
        while !rest.is_empty() {
            let n = io.write_vectored(rest).await.map_err(WsError::Io)?;
            if n == 0 {
                return Err(WsError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
    }
    io.flush().await.map_err(WsError::Io)
}

/// RFC 6455 header of an unmasked, final, binary frame of `len` bytes.
fn frame_header(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x82;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

fn ws_error(e: WsError) -> Ended {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        // A dropped TCP connection is not the client misbehaving.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Ended::Gone,
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Ended::Close(CloseCode::FrameTooLarge)
        }
        WsError::Capacity(_) => Ended::Close(CloseCode::FrameTooLarge),
        WsError::Protocol(_) | WsError::Utf8(_) => Ended::Close(CloseCode::ProtocolViolation),
        _ => Ended::Gone,
    }
}

/// Ends the WebSocket the way `end` says.
async fn finish(node: &Node, ws: &mut Ws, end: Ended, reason: Option<String>) {
    match end {
        Ended::Close(code) => close(node, ws, code, reason).await,
        // tungstenite queued the echo of the peer's Close; send it.
        Ended::PeerClosed => {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.flush()).await;
        }
        Ended::Gone => {}
        Ended::Abandoned(code) => {
            node.metrics.close(code);
            if code == CloseCode::SlowConsumer {
                node.metrics.slow_consumers.inc();
            }
        }
    }
}

/// Sends the close frame (bounded in time: the peer may not be reading).
async fn close(node: &Node, ws: &mut Ws, code: CloseCode, reason: Option<String>) {
    node.metrics.close(code);
    if code == CloseCode::SlowConsumer {
        node.metrics.slow_consumers.inc();
    }
    let frame = CloseFrame {
        code: WsCloseCode::from(code.code()),
        reason: reason.unwrap_or_else(|| code.reason().to_owned()).into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
}
