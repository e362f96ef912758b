//! RedisStreamsFanout against a real Redis (`CHAT_TEST_REDIS_URL`, default
//! the local one), each test in its own key namespace.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatgate_fanout::cluster::Cluster;
use chatgate_fanout::{
    Fanout, LocalDelivery, Position, RedisFanoutConfig, RedisStreamsFanout, Replay, RoomEvent,
};
use chatgate_protocol::payload::Message;
use chatgate_protocol::{Codec, ServerFrame};
use parking_lot::Mutex;
use rand::Rng;

fn redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

type Delivery = (String, Bytes, Option<u64>, bool);

/// What a node delivered; `.1` names the rooms with members here (`None`:
/// every room).
#[derive(Default)]
struct Recorder(Mutex<Vec<Delivery>>, Mutex<Option<Vec<String>>>);

impl LocalDelivery for Recorder {
    fn deliver(&self, room: &str, frame: &Bytes, exclude: Option<u64>, ephemeral: bool) {
        self.0
            .lock()
            .push((room.to_owned(), frame.clone(), exclude, ephemeral));
    }

    fn has_members(&self, room: &str) -> bool {
        self.1
            .lock()
            .as_ref()
            .is_none_or(|rooms| rooms.iter().any(|r| r == room))
    }
}

fn message(room: &str, id: u64, body: &str) -> RoomEvent {
    RoomEvent::Message(Message {
        id,
        room: room.into(),
        seq: 0,
        sender_id: "u".into(),
        sender_name: "U".into(),
        sender_image: String::new(),
        client_msg_id: format!("c{id}"),
        body: body.into(),
        attachments: vec![],
        reactions: vec![],
        created_at_ms: 1,
    })
}

async fn node(ns: &str, id: &str) -> (RedisStreamsFanout, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let mut config = RedisFanoutConfig::new(redis_url(), id);
    config.namespace = ns.into();
    config.partitions = 4;
    (
        RedisStreamsFanout::connect(config, Codec::default(), rec.clone())
            .await
            .unwrap(),
        rec,
    )
}

fn seqs(rec: &Recorder, room: &str) -> Vec<u64> {
    rec.0
        .lock()
        .iter()
        .filter(|d| d.0 == room)
        .map(|d| match Codec::default().decode_server(&d.1).unwrap().1 {
            ServerFrame::NewMessage(m) => m.message.seq,
            ServerFrame::Reaction(r) => r.seq,
            other => panic!("{other:?}"),
        })
        .collect()
}

async fn wait_for(what: &str, check: impl Fn() -> bool) {
    wait_for_within(what, Duration::from_secs(5), check).await
}

