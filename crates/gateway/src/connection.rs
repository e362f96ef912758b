//! The per-connection task: frames in, frames out, nothing else.
//!
//! One task per WebSocket. It waits for Identify (within the connect
//! timeout), then loops over: the next client frame, the outbox having
//! something to write, storage-bound requests finishing, the heartbeat
//! deadline, and shutdown. Decoding and the request rules live in
//! [`crate::session`]; this file only frames, dispatches and closes with
//! the right code.

use std::sync::Arc;
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

use crate::node::Node;
use crate::outbox::Outbox;
use crate::session::{Pending, Session};

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Storage-bound requests one connection may have running at once; past
/// it the connection stops reading (backpressure on the client).
const MAX_IN_FLIGHT: usize = 32;
/// Frames moved from the outbox per wake-up.
const DRAIN_FRAMES: usize = 256;
/// Largest batch frame assembled from queued frames.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// How a read ended when it did not yield a frame.
enum Ended {
    /// Close with this code.
    Close(CloseCode),
    /// The peer closed or the socket failed; nothing more to say.
    Gone,
}

/// Serves one upgraded WebSocket until it closes.
pub async fn serve(node: Arc<Node>, mut ws: Ws, mut shutdown: watch::Receiver<bool>) {
    node.metrics.connections.inc();
    node.metrics.connections_total.inc();
    let conn = node.next_conn_id();
    let outbox = Arc::new(Outbox::new(
        node.config.outbound_queue_frames,
        node.config.outbound_queue_bytes,
    ));

    let opened = tokio::select! {
        r = tokio::time::timeout(node.config.connect_timeout, identify(&node, &mut ws, conn, &outbox)) => {
            r.unwrap_or(Err(Ended::Close(CloseCode::IdentifyTimeout)))
        }
        _ = shutdown.changed() => Err(Ended::Close(CloseCode::ShuttingDown)),
    };
    match opened {
        Ok(mut session) => {
            let end = run(&node, &mut ws, &mut session, &outbox, &mut shutdown).await;
            if let Ended::Close(code) = end {
                close(&node, &mut ws, code).await;
            }
            drop(session);
        }
        Err(Ended::Close(code)) => close(&node, &mut ws, code).await,
        Err(Ended::Gone) => {}
    }
    node.metrics.connections.dec();
}

/// Reads the first frame, which must be Identify, and opens the session.
async fn identify(
    node: &Arc<Node>,
    ws: &mut Ws,
    conn: u64,
    outbox: &Arc<Outbox>,
) -> Result<Session, Ended> {
    let data = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => break data,
            Some(Ok(Message::Text(_))) => return Err(Ended::Close(CloseCode::TextFrame)),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | None => return Err(Ended::Gone),
            Some(Err(e)) => return Err(ws_error(e)),
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
    if ClientFrame::Identify(identify.clone()).validate().is_err() {
        return Err(Ended::Close(CloseCode::InvalidToken));
    }
    let (session, first) = Session::open(node.clone(), conn, outbox.clone(), rid, identify)
        .await
        .map_err(Ended::Close)?;
    for frame in first {
        count_out(node, &frame);
        node.metrics.frame_out(frame[0]);
        ws.feed(Message::Binary(frame))
            .await
            .map_err(|_| Ended::Gone)?;
    }
    ws.flush().await.map_err(|_| Ended::Gone)?;
    Ok(session)
}

/// The identified session's loop.
async fn run(
    node: &Arc<Node>,
    ws: &mut Ws,
    session: &mut Session,
    outbox: &Arc<Outbox>,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let mut in_flight: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut queued: Vec<(Bytes, Instant)> = Vec::new();
    let silence_limit = node.config.heartbeat_interval + node.config.heartbeat_timeout;
    let mut last_seen = Instant::now();
    let heartbeat = tokio::time::sleep(silence_limit);
    tokio::pin!(heartbeat);

    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ended::Close(CloseCode::ShuttingDown),
            _ = outbox.wait() => {
                // Drain until the queue is seen empty: a wake-up consumed
                // while writing must not leave frames stranded (pushes
                // only notify on the empty -> non-empty transition).
                loop {
                    if let Err(code) = outbox.drain(&mut queued, DRAIN_FRAMES) {
                        return Ended::Close(code);
                    }
                    if queued.is_empty() {
                        break;
                    }
                    if let Err(end) = write_queued(node, ws, session, outbox, &mut queued).await {
                        return end;
                    }
                }
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            msg = ws.next(), if in_flight.len() < MAX_IN_FLIGHT => {
                last_seen = Instant::now();
                let data = match msg {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Text(_))) => return Ended::Close(CloseCode::TextFrame),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => return Ended::Gone,
                    Some(Err(e)) => return ws_error(e),
                };
                count_in(node, &data);
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
                match session.handle(rid, frame).await {
                    Ok(Some(pending)) => in_flight.push(pending),
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

/// Writes drained frames: consecutive uncompressed frames travel as one
/// Batch message, compressed ones alone (the protocol keeps batch members
/// uncompressed, and re-compressing per recipient is what we avoid).
async fn write_queued(
    node: &Arc<Node>,
    ws: &mut Ws,
    session: &mut Session,
    outbox: &Arc<Outbox>,
    queued: &mut Vec<(Bytes, Instant)>,
) -> Result<(), Ended> {
    if let Some((_, oldest)) = queued.first() {
        node.metrics
            .delivery_latency
            .observe(oldest.elapsed().as_secs_f64());
    }
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_bytes = 0;
    let mut messages: Vec<Bytes> = Vec::new();
    for (frame, _) in queued.drain(..) {
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
    // A client that stops reading blocks this write; the outbox closing
    // (slow consumer) or the write timeout ends it.
    let limit = node.config.heartbeat_timeout;
    let write = async {
        for frame in messages {
            count_out(node, &frame);
            ws.feed(Message::Binary(frame)).await?;
        }
        ws.flush().await
    };
    tokio::pin!(write);
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = &mut write => return r.map_err(|_| Ended::Gone),
            _ = outbox.wait() => {
                if let Some(code) = outbox.closed() {
                    return Err(Ended::Close(code));
                }
            }
            _ = &mut deadline => return Err(Ended::Close(CloseCode::SlowConsumer)),
        }
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

fn ws_error(e: WsError) -> Ended {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Ended::Close(CloseCode::FrameTooLarge)
        }
        WsError::Capacity(_) => Ended::Close(CloseCode::FrameTooLarge),
        WsError::Protocol(_) | WsError::Utf8(_) => Ended::Close(CloseCode::ProtocolViolation),
        _ => Ended::Gone,
    }
}

/// Sends the close frame (bounded in time: the peer may not be reading).
async fn close(node: &Node, ws: &mut Ws, code: CloseCode) {
    node.metrics.close(code);
    if code == CloseCode::SlowConsumer {
        node.metrics.slow_consumers.inc();
    }
    let frame = CloseFrame {
        code: WsCloseCode::from(code.code()),
        reason: code.reason().into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
}
