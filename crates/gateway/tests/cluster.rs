//! Several gateway processes as one service through Redis Streams:
//! exactly-once ordered delivery across nodes, resume on another node,
//! Redis restarts, a node killed with SIGKILL, cluster-wide limits, and
//! the same on a Redis Cluster.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::time::{Duration, Instant};

use chatgate_client::RawConnection;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, CloseCode, ErrorCode, ServerFrame};
use common::*;
use serde_json::json;

/// Reads NewMessage frames until `count` arrived or `limit` passed;
/// returns (message id, room seq, body) in arrival order.
async fn collect(c: &mut Conn, count: usize, limit: Duration) -> Vec<(u64, u64, String)> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < deadline {
        if let Some((_, ServerFrame::NewMessage(m))) = c.next(Duration::from_millis(200)).await {
            got.push((m.message.id, m.message.seq, m.message.body));
        }
    }
    got
}

/// Sends until acknowledged, retrying a retryable error with the same
/// client id (what a real client does through an outage).
async fn send_acked(c: &mut Conn, rid: &mut u32, room: &str, cid: &str, body: &str) -> MessageSent {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        *rid += 1;
        match c.request(*rid, send_frame(room, cid, body)).await {
            ServerFrame::MessageSent(ack) => return ack,
            ServerFrame::Error(e) if ErrorCode::from_u16(e.code).is_some_and(|c| c.retryable()) => {
                assert!(Instant::now() < deadline, "never acknowledged: {e:?}");
                tokio::time::sleep(Duration::from_millis(e.retry_after_ms.clamp(50, 500) as u64))
                    .await;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_deliver_every_message_once_in_one_order() {
    let cluster = Cluster::start(3, &shared_redis_url(), &[]).await;
    let h = cluster.nodes[0].wait_health("3 live nodes", |h| {
        h["cluster"]["live_nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 3)
    });
    assert_eq!(h["backends"]["fanout"]["engine"], "redis-streams");

    // Two readers and one sender per node, all in one room.
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        for r in 0..2 {
            let mut c = user(node, &format!("reader-{i}-{r}")).await;
            join(&mut c, &["all"]).await;
            readers.push(c);
        }
        let mut s = user(node, &format!("sender-{i}")).await;
        join(&mut s, &["all"]).await;
        senders.push(s);
    }
    let per_sender = 50;
    let mut tasks = Vec::new();
    for (i, mut s) in senders.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut rid = 10;
            let mut acks = Vec::new();
            for m in 0..per_sender {
                let ack = send_acked(
                    &mut s,
                    &mut rid,
                    "all",
                    &format!("s{i}-{m}"),
                    &format!("from {i} #{m}"),
                )
                .await;
                acks.push(ack.message_id);
            }
            // Every sender also hears the other senders, never itself.
            let heard = collect(&mut s, 2 * per_sender, Duration::from_secs(20)).await;
            assert_eq!(
                heard.len(),
                2 * per_sender,
                "sender {i} heard {}",
                heard.len()
            );
            assert!(
                heard.iter().all(|(id, _, _)| !acks.contains(id)),
                "sender {i} got its own echo"
            );
            acks
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let total = 3 * per_sender;
    let mut orders = Vec::new();
    for (n, r) in readers.iter_mut().enumerate() {
        let got = collect(r, total, Duration::from_secs(20)).await;
        assert_eq!(got.len(), total, "reader {n} got {} of {total}", got.len());
        let mut ids: Vec<u64> = got.iter().map(|g| g.0).collect();
        let seqs: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "reader {n}: sequence not gapless and ordered"
        );
        orders.push(ids.clone());
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), total, "reader {n} got duplicates");
        r.assert_quiet(
            Duration::from_millis(200),
            &format!("reader {n} got extra frames"),
        )
        .await;
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "readers disagree on the order"
    );
    acked.sort_unstable();
    let mut delivered = orders[0].clone();
    delivered.sort_unstable();
    assert_eq!(
        acked, delivered,
        "delivered exactly the acknowledged messages"
    );
}

