//! The removal log under pressure, held at exact points with a gated
//! store: streams lost while a join is in flight, more removals than the
//! log keeps while a resume or join opens, a re-check that must not lose
//! events, and a Redis generation that must never repeat. Each case
//! failed on the code before its fix.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod common;

use common::hooked::{Hook, Hooked};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore};

use chatgate_fanout::LocalDelivery;
use chatgate_gateway::auth::{Claims, unix_now};
use chatgate_gateway::outbox::Outbox;
use chatgate_gateway::session::Session;
use chatgate_gateway::{Config, Node};
use chatgate_protocol::payload::{Identify, Resume, RoomPosition, Rooms};
use chatgate_protocol::{ClientFrame, ServerFrame};
use chatgate_storage::*;

/// A memory store whose memberships / grant / join calls can be held at a
/// gate (after reading), to widen a window deterministically.
struct Gate {
    hold_memberships: AtomicBool,
    hold_grant: AtomicBool,
    hold_join: AtomicBool,
    entered: Notify,
    gate: Semaphore,
}

type Gated = Hooked<Gate>;

fn gated() -> Arc<Gated> {
    Hooked::new(Gate {
        hold_memberships: AtomicBool::new(false),
        hold_grant: AtomicBool::new(false),
        hold_join: AtomicBool::new(false),
        entered: Notify::new(),
        gate: Semaphore::new(0),
    })
}

impl Gate {
    async fn hold(&self, flag: &AtomicBool) {
        if flag.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.gate.acquire().await.unwrap().forget();
        }
    }
}

#[async_trait]
impl Hook for Gate {
    async fn after_memberships(&self) {
        self.hold(&self.hold_memberships).await;
    }
    async fn after_grant(&self) {
        self.hold(&self.hold_grant).await;
    }
    async fn after_join(&self) {
        self.hold(&self.hold_join).await;
    }
}

fn member(user: &str) -> Member {
    Member {
        user_id: user.into(),
        role: "member".into(),
        since_ms: 0,
    }
}

async fn node(store: Arc<dyn Store>) -> Arc<Node> {
    Node::with_store(Config::default(), store).await.unwrap()
}

fn identify(node: &Node, user: &str, resume: Option<Resume>) -> Identify {
    let token = node.verifier.mint(&Claims {
        sub: user.into(),
        name: None,
        picture: None,
        exp: unix_now() + 3600,
        rooms: vec![],
    });
    Identify { token, resume }
}

fn drain(node: &Node, session: &mut Session, outbox: &Outbox) -> Vec<ServerFrame> {
    let mut queued = Vec::new();
    let _ = outbox.drain(&mut queued, usize::MAX);
    queued
        .into_iter()
        .filter(|f| session.should_deliver(f))
        .map(|f| node.codec.decode_server(&f).unwrap().1)
        .collect()
}

/// Removals of OTHER users in OTHER rooms, enough to overflow the hub's
/// removal log (4096 entries), while alice's resume is in flight: she is
/// told she left a room she is still granted, and Ready omits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_removal_log_does_not_evict_an_innocent_resume() {
    let store = gated();
    let node = node(store.clone()).await;
    store
        .add_members("team:a", &[member("alice")])
        .await
        .unwrap();
    store.join("alice", &["team:a".into()]).await.unwrap();
    let resume = Resume {
        session_id: [0; 16],
        positions: vec![RoomPosition {
            room: "team:a".into(),
            epoch: 0,
            seq: 0,
        }],
    };
    store.hold_memberships.store(true, Ordering::SeqCst);
    let outbox = Arc::new(Outbox::new(1024, 1 << 22));
    let open = Session::open(
        node.clone(),
        node.next_conn_id(),
        outbox.clone(),
        1,
        identify(&node, "alice", Some(resume)),
    );
    let other = async {
        store.entered.notified().await;
        for i in 0..4097 {
            node.hub
                .remove_from_room(&format!("other:{i}"), Some(&["bob".to_string()]));
        }
        store.gate.add_permits(1);
    };
    let (opened, ()) = tokio::join!(open, other);
    let (_session, first) = opened.unwrap();
    let frames: Vec<ServerFrame> = first
        .iter()
        .map(|f| node.codec.decode_server(f).unwrap().1)
        .collect();
    println!("frames to alice: {frames:?}");
    let still_granted = store.grant("team:a", "alice").await.unwrap().is_some();
    let ready_rooms = match &frames[0] {
        ServerFrame::Ready(r) => r.rooms.iter().map(|p| p.room.clone()).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let told_left = frames
        .iter()
        .any(|f| matches!(f, ServerFrame::Left(l) if l.rooms.contains(&"team:a".to_string())));
    assert!(still_granted);
    assert!(
        ready_rooms.contains(&"team:a".to_string()) && !told_left,
        "alice (still granted) was told Left(team:a): ready={ready_rooms:?} left={told_left}"
    );
}

