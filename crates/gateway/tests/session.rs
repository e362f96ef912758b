//! The session rules in process, without sockets: a real node (in-memory
//! store, local fan-out) whose store can be held at a chosen step or fail
//! and whose fan-out can fail on demand, and sessions driven through
//! `Session::handle` with their outboxes read directly. Races that need
//! luck over the network are set up here step by step.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Semaphore;

use chatgate_fanout::{
    Fanout, FanoutError, LocalFanout, LocalFanoutConfig, OnSequenced, Position, Published, Replay,
    RoomEvent,
};

use chatgate_gateway::auth::{Claims, unix_now};
use chatgate_gateway::outbox::Outbox;
use chatgate_gateway::session::{Pending, Session};
use chatgate_gateway::{Config, Node};
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ServerFrame};
use chatgate_storage::{MemoryStore, Store, StoreError};
use common::hooked::{Hook, Hooked};

/// The in-memory store, with `set_seq` held until the test lets it go,
/// and inserts that fail on demand.
struct Held {
    set_seq_gate: Semaphore,
    set_seqs: AtomicUsize,
    fail_inserts: AtomicBool,
}

type HeldStore = Hooked<Held>;

fn held_store() -> Arc<HeldStore> {
    Hooked::new(Held {
        set_seq_gate: Semaphore::new(0),
        set_seqs: AtomicUsize::new(0),
        fail_inserts: AtomicBool::new(false),
    })
}

#[async_trait]
impl Hook for Held {
    async fn before_insert(&self) -> Result<(), StoreError> {
        if self.fail_inserts.load(Ordering::SeqCst) {
            return Err(StoreError::Internal("injected".into()));
        }
        Ok(())
    }
    async fn before_set_seq(&self) {
        let permit = self.set_seq_gate.acquire().await.unwrap();
        permit.forget();
    }
    fn after_set_seq(&self) {
        self.set_seqs.fetch_add(1, Ordering::SeqCst);
    }
}

struct Client {
    session: Session,
    outbox: Arc<Outbox>,
    node: Arc<Node>,
}

impl Client {
    async fn open(node: &Arc<Node>, user: &str) -> Client {
        Client::resume(node, user, None).await.0
    }

    /// Opens a session (resuming when `resume` is given); also returns
    /// the frames written before anything queued: Ready, replay, Resumed.
    async fn resume(
        node: &Arc<Node>,
        user: &str,
        resume: Option<Resume>,
    ) -> (Client, Vec<ServerFrame>) {
        let outbox = Arc::new(Outbox::new(1024, 1 << 22));
        let token = node.verifier.mint(&Claims {
            sub: user.into(),
            name: None,
            picture: None,
            exp: unix_now() + 3600,
            rooms: vec!["*".into()],
        });
        let identify = Identify { token, resume };
        let (session, first) = Session::open(
            node.clone(),
            node.next_conn_id(),
            outbox.clone(),
            1,
            identify,
        )
        .await
        .unwrap();
        let first = first
            .iter()
            .flat_map(|f| node.codec.decode_server_all(f).unwrap())
            .map(|(_, f)| f)
            .collect();
        let client = Client {
            session,
            outbox,
            node: node.clone(),
        };
        (client, first)
    }

    /// Everything queued, still encoded (to compare buffers).
    fn raw_written(&mut self) -> Vec<bytes::Bytes> {
        let mut queued = Vec::new();
        self.outbox.drain(&mut queued, usize::MAX).unwrap();
        queued
    }

    async fn request(&mut self, rid: u32, frame: ClientFrame) -> Option<Pending> {
        self.session.handle(rid, frame).await.unwrap()
    }

    /// Handles a request and runs it to its end.
    async fn run(&mut self, rid: u32, frame: ClientFrame) {
        if let Some(p) = self.request(rid, frame).await {
            p.await;
        }
    }

    async fn join(&mut self, room: &str) {
        let join = ClientFrame::Join(Rooms {
            rooms: vec![room.into()],
        });
        assert!(self.request(2, join).await.is_none());
    }

    /// Everything queued, as the socket loop would write it (frames the
    /// session says not to deliver are left out).
    fn written(&mut self) -> Vec<ServerFrame> {
        let mut queued = Vec::new();
        self.outbox.drain(&mut queued, usize::MAX).unwrap();
        queued
            .into_iter()
            .filter(|f| self.session.should_deliver(f))
            .map(|f| self.node.codec.decode_server(&f).unwrap().1)
            .collect()
    }
}