/// Opens a session on `node` resuming `user`'s session at `room`'s
/// (epoch, seq); returns it with the ids replayed before `Resumed`, which
/// must say the room was recovered.
async fn resume_at(
    node: &Gateway,
    user: &str,
    session_id: SessionId,
    room: &str,
    epoch: u64,
    seq: u64,
) -> (Conn, Vec<u64>) {
    let resume = Resume {
        session_id,
        positions: vec![RoomPosition {
            room: room.into(),
            epoch,
            seq,
        }],
    };
    let mut back = Conn::new(send_identify(node, token(user), Some(resume)).await);
    assert!(matches!(back.expect().await, (1, ServerFrame::Ready(r)) if r.resuming));
    let mut replayed = Vec::new();
    loop {
        match back.expect().await.1 {
            ServerFrame::NewMessage(m) => replayed.push(m.message.id),
            ServerFrame::Resumed(r) => {
                assert!(r.rooms[0].recovered, "{r:?}");
                assert_eq!(r.rooms[0].replayed as usize, replayed.len());
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    (back, replayed)
}

/// On a Redis Cluster (3 masters, 3 replicas) every partition is its own
/// slot, spread over the masters: rooms on all of them reach every node
/// once, in order, and a client resumes on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_on_a_redis_cluster_deliver_every_room_once_in_order_and_resume() {
    let redis = common::redis_cluster::PrivateRedisCluster::start(3, 1);
    let cluster = Cluster::start(3, &redis.url(), &[]).await;
    all_live(&cluster.nodes);
    // Rooms enough to land on every master.
    let rooms: Vec<String> = (0..12).map(|r| format!("spread-{r}")).collect();
    let room_refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut readers = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut c = user(node, &format!("reader-{i}")).await;
        join(&mut c, &room_refs).await;
        readers.push(c);
    }
    let (raw, ready) = identified(&cluster.nodes[0], "wanderer").await;
    let mut wanderer = Conn::new(raw);
    let joined = join(&mut wanderer, &["spread-0"]).await;
    let mut sender = user(&cluster.nodes[1], "sender").await;
    join(&mut sender, &room_refs).await;
    let mut rid = 10;
    let mut acked = Vec::new();
    for m in 0..5 {
        for room in &rooms {
            let ack = send_acked(
                &mut sender,
                &mut rid,
                room,
                &format!("{room}-{m}"),
                &format!("{room} #{m}"),
            )
            .await;
            acked.push(ack.message_id);
        }
    }
    // Every master holds room logs of these rooms.
    let by_master = redis.keys_by_master("*:room:spread-*:log");
    assert_eq!(by_master.len(), 3);
    for (port, keys) in &by_master {
        assert!(!keys.is_empty(), "no room landed on the master at {port}");
    }
    for (n, r) in readers.iter_mut().enumerate() {
        let got = collect(r, acked.len(), Duration::from_secs(20)).await;
        let mut ids: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(ids.len(), acked.len(), "reader {n}");
        // Per room: seq 1..=5 in order.
        for room in &rooms {
            let seqs: Vec<u64> = got
                .iter()
                .filter(|g| g.2.starts_with(&format!("{room} #")))
                .map(|g| g.1)
                .collect();
            assert_eq!(seqs, vec![1, 2, 3, 4, 5], "reader {n}, {room}");
        }
        ids.sort_unstable();
        let mut want = acked.clone();
        want.sort_unstable();
        assert_eq!(ids, want, "reader {n}: exactly the acknowledged messages");
        r.assert_quiet(Duration::from_millis(200), "extra frames")
            .await;
    }
    // The wanderer heard spread-0's five; it leaves, misses three, and
    // resumes on the third node.
    let heard = collect(&mut wanderer, 5, Duration::from_secs(10)).await;
    let seq = heard.last().unwrap().1;
    wanderer.raw.close().await.unwrap();
    drop(wanderer);
    let mut missed = Vec::new();
    for m in 0..3 {
        let ack = send_acked(
            &mut sender,
            &mut rid,
            "spread-0",
            &format!("away-{m}"),
            &format!("away {m}"),
        )
        .await;
        missed.push(ack.message_id);
    }
    let (_, replayed) = resume_at(
        &cluster.nodes[2],
        "wanderer",
        ready.session_id,
        "spread-0",
        joined.rooms[0].epoch,
        seq,
    )
    .await;
    assert_eq!(replayed, missed, "exactly the missed messages, in order");
}

/// Waits until every node sees all of them live and its fan-out healthy.
fn all_live(nodes: &[Gateway]) {
    for node in nodes {
        node.wait_health("every node live", |h| {
            h["cluster"]["live_nodes"]
                .as_array()
                .is_some_and(|n| n.len() == nodes.len())
                && h["backends"]["fanout"]["status"] == "ok"
        });
    }
}

/// Message `m` to every room in turn (bodies `<room> #m`), each sent
/// until acknowledged; the acknowledged ids, by room.
async fn send_round(sender: &mut Conn, rid: &mut u32, rooms: &[String], m: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(rooms.len());
    for room in rooms {
        let body = format!("{room} #{m}");
        ids.push(
            send_acked(sender, rid, room, &format!("{room}-{m}"), &body)
                .await
                .message_id,
        );
    }
    ids
}

/// Per room, the ids `got` holds (bodies are `<room> #...`), checking
/// that the room's numbers follow on from `after` without a gap.
fn by_room(
    got: &[(u64, u64, String)],
    rooms: &[String],
    after: &[u64],
    who: &str,
) -> Vec<Vec<u64>> {
    rooms
        .iter()
        .zip(after)
        .map(|(room, after)| {
            let mine: Vec<&(u64, u64, String)> = got
                .iter()
                .filter(|g| g.2.starts_with(&format!("{room} #")))
                .collect();
            let seqs: Vec<u64> = mine.iter().map(|g| g.1).collect();
            let want: Vec<u64> = (after + 1..=after + seqs.len() as u64).collect();
            assert_eq!(
                seqs, want,
                "{who}, {room}: numbers with a gap or out of order"
            );
            mine.iter().map(|g| g.0).collect()
        })
        .collect()
}

/// A master of a Redis Cluster (3 masters, 3 replicas) is SIGKILLed while
/// messages flow; its replica takes over. With `--redis-wait-replicas 1`
/// nothing a member saw or a sender was told is taken back: every
/// acknowledged message reaches every member on every node once, in
/// order, with no gap in the numbers. Then a gateway node is SIGKILLed
/// and started again: its member resumes there with exactly what it
/// missed, and live delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_failing_over_during_traffic_loses_and_repeats_nothing_and_a_node_restarts() {
    let mut redis = common::redis_cluster::PrivateRedisCluster::start(3, 1);
    let mut cluster = Cluster::start(3, &redis.url(), &["--redis-wait-replicas", "1"]).await;
    all_live(&cluster.nodes);
    let rooms: Vec<String> = (0..9).map(|r| format!("fo-{r}")).collect();
    let room_refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut readers = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let name = format!("fo-reader-{i}");
        let (raw, ready) = identified(node, &name).await;
        let mut c = Conn::new(raw);
        let joined = join(&mut c, &room_refs).await;
        assert!(joined.rooms.iter().all(|r| r.seq == 0));
        let epochs: Vec<u64> = joined.rooms.iter().map(|r| r.epoch).collect();
        readers.push((c, name, ready.session_id, epochs));
    }
    let mut sender = user(&cluster.nodes[1], "fo-sender").await;
    join(&mut sender, &room_refs).await;
    let mut rid = 10;
    let mut acked: Vec<Vec<u64>> = vec![Vec::new(); rooms.len()];
    for m in 0..3 {
        for (r, id) in send_round(&mut sender, &mut rid, &rooms, m)
            .await
            .into_iter()
            .enumerate()
        {
            acked[r].push(id);
        }
    }
    // The master holding fo-0 dies mid-traffic; sends keep going (and are
    // retried through the failover, as a client does).
    let victim = redis
        .keys_by_master("*:room:fo-0:log")
        .into_iter()
        .find(|(_, keys)| !keys.is_empty())
        .map(|(port, _)| port)
        .expect("a master holds fo-0");
    // Once its replica took over, it is started again (empty) and joins as
    // the new master's replica: until then the promoted master has no
    // replica, and sends to its rooms wait (each fails, retryable, as no
    // replica holds it).
    let (pid, seat) = redis.server(victim);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        std::thread::sleep(Duration::from_millis(4000));
        let back = seat.restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !common::redis_cluster::PrivateRedisCluster::is_replica(victim) {
            assert!(
                Instant::now() < deadline,
                "the old master never became a replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        back
    });
    for m in 3..15 {
        for (r, id) in send_round(&mut sender, &mut rid, &rooms, m)
            .await
            .into_iter()
            .enumerate()
        {
            acked[r].push(id);
        }
    }
    redis.adopt(killer.join().unwrap());
    let masters = redis.masters();
    assert!(
        !masters.contains(&victim) && masters.len() == 3,
        "the replica took over: masters {masters:?}, killed {victim}"
    );
    let total: usize = acked.iter().map(Vec::len).sum();
    let zeros = vec![0; rooms.len()];
    let mut heard = Vec::new();
    for (c, name, _, _) in readers.iter_mut() {
        let got = collect(c, total, Duration::from_secs(30)).await;
        assert_eq!(got.len(), total, "{name} got {} of {total}", got.len());
        assert_eq!(
            by_room(&got, &rooms, &zeros, name),
            acked,
            "{name}: exactly the acknowledged messages"
        );
        c.assert_quiet(Duration::from_millis(300), "extra frames")
            .await;
        heard.push(got.len() as u64 / rooms.len() as u64);
    }

    // Node 2 is SIGKILLed and started again; its member comes back there.
    let dead = cluster.nodes.remove(2);
    std::process::Command::new("kill")
        .args(["-KILL", &dead.pid().to_string()])
        .status()
        .unwrap();
    drop(dead);
    let (_, name, session, epochs) = readers.pop().unwrap();
    let mut missed: Vec<Vec<u64>> = vec![Vec::new(); rooms.len()];
    for m in 15..17 {
        for (r, id) in send_round(&mut sender, &mut rid, &rooms, m)
            .await
            .into_iter()
            .enumerate()
        {
            acked[r].push(id);
            missed[r].push(id);
        }
    }
    let restarted = Cluster::node(&cluster.args, 2);
    restarted.wait_health("fan-out up", |h| h["backends"]["fanout"]["status"] == "ok");
    let resume = Resume {
        session_id: session,
        positions: rooms
            .iter()
            .zip(&epochs)
            .map(|(room, epoch)| RoomPosition {
                room: room.clone(),
                epoch: *epoch,
                seq: heard[2],
            })
            .collect(),
    };
    let mut back = Conn::new(send_identify(&restarted, token(&name), Some(resume)).await);
    let mut replayed = Vec::new();
    loop {
        match back.expect().await.1 {
            ServerFrame::NewMessage(m) => {
                replayed.push((m.message.id, m.message.seq, m.message.body))
            }
            ServerFrame::Resumed(r) => {
                assert!(r.rooms.iter().all(|r| r.recovered), "{r:?}");
                break;
            }
            _ => {}
        }
    }
    let after = vec![heard[2]; rooms.len()];
    assert_eq!(
        by_room(&replayed, &rooms, &after, "resumed"),
        missed,
        "exactly the missed ones"
    );
    // Live again, on every node, the restarted one included.
    let last = send_acked(&mut sender, &mut rid, "fo-4", "fo-4-last", "fo-4 #last").await;
    for (c, name, _, _) in readers.iter_mut() {
        let got = collect(c, 2 * rooms.len() + 1, Duration::from_secs(10)).await;
        assert_eq!(got.last().map(|g| g.0), Some(last.message_id), "{name}");
    }
    let got = collect(&mut back, 1, Duration::from_secs(10)).await;
    assert_eq!(
        got.first().map(|g| g.0),
        Some(last.message_id),
        "the restarted node's member"
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_away_for_30_seconds_resumes_on_another_node_with_exactly_the_missed_100() {
    let cluster = Cluster::start(3, &shared_redis_url(), &[]).await;
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let (raw, ready) = identified(a, "wanderer").await;
    let mut wanderer = Conn::new(raw);
    let joined = join(&mut wanderer, &["news"]).await;
    let mut sender = user(b, "sender").await;
    join(&mut sender, &["news"]).await;
    let mut rid = 10;
    send_acked(&mut sender, &mut rid, "news", "pre", "before the break").await;
    let (_, seq, _) = collect(&mut wanderer, 1, Duration::from_secs(10))
        .await
        .remove(0);
    let epoch = joined.rooms[0].epoch;
    wanderer.raw.close().await.unwrap();
    drop(wanderer);

    // 100 messages over 30 seconds while the wanderer is away.
    let started = Instant::now();
    let mut sent = Vec::new();
    for i in 0..100 {
        let ack = send_acked(
            &mut sender,
            &mut rid,
            "news",
            &format!("away-{i}"),
            &format!("missed {i}"),
        )
        .await;
        sent.push(ack.message_id);
        let due = started + Duration::from_millis(300 * (i + 1));
        tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
    }

    let (mut back, replayed) = resume_at(c, "wanderer", ready.session_id, "news", epoch, seq).await;
    assert_eq!(replayed.len(), 100);
    assert_eq!(replayed, sent, "exactly the 100 missed messages, in order");
    send_acked(&mut sender, &mut rid, "news", "after", "live again").await;
    let live = collect(&mut back, 1, Duration::from_secs(10)).await;
    assert_eq!(live[0].2, "live again");
    back.assert_quiet(Duration::from_millis(300), "duplicates after the resume")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_loses_and_duplicates_no_acknowledged_message() {
    let mut redis = PrivateRedis::start_durable();
    let cluster = Cluster::start(2, &redis.url(), &[]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut members = Vec::new();
    for (i, node) in [a, b, a, b].iter().enumerate() {
        let mut m = user(node, &format!("member-{i}")).await;
        join(&mut m, &["steady"]).await;
        members.push(m);
    }
    let mut sender = user(a, "sender").await;
    join(&mut sender, &["steady"]).await;
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut m| {
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while let Some(frame) = m.next(Duration::from_secs(8)).await {
                    if let (_, ServerFrame::NewMessage(msg)) = frame {
                        ids.push(msg.message.id);
                    }
                }
                ids
            })
        })
        .collect();
    let traffic = tokio::spawn(async move {
        let mut rid = 10;
        let mut acked = Vec::new();
        for i in 0..120 {
            acked.push(
                send_acked(
                    &mut sender,
                    &mut rid,
                    "steady",
                    &format!("m{i}"),
                    &format!("steady {i}"),
                )
                .await
                .message_id,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.restart();
    let acked = traffic.await.unwrap();
    assert_eq!(acked.len(), 120);
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.await.unwrap();
        assert_eq!(
            got, acked,
            "member {i}: every acknowledged message exactly once, in order"
        );
    }
    for node in [a, b] {
        node.wait_health("fan-out back", |h| {
            h["backends"]["fanout"]["status"] == "ok"
        });
        assert!(
            node.metric("chat_fanout_reconnects") >= 1.0,
            "the outage shows in metrics"
        );
    }
}

/// A message published, then Redis loses its data before the position
/// is recorded (the node died, or the reply was lost with Redis): the
/// store still says "never published". The sender's retry must not
/// deliver it a second time under the new epoch to members who had it;
/// they are made to resume, are told the old stream cannot be replayed,
/// and find the message in History.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_retried_after_redis_lost_its_data_is_not_delivered_twice() {
    let mut redis = PrivateRedis::start();
    let cluster = Cluster::start(2, &redis.url(), &[]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut sender = user(a, "lost-sender").await;
    join(&mut sender, &["fragile"]).await;
    let mut members = Vec::new();
    for (i, node) in [a, b].into_iter().enumerate() {
        let mut m = user(node, &format!("lost-member-{i}")).await;
        let start = join(&mut m, &["fragile"]).await.rooms[0].clone();
        members.push((m, start));
    }
    let mut rid = 10;
    let first = send_acked(&mut sender, &mut rid, "fragile", "c-1", "once").await;
    for (m, _) in &mut members {
        let got = collect(m, 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "delivered live");
        assert_eq!(got[0].0, first.message_id);
    }
    // The position was never recorded ...
    let db = cluster.args[cluster
        .args
        .iter()
        .position(|a| a == "--database-url")
        .unwrap()
        + 1]
    .clone();
    let (pg, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let updated = pg
        .execute(
            "UPDATE messages SET seq = 0, epoch = 0 WHERE id = $1",
            &[&(first.message_id as i64)],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1);
    // ... and Redis comes back without its data.
    redis.restart();
    for node in [a, b] {
        node.wait_health("fan-out back", |h| {
            h["backends"]["fanout"]["status"] == "ok"
        });
        // Gauges are refreshed every second.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while node.metric("chat_fanout_streams_lost") < 1.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the loss never showed in metrics"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The sender retries on a new connection.
    let mut again = user(a, "lost-sender").await;
    let retry = send_acked(&mut again, &mut rid, "fragile", "c-1", "once").await;
    assert!(retry.duplicate, "{retry:?}");
    assert_eq!(retry.message_id, first.message_id);

    for (i, (mut m, start)) in members.into_iter().enumerate() {
        let node = if i == 0 { a } else { b };
        // Whatever the member hears from here on, live or after a resume,
        // must not include the message again.
        let mut ids: Vec<u64> = collect(&mut m, 1, Duration::from_secs(2))
            .await
            .into_iter()
            .map(|g| g.0)
            .collect();
        assert!(
            !ids.contains(&first.message_id),
            "member {i} received the message a second time, live"
        );
        let closed = m.close_code().await;
        assert_eq!(closed, Some(4005), "member {i} is made to resume");
        let mut raw = chatgate_client::RawConnection::connect(&node.url())
            .await
            .unwrap();
        let resume = Resume {
            session_id: [0; 16],
            positions: vec![RoomPosition {
                room: "fragile".into(),
                epoch: start.epoch,
                seq: start.seq + 1,
            }],
        };
        raw.send(
            1,
            &ClientFrame::Identify(Identify {
                token: token(&format!("lost-member-{i}")),
                resume: Some(resume),
            }),
        )
        .await
        .unwrap();
        let mut resumed = Conn::new(raw);
        let outcome = loop {
            match resumed.expect().await {
                (_, ServerFrame::Resumed(r)) => break r,
                (_, ServerFrame::NewMessage(n)) => ids.push(n.message.id),
                _ => {}
            }
        };
        assert!(
            !outcome.rooms[0].recovered,
            "member {i}: the lost stream cannot be replayed: {outcome:?}"
        );
        ids.extend(
            collect(&mut resumed, 1, Duration::from_secs(2))
                .await
                .into_iter()
                .map(|g| g.0),
        );
        assert!(
            !ids.contains(&first.message_id),
            "member {i} received the message a second time"
        );
        assert!(resumed.alive().await, "member {i}'s connection is alive");
        // History, which the member reloads, has it once.
        let page = resumed
            .request(
                20,
                ClientFrame::History(History {
                    room: "fragile".into(),
                    before: None,
                    limit: 10,
                }),
            )
            .await;
        let ServerFrame::HistoryPage(page) = page else {
            panic!("{page:?}");
        };
        let found = page
            .messages
            .iter()
            .filter(|m| m.id == first.message_id)
            .count();
        assert_eq!(found, 1, "member {i}: History holds the message once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_killed_node_resume_elsewhere_without_missing_anything() {
    let mut cluster = Cluster::start(3, &shared_redis_url(), &[]).await;
    let mut sender = user(&cluster.nodes[0], "sender").await;
    join(&mut sender, &["r"]).await;
    // Victims on node 2 track their positions like a client library does.
    let mut victims = Vec::new();
    for i in 0..3 {
        let (raw, ready) = identified(&cluster.nodes[2], &format!("victim-{i}")).await;
        let mut c = Conn::new(raw);
        let j = join(&mut c, &["r"]).await;
        victims.push((
            c,
            ready.session_id,
            j.rooms[0].epoch,
            j.rooms[0].seq,
            Vec::<u64>::new(),
        ));
    }
    let mut rid = 10;
    let mut acked = Vec::new();
    for i in 0..30 {
        acked.push(
            send_acked(&mut sender, &mut rid, "r", &format!("a{i}"), "x")
                .await
                .message_id,
        );
    }
    for v in victims.iter_mut() {
        for (id, seq, _) in collect(&mut v.0, 30, Duration::from_secs(10)).await {
            v.3 = seq;
            v.4.push(id);
        }
    }
    // SIGKILL node 2 mid-traffic.
    let killer = {
        let pid = cluster.nodes[2].pid();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap();
        })
    };
    for i in 30..80 {
        acked.push(
            send_acked(&mut sender, &mut rid, "r", &format!("a{i}"), "x")
                .await
                .message_id,
        );
    }
    killer.await.unwrap();
    let dead = cluster.nodes.remove(2);
    drop(dead);
    // Victims drain what they got before the kill, then resume on node 1.
    for (i, v) in victims.iter_mut().enumerate() {
        for (id, seq, _) in collect(&mut v.0, 50, Duration::from_millis(500)).await {
            v.3 = seq;
            v.4.push(id);
        }
        let mut raw = RawConnection::connect(&cluster.nodes[1].url())
            .await
            .unwrap();
        let resume = Resume {
            session_id: v.1,
            positions: vec![RoomPosition {
                room: "r".into(),
                epoch: v.2,
                seq: v.3,
            }],
        };
        let ident = Identify {
            token: token(&format!("victim-{i}")),
            resume: Some(resume),
        };
        raw.send(1, &ClientFrame::Identify(ident)).await.unwrap();
        let mut c = Conn::new(raw);
        loop {
            match c.expect().await.1 {
                ServerFrame::NewMessage(m) => v.4.push(m.message.id),
                ServerFrame::Resumed(r) => {
                    assert!(r.rooms[0].recovered, "victim {i}: {r:?}");
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(
            v.4, acked,
            "victim {i}: every acknowledged message exactly once, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_user_cap_holds_across_nodes() {
    let cluster = Cluster::start(3, &shared_redis_url(), &[]).await;
    the_cap_holds_across(&cluster.nodes).await;
}

/// Five connections of one user on nodes 0 and 1 (the default cap); a
/// sixth on node 2 is refused with 4003, and closing one frees a slot
/// on every node.
async fn the_cap_holds_across(nodes: &[Gateway]) {
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(user(&nodes[i % 2], "greedy").await);
    }
    let mut sixth = RawConnection::connect(&nodes[2].url()).await.unwrap();
    sixth
        .send(
            1,
            &ClientFrame::Identify(Identify {
                token: token("greedy"),
                resume: None,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        Conn::new(sixth).close_code().await,
        Some(CloseCode::ConnectionLimit.code())
    );
    // Closing one anywhere frees a slot everywhere.
    held.pop().unwrap().raw.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = RawConnection::connect(&nodes[2].url()).await.unwrap();
        c.send(
            1,
            &ClientFrame::Identify(Identify {
                token: token("greedy"),
                resume: None,
            }),
        )
        .await
        .unwrap();
        let mut c = Conn::new(c);
        match c.next(Duration::from_secs(5)).await {
            Some((1, ServerFrame::Ready(_))) => break,
            _ => assert!(Instant::now() < deadline, "slot never freed"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A room's slot moves to another master (resharding) while messages
/// flow to it and to rooms that stay: sends that meet the slot mid-move
/// fail retryably and are retried; every acknowledged message reaches the
/// members on every node once, in order, without a gap, within seconds
/// (nodes that only listen notice the move from the slot map: Redis
/// drops their subscriptions to the moved slot without a word the client
/// library passes on); afterwards the room's keys are on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_moving_to_another_master_under_traffic_loses_and_repeats_nothing() {
    let redis = common::redis_cluster::PrivateRedisCluster::start(3, 0);
    let cluster = Cluster::start(3, &redis.url(), &[]).await;
    all_live(&cluster.nodes);
    let rooms: Vec<String> = (0..4).map(|r| format!("moving-{r}")).collect();
    let room_refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut readers = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut c = user(node, &format!("reader-{i}")).await;
        join(&mut c, &room_refs).await;
        readers.push(c);
    }
    let mut sender = user(&cluster.nodes[0], "sender").await;
    join(&mut sender, &room_refs).await;
    let mut rid = 10;
    let mut acked: Vec<Vec<u64>> = vec![Vec::new(); rooms.len()];
    let round = |ids: Vec<u64>, acked: &mut Vec<Vec<u64>>| {
        for (room, id) in acked.iter_mut().zip(ids) {
            room.push(id);
        }
    };
    for m in 0..3 {
        round(
            send_round(&mut sender, &mut rid, &rooms, m).await,
            &mut acked,
        );
    }
    // moving-0's slot goes to another master, a key every 150 ms, while
    // the rounds go on.
    let keys = redis.keys_by_master("*:room:moving-0:*");
    let (from, key) = keys
        .iter()
        .find_map(|(port, keys)| keys.first().map(|k| (*port, k.clone())))
        .expect("moving-0 has keys");
    let slot = redis.keyslot(&key);
    assert_eq!(redis.master_of(slot), from);
    let to = redis
        .masters()
        .into_iter()
        .find(|p| *p != from)
        .expect("another master");
    let rt = tokio::runtime::Handle::current();
    let mover = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let mover = scope.spawn(|| {
                redis.move_slot(slot, from, to, Duration::from_millis(150));
            });
            let mut m = 3;
            while !mover.is_finished() || m < 8 {
                let ids = rt.block_on(send_round(&mut sender, &mut rid, &rooms, m));
                round(ids, &mut acked);
                m += 1;
            }
            mover.join().is_ok()
        })
    });
    assert!(mover, "the slot move failed");
    assert_eq!(redis.master_of(slot), to, "the slot moved");
    let after = redis.keys_by_master("*:room:moving-0:*");
    for (port, keys) in &after {
        assert_eq!(
            !keys.is_empty(),
            *port == to,
            "moving-0's keys on {port}: {keys:?}"
        );
    }
    for m in 100..102 {
        round(
            send_round(&mut sender, &mut rid, &rooms, m).await,
            &mut acked,
        );
    }
    let total: usize = acked.iter().map(Vec::len).sum();
    for (n, r) in readers.iter_mut().enumerate() {
        // All three readers within 18 s, under the 30 s in which every
        // subscription is renewed anyway: the move itself must be
        // noticed.
        let got = collect(r, total, Duration::from_secs(6)).await;
        let got_by_room = by_room(&got, &rooms, &vec![0; rooms.len()], &format!("reader {n}"));
        assert_eq!(
            got_by_room, acked,
            "reader {n}: every acknowledged message once, in order"
        );
        r.assert_quiet(Duration::from_millis(200), "extra frames")
            .await;
    }
}

/// On a Redis Cluster (3 masters) what the nodes share lives in one
/// slot per key, as on one Redis: heartbeats (every node sees the
/// others), the per-user connection cap, the per-user message rate (one
/// bucket, whichever node a send arrives at) and presence (asked through
/// one node, answered by all).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_presence_and_heartbeats_are_cluster_wide_on_a_redis_cluster() {
    const PER_MINUTE: u64 = 16;
    let redis = common::redis_cluster::PrivateRedisCluster::start(3, 0);
    let per_minute = PER_MINUTE.to_string();
    let mut extra = API_ARGS.to_vec();
    extra.extend(["--messages-per-minute", &per_minute]);
    let cluster = Cluster::start(3, &redis.url(), &extra).await;
    all_live(&cluster.nodes);
    the_cap_holds_across(&cluster.nodes).await;

    // One user sending through all three nodes in turn spends one bucket
    // of 16 (each node leases one token at a time at this rate): per-node
    // buckets would take 16 on each.
    let started = Instant::now();
    let mut chatty = Vec::new();
    for node in &cluster.nodes {
        let mut c = user(node, "chatty").await;
        join(&mut c, &["rate-room"]).await;
        chatty.push(c);
    }
    let (mut acked, mut refused) = (0u64, 0u64);
    for i in 0..3 * PER_MINUTE {
        let c = &mut chatty[(i % 3) as usize];
        match c
            .request(
                100 + i as u32,
                send_frame("rate-room", &format!("r{i}"), "x"),
            )
            .await
        {
            ServerFrame::MessageSent(_) => acked += 1,
            ServerFrame::Error(e) if e.code == ErrorCode::RateLimited.code() => refused += 1,
            other => panic!("send {i}: {other:?}"),
        }
    }
    let refilled = (started.elapsed().as_secs_f64() * PER_MINUTE as f64 / 60.0).floor() as u64;
    assert!(
        acked >= PER_MINUTE && acked <= PER_MINUTE + refilled,
        "{acked} sends taken, {refused} refused: one bucket of {PER_MINUTE} (+{refilled} refilled)"
    );

    // Presence through node 2 counts the connections on nodes 0 and 1.
    let [n0, n1, n2] = &cluster.nodes[..] else {
        panic!("three nodes")
    };
    let room = "team:presence";
    n0.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "alice"}, {"user_id": "bob"}]}),
    );
    let (_alice, r) = identify_as(n0, "alice", &[], None).await;
    assert_eq!(r.rooms.len(), 1, "{:?}", r.rooms);
    let (_bob, _) = identify_as(n1, "bob", &[], None).await;
    let (_bob_again, _) = identify_as(n0, "bob", &[], None).await;
    let presence = n2.api("presence", json!({"room": room}));
    assert_eq!(
        presence["users"],
        json!([{"user_id": "alice", "connections": 1}, {"user_id": "bob", "connections": 2}]),
        "{presence}"
    );
    assert_eq!(presence["complete"], json!(true), "{presence}");
}

/// Through the client library's public API: a client whose node goes
/// away reconnects to its replacement, resumes, and receives every
/// message it missed exactly once, in order, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_library_resumes_and_gets_each_missed_message_once() {
    use chatgate_client::{Client, ClientConfig, Event};
    let cluster = Cluster::start(0, &shared_redis_url(), &[]).await;
    let node = |i: usize, listen: &str| {
        let mut a: Vec<&str> = cluster.args.iter().map(String::as_str).collect();
        let id = format!("node-{i}");
        a.extend(["--node-id", &id, "--reuse-port"]);
        Gateway::start_on(listen, &a)
    };
    let first = node(0, "127.0.0.1:0");
    let other = node(1, "127.0.0.1:0");
    let mut config = ClientConfig::new(first.url(), token("library"));
    config.backoff_base = Duration::from_millis(50);
    let (client, mut events) = Client::connect(config).await.unwrap();
    client.join(&["lib"]).await.unwrap();
    let mut sender = user(&other, "lib-sender").await;
    join(&mut sender, &["lib"]).await;
    let mut rid = 10;
    let mut sent = Vec::new();
    let send = async |sender: &mut Conn, rid: &mut u32, i: usize| {
        send_acked(sender, rid, "lib", &format!("l{i}"), &format!("#{i}"))
            .await
            .message_id
    };
    for i in 0..2 {
        sent.push(send(&mut sender, &mut rid, i).await);
    }
    let mut got = Vec::new();
    let next = async |events: &mut tokio::sync::mpsc::Receiver<Event>| {
        tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("an event")
            .expect("the client is running")
    };
    while got.len() < 2 {
        if let Event::Message(m) = next(&mut events).await {
            got.push(m.message.id);
        }
    }
    // The node goes; the address is held until its replacement binds.
    let placeholder = hold_address(first.addr);
    first.terminate();
    loop {
        if let Event::Disconnected { reconnecting, .. } = next(&mut events).await {
            assert!(reconnecting);
            break;
        }
    }
    for i in 2..7 {
        sent.push(send(&mut sender, &mut rid, i).await);
    }
    let listen = first.addr.to_string();
    drop(first);
    let _second = node(0, &listen);
    drop(placeholder);
    let resumed = loop {
        match next(&mut events).await {
            Event::Message(m) => got.push(m.message.id),
            Event::Resumed(r) => break r,
            Event::StreamLost { room, .. } => panic!("stream of {room} lost"),
            _ => {}
        }
    };
    assert!(resumed.rooms[0].recovered, "{resumed:?}");
    assert_eq!(resumed.rooms[0].replayed, 5);
    sent.push(send(&mut sender, &mut rid, 7).await);
    while got.len() < sent.len() {
        if let Event::Message(m) = next(&mut events).await {
            got.push(m.message.id);
        }
    }
    assert_eq!(got, sent, "every message once, in order");
    let extra = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
    assert!(
        !matches!(extra, Ok(Some(Event::Message(_)))),
        "nothing twice: {extra:?}"
    );
    let seq = client.send("lib", "back").await.unwrap().seq;
    assert_eq!(seq, 9, "the client's position is the room's");
}
