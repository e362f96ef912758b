//! The session rules driven in process (as in
//! tests/session.rs), with a store and a fan-out whose faults are chosen
//! by the test. Each test states the promise it attacks.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

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
use chatgate_storage::{MemoryStore, Store};

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
    async fn position(&self, room: &str) -> Result<Position, FanoutError> {
        if self.fail_position.load(Ordering::SeqCst) {
            return Err(FanoutError::Unavailable("injected".into()));
        }
        self.inner.position(room).await
    }
    async fn replay(&self, room: &str, since: Position) -> Result<Replay, FanoutError> {
        self.inner.replay(room, since).await
    }
    fn maintain(&self) {
        self.inner.maintain()
    }
}

async fn node_with(store: Arc<dyn Store>, tune: impl FnOnce(&mut Config)) -> Arc<Node> {
    let mut config = Config {
        messages_per_minute: 100_000,
        ..Config::default()
    };
    tune(&mut config);
    Node::with_store(config, store).await.unwrap()
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

struct Client {
    session: Session,
    outbox: Arc<Outbox>,
    node: Arc<Node>,
}

impl Client {
    async fn open(node: &Arc<Node>, user: &str) -> Client {
        let outbox = Arc::new(Outbox::new(4096, 1 << 24));
        let token = node.verifier.mint(&Claims {
            sub: user.into(),
            name: None,
            picture: None,
            exp: unix_now() + 3600,
        });
        let identify = Identify {
            token,
            resume: None,
        };
        let (session, _first) = Session::open(
            node.clone(),
            node.next_conn_id(),
            outbox.clone(),
            1,
            identify,
        )
        .await
        .unwrap();
        Client {
            session,
            outbox,
            node: node.clone(),
        }
    }

    async fn request(&mut self, rid: u32, frame: ClientFrame) -> Option<Pending> {
        self.session.handle(rid, frame).await.unwrap()
    }

    async fn run(&mut self, rid: u32, frame: ClientFrame) {
        if let Some(p) = self.request(rid, frame).await {
            p.await;
        }
    }

    async fn join(&mut self, room: &str) {
        let join = ClientFrame::Join(Rooms {
            rooms: vec![room.into()],
        });
        self.run(2, join).await;
    }

    fn written(&mut self) -> Vec<ServerFrame> {
        let mut queued = Vec::new();
        self.outbox.drain(&mut queued, usize::MAX).unwrap();
        queued
            .into_iter()
            .filter(|f| self.session.should_deliver(f))
            .flat_map(|f| self.node.codec.decode_server_all(&f).unwrap())
            .map(|(_, f)| f)
            .collect()
    }
}

fn send(cid: &str) -> ClientFrame {
    ClientFrame::Send(Send {
        room: "r".into(),
        client_msg_id: cid.into(),
        body: format!("body of {cid}"),
        attachments: vec![],
    })
}

/// Promise: an acknowledged change reaches every member.
///
/// A reaction is stored, then its publish fails (Redis briefly refused):
/// the client is told `unavailable`, retry. The retry finds the reaction
/// already stored (`Unchanged`), answers Reacted with seq 0 and publishes
/// nothing. No member ever receives the reaction live.
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
/// Error, but has already joined the hub and the session: the retry the
/// error asks for is answered with an empty Joined, so the client never
/// learns a starting position for a room whose events it receives.
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