fn send(cid: &str) -> ClientFrame {
    ClientFrame::Send(Send {
        room: "r".into(),
        client_msg_id: cid.into(),
        body: "hello".into(),
        attachments: vec![],
    })
}

async fn node(store: Arc<dyn Store>) -> Arc<Node> {
    node_with(store, |_| {}).await
}

async fn node_with(store: Arc<dyn Store>, tune: impl FnOnce(&mut Config)) -> Arc<Node> {
    let mut config = Config {
        messages_per_minute: 100_000,
        ..Config::default()
    };
    tune(&mut config);
    Node::with_store(config, store).await.unwrap()
}

fn error_code(f: &ServerFrame) -> Option<u16> {
    match f {
        ServerFrame::Error(e) => Some(e.code),
        _ => None,
    }
}

/// The connection of a sender closes after its message was published and
/// before the position was recorded; the retry (same client message id)
/// must be answered as a duplicate, and nobody may receive it twice.
#[tokio::test]
async fn a_send_abandoned_between_publish_and_record_is_delivered_once() {
    let store = held_store();
    let node = node(store.clone()).await;
    let mut member = Client::open(&node, "member").await;
    member.join("r").await;
    let mut sender = Client::open(&node, "sender").await;
    sender.join("r").await;
    member.written();

    let mut pending = sender.request(10, send("c-1")).await.unwrap();
    // Run it until the member has the message: published, not recorded.
    let delivered = loop {
        assert!(futures_util::poll!(pending.as_mut()).is_pending());
        let got = member.written();
        if !got.is_empty() {
            break got;
        }
        tokio::task::yield_now().await;
    };
    assert!(matches!(&delivered[..], [ServerFrame::NewMessage(_)]));
    // The connection closes: its requests are dropped with it.
    drop(pending);
    drop(sender);
    store.set_seq_gate.add_permits(1);

    let mut again = Client::open(&node, "sender").await;
    again.join("r").await;
    let retry = again.request(11, send("c-1")).await.unwrap();
    store.set_seq_gate.add_permits(1);
    retry.await;
    let acks = again.written();
    let [_joined, ServerFrame::MessageSent(ack)] = &acks[..] else {
        panic!("expected Joined then MessageSent, got {acks:?}");
    };
    assert!(ack.duplicate, "the retry is a duplicate: {ack:?}");
    assert_eq!(ack.seq, 1);
    let more = member.written();
    assert!(more.is_empty(), "delivered twice: {more:?}");
    assert_eq!(store.set_seqs.load(Ordering::SeqCst), 1, "recorded once");
}

/// Events queued for a member are still written after it sends Join for
/// a room it is already in: the Join moves nothing.
#[tokio::test]
async fn a_join_of_a_joined_room_keeps_what_is_queued() {
    let node = node(Arc::new(MemoryStore::default())).await;
    let mut member = Client::open(&node, "member").await;
    member.join("r").await;
    assert_eq!(member.written().len(), 1, "Joined");
    let mut sender = Client::open(&node, "sender").await;
    sender.join("r").await;
    for i in 0..5 {
        let p = sender
            .request(10 + i, send(&format!("c-{i}")))
            .await
            .unwrap();
        p.await;
    }
    // Nothing written yet; the member joins "r" again.
    member.join("r").await;
    let frames = member.written();
    let seqs: Vec<u64> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::NewMessage(m) => Some(m.message.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "{frames:?}");
    assert!(
        matches!(frames.last(), Some(ServerFrame::Joined(j)) if j.rooms.is_empty()),
        "the Join is answered with no room newly joined: {frames:?}"
    );
}

