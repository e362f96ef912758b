//! What a member sees of a room stream while other requests race it:
//! re-joining a room under traffic loses nothing, the sender's own
//! acknowledgement takes its place in sequence order, and a client's
//! Close is answered. Each runs on one node and on a 3-node cluster,
//! on Postgres (the shape where these races were found).
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::time::{Duration, Instant};

use chatgate_client::Incoming;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ServerFrame};
use common::*;

const FAST: [&str; 6] = [
    "--messages-per-minute",
    "1000000",
    "--requests-per-second",
    "100000",
    "--request-burst",
    "100000",
];

/// One node on a fresh Postgres schema, with limits out of the way.
async fn one_node() -> Vec<Gateway> {
    let db = fresh_database_url().await;
    let mut args = vec!["--database-url", db.as_str()];
    args.extend(FAST);
    vec![Gateway::start(&args)]
}

async fn three_nodes() -> Cluster {
    // The cluster harness sets its own message rate.
    Cluster::start(3, &shared_redis_url(), &FAST[2..]).await
}

/// Sends `count` messages to `room`, `window` at a time, and waits for
/// every acknowledgement; returns the acknowledged sequence numbers.
async fn send_many(c: &mut Conn, room: &str, tag: &str, count: u32, window: u32) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut next = 0;
    while next < count {
        let end = (next + window).min(count);
        for i in next..end {
            c.raw
                .send(1000 + i, &send_frame(room, &format!("{tag}-{i}"), "x"))
                .await
                .unwrap();
        }
        while acked.len() < end as usize {
            match c.expect().await {
                (_, ServerFrame::MessageSent(a)) => acked.push(a.seq),
                (_, ServerFrame::NewMessage(_)) => {}
                other => panic!("{tag}: unexpected {other:?}"),
            }
        }
        next = end;
    }
    acked
}