async fn wait_for_within(what: &str, limit: Duration, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn every_node_delivers_every_event_in_sequence_order() {
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let (a, rec_a) = node(&ns, "a").await;
    let (b, rec_b) = node(&ns, "b").await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    // Both have members in both rooms (the gateway reads the position
    // after adding a member: that is when a node starts listening).
    for f in [&a, &b] {
        for room in ["even", "odd"] {
            assert_eq!(f.position(room).await.unwrap().seq, 0);
        }
    }
    // Two nodes publish into the same rooms concurrently.
    let mut tasks = Vec::new();
    for (n, f) in [(0u64, a.clone()), (1, b.clone())] {
        tasks.push(tokio::spawn(async move {
            for i in 0..100u64 {
                let room = if i % 2 == 0 { "even" } else { "odd" };
                let p = f
                    .publish(room, message(room, n * 1000 + i, "x"), Some(7), None)
                    .await
                    .unwrap();
                assert!(p.position.seq >= 1);
                assert!(!p.frame.is_empty(), "publisher read its own event back");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for rec in [&rec_a, &rec_b] {
        wait_for("200 deliveries", || rec.0.lock().len() == 200).await;
        for room in ["even", "odd"] {
            assert_eq!(
                seqs(rec, room),
                (1..=100).collect::<Vec<_>>(),
                "room {room} order"
            );
        }
    }
    // The publisher excludes the sending connection; the other node
    // excludes no one (the connection is not there).
    let a_excl = rec_a.0.lock().iter().filter(|d| d.2 == Some(7)).count();
    let b_excl = rec_b.0.lock().iter().filter(|d| d.2 == Some(7)).count();
    assert_eq!(
        (a_excl, b_excl),
        (100, 100),
        "each node excludes only its own senders"
    );
    // Frames built by the Lua script decode to what the codec expects.
    let frame = rec_b.0.lock()[0].1.clone();
    let ServerFrame::NewMessage(m) = Codec::default().decode_server(&frame).unwrap().1 else {
        panic!()
    };
    let pos = a.position("even").await.unwrap();
    assert_eq!(m.epoch, pos.epoch);
    assert!(pos.epoch > 1_700_000_000_000, "epoch is Redis time in ms");
}

#[tokio::test]
async fn replay_returns_exactly_the_missed_events_or_says_it_cannot() {
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let (a, _rec) = node(&ns, "a").await;
    let start = a.position("r").await.unwrap();
    assert_eq!(start.seq, 0);
    for i in 0..300 {
        a.publish("r", message("r", i, &format!("m{i}")), None, None)
            .await
            .unwrap();
    }
    match a
        .replay(
            "r",
            Position {
                epoch: start.epoch,
                seq: 250,
            },
            usize::MAX,
        )
        .await
        .unwrap()
    {
        Replay::Events { frames, position } => {
            assert_eq!(frames.len(), 50);
            assert_eq!(position.seq, 300);
            let first = Codec::default().decode_server(&frames[0]).unwrap().1;
            assert!(
                matches!(first, ServerFrame::NewMessage(m) if m.message.seq == 251 && m.message.body == "m250")
            );
        }
        other => panic!("{other:?}"),
    }
    // More than the caller can take: not recovered, nothing read.
    let over = a
        .replay(
            "r",
            Position {
                epoch: start.epoch,
                seq: 250,
            },
            49,
        )
        .await
        .unwrap();
    assert!(matches!(over, Replay::NotRecoverable { current } if current.seq == 300));
    let up_to_date = a
        .replay(
            "r",
            Position {
                epoch: start.epoch,
                seq: 300,
            },
            usize::MAX,
        )
        .await
        .unwrap();
    assert!(matches!(up_to_date, Replay::Events { ref frames, .. } if frames.is_empty()));
    for bad in [
        Position {
            epoch: start.epoch + 1,
            seq: 10,
        },
        Position {
            epoch: start.epoch,
            seq: 301,
        },
    ] {
        assert!(
            matches!(
                a.replay("r", bad, usize::MAX).await.unwrap(),
                Replay::NotRecoverable { .. }
            ),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn cluster_limits_are_shared_by_nodes() {
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let (a, _) = node(&ns, "a").await;
    let (b, _) = node(&ns, "b").await;
    let ca = Cluster::new(a.client().clone(), &ns, "a");
    let cb = Cluster::new(b.client().clone(), &ns, "b");
    ca.heartbeat().await.unwrap();
    let live = cb.heartbeat().await.unwrap();
    assert_eq!(live.len(), 2, "{live:?}");
    ca.heartbeat().await.unwrap();
    for _ in 0..3 {
        assert!(ca.acquire_connection("u", 5).await.unwrap());
    }
    assert!(cb.acquire_connection("u", 5).await.unwrap());
    assert!(cb.acquire_connection("u", 5).await.unwrap());
    assert!(
        !ca.acquire_connection("u", 5).await.unwrap(),
        "sixth across nodes refused"
    );
    cb.release_connection("u").await.unwrap();
    assert!(ca.acquire_connection("u", 5).await.unwrap());
    // Shared rate bucket: four a minute, one token every 15 s.
    let started = std::time::Instant::now();
    for _ in 0..3 {
        assert!(ca.take_message("r", 4).await.unwrap().is_none());
    }
    assert!(cb.take_message("r", 4).await.unwrap().is_none());
    let wait = cb.take_message("r", 4).await.unwrap().unwrap();
    // The fifth waits for the token that began refilling at the first
    // take: 15 s less the time since (Redis counts whole milliseconds).
    // Bounds that follow the clock instead of assuming a fast machine.
    let since = started.elapsed();
    assert!(wait <= Duration::from_secs(15), "{wait:?}");
    assert!(
        wait + since + Duration::from_millis(2) >= Duration::from_secs(15),
        "waits {wait:?} after {since:?}: a bucket of 4 a minute refills one token in 15 s"
    );
}

#[tokio::test]
async fn equal_message_ids_from_different_nodes_are_different_events() {
    // Nodes with separate stores can hand out the same message id; only
    // the idempotency key (sender, client id) identifies a retry.
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let (a, rec) = node(&ns, "a").await;
    let (b, _) = node(&ns, "b").await;
    a.position("r").await.unwrap();
    let mut m1 = message("r", 5, "from a");
    let mut m2 = message("r", 5, "from b");
    if let (RoomEvent::Message(x), RoomEvent::Message(y)) = (&mut m1, &mut m2) {
        x.sender_id = "alice".into();
        y.sender_id = "bob".into();
    }
    let p1 = a.publish("r", m1.clone(), None, None).await.unwrap();
    let p2 = b.publish("r", m2, None, None).await.unwrap();
    assert_eq!((p1.position.seq, p2.position.seq), (1, 2));
    // A real retry (same sender and client id) is recognised.
    let again = a.publish("r", m1, None, None).await.unwrap();
    assert_eq!(again.position.seq, 1);
    // Events are delivered in stream order: one published after the retry
    // arrives after anything the retry put in the stream, however slowly.
    let barrier = b
        .publish("r", message("r", 9, "after"), None, None)
        .await
        .unwrap();
    assert_eq!(barrier.position.seq, 3, "the retry took no sequence number");
    wait_for("the event after the retry", || seqs(&rec, "r").contains(&3)).await;
    assert_eq!(
        seqs(&rec, "r"),
        vec![1, 2, 3],
        "the retry was not delivered again"
    );
}

/// The room keys in `ns`.
fn room_keys(ns: &str) -> Vec<String> {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-u",
            &redis_url(),
            "--scan",
            "--pattern",
            &format!("{ns}:*"),
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|k| k.contains(":room:"))
        .map(str::to_owned)
        .collect()
}

/// Nothing of an idle room stays in Redis: its epoch, counter, log and
/// idempotency keys expire with the recovery window, the next publish
/// starts a stream with a new epoch, and the epochs given to rooms only
/// asked about (a resume naming made-up rooms) expire the same way.
#[tokio::test]
async fn idle_rooms_leave_no_keys_and_come_back_with_a_new_epoch() {
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let rec = Arc::new(Recorder::default());
    let mut config = RedisFanoutConfig::new(redis_url(), "a");
    config.namespace = ns.clone();
    config.partitions = 2;
    config.recovery_window = Duration::from_millis(300);
    config.stream_idle_ttl = Duration::from_millis(600);
    let a = RedisStreamsFanout::connect(config, Codec::default(), rec)
        .await
        .unwrap();
    for i in 0..1000 {
        let room = format!("made-up-{i}");
        assert_eq!(a.position(&room).await.unwrap().seq, 0);
    }
    let first = a
        .publish("r", message("r", 1, "a"), None, None)
        .await
        .unwrap();
    assert!(!room_keys(&ns).is_empty(), "a used room has keys");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !room_keys(&ns).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "keys never expired: {:?}",
            room_keys(&ns)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next = a
        .publish("r", message("r", 2, "b"), None, None)
        .await
        .unwrap();
    assert_ne!(next.position.epoch, first.position.epoch);
    assert_eq!(next.position.seq, 1);
    assert!(matches!(
        a.replay("r", first.position, usize::MAX).await.unwrap(),
        Replay::NotRecoverable { .. }
    ));
}

/// A room's log is bounded by bytes as well as by count: a few large
/// events push the oldest out, and a resume from before them is "not
/// recovered"; small events keep the count bound.
#[tokio::test]
async fn room_logs_are_bounded_by_bytes() {
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let mut config = RedisFanoutConfig::new(redis_url(), "a");
    config.namespace = ns.clone();
    config.partitions = 2;
    config.max_log = 100;
    config.max_log_bytes = 50_000;
    let a = RedisStreamsFanout::connect(config, Codec::default(), Arc::new(Recorder::default()))
        .await
        .unwrap();
    // Text that does not compress.
    let noise = |seed: u64| -> String {
        let mut x = seed | 1;
        (0..16_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'!' + (x % 90) as u8)
            })
            .collect()
    };
    let first = a
        .publish("big", message("big", 1, &noise(1)), None, None)
        .await
        .unwrap();
    for i in 2..=10 {
        a.publish("big", message("big", i, &noise(i)), None, None)
            .await
            .unwrap();
    }
    let since = Position {
        seq: first.position.seq - 1,
        ..first.position
    };
    assert!(matches!(
        a.replay("big", since, usize::MAX).await.unwrap(),
        Replay::NotRecoverable { .. }
    ));
    let recent = Position {
        seq: first.position.seq + 7,
        ..first.position
    };
    match a.replay("big", recent, usize::MAX).await.unwrap() {
        Replay::Events { frames, .. } => assert_eq!(frames.len(), 2),
        other => panic!("the newest two are kept: {other:?}"),
    }
    // Small events: the count bound (100) holds; trimmed in batches, the
    // log keeps at least 100 - 100/64 = 99 of them.
    for i in 0..150 {
        a.publish("small", message("small", 1000 + i, "hi"), None, None)
            .await
            .unwrap();
    }
    let end = a.position("small").await.unwrap();
    match a
        .replay(
            "small",
            Position {
                seq: end.seq - 99,
                ..end
            },
            usize::MAX,
        )
        .await
        .unwrap()
    {
        Replay::Events { frames, .. } => assert_eq!(frames.len(), 99),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        a.replay(
            "small",
            Position {
                seq: end.seq - 101,
                ..end
            },
            usize::MAX
        )
        .await
        .unwrap(),
        Replay::NotRecoverable { .. }
    ));
}

/// How many connections subscribe to the shard channel.
async fn subscribers(client: &fred::prelude::Client, channel: &str) -> i64 {
    use fred::prelude::PubsubInterface;
    let reply: Vec<fred::types::Value> = client.pubsub_shardnumsub(channel).await.unwrap();
    reply.get(1).and_then(|v| v.as_i64()).unwrap_or(-1)
}

/// A node listens to the rooms its members are in and to no others: it
/// receives nothing of a room without members here, starts with the
/// first member (from the position the gateway reads then) and stops a
/// while after the last one left.
#[tokio::test]
async fn a_node_receives_only_the_rooms_its_members_are_in() {
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let (a, rec_a) = node(&ns, "a").await;
    let (b, rec_b) = node(&ns, "b").await;
    *rec_b.1.lock() = Some(Vec::new());
    a.position("busy").await.unwrap();
    // b has no member: not even its own publish comes back to it, and its
    // ack does not wait for a delivery that will not happen.
    for i in 0..20 {
        b.publish("busy", message("busy", i, "x"), Some(3), None)
            .await
            .unwrap();
    }
    wait_for("a's 20", || seqs(&rec_a, "busy").len() == 20).await;
    let b_stats = b.stats().unwrap();
    assert_eq!(
        b_stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(
        rec_b.0.lock().is_empty(),
        "b received events of a room it has no member in"
    );
    let live = format!("{ns}:{{p{}}}:room:busy:live", partition_of("busy", 4));
    assert_eq!(subscribers(a.client(), &live).await, 1, "only a listens");

    // A member joins on b: b listens from the position it reads.
    *rec_b.1.lock() = Some(vec!["busy".into()]);
    let joined = b.position("busy").await.unwrap();
    assert_eq!(joined.seq, 20);
    assert_eq!(subscribers(a.client(), &live).await, 2);
    a.publish("busy", message("busy", 100, "y"), None, None)
        .await
        .unwrap();
    wait_for("b's first", || seqs(&rec_b, "busy") == [21]).await;

    // The member leaves: b stops listening.
    *rec_b.1.lock() = Some(Vec::new());
    b.maintain();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while subscribers(a.client(), &live).await != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "b never stopped listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.publish("busy", message("busy", 101, "z"), None, None)
        .await
        .unwrap();
    wait_for("a's 22", || seqs(&rec_a, "busy").len() == 22).await;
    assert_eq!(seqs(&rec_b, "busy"), [21], "nothing after b's member left");
}

fn partition_of(room: &str, partitions: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % partitions
}

/// An event that never went live (its publisher waited for a replica
/// that is not there, and failed) is in the room's log: the next event's
/// number shows the gap, and a listening node reads it from the log and
/// delivers both in order, each once. Its sender's retry finds it
/// published and takes no new number.
#[tokio::test]
async fn an_event_missed_live_is_read_from_the_log_before_the_next() {
    let ns = format!("t{:x}", rand::rng().random::<u64>());
    let (listener, rec) = node(&ns, "l").await;
    listener.position("r").await.unwrap();
    let mut config = RedisFanoutConfig::new(redis_url(), "w");
    config.namespace = ns.clone();
    config.partitions = 4;
    config.replicas = 1;
    config.replica_timeout = Duration::from_millis(100);
    let waiting =
        RedisStreamsFanout::connect(config, Codec::default(), Arc::new(Recorder::default()))
            .await
            .unwrap();
    let first = message("r", 1, "never live");
    let failed = waiting.publish("r", first.clone(), None, None).await;
    assert!(failed.is_err(), "no replica acknowledged: {failed:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seqs(&rec, "r").is_empty(),
        "an event no replica holds was delivered"
    );
    let (other, _) = node(&ns, "o").await;
    let second = other
        .publish("r", message("r", 2, "live"), None, None)
        .await
        .unwrap();
    assert_eq!(second.position.seq, 2);
    wait_for("both, in order", || seqs(&rec, "r") == [1, 2]).await;
    let retried = other.publish("r", first, None, None).await.unwrap();
    assert_eq!(retried.position.seq, 1, "the retry is the original");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seqs(&rec, "r"), [1, 2], "nothing delivered twice");
}

/// A redis-server of this test's own on a spare port (killed on drop):
/// the tests that cut connections or add replicas never touch the shared
/// one.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    fn start(extra: &[&str]) -> PrivateRedis {
        let dir = std::env::temp_dir().join(format!("fanout-redis-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .args(extra)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if cli(port, &["ping"]).trim() == "PONG" {
                    return PrivateRedis { child, port, dir };
                }
                if child.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: another one
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends the server `SIG<name>` (by the PID this test started).
    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node on `redis` that waits for one replica (300 ms at most) before
/// an event goes live.
fn waiting_config(redis: &PrivateRedis, ns: &str, id: &str) -> RedisFanoutConfig {
    let mut config = RedisFanoutConfig::new(redis.url(), id);
    config.namespace = ns.into();
    config.partitions = 4;
    config.replicas = 1;
    config.replica_timeout = Duration::from_millis(300);
    config
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// With replicas to wait for, an event whose publisher's `WAIT` failed
/// sits in the master's log alone. A node that comes back from a lost
/// connection and finds it behind its room's head must not deliver it
/// then (a failover would take it back from members who saw it); once a
/// replica holds it, the node delivers it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_only_the_master_holds_is_not_delivered_after_a_reconnect_until_a_replica_has_it()
{
    let redis = PrivateRedis::start(&["--repl-diskless-sync-delay", "0"]);
    let waiting = |id: &str| waiting_config(&redis, "unvouched", id);
    let rec = Arc::new(Recorder::default());
    let listener = RedisStreamsFanout::connect(waiting("l"), Codec::default(), rec.clone())
        .await
        .unwrap();
    listener.position("r").await.unwrap();
    let writer = RedisStreamsFanout::connect(
        waiting("w"),
        Codec::default(),
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap();
    let failed = writer
        .publish("r", message("r", 1, "alone"), None, None)
        .await;
    assert!(failed.is_err(), "no replica acknowledged: {failed:?}");

    // The listener's Pub/Sub connection is cut: it reconnects and compares
    // the room's head (1) with what it delivered (nothing).
    let stats = listener.stats().unwrap();
    let before = stats.reconnects.load(std::sync::atomic::Ordering::Relaxed);
    assert!(cli(redis.port, &["client", "kill", "type", "pubsub"]).trim() != "0");
    let errors = stats.read_errors.load(std::sync::atomic::Ordering::Relaxed);
    wait_for("the listener reconnected", || {
        stats.reconnects.load(std::sync::atomic::Ordering::Relaxed) > before
    })
    .await;
    // It read the event and the confirmation was refused (no replica).
    wait_for("a refused fill", || {
        stats.read_errors.load(std::sync::atomic::Ordering::Relaxed) > errors
    })
    .await;
    assert!(
        seqs(&rec, "r").is_empty(),
        "an event no replica holds was delivered after a reconnect"
    );

    // A replica copies the master: now the event is safe, and delivered.
    let master = redis.port.to_string();
    let _replica = PrivateRedis::start(&["--replicaof", "127.0.0.1", &master]);
    wait_for_within(
        "delivered once a replica holds it",
        Duration::from_secs(15),
        || seqs(&rec, "r") == [1],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seqs(&rec, "r"), [1], "once");
}

/// A publish whose `WAIT` failed (its replica is stalled) is retried by
/// its sender through another node: the retry must not go live until a
/// replica holds the event either. Where `WAIT` counts only what its
/// connection wrote (as documented), a retry that writes nothing would be
/// confirmed at once, so the retry writes; Redis 7.0 also moves a
/// connection's `WAIT` offset on commands that write nothing, so there
/// this holds without that write too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_live_only_once_a_replica_holds_the_event() {
    let redis = PrivateRedis::start(&["--repl-diskless-sync-delay", "0"]);
    let master = redis.port.to_string();
    let replica = PrivateRedis::start(&["--replicaof", "127.0.0.1", &master]);
    wait_for_within("the replica in sync", Duration::from_secs(15), || {
        cli(redis.port, &["info", "replication"]).contains("state=online")
    })
    .await;
    let waiting = |id: &str| waiting_config(&redis, "retried", id);
    let rec = Arc::new(Recorder::default());
    let listener = RedisStreamsFanout::connect(waiting("l"), Codec::default(), rec.clone())
        .await
        .unwrap();
    listener.position("r").await.unwrap();
    let first = RedisStreamsFanout::connect(
        waiting("a"),
        Codec::default(),
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap();
    // Warm the publisher's connections, so they have written before (a
    // replica just in sync may take a moment to acknowledge).
    let mut warm = Err(chatgate_fanout::FanoutError::Unavailable(String::new()));
    for _ in 0..20 {
        warm = first
            .publish("r", message("r", 1, "before"), None, None)
            .await;
        if warm.is_ok() {
            break;
        }
    }
    warm.unwrap();
    wait_for("the first event", || seqs(&rec, "r") == [1]).await;

    replica.signal("STOP");
    let failed = first
        .publish("r", message("r", 2, "stalled"), None, None)
        .await;
    assert!(failed.is_err(), "the replica is stalled: {failed:?}");
    let second = RedisStreamsFanout::connect(
        waiting("b"),
        Codec::default(),
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap();
    let retried = second
        .publish("r", message("r", 2, "stalled"), None, None)
        .await;
    assert!(
        retried.is_err(),
        "a retry went live while no replica held the event: {retried:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seqs(&rec, "r"), [1], "nothing unconfirmed delivered");

    replica.signal("CONT");
    let mut again = Err(chatgate_fanout::FanoutError::Unavailable(String::new()));
    for _ in 0..20 {
        again = second
            .publish("r", message("r", 2, "stalled"), None, None)
            .await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(again.unwrap().position.seq, 2, "the retry is the original");
    wait_for("delivered once confirmed", || seqs(&rec, "r") == [1, 2]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seqs(&rec, "r"), [1, 2], "once");
}