/// PROTOCOL.md §9.4: request id 0 asks for no success reply, except
/// where the reply is something the client must not miss: a heartbeat's
/// answer and its own message's or reaction's position.
#[tokio::test]
async fn request_id_zero_still_gets_heartbeat_acks_and_positions() {
    let node = node(Arc::new(MemoryStore::default())).await;
    let mut c = Client::open(&node, "zero").await;
    c.join("r").await;
    c.written();
    assert!(c.request(0, ClientFrame::Heartbeat).await.is_none());
    c.request(0, send("z-1")).await.unwrap().await;
    let join = ClientFrame::Join(Rooms {
        rooms: vec!["other".into()],
    });
    assert!(c.request(0, join).await.is_none());
    let frames = c.written();
    assert!(
        matches!(
            &frames[..],
            [ServerFrame::HeartbeatAck(_), ServerFrame::MessageSent(m)] if m.seq == 1
        ),
        "{frames:?}"
    );
}

/// An idempotency key names one message: reusing it for another body is
/// refused, not acknowledged as the original (which would drop the text).
#[tokio::test]
async fn a_client_message_id_reused_for_another_body_is_refused() {
    let node = node(Arc::new(MemoryStore::default())).await;
    let mut c = Client::open(&node, "reuser").await;
    c.join("r").await;
    c.request(10, send("same")).await.unwrap().await;
    let other = ClientFrame::Send(Send {
        room: "r".into(),
        client_msg_id: "same".into(),
        body: "something else".into(),
        attachments: vec![],
    });
    c.request(11, other).await.unwrap().await;
    c.request(12, send("same")).await.unwrap().await;
    let frames = c.written();
    let [
        _joined,
        ServerFrame::MessageSent(first),
        ServerFrame::Error(refused),
        ServerFrame::MessageSent(retry),
    ] = &frames[..]
    else {
        panic!("{frames:?}");
    };
    assert_eq!(
        refused.code,
        chatgate_protocol::ErrorCode::InvalidRequest.code()
    );
    assert!(!first.duplicate && retry.duplicate);
    assert_eq!(first.message_id, retry.message_id);
}

/// A Join or Leave naming a room twice is answered with it once.
#[tokio::test]
async fn a_room_named_twice_is_answered_once() {
    let node = node(Arc::new(MemoryStore::default())).await;
    let mut c = Client::open(&node, "twice").await;
    let twice = vec!["a".to_string(), "b".into(), "a".into()];
    let join = ClientFrame::Join(Rooms {
        rooms: twice.clone(),
    });
    assert!(c.request(3, join).await.is_none());
    let leave = ClientFrame::Leave(Rooms { rooms: twice });
    assert!(c.request(4, leave).await.is_none());
    let frames = c.written();
    let [ServerFrame::Joined(j), ServerFrame::Left(l)] = &frames[..] else {
        panic!("{frames:?}");
    };
    let joined: Vec<&str> = j.rooms.iter().map(|r| r.room.as_str()).collect();
    assert_eq!(joined, ["a", "b"]);
    assert_eq!(l.rooms, ["a", "b"]);
}

/// The per-session room limit refuses the whole Join with
/// `too_many_rooms` and joins nothing.
#[tokio::test]
async fn joining_past_the_room_limit_is_too_many_rooms_and_joins_nothing() {
    let node = node_with(Arc::new(MemoryStore::default()), |c| {
        c.max_rooms_per_session = 2
    })
    .await;
    let mut c = Client::open(&node, "busy").await;
    c.join("a").await;
    let join = ClientFrame::Join(Rooms {
        rooms: vec!["b".into(), "c".into()],
    });
    assert!(c.request(3, join).await.is_none());
    let typing = ClientFrame::Typing(Typing { room: "b".into() });
    assert!(c.request(4, typing).await.is_none());
    let frames = c.written();
    let codes: Vec<Option<u16>> = frames.iter().map(error_code).collect();
    assert_eq!(
        codes,
        [
            None,
            Some(chatgate_protocol::ErrorCode::TooManyRooms.code()),
            Some(chatgate_protocol::ErrorCode::NotInRoom.code())
        ],
        "{frames:?}"
    );
}

/// A store failure that is not an outage is `internal` (retryable), and
/// the retry works.
#[tokio::test]
async fn a_store_failure_is_internal_and_the_session_goes_on() {
    let store = held_store();
    let node = node(store.clone()).await;
    let mut c = Client::open(&node, "unlucky").await;
    c.join("r").await;
    c.written();
    store.fail_inserts.store(true, Ordering::SeqCst);
    c.request(5, send("i-1")).await.unwrap().await;
    store.fail_inserts.store(false, Ordering::SeqCst);
    store.set_seq_gate.add_permits(1);
    c.request(6, send("i-1")).await.unwrap().await;
    let frames = c.written();
    assert_eq!(
        error_code(&frames[0]),
        Some(chatgate_protocol::ErrorCode::Internal.code()),
        "{frames:?}"
    );
    assert!(matches!(&frames[1], ServerFrame::MessageSent(m) if !m.duplicate && m.seq == 1));
}

