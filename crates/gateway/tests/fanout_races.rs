//! The Redis Streams fan-out against the local Redis, under races a
//! slow reader or a long gap creates (each test in its own namespace).
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;

use chatgate_fanout::{
    Fanout, LocalDelivery, OnSequenced, RedisFanoutConfig, RedisStreamsFanout, RoomEvent,
};
use chatgate_protocol::payload::Message;
use chatgate_protocol::{Codec, ServerFrame};

fn ns() -> String {
    format!("adv{:x}", rand::rng().random::<u64>())
}

fn message(room: &str, id: u64) -> RoomEvent {
    RoomEvent::Message(Message {
        id,
        room: room.into(),
        seq: 0,
        sender_id: format!("u{id}"),
        sender_name: "U".into(),
        sender_image: String::new(),
        client_msg_id: format!("c{id}"),
        body: "x".into(),
        attachments: vec![],
        reactions: vec![],
        created_at_ms: 1,
    })
}

fn seq_of(frame: &Bytes) -> u64 {
    match Codec::default().decode_server(frame).unwrap().1 {
        ServerFrame::NewMessage(m) => m.message.seq,
        other => panic!("{other:?}"),
    }
}

/// What connection 1 (the sender) would have queued, in order: events
/// not excluded for it, and its own acks.
struct SenderView {
    log: Arc<Mutex<Vec<String>>>,
}

impl LocalDelivery for SenderView {
    fn deliver(&self, _room: &str, frame: &Bytes, exclude: Option<u64>, _eph: bool) {
        if exclude != Some(1) {
            self.log.lock().push(format!("event {}", seq_of(frame)));
        }
    }
}

/// A loopback proxy to the local Redis that, while `slow` is set, holds
/// everything Redis sends on the connection that subscribes (the node's
/// live path) for a second: a subscriber connection that is
/// retransmitting, while the command connection is fine.
async fn slow_reader_proxy(slow: Arc<AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            let slow = slow.clone();
            tokio::spawn(async move {
                let outbound = tokio::net::TcpStream::connect("127.0.0.1:6379")
                    .await
                    .unwrap();
                let (mut ci, mut co) = inbound.into_split();
                let (mut si, mut so) = outbound.into_split();
                let reader = Arc::new(AtomicBool::new(false));
                let is_reader = reader.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match ci.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if buf[..n]
                            .windows(10)
                            .any(|w| w.eq_ignore_ascii_case(b"SSUBSCRIBE"))
                        {
                            is_reader.store(true, Ordering::SeqCst);
                        }
                        if so.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match si.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if reader.load(Ordering::SeqCst) && slow.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(1000)).await;
                    }
                    if co.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Promise: on one connection, every frame with a sequence number arrives
/// in increasing order (the sender's MessageSent takes its event's place).
///
/// When this node's live path is slower than `self_delivery_timeout` (5 s
/// by default; 300 ms here), the publisher returns without it; the ack
/// must still be queued by the live path in its place. Queued by the publisher,
/// it would overtake seq 1, which a client following §9.5 then drops as
/// "already seen": a silent loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_still_queues_the_ack_in_its_place() {
    let slow = Arc::new(AtomicBool::new(false));
    let port = slow_reader_proxy(slow.clone()).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::new(SenderView { log: log.clone() });
    let mut config = RedisFanoutConfig::new(format!("redis://127.0.0.1:{port}/0"), "n1");
    config.namespace = ns();
    config.partitions = 1;
    config.self_delivery_timeout = Duration::from_millis(300);
    let fanout = Arc::new(
        RedisStreamsFanout::connect(config, Codec::default(), sink.clone())
            .await
            .unwrap(),
    );
    // The sender's connection is a member here: the node listens.
    fanout.position("r").await.unwrap();
    slow.store(true, Ordering::SeqCst);
    // Someone else's message (connection 99), seq 1.
    let other = {
        let f = fanout.clone();
        tokio::spawn(async move { f.publish("r", message("r", 1), Some(99), None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Connection 1's message, seq 2, with its ack queued by OnSequenced.
    let ack: OnSequenced = {
        let log = log.clone();
        Box::new(move |p, dup| log.lock().push(format!("ack {} dup={dup}", p.seq)))
    };
    let t = std::time::Instant::now();
    let mine = fanout
        .publish("r", message("r", 2), Some(1), Some(ack))
        .await
        .unwrap();
    eprintln!(
        "publish took {:?}, read back: {}, log then: {:?}",
        t.elapsed(),
        !mine.frame.is_empty(),
        log.lock().clone()
    );
    assert_eq!(mine.position.seq, 2);
    other.await.unwrap().unwrap();
    slow.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let seen = log.lock().clone();
    eprintln!("sender view: {seen:?}");
    assert_eq!(
        seen,
        ["event 1", "ack 2 dup=false"],
        "the sender's connection got its ack before an earlier event"
    );
}

#[derive(Default)]
struct Recorder(Mutex<Vec<u64>>);

impl LocalDelivery for Recorder {
    fn deliver(&self, _room: &str, frame: &Bytes, _exclude: Option<u64>, _eph: bool) {
        self.0.lock().push(seq_of(frame));
    }
}

/// Promise: a resume "replays everything after the client's position ...
/// or says `recovered = false`" (ARCHITECTURE, No silent gap).
///
/// The recovery log is capped with `MAXLEN ~ max_log` (approximate: it
/// keeps whole stream nodes, so more than `max_log` entries), and
/// `replay` reads it with `COUNT max_log`. A position more than
/// `max_log` events back, whose next entry is still in the log, must not
/// get `Replay::Events` that stops short of the head: the session would
/// answer `recovered = true` with a position before the head, and the
/// events in between (published before the resume) would never follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_longer_than_the_log_read_is_not_called_recovered() {
    let mut config = RedisFanoutConfig::new("redis://127.0.0.1:6379/0", "n1");
    config.namespace = ns();
    config.partitions = 1;
    config.max_log = 5;
    let fanout =
        RedisStreamsFanout::connect(config, Codec::default(), Arc::new(Recorder::default()))
            .await
            .unwrap();
    let start = fanout.position("r").await.unwrap();
    for i in 1..=8 {
        fanout
            .publish("r", message("r", i), None, None)
            .await
            .unwrap();
    }
    let head = fanout.position("r").await.unwrap();
    match fanout.replay("r", start, usize::MAX).await.unwrap() {
        chatgate_fanout::Replay::Events { frames, position } => assert_eq!(
            position,
            head,
            "replay says it is complete with {} events, up to {position:?}; the head is {head:?}",
            frames.len()
        ),
        chatgate_fanout::Replay::NotRecoverable { .. } => {}
    }
}