/// The bug this guards against: a Join of a room the connection was
/// already in moved its watermark to the room's head, so events still
/// queued (or not yet read from Redis) were dropped without a trace.
async fn rejoin_under_traffic(nodes: &[Gateway]) {
    let room = "busy";
    let mut sender = user(&nodes[0], "rejoin-sender").await;
    join(&mut sender, &[room]).await;
    let mut member = user(nodes.last().unwrap(), "rejoin-member").await;
    let start = join(&mut member, &[room]).await.rooms[0].seq;

    let count = 600;
    let sending =
        tokio::spawn(async move { send_many(&mut sender, room, "m", count, 20).await.len() });
    // Join the same room again and again while the messages flow.
    let mut seqs = Vec::new();
    let mut rejoins = 0u32;
    let mut replies = 0u32;
    let mut rejoined = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seqs.len() < count as usize && Instant::now() < deadline {
        if rejoins < 200 {
            rejoins += 1;
            let join = ClientFrame::Join(Rooms {
                rooms: vec![room.into(), room.into()],
            });
            member.raw.send(5000 + rejoins, &join).await.unwrap();
        }
        while let Some((rid, frame)) = member.next(Duration::from_millis(5)).await {
            match frame {
                ServerFrame::NewMessage(m) => seqs.push(m.message.seq),
                ServerFrame::Joined(j) => {
                    assert!(rid > 5000, "unexpected Joined {rid}");
                    rejoined.extend(j.rooms);
                    replies += 1;
                }
                other => panic!("member: unexpected {other:?}"),
            }
        }
    }
    assert_eq!(sending.await.unwrap(), count as usize);
    let expected: Vec<u64> = (start + 1..=start + u64::from(count)).collect();
    assert_eq!(
        seqs.len(),
        expected.len(),
        "member received {} of {count} messages",
        seqs.len()
    );
    assert_eq!(
        seqs, expected,
        "every sequence exactly once, in order, across {rejoins} re-joins"
    );
    while replies < rejoins {
        match member.expect().await {
            (_, ServerFrame::Joined(j)) => {
                rejoined.extend(j.rooms);
                replies += 1;
            }
            other => panic!("member: unexpected {other:?}"),
        }
    }
    assert!(
        rejoined.is_empty(),
        "a room already joined is not joined again: {:?}",
        &rejoined[..rejoined.len().min(3)]
    );
    assert!(member.alive().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoining_a_joined_room_under_traffic_loses_nothing_on_one_node() {
    rejoin_under_traffic(&one_node().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoining_a_joined_room_under_traffic_loses_nothing_in_a_cluster() {
    rejoin_under_traffic(&three_nodes().await.nodes).await;
}

/// Two members send at once; on each one's connection every frame that
/// carries a sequence number of the room, its own MessageSent included,
/// must arrive in increasing order (PROTOCOL.md §9.5).
async fn acks_in_sequence_order(nodes: &[Gateway]) {
    let room = "duet";
    let mut tasks = Vec::new();
    for (i, node) in [&nodes[0], nodes.last().unwrap()].into_iter().enumerate() {
        let mut c = user(node, &format!("duet-{i}")).await;
        join(&mut c, &[room]).await;
        tasks.push(c);
    }
    let count = 300u32;
    let mut handles = Vec::new();
    for (i, mut c) in tasks.into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            let mut order = Vec::new();
            let mut by_request = Vec::new();
            let mut acks = 0;
            for m in 0..count {
                c.raw
                    .send(10 + m, &send_frame(room, &format!("d{i}-{m}"), "x"))
                    .await
                    .unwrap();
                // Keep a few sends in flight, as a chatty client does.
                while m + 1 - acks > 4 {
                    match c.expect().await {
                        (rid, ServerFrame::MessageSent(a)) => {
                            acks += 1;
                            order.push((a.seq, "ack"));
                            by_request.push((rid, a.seq));
                        }
                        (_, ServerFrame::NewMessage(n)) => order.push((n.message.seq, "event")),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while order.len() < 2 * count as usize && Instant::now() < deadline {
                match c.next(Duration::from_millis(200)).await {
                    Some((rid, ServerFrame::MessageSent(a))) => {
                        order.push((a.seq, "ack"));
                        by_request.push((rid, a.seq));
                    }
                    Some((_, ServerFrame::NewMessage(n))) => order.push((n.message.seq, "event")),
                    Some(other) => panic!("unexpected {other:?}"),
                    None => {}
                }
            }
            (order, by_request)
        }));
    }
    for h in handles {
        let (order, mut by_request) = h.await.unwrap();
        // A client's messages take their places in the order it sent them.
        by_request.sort_unstable();
        assert!(
            by_request.windows(2).all(|w| w[0].1 < w[1].1),
            "messages of one connection out of request order"
        );
        assert_eq!(order.len(), 2 * count as usize, "every ack and every event");
        let bad: Vec<_> = order.windows(2).filter(|w| w[1].0 <= w[0].0).collect();
        assert!(
            bad.is_empty(),
            "{} frames out of sequence order, e.g. {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_senders_ack_is_in_sequence_order_on_one_node() {
    acks_in_sequence_order(&one_node().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_senders_ack_is_in_sequence_order_in_a_cluster() {
    acks_in_sequence_order(&three_nodes().await.nodes).await;
}

/// RFC 6455 §5.5.1: an endpoint that receives a Close answers with one.
#[tokio::test]
async fn a_clients_close_is_answered_with_a_close() {
    let gw = Gateway::start(&[]);
    let (mut identified, _) = identified(&gw, "closer").await;
    let mut fresh = chatgate_client::RawConnection::connect(&gw.url())
        .await
        .unwrap();
    for (what, c) in [
        ("identified", &mut identified),
        ("before Identify", &mut fresh),
    ] {
        c.close().await.unwrap();
        match c.recv_timeout(Duration::from_secs(10)).await.unwrap() {
            Some(Incoming::Closed(Some((code, _)))) => assert_eq!(code, 1000, "{what}"),
            other => panic!("{what}: expected the server's Close, got {other:?}"),
        }
    }
    // The gateway still serves.
    let mut c = user(&gw, "after").await;
    assert!(c.alive().await);
}

/// PROTOCOL.md §9.5 and §9.7 agree: a resuming Ready puts a replayed room
/// at the client's own position, so a client that drops every event at or
/// before Ready's position keeps the whole replay, each event once.
#[tokio::test]
async fn a_resumed_room_starts_at_the_clients_position_and_the_replay_follows() {
    let gw = Gateway::start(&FAST);
    let mut sender = user(&gw, "resume-sender").await;
    join(&mut sender, &["again"]).await;
    let (raw, ready) = identified(&gw, "resume-reader").await;
    let mut reader = Conn::new(raw);
    let start = join(&mut reader, &["again"]).await.rooms[0].clone();
    drop(reader);

    let mut acked = Vec::new();
    for i in 0..5 {
        match sender
            .request(10 + i, send_frame("again", &format!("r-{i}"), "missed"))
            .await
        {
            ServerFrame::MessageSent(a) => acked.push(a.seq),
            other => panic!("{other:?}"),
        }
    }
    let mut raw = chatgate_client::RawConnection::connect(&gw.url())
        .await
        .unwrap();
    let identify = Identify {
        token: token("resume-reader"),
        resume: Some(Resume {
            session_id: ready.session_id,
            positions: vec![start.clone()],
        }),
    };
    raw.send(1, &ClientFrame::Identify(identify)).await.unwrap();
    let mut c = Conn::new(raw);
    let (_, first) = c.expect().await;
    let ServerFrame::Ready(resumed_ready) = first else {
        panic!("expected Ready, got {first:?}");
    };
    assert!(resumed_ready.resuming);
    assert_eq!(
        resumed_ready.rooms,
        vec![start.clone()],
        "Ready carries the client's own position for a replayed room"
    );
    // A client following §9.5 literally: drop what is at or before its
    // position, advance on everything else.
    let mut position = (start.epoch, start.seq);
    let mut kept = Vec::new();
    let outcome = loop {
        match c.expect().await {
            (_, ServerFrame::NewMessage(m)) => {
                if m.epoch == position.0 && m.message.seq > position.1 {
                    position.1 = m.message.seq;
                    kept.push(m.message.seq);
                }
            }
            (_, ServerFrame::Resumed(r)) => break r,
            (_, other) => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(kept, acked, "every missed message, once, in order");
    let room = &outcome.rooms[0];
    assert!(room.recovered);
    assert_eq!(room.replayed, 5);
    assert_eq!((room.epoch, room.seq), position, "Resumed carries the head");
    assert!(c.next(Duration::from_millis(300)).await.is_none());
    assert!(c.alive().await);
}