/// Encode once per broadcast: every member's queue holds the same
/// buffer, not a copy encoded for it.
#[tokio::test]
async fn a_broadcast_is_encoded_once_for_all_members() {
    let node = node(Arc::new(MemoryStore::default())).await;
    let mut members = Vec::new();
    for i in 0..3 {
        let mut m = Client::open(&node, &format!("m{i}")).await;
        m.join("r").await;
        m.written();
        members.push(m);
    }
    let mut sender = Client::open(&node, "s").await;
    sender.join("r").await;
    let frame = ClientFrame::Send(Send {
        room: "r".into(),
        client_msg_id: "e-1".into(),
        // Above the compression threshold: the costly case.
        body: "chat ".repeat(800),
        attachments: vec![],
    });
    sender.request(7, frame).await.unwrap().await;
    let got: Vec<bytes::Bytes> = members
        .iter_mut()
        .map(|m| {
            let mut w = m.raw_written();
            assert_eq!(w.len(), 1);
            w.remove(0)
        })
        .collect();
    assert!(got[0][1] & 1 == 1, "the event is compressed");
    assert!(
        got.windows(2).all(|w| w[0].as_ptr() == w[1].as_ptr()),
        "one buffer shared by every member"
    );
}

/// A resume replays stored events only (typing never), and past the
/// recovery window says `recovered = false` instead of a silent gap.
#[tokio::test]
async fn a_resume_replays_stored_events_only_and_admits_what_it_cannot() {
    for window in [
        std::time::Duration::from_secs(120),
        std::time::Duration::ZERO,
    ] {
        let node = node_with(Arc::new(MemoryStore::default()), |c| {
            c.recovery_window = window
        })
        .await;
        let mut member = Client::open(&node, "away").await;
        member.join("r").await;
        let start = match &member.written()[..] {
            [ServerFrame::Joined(j)] => j.rooms[0].clone(),
            other => panic!("{other:?}"),
        };
        drop(member);
        let mut other = Client::open(&node, "here").await;
        other.join("r").await;
        let typing = ClientFrame::Typing(Typing { room: "r".into() });
        assert!(other.request(8, typing).await.is_none());
        other.request(9, send("t-1")).await.unwrap().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let resume = Resume {
            session_id: [0; 16],
            positions: vec![start.clone()],
        };
        let (_back, first) = Client::resume(&node, "away", Some(resume)).await;
        let kinds: Vec<&str> = first
            .iter()
            .map(|f| match f {
                ServerFrame::Ready(_) => "ready",
                ServerFrame::NewMessage(_) => "message",
                ServerFrame::UserTyping(_) => "typing",
                ServerFrame::Resumed(r) if r.rooms[0].recovered => "recovered",
                ServerFrame::Resumed(_) => "not recovered",
                _ => "other",
            })
            .collect();
        if window.is_zero() {
            assert_eq!(kinds, ["ready", "not recovered"], "window {window:?}");
        } else {
            assert_eq!(
                kinds,
                ["ready", "message", "recovered"],
                "window {window:?}"
            );
        }
    }
}

/// The same message sent on two connections at once (a retry racing
/// the first attempt): the second waits for the first and is answered
/// as its duplicate, instead of being refused as `unavailable`.
#[tokio::test]
async fn a_retry_racing_the_first_attempt_waits_and_is_its_duplicate() {
    let store = held_store();
    let node = node(store.clone()).await;
    let mut a = Client::open(&node, "twin").await;
    a.join("r").await;
    let mut b = Client::open(&node, "twin").await;
    b.join("r").await;
    a.written();
    b.written();
    let first = tokio::spawn(a.request(20, send("race")).await.unwrap());
    // Published and acknowledged; its position is not recorded yet, so
    // the first attempt still holds the message.
    let acked = loop {
        let w = a.written();
        if !w.is_empty() {
            break w;
        }
        tokio::task::yield_now().await;
    };
    assert!(matches!(&acked[..], [ServerFrame::MessageSent(m)] if !m.duplicate));
    let second = tokio::spawn(b.request(21, send("race")).await.unwrap());
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    // The user's other connection has the message as an event, and no
    // answer to its retry yet.
    let early = b.written();
    assert!(
        matches!(&early[..], [ServerFrame::NewMessage(_)]),
        "the retry waits for the first attempt: {early:?}"
    );
    store.set_seq_gate.add_permits(2);
    first.await.unwrap();
    second.await.unwrap();
    let answer = b.written();
    assert!(
        matches!(&answer[..], [ServerFrame::MessageSent(m)] if m.duplicate && m.seq == 1),
        "{answer:?}"
    );
}