/// Same overflow against a Join: refused Forbidden although granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_removal_log_does_not_refuse_an_innocent_join() {
    let store = gated();
    let node = node(store.clone()).await;
    let outbox = Arc::new(Outbox::new(1024, 1 << 22));
    let (mut session, _) = Session::open(
        node.clone(),
        node.next_conn_id(),
        outbox.clone(),
        1,
        identify(&node, "alice", None),
    )
    .await
    .unwrap();
    let _ = drain(&node, &mut session, &outbox);
    store
        .add_members("team:j", &[member("alice")])
        .await
        .unwrap();
    store.hold_grant.store(true, Ordering::SeqCst);
    let join = session.handle(
        7,
        ClientFrame::Join(Rooms {
            rooms: vec!["team:j".into()],
        }),
    );
    let other = async {
        store.entered.notified().await;
        println!("join holds in grant()");
        for i in 0..4097 {
            node.hub
                .remove_from_room(&format!("other:{i}"), Some(&["bob".to_string()]));
        }
        store.gate.add_permits(1);
    };
    let (r, ()) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(join, other) })
            .await
            .expect("the Join never answered");
    assert!(r.unwrap().is_none());
    let frames = drain(&node, &mut session, &outbox);
    println!("join answer: {frames:?}");
    assert!(
        frames.iter().any(|f| matches!(f, ServerFrame::Joined(_))),
        "a granted join was refused: {frames:?}"
    );
}

/// Streams lost (forget_all + every member closed 4005) while a Join that
/// read a stale grant is in flight: the Join completes after the sweep,
/// nothing is logged, and the connection stays in the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_in_flight_when_streams_are_lost_asks_again() {
    let store = gated();
    let node = node(store.clone()).await;
    store
        .add_members("team:s", &[member("mallory")])
        .await
        .unwrap();
    // The node cache holds mallory's grant.
    assert!(
        node.rooms
            .rights("team:s", "mallory", &[])
            .await
            .unwrap()
            .entry
            .is_some()
    );
    // The removal's control message is lost with the streams.
    store
        .remove_members("team:s", &["mallory".into()])
        .await
        .unwrap();
    let outbox = Arc::new(Outbox::new(1024, 1 << 22));
    let conn = node.next_conn_id();
    let (mut session, _) = Session::open(
        node.clone(),
        conn,
        outbox.clone(),
        1,
        identify(&node, "mallory", None),
    )
    .await
    .unwrap();
    let _ = drain(&node, &mut session, &outbox);
    store.hold_join.store(true, Ordering::SeqCst);
    let join = session.handle(
        7,
        ClientFrame::Join(Rooms {
            rooms: vec!["team:s".into()],
        }),
    );
    let lost = async {
        store.entered.notified().await;
        node.hub.streams_lost();
        store.gate.add_permits(1);
    };
    let (r, ()) = tokio::join!(join, lost);
    assert!(r.unwrap().is_none());
    let frames = drain(&node, &mut session, &outbox);
    println!(
        "join answer: {frames:?}, outbox closed: {:?}",
        outbox.closed()
    );
    let fresh = node.rooms.rights("team:s", "mallory", &[]).await.unwrap();
    assert!(fresh.entry.is_none(), "store says removed");
    assert!(
        !node.hub.is_member("team:s", conn) || outbox.closed().is_some(),
        "mallory is in team:s after streams_lost, with no grant: {frames:?}"
    );
}