/// The local fan-out with injectable faults: the next publish fails
/// before doing anything (Redis refused the connection), and `position`
/// fails while `fail_position` is set.
struct FlakyFanout {
    inner: LocalFanout,
    fail_next_publish: AtomicBool,
    fail_position: AtomicBool,
}

#[async_trait]
impl Fanout for FlakyFanout {
    fn engine(&self) -> &'static str {
        "flaky"
    }
    async fn publish(
        &self,
        room: &str,
        event: RoomEvent,
        exclude: Option<u64>,
        on_sequenced: Option<OnSequenced>,
    ) -> Result<Published, FanoutError> {
        if self.fail_next_publish.swap(false, Ordering::SeqCst) {
            return Err(FanoutError::Unavailable("injected".into()));
        }
        self.inner.publish(room, event, exclude, on_sequenced).await
    }
    async fn publish_ephemeral(
        &self,
        room: &str,
        frame: Bytes,
        exclude: Option<u64>,
    ) -> Result<(), FanoutError> {
        self.inner.publish_ephemeral(room, frame, exclude).await
    }
    async fn control(&self, key: &str, payload: Bytes) -> Result<(), FanoutError> {
        self.inner.control(key, payload).await
    }
    async fn forget_room(&self, room: &str) -> Result<(), FanoutError> {
        self.inner.forget_room(room).await
    }
    async fn position(&self, room: &str) -> Result<Position, FanoutError> {
        if self.fail_position.load(Ordering::SeqCst) {
            return Err(FanoutError::Unavailable("injected".into()));
        }
        self.inner.position(room).await
    }
    async fn replay(
        &self,
        room: &str,
        since: Position,
        limit: usize,
    ) -> Result<Replay, FanoutError> {
        self.inner.replay(room, since, limit).await
    }
    fn maintain(&self) {
        self.inner.maintain()
    }
}

/// A node whose fan-out is a [`FlakyFanout`] around the local one.
async fn flaky_node(store: Arc<dyn Store>) -> (Arc<Node>, Arc<FlakyFanout>) {
    let mut node = node_with(store, |_| {}).await;
    let n = Arc::get_mut(&mut node).expect("sole owner");
    let flaky = Arc::new(FlakyFanout {
        inner: LocalFanout::new(n.codec, LocalFanoutConfig::default(), n.hub.clone()),
        fail_next_publish: AtomicBool::new(false),
        fail_position: AtomicBool::new(false),
    });
    n.fanout = flaky.clone();
    (node, flaky)
}

/// Promise: an acknowledged change reaches every member.
///
/// A reaction is stored, then its publish fails (Redis briefly refused):
/// the client is told `unavailable`, retry. Were the stored change kept,
/// the retry would find it `Unchanged`, answer Reacted with seq 0 and
/// publish nothing: no member would ever receive the reaction live.
#[tokio::test]
async fn a_reaction_whose_publish_failed_is_delivered_by_its_retry() {
    let (node, flaky) = flaky_node(Arc::new(MemoryStore::default())).await;
    let mut member = Client::open(&node, "member").await;
    member.join("r").await;
    let mut sender = Client::open(&node, "sender").await;
    sender.join("r").await;
    sender.run(10, send("m-1")).await;
    let id = match &sender.written()[..] {
        [_joined, ServerFrame::MessageSent(m)] => m.message_id,
        other => panic!("{other:?}"),
    };
    member.written();

    let react = || {
        ClientFrame::React(React {
            room: "r".into(),
            message_id: id,
            emoji: "+1".into(),
            remove: false,
        })
    };
    flaky.fail_next_publish.store(true, Ordering::SeqCst);
    sender.run(11, react()).await;
    sender.run(12, react()).await; // the retry the error asked for
    let answers = sender.written();
    let got = member.written();
    assert!(
        got.iter().any(|f| matches!(f, ServerFrame::Reaction(_))),
        "the reaction is stored and acknowledged ({answers:?}) but the member got {got:?}"
    );
}

/// Promise: Joined gives the starting position of every room the client
/// joins (a client needs it to apply §9.5).
///
/// A Join whose position lookup fails (fan-out unavailable) answers an
/// Error. Were the room left joined in the hub and the session, the retry
/// the error asks for would be answered with an empty Joined, and the
/// client would never learn a starting position for a room whose events
/// it receives.
#[tokio::test]
async fn a_join_that_failed_on_the_fanout_is_undone_and_its_retry_answers() {
    let (node, flaky) = flaky_node(Arc::new(MemoryStore::default())).await;
    let mut c = Client::open(&node, "joiner").await;
    flaky.fail_position.store(true, Ordering::SeqCst);
    c.join("r").await;
    flaky.fail_position.store(false, Ordering::SeqCst);
    c.join("r").await;
    let mut other = Client::open(&node, "other").await;
    other.join("r").await;
    other.run(9, send("o-1")).await;
    let frames = c.written();
    let joined_rooms: Vec<String> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Joined(j) => Some(j.rooms.iter().map(|r| r.room.clone())),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        joined_rooms.contains(&"r".to_string()),
        "the client got {frames:?}: an Error, then a Joined without the room, \
         then the room's events"
    );
}

/// SIGTERM drains: the listener stops, no more frames are read, requests
/// in flight finish and their acks are written, and only then do
/// sessions close with 4000; the server returns after that. Sends held
/// at their last step when shutdown begins are all acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_sends_before_closing() {
    use chatgate_client::{Incoming, RawConnection};
    let store = held_store();
    let node = node_with(store.clone(), |c| {
        c.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let server = chatgate_gateway::Server::bind(node.clone()).await.unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    let stop = server.shutdown_handle();
    let running = tokio::spawn(server.run());
    let mint = |user: &str| {
        node.verifier.mint(&Claims {
            sub: user.into(),
            name: None,
            picture: None,
            exp: unix_now() + 600,
            rooms: vec!["*".into()],
        })
    };
    let mut sender = RawConnection::connect(&url).await.unwrap();
    sender
        .send(
            1,
            &ClientFrame::Identify(Identify {
                token: mint("sender"),
                resume: None,
            }),
        )
        .await
        .unwrap();
    sender
        .send(
            2,
            &ClientFrame::Join(Rooms {
                rooms: vec!["r".into()],
            }),
        )
        .await
        .unwrap();
    for i in 0..10u32 {
        sender.send(10 + i, &send(&format!("d-{i}"))).await.unwrap();
    }
    // The first send is stored and held before its record; the rest wait
    // behind it, in order, all ten read by the server.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let read_all = || {
        node.metrics
            .render()
            .contains("chat_frames_in_total{opcode=\"send\"} 10")
    };
    while !read_all()
        || store
            .inner
            .history("r", None, 10, 0)
            .await
            .unwrap()
            .messages
            .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not all read and stored"
        );
        tokio::task::yield_now().await;
    }
    let mut frames = Vec::new();
    stop.shutdown();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "returned with sends in flight");
    store.set_seq_gate.add_permits(10);
    let close = loop {
        match sender
            .recv_timeout(std::time::Duration::from_secs(10))
            .await
            .unwrap()
        {
            Some(Incoming::Frames(f)) => frames.extend(f.into_iter().map(|(_, f)| f)),
            Some(Incoming::Closed(c)) => break c,
            None => panic!("no close"),
        }
    };
    let acks = frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::MessageSent(_)))
        .count();
    assert_eq!(acks, 10, "every send in flight acknowledged: {frames:?}");
    assert_eq!(close.map(|(code, _)| code), Some(4000));
    running.await.unwrap().unwrap();
    assert_eq!(
        store.set_seqs.load(Ordering::SeqCst),
        10,
        "every position recorded"
    );
}