/// Redis grant cache: the generation key expires (2 x TTL after the last
/// change) and INCR starts again at 1, so a fill that read "1" before the
/// expiry matches the "1" of the next change: the removed grant is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_grant_generation_never_repeats() {
    let store = gated();
    let mut config = CacheConfig::new(common::shared_redis_url());
    config.namespace = format!("rv2{:x}", rand::random::<u64>());
    config.ttl = Duration::from_secs(1);
    let ns = config.namespace.clone();
    let cached = Arc::new(CachedStore::connect(store.clone(), config).await.unwrap());
    let room = "team:aba";
    cached
        .add_members(room, &[member("mallory")])
        .await
        .unwrap(); // gen = 1, expires in 2 s
    let gen_key = format!("{ns}:{{r:{room}}}:gen");
    let redis = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", &common::shared_redis_url()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    println!(
        "gen={} pttl={}",
        redis(&["GET", &gen_key]),
        redis(&["PTTL", &gen_key])
    );
    // Wait until the key is about to expire, then start a read.
    while redis(&["PTTL", &gen_key]).parse::<i64>().unwrap() > 300 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.hold_grant.store(true, Ordering::SeqCst);
    let c1 = cached.clone();
    let read = tokio::spawn(async move { c1.grant(room, "mallory").await });
    store.entered.notified().await; // gen "1" read, old grant read
    while redis(&["EXISTS", &gen_key]) != "0" {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cached
        .remove_members(room, &["mallory".into()])
        .await
        .unwrap();
    println!("after removal gen={}", redis(&["GET", &gen_key]));
    store.gate.add_permits(1);
    let _ = read.await.unwrap();
    let served = cached.grant(room, "mallory").await.unwrap();
    let db = store.inner.grant(room, "mallory").await.unwrap();
    for k in [gen_key.clone(), format!("{ns}:{{r:{room}}}:members")] {
        redis(&["DEL", &k]);
    }
    assert_eq!(db, None);
    assert_eq!(
        served, None,
        "Redis serves the removed grant after a gen ABA"
    );
}

/// When the log overflowed, the join leaves the hub, asks again and
/// rejoins; the position it tells is read after that, so an event
/// published while it was out is either counted in the position or
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rechecked_join_loses_no_event_after_its_position() {
    use chatgate_fanout::RoomEvent;
    let store = gated();
    let node = node(store.clone()).await;
    let outbox = Arc::new(Outbox::new(1024, 1 << 22));
    let (mut session, _) = Session::open(
        node.clone(),
        node.next_conn_id(),
        outbox.clone(),
        1,
        identify(&node, "alice", None),
    )
    .await
    .unwrap();
    let _ = drain(&node, &mut session, &outbox);
    store
        .add_members("team:g", &[member("alice")])
        .await
        .unwrap();
    store.hold_grant.store(true, Ordering::SeqCst);
    let join = session.handle(
        7,
        ClientFrame::Join(Rooms {
            rooms: vec!["team:g".into()],
        }),
    );
    let other = async {
        store.entered.notified().await;
        // Some unrelated grant change: the first answer is not cached.
        node.hub
            .control(br#"{"t":"members","room":"x","changed":["zed"]}"#);
        for i in 0..4097 {
            node.hub
                .remove_from_room(&format!("other:{i}"), Some(&["bob".to_string()]));
        }
        store.hold_grant.store(true, Ordering::SeqCst);
        store.gate.add_permits(1);
        // Held again: settle's second question.
        store.entered.notified().await;
        let msg = NewMessage {
            room: "team:g".into(),
            sender_id: "bob".into(),
            sender_name: "bob".into(),
            sender_image: String::new(),
            client_msg_id: "m1".into(),
            body: "while alice re-asks".into(),
            attachments: vec![],
        };
        let p = node
            .fanout
            .publish("team:g", RoomEvent::Message(msg.stored(1, 1)), None, None)
            .await
            .unwrap();
        println!("published at {:?}", p.position);
        store.gate.add_permits(1);
    };
    let (r, ()) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(join, other) })
            .await
            .expect("the Join never answered");
    assert!(r.unwrap().is_none());
    let frames = drain(&node, &mut session, &outbox);
    println!("alice got: {frames:?}");
    let joined_at = frames.iter().find_map(|f| match f {
        ServerFrame::Joined(j) => j.rooms.first().map(|p| p.seq),
        _ => None,
    });
    let got_msg = frames
        .iter()
        .any(|f| matches!(f, ServerFrame::NewMessage(_)));
    // The message is seq 1: counted in a Joined at 1, delivered after a
    // Joined at 0.
    assert!(
        joined_at.is_none() || joined_at == Some(1) || got_msg,
        "Joined at seq {joined_at:?} but the message published after it never arrives"
    );
}
