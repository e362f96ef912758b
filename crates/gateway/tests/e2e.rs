//! End-to-end: the real gateway process, real WebSockets.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::time::{Duration, Instant};

use chatgate_client::{Client, ClientConfig, Event, RawConnection};
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, CloseCode, ErrorCode, ServerFrame};
use common::*;

const QUIET: Duration = Duration::from_millis(300);

/// Whole tokens a bucket refilling at `per_second` can gain in `elapsed`.
/// Limits are tested at rates so low that this is 0 on any machine that
/// runs the test in less than one refill; a slower machine is allowed
/// exactly the tokens it earned. So counts check the limit's rule, never
/// how fast the machine is.
fn refills(elapsed: Duration, per_second: f64) -> usize {
    (elapsed.as_secs_f64() * per_second).floor() as usize
}

#[tokio::test]
async fn two_users_chat_sender_acked_not_echoed_outsider_hears_nothing() {
    let gw = Gateway::start(&[]);
    let mut alice = user(&gw, "alice").await;
    let mut alice_phone = user(&gw, "alice").await;
    let mut bob = user(&gw, "bob").await;
    let mut carol = user(&gw, "carol").await;
    join(&mut alice, &["general"]).await;
    join(&mut alice_phone, &["general"]).await;
    join(&mut bob, &["general"]).await;
    join(&mut carol, &["random"]).await;

    let ack = match alice
        .request(10, send_frame("general", "m1", "hi bob"))
        .await
    {
        ServerFrame::MessageSent(a) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!(ack.seq, 1);
    assert!(!ack.duplicate);
    for c in [&mut bob, &mut alice_phone] {
        match c.expect().await {
            (0, ServerFrame::NewMessage(m)) => {
                assert_eq!(m.message.body, "hi bob");
                assert_eq!(m.message.id, ack.message_id);
                assert_eq!(m.message.seq, 1);
                assert_eq!(m.message.sender_id, "alice");
            }
            other => panic!("{other:?}"),
        }
    }
    alice
        .assert_quiet(QUIET, "the sending connection got an echo")
        .await;
    carol
        .assert_quiet(QUIET, "a non-member got the message")
        .await;

    // Bob answers through the client library.
    let (bob_client, _events) = Client::connect(ClientConfig::new(gw.url(), token("bob")))
        .await
        .unwrap();
    bob_client.join(&["general"]).await.unwrap();
    let reply = bob_client.send("general", "hello alice").await.unwrap();
    assert_eq!(reply.seq, 2);
    match alice.expect().await {
        (0, ServerFrame::NewMessage(m)) => assert_eq!(m.message.body, "hello alice"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn retried_send_is_stored_and_delivered_once() {
    let gw = Gateway::start(&[]);
    let mut alice = user(&gw, "alice").await;
    let mut bob = user(&gw, "bob").await;
    join(&mut alice, &["r"]).await;
    join(&mut bob, &["r"]).await;
    let first = alice.request(3, send_frame("r", "same-id", "once")).await;
    let again = alice.request(4, send_frame("r", "same-id", "once")).await;
    let (ServerFrame::MessageSent(a), ServerFrame::MessageSent(b)) = (first, again) else {
        panic!()
    };
    assert!(!a.duplicate && b.duplicate);
    assert_eq!((a.message_id, a.seq), (b.message_id, b.seq));
    assert!(matches!(bob.expect().await.1, ServerFrame::NewMessage(_)));
    bob.assert_quiet(QUIET, "retry delivered twice").await;
}

#[tokio::test]
async fn history_pages_back_newest_first() {
    let gw = Gateway::start(&["--messages-per-minute", "1000", "--request-burst", "1000"]);
    let mut alice = user(&gw, "alice").await;
    join(&mut alice, &["h"]).await;
    for i in 0..120 {
        let r = alice
            .request(
                100 + i,
                send_frame("h", &format!("c{i}"), &format!("msg {i}")),
            )
            .await;
        assert!(matches!(r, ServerFrame::MessageSent(_)), "{r:?}");
    }
    let mut before = None;
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let page = match alice
            .request(
                7,
                ClientFrame::History(History {
                    room: "h".into(),
                    before,
                    limit: 0,
                }),
            )
            .await
        {
            ServerFrame::HistoryPage(p) => p,
            other => panic!("{other:?}"),
        };
        sizes.push(page.messages.len());
        seen.extend(page.messages.iter().map(|m| m.body.clone()));
        match page.next {
            Some(c) => before = Some(c),
            None => break,
        }
    }
    assert_eq!(sizes, vec![50, 50, 20], "default page size 50");
    let want: Vec<String> = (0..120).rev().map(|i| format!("msg {i}")).collect();
    assert_eq!(seen, want);
    let r = alice
        .request(
            8,
            ClientFrame::History(History {
                room: "h".into(),
                before: None,
                limit: 101,
            }),
        )
        .await;
    assert!(matches!(r, ServerFrame::Error(e) if e.code == ErrorCode::InvalidRequest.code()));
    let r = alice
        .request(
            9,
            ClientFrame::History(History {
                room: "elsewhere".into(),
                before: None,
                limit: 10,
            }),
        )
        .await;
    assert!(matches!(r, ServerFrame::Error(e) if e.code == ErrorCode::NotInRoom.code()));
}

#[tokio::test]
async fn messages_past_the_per_minute_limit_are_refused_and_the_connection_stays() {
    // Two a minute: the bucket holds two and refills one every 30 s, so
    // nothing refills while the test runs.
    const PER_MINUTE: usize = 2;
    let started = Instant::now();
    let gw = Gateway::start(&["--messages-per-minute", "2"]);
    let mut alice = user(&gw, "alice").await;
    let mut alice2 = user(&gw, "alice").await;
    join(&mut alice, &["r"]).await;
    join(&mut alice2, &["r"]).await;
    // Five sends on one connection, then three on the other: the limit is
    // per user, so the second connection finds the bucket empty.
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..8u32 {
        let c = if i < 5 { &mut alice } else { &mut alice2 };
        match c
            .request(10 + i, send_frame("r", &format!("c{i}"), "x"))
            .await
        {
            ServerFrame::MessageSent(_) => acked.push(i),
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited.code(), "send {i}: {e:?}");
                // One token takes 30 s at this rate.
                assert!(
                    e.retry_after_ms > 0 && e.retry_after_ms <= 30_000,
                    "send {i}: retry after {} ms",
                    e.retry_after_ms
                );
                refused += 1;
            }
            other => panic!("send {i}: {other:?}"),
        }
    }
    let slack = refills(started.elapsed(), PER_MINUTE as f64 / 60.0);
    assert_eq!(
        acked[..PER_MINUTE.min(acked.len())],
        [0, 1],
        "a full bucket takes the first sends"
    );
    assert!(
        acked.len() <= PER_MINUTE + slack,
        "sends {acked:?} acked; the limit is {PER_MINUTE} a minute per user ({slack} refilled)"
    );
    assert!(alice.alive().await, "rate limiting must not disconnect");
    assert!(alice2.alive().await, "rate limiting must not disconnect");
    assert_eq!(gw.metric("chat_rate_limited_total"), refused as f64);
}

#[tokio::test]
async fn the_sixth_connection_of_a_user_is_refused() {
    let gw = Gateway::start(&[]);
    let mut five = Vec::new();
    for _ in 0..5 {
        five.push(user(&gw, "dave").await);
    }
    let mut sixth = RawConnection::connect(&gw.url()).await.unwrap();
    sixth
        .send(
            1,
            &ClientFrame::Identify(Identify {
                token: token("dave"),
                resume: None,
            }),
        )
        .await
        .unwrap();
    let mut sixth = Conn::new(sixth);
    assert_eq!(
        sixth.close_code().await,
        Some(CloseCode::ConnectionLimit.code())
    );
    for c in &mut five {
        assert!(c.alive().await);
    }
    // Closing one frees a slot.
    five.pop().unwrap().raw.close().await.unwrap();
    gw.wait_health("4 connections", |h| h["connections"] == 4);
    let _again = user(&gw, "dave").await;
}

async fn violation(gw: &Gateway, act: impl AsyncFnOnce(&mut RawConnection)) -> Option<u16> {
    let (mut raw, _) = identified(gw, "mallory").await;
    act(&mut raw).await;
    Conn::new(raw).close_code().await
}

#[tokio::test]
async fn bad_input_gets_its_close_code_and_others_are_unaffected() {
    let gw = Gateway::start(&["--max-frame-bytes", "4096", "--connect-timeout-ms", "500"]);
    let mut bystander = user(&gw, "bystander").await;

    let code = violation(&gw, async |c| c.send_text("hello").await.unwrap()).await;
    assert_eq!(code, Some(CloseCode::TextFrame.code()));
    let code = violation(&gw, async |c| {
        c.send_bytes(vec![0x05, 0, 1, 0, 0, 0, 9, 9]).await.unwrap()
    })
    .await;
    assert_eq!(code, Some(CloseCode::ProtocolViolation.code()));
    let code = violation(&gw, async |c| {
        c.send_bytes(vec![0x3E, 0, 1, 0, 0, 0]).await.unwrap()
    })
    .await;
    assert_eq!(
        code,
        Some(CloseCode::ProtocolViolation.code()),
        "unknown opcode"
    );
    let code = violation(&gw, async |c| {
        c.send_bytes(vec![0x05; 10_000]).await.unwrap()
    })
    .await;
    assert_eq!(code, Some(CloseCode::FrameTooLarge.code()));
    let code = violation(&gw, async |c| {
        c.send(
            5,
            &ClientFrame::Identify(Identify {
                token: token("mallory"),
                resume: None,
            }),
        )
        .await
        .unwrap()
    })
    .await;
    assert_eq!(code, Some(CloseCode::AlreadyIdentified.code()));

    // Before Identify.
    let mut silent = Conn::new(RawConnection::connect(&gw.url()).await.unwrap());
    assert_eq!(
        silent.close_code().await,
        Some(CloseCode::IdentifyTimeout.code())
    );
    let mut early = RawConnection::connect(&gw.url()).await.unwrap();
    early.send(1, &ClientFrame::Heartbeat).await.unwrap();
    assert_eq!(
        Conn::new(early).close_code().await,
        Some(CloseCode::ProtocolViolation.code())
    );
    for bad in ["not-a-token", &token("x")[..20]] {
        let mut c = RawConnection::connect(&gw.url()).await.unwrap();
        c.send(
            1,
            &ClientFrame::Identify(Identify {
                token: bad.into(),
                resume: None,
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            Conn::new(c).close_code().await,
            Some(CloseCode::InvalidToken.code())
        );
    }
    // A token signed with another secret.
    let forged = chatgate_gateway::auth::Verifier::new(b"some-other-secret-value").mint(
        &chatgate_gateway::auth::Claims {
            sub: "alice".into(),
            name: None,
            picture: None,
            exp: u64::MAX / 2,
            rooms: Vec::new(),
        },
    );
    let mut c = RawConnection::connect(&gw.url()).await.unwrap();
    c.send(
        1,
        &ClientFrame::Identify(Identify {
            token: forged,
            resume: None,
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        Conn::new(c).close_code().await,
        Some(CloseCode::InvalidToken.code())
    );

    // Invalid request fields are an Error frame, not a close.
    match bystander
        .request(
            3,
            ClientFrame::Join(Rooms {
                rooms: vec![String::new()],
            }),
        )
        .await
    {
        ServerFrame::Error(e) => assert_eq!(e.code, ErrorCode::InvalidRequest.code()),
        other => panic!("{other:?}"),
    }
    assert!(bystander.alive().await, "the bystander was affected");
    assert!(gw.metric("chat_auth_failures_total") >= 3.0);
    assert!(gw.metric("chat_closes_total{code=\"text_frame\"}") >= 1.0);
}

#[tokio::test]
async fn upgrade_without_the_subprotocol_is_refused() {
    let gw = Gateway::start(&[]);
    let err = RawConnection::connect_with(&gw.url(), Default::default(), None)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("400"), "{err}");
    assert_eq!(gw.get("/nope").0, 404);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_slow_and_others_keep_up() {
    // Messages are stored in Postgres, not in the gateway; none is kept
    // for resumes (a recovery window of 0) and none is compressed. So the
    // only memory that could grow with this traffic is the queue of the
    // client that stops reading: 2000 messages of 12 KB, 24 MB, were it
    // unbounded.
    let db = fresh_database_url().await;
    let gw = Gateway::start(&[
        "--database-url",
        &db,
        "--recovery-window-secs",
        "0",
        "--compress-threshold",
        "1000000",
        "--messages-per-minute",
        "100000",
        "--requests-per-second",
        "100000",
        "--request-burst",
        "100000",
        "--outbound-queue-frames",
        "64",
        "--outbound-queue-bytes",
        "262144",
    ]);
    let mut sender = user(&gw, "sender").await;
    let mut reader = user(&gw, "reader").await;
    let (mut sloth, _) = identified(&gw, "sloth").await;
    join(&mut sender, &["busy"]).await;
    join(&mut reader, &["busy"]).await;
    sloth
        .send(
            2,
            &ClientFrame::Join(Rooms {
                rooms: vec!["busy".into()],
            }),
        )
        .await
        .unwrap();
    gw.wait_health("3 members", |h| h["connections"] == 3);
    // sloth never reads again; socket buffers (several MiB on loopback)
    // fill after a few hundred messages, then its queue.
    let body: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..12_000)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect()
    };
    let rss_before = gw.health()["memory_rss_bytes"].as_u64().unwrap();
    let total = 2000;
    let reader_task = tokio::spawn(async move {
        let mut got = 0;
        while got < total {
            match reader.next(Duration::from_secs(10)).await {
                Some((_, ServerFrame::NewMessage(_))) => got += 1,
                Some(_) => {}
                None => break,
            }
        }
        (got, reader)
    });
    for i in 0..total {
        let ack = sender
            .request(1000 + i, send_frame("busy", &format!("f{i}"), &body))
            .await;
        assert!(matches!(ack, ServerFrame::MessageSent(_)), "{ack:?}");
    }
    let (got, mut reader) = reader_task.await.unwrap();
    assert_eq!(got, total, "the reading member missed messages");
    // Measured before anything waits for the sloth's close: whether or
    // not it is gone yet, its backlog must not be in memory. 8 MiB is a
    // third of what an unbounded queue would hold by now.
    let rss_after = gw.health()["memory_rss_bytes"].as_u64().unwrap();
    assert!(
        rss_after < rss_before + 8 * 1024 * 1024,
        "RSS grew from {rss_before} to {rss_after}"
    );
    gw.wait_health("sloth closed", |h| h["connections"] == 2);
    assert!(reader.alive().await);
    assert_eq!(gw.metric("chat_slow_consumer_disconnects_total"), 1.0);
    assert_eq!(gw.metric("chat_closes_total{code=\"slow_consumer\"}"), 1.0);
    // The sloth's socket is ended by the gateway. Its close code is the
    // metric above: a write was cut off mid-frame on its full socket and
    // did not finish within a second, so the gateway dropped the socket
    // rather than put a close frame inside a frame. What the sloth reads
    // is whole frames, then the end.
    let mut sloth = Conn::new(sloth);
    let ended = sloth.close_code().await;
    assert!(
        matches!(ended, None | Some(4001)),
        "whole frames then the end (or 4001): {ended:?}"
    );
}

#[tokio::test]
async fn silent_clients_time_out_and_heartbeats_keep_them() {
    // Silence is allowed for interval + timeout = 2 s; the talker beats
    // every 100 ms. Only a broken rule fails this, not a slow machine:
    // the talker would have to stall for 20 of its beats.
    let gw = Gateway::start(&[
        "--heartbeat-interval-ms",
        "500",
        "--heartbeat-timeout-ms",
        "1500",
    ]);
    let limit = Duration::from_millis(2000);
    let (silent, ready) = identified(&gw, "quiet").await;
    let silent_since = Instant::now();
    assert_eq!(
        (ready.heartbeat_interval_ms, ready.heartbeat_timeout_ms),
        (500, 1500)
    );
    let mut talker = user(&gw, "talker").await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let beat = tokio::spawn(async move {
        loop {
            assert!(talker.alive().await, "a beating client was dropped");
            tokio::select! {
                _ = &mut stopped => return talker,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    assert_eq!(
        Conn::new(silent).close_code().await,
        Some(CloseCode::HeartbeatTimeout.code())
    );
    // Not at the interval: the timeout is added to it. (The gateway's
    // clock started before Ready reached this test, hence the slack; a
    // slow machine only makes this later.)
    let silent_for = silent_since.elapsed();
    assert!(
        silent_for >= limit - Duration::from_millis(500),
        "closed after {silent_for:?} of silence; the limit is {limit:?}"
    );
    // The talker, connected before the silent one was closed, beats on
    // for one more silence limit: it outlives the limit by beating.
    tokio::time::sleep(limit).await;
    stop.send(()).unwrap();
    let mut talker = beat.await.unwrap();
    assert!(talker.alive().await);
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_events() {
    let gw = Gateway::start(&["--messages-per-minute", "1000", "--request-burst", "1000"]);
    let mut alice = user(&gw, "alice").await;
    let (mut bob_raw, bob_ready) = identified(&gw, "bob").await;
    join(&mut alice, &["r"]).await;
    let mut bob = Conn::new(bob_raw);
    let joined = join(&mut bob, &["r"]).await;
    let start = joined.rooms[0].clone();
    for i in 0..3 {
        alice
            .request(
                10 + i,
                send_frame("r", &format!("a{i}"), &format!("seen {i}")),
            )
            .await;
    }
    let mut last = start.seq;
    for _ in 0..3 {
        if let (_, ServerFrame::NewMessage(m)) = bob.expect().await {
            last = m.message.seq;
        }
    }
    bob.raw.close().await.unwrap();
    drop(bob);
    for i in 0..5 {
        alice
            .request(
                20 + i,
                send_frame("r", &format!("b{i}"), &format!("missed {i}")),
            )
            .await;
    }
    // Bob resumes from where he was.
    bob_raw = RawConnection::connect(&gw.url()).await.unwrap();
    let resume = Resume {
        session_id: bob_ready.session_id,
        positions: vec![RoomPosition {
            room: "r".into(),
            epoch: start.epoch,
            seq: last,
        }],
    };
    bob_raw
        .send(
            1,
            &ClientFrame::Identify(Identify {
                token: token("bob"),
                resume: Some(resume),
            }),
        )
        .await
        .unwrap();
    let mut bob = Conn::new(bob_raw);
    assert!(matches!(bob.expect().await, (1, ServerFrame::Ready(r)) if r.resuming));
    let mut bodies = Vec::new();
    loop {
        match bob.expect().await.1 {
            ServerFrame::NewMessage(m) => bodies.push(m.message.body),
            ServerFrame::Resumed(r) => {
                assert_eq!(r.rooms.len(), 1);
                assert!(r.rooms[0].recovered);
                assert_eq!(r.rooms[0].replayed, 5);
                assert_eq!(r.rooms[0].seq, last + 5);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        bodies,
        (0..5).map(|i| format!("missed {i}")).collect::<Vec<_>>()
    );
    // Live traffic continues after the replay, without duplicates.
    alice.request(40, send_frame("r", "c", "live")).await;
    match bob.expect().await.1 {
        ServerFrame::NewMessage(m) => {
            assert_eq!((m.message.body.as_str(), m.message.seq), ("live", last + 6))
        }
        other => panic!("{other:?}"),
    }
    // A position from another epoch is reported, not silently skipped.
    let mut stale = RawConnection::connect(&gw.url()).await.unwrap();
    let resume = Resume {
        session_id: [0; 16],
        positions: vec![RoomPosition {
            room: "r".into(),
            epoch: start.epoch + 1,
            seq: 1,
        }],
    };
    stale
        .send(
            1,
            &ClientFrame::Identify(Identify {
                token: token("carol"),
                resume: Some(resume),
            }),
        )
        .await
        .unwrap();
    let mut stale = Conn::new(stale);
    stale.expect().await;
    match stale.expect().await.1 {
        ServerFrame::Resumed(r) => assert!(!r.rooms[0].recovered),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn typing_and_reactions_reach_the_room() {
    let gw = Gateway::start(&[]);
    let mut alice = user(&gw, "alice").await;
    let mut bob = user(&gw, "bob").await;
    join(&mut alice, &["r"]).await;
    join(&mut bob, &["r"]).await;
    assert!(matches!(
        alice
            .request(3, ClientFrame::Typing(Typing { room: "r".into() }))
            .await,
        ServerFrame::Ok
    ));
    assert!(matches!(bob.expect().await.1, ServerFrame::UserTyping(t) if t.user_id == "alice"));
    let sent = match alice.request(4, send_frame("r", "m", "react to me")).await {
        ServerFrame::MessageSent(s) => s,
        other => panic!("{other:?}"),
    };
    bob.expect().await;
    let react = ClientFrame::React(React {
        room: "r".into(),
        message_id: sent.message_id,
        emoji: "👍".into(),
        remove: false,
    });
    match bob.request(5, react).await {
        ServerFrame::Reacted(r) => assert_eq!(r.seq, sent.seq + 1),
        other => panic!("{other:?}"),
    }
    match alice.expect().await.1 {
        ServerFrame::Reaction(r) => assert_eq!(
            (r.user_id.as_str(), r.emoji.as_str(), r.seq),
            ("bob", "👍", sent.seq + 1)
        ),
        other => panic!("{other:?}"),
    }
    let page = match alice
        .request(
            6,
            ClientFrame::History(History {
                room: "r".into(),
                before: None,
                limit: 5,
            }),
        )
        .await
    {
        ServerFrame::HistoryPage(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        page.messages[0].reactions,
        vec![ReactionCount {
            emoji: "👍".into(),
            count: 1
        }]
    );
    let missing = ClientFrame::React(React {
        room: "r".into(),
        message_id: 999_999,
        emoji: "x".into(),
        remove: false,
    });
    assert!(
        matches!(bob.request(7, missing).await, ServerFrame::Error(e) if e.code == ErrorCode::NotFound.code())
    );
}

#[tokio::test]
async fn stored_memberships_are_joined_at_identify() {
    let gw = Gateway::start(&[]);
    let mut first = user(&gw, "erin").await;
    join(&mut first, &["a", "b"]).await;
    let (_, ready) = identified(&gw, "erin").await;
    let rooms: Vec<&str> = ready.rooms.iter().map(|r| r.room.as_str()).collect();
    assert_eq!(rooms, vec!["a", "b"]);
    assert!(matches!(
        first
            .request(
                3,
                ClientFrame::Leave(Rooms {
                    rooms: vec!["a".into()]
                })
            )
            .await,
        ServerFrame::Left(_)
    ));
    let (_, ready) = identified(&gw, "erin").await;
    assert_eq!(ready.rooms.len(), 1);
}

#[tokio::test]
async fn metrics_and_health_follow_activity() {
    let gw = Gateway::start(&[]);
    assert_eq!(gw.health()["connections"], 0);
    let mut a = user(&gw, "a").await;
    let mut b = user(&gw, "b").await;
    join(&mut a, &["m"]).await;
    join(&mut b, &["m"]).await;
    a.request(3, send_frame("m", "1", "x")).await;
    b.expect().await;
    let h = gw.health();
    assert_eq!(h["connections"], 2);
    assert_eq!(h["rooms"], 1);
    assert_eq!(h["status"], "ok");
    assert!(h["memory_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(gw.metric("chat_connections"), 2.0);
    assert_eq!(gw.metric("chat_frames_in_total{opcode=\"send\"}"), 1.0);
    assert_eq!(gw.metric("chat_frames_in_total{opcode=\"join\"}"), 2.0);
    assert_eq!(gw.metric("chat_deliveries_total"), 1.0);
    assert!(gw.metric("chat_frames_out_total{opcode=\"new_message\"}") >= 1.0);
    assert!(gw.metric("chat_bytes_in_total") > 0.0);
    assert!(gw.metric("chat_process_resident_memory_bytes") > 0.0);
    assert!(gw.metric("chat_request_duration_seconds_count{opcode=\"send\"}") >= 1.0);
}

#[tokio::test]
async fn at_capacity_upgrades_get_503_with_retry_after() {
    let gw = Gateway::start(&["--max-connections", "2"]);
    let _a = user(&gw, "a").await;
    let b = user(&gw, "b").await;
    let (status, headers) = gw.upgrade_response();
    assert_eq!(status, 503, "{headers:?}");
    let retry_after = headers
        .iter()
        .find(|(name, _)| name == "retry-after")
        .map(|(_, value)| value.as_str())
        .unwrap_or_else(|| panic!("a 503 without Retry-After: {headers:?}"));
    let secs: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not delay-seconds: {retry_after:?}"));
    assert!((1..=60).contains(&secs), "Retry-After: {secs}");
    // The client library reports the refusal too.
    let err = RawConnection::connect(&gw.url()).await.err().unwrap();
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(gw.metric("chat_connections_refused_overload_total"), 2.0);
    assert_eq!(gw.get("/health").0, 200, "HTTP still served at capacity");
    // A retry after a connection left gets in.
    drop(b);
    gw.wait_health("a slot freed", |h| h["connections"] == 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match gw.upgrade_response() {
            (101, _) => break,
            (503, _) => assert!(Instant::now() < deadline, "the freed slot stays taken"),
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sigterm_closes_sessions_with_4000_and_exits_cleanly() {
    let mut gw = Gateway::start(&[]);
    let (c, _) = identified(&gw, "a").await;
    let mut c = Conn::new(c);
    gw.terminate();
    assert_eq!(c.close_code().await, Some(CloseCode::ShuttingDown.code()));
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn ten_thousand_connections_open_and_close_without_leaks() {
    // 500 handshakes at once from one address: past the default cap.
    let gw = Gateway::start(&["--max-pending-per-ip", "0"]);
    let url = gw.url();
    for wave in 0..20 {
        let mut tasks = Vec::new();
        for i in 0..500 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("u{wave}-{i}");
                let mut c = RawConnection::connect(&url).await.unwrap();
                c.send(
                    1,
                    &ClientFrame::Identify(Identify {
                        token: token(&name),
                        resume: None,
                    }),
                )
                .await
                .unwrap();
                let rooms = vec![format!("room-{}", i % 50), "lobby".to_string()];
                c.send(2, &ClientFrame::Join(Rooms { rooms }))
                    .await
                    .unwrap();
                let mut c = Conn::new(c);
                loop {
                    if let (2, f) = c.expect().await {
                        assert!(matches!(f, ServerFrame::Joined(_)));
                        break;
                    }
                }
                if i % 2 == 0 {
                    c.raw.close().await.unwrap();
                }
                // Odd ones just drop the socket (no close handshake).
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let h = gw.wait_health("everything released", |h| {
        h["connections"] == 0 && h["rooms"] == 0 && h["users"] == 0
    });
    assert_eq!(gw.metric("chat_connections_total"), 10_000.0, "{h}");
    assert_eq!(gw.metric("chat_rooms"), 0.0);
}

#[tokio::test]
async fn the_client_library_reconnects_and_rejoins_after_a_restart() {
    // Two gateways on one address, one after the other. The first binds
    // a port of the kernel's choosing; from before it stops until the
    // second has bound, the test holds the address itself (all three
    // sockets share it with SO_REUSEPORT), so no other process can take
    // it in between. Connections that reach the placeholder are reset
    // when it goes: to the client, the gateway is down until then.
    let first = Gateway::start(&["--reuse-port"]);
    let listen = first.addr.to_string();
    let mut config = ClientConfig::new(first.url(), token("alice"));
    config.backoff_base = Duration::from_millis(50);
    let (client, mut events) = Client::connect(config).await.unwrap();
    client.join(&["r"]).await.unwrap();
    let placeholder = hold_address(first.addr);
    first.terminate();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Disconnected { code, reconnecting } => {
                assert_eq!(code, Some(CloseCode::ShuttingDown.code()));
                assert!(reconnecting);
                break;
            }
            _ => continue,
        }
    }
    drop(first);
    let second = Gateway::start_on(&listen, &["--reuse-port"]);
    drop(placeholder);
    // The new node has a new epoch: the client hears it could not recover.
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Resumed(r) => {
                assert_eq!(r.rooms.len(), 1);
                assert!(!r.rooms[0].recovered);
                break;
            }
            _ => continue,
        }
    }
    // It is back in the room: messages reach it.
    let mut bob = user(&second, "bob").await;
    join(&mut bob, &["r"]).await;
    bob.request(3, send_frame("r", "x", "welcome back")).await;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Message(m) => {
                assert_eq!(m.message.body, "welcome back");
                break;
            }
            _ => continue,
        }
    }
    // Requests work on the new connection.
    assert_eq!(client.send("r", "thanks").await.unwrap().seq, 2);
}

#[tokio::test]
async fn a_typing_flood_is_refused_with_rate_limited_and_the_connection_stays() {
    // The lowest refill (one request a second) under a burst of 40: the
    // flood of 200 outruns it by far, and the count allows exactly the
    // tokens that refilled meanwhile (none on a machine of normal speed).
    let started = Instant::now();
    let gw = Gateway::start(&["--requests-per-second", "1", "--request-burst", "40"]);
    let mut flooder = user(&gw, "flooder").await;
    let mut peer = user(&gw, "peer").await;
    join(&mut flooder, &["r"]).await;
    join(&mut peer, &["r"]).await;
    for i in 0..200u32 {
        flooder
            .raw
            .send(100 + i, &ClientFrame::Typing(Typing { room: "r".into() }))
            .await
            .unwrap();
    }
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..200 {
        match flooder.expect().await.1 {
            ServerFrame::Ok => ok += 1,
            ServerFrame::Error(e) if e.code == ErrorCode::RateLimited.code() => {
                // One token takes a second at this rate.
                assert!(
                    e.retry_after_ms > 0 && e.retry_after_ms <= 1000,
                    "{}",
                    e.retry_after_ms
                );
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // 40 tokens minus the Join's, plus what refilled.
    let slack = refills(started.elapsed(), 1.0);
    assert!(
        (39..=39 + slack).contains(&ok),
        "{ok} typing requests allowed; the burst is 40 with the Join taking one ({slack} refilled)"
    );
    assert_eq!(ok + limited, 200);
    // Throttled, not disconnected: even its heartbeat costs a request,
    // and is answered (refused while the budget refills).
    match flooder.request(0xFFFF, ClientFrame::Heartbeat).await {
        ServerFrame::HeartbeatAck(_) => {}
        ServerFrame::Error(e) if e.code == ErrorCode::RateLimited.code() => {}
        other => panic!("the flooder's heartbeat: {other:?}"),
    }
    // The peer saw the allowed typing coalesced to one per 2 s (one user,
    // one room): queued to it before the flooder's answers, so all of
    // them arrive before the answer to a heartbeat sent now.
    peer.raw.send(9, &ClientFrame::Heartbeat).await.unwrap();
    let mut typing = 0;
    loop {
        match peer.expect().await {
            (9, ServerFrame::HeartbeatAck(_)) => break,
            (_, ServerFrame::UserTyping(_)) => typing += 1,
            other => panic!("{other:?}"),
        }
    }
    let intervals = 1 + (started.elapsed().as_secs() / 2) as usize;
    assert!(
        (1..=intervals).contains(&typing),
        "{typing} typing events delivered of {ok} allowed; at most {intervals} expected"
    );
    assert!(matches!(
        peer.request(10, send_frame("r", "p1", "still fine")).await,
        ServerFrame::MessageSent(_)
    ));
}

/// Promise: `chatgate health` (what the image's health check runs) exits
/// 0 with the health JSON while a gateway serves, and 1 when nothing
/// answers.
#[test]
fn the_health_subcommand_tells_serving_from_not() {
    let gw = Gateway::start(&[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .args(["health", "--addr", &gw.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    // A port nobody listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .args([
            "health",
            "--addr",
            &closed.to_string(),
            "--timeout-ms",
            "500",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Promise: a gateway started with a low soft open-files limit (the
/// common 1,024 of containers) raises it to the hard limit before it
/// sizes `max_connections` (the limit less the pending pool, the
/// database pool and a reserve), instead of sizing it from 1,024.
#[test]
fn a_low_soft_open_files_limit_is_raised_to_the_hard_one() {
    use std::io::{BufRead, BufReader};
    let hard: u64 = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .expect("a numeric hard limit");
    assert!(
        hard > 1024,
        "the hard limit here ({hard}) leaves nothing to raise"
    );
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -Sn 1024 && exec "$0" --listen 127.0.0.1:0"#)
        .arg(env!("CARGO_BIN_EXE_chatgate"))
        .env("CHAT_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The "listening" line: the node is built (the "starting" one comes
    // before it, while backends are reached).
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("chatgate listening") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "no listening line");
    }
    let addr: std::net::SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let health = std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .args(["health", "--addr", &addr.to_string()])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let body: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    // Defaults: pending min(1024, hard / 8), pool 16, reserve 64 (memory
    // allows more on any machine that runs these tests).
    let pending = 1024.min(hard / 8);
    assert_eq!(
        body["max_connections"].as_u64(),
        Some(hard - pending - 16 - 64),
        "{body}"
    );
}

#[tokio::test]
async fn the_chat_page_is_served_and_signs_in_with_development_tokens_only_locally() {
    let gw = Gateway::start(&[]);
    let (status, page) = gw.get("/");
    assert_eq!(status, 200);
    assert!(
        page.contains("/app.js"),
        "the page loads its script: {page}"
    );
    assert_eq!(gw.get("/app.js").0, 200);
    assert_eq!(gw.get("/app.css").0, 200);
    assert_eq!(gw.get("/app.js.map").0, 404);

    let (status, body) = gw.get("/dev/token?name=Ada%20L");
    assert_eq!(status, 200, "{body}");
    let issued: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(issued["user"], "Ada L");
    let token = issued["token"].as_str().unwrap().to_owned();
    let mut raw = send_identify(&gw, token, None).await;
    match next_frame(&mut raw).await {
        (1, ServerFrame::Ready(r)) => {
            assert_eq!(r.user_id, "Ada L");
            assert_eq!(r.user_name, "Ada L");
        }
        other => panic!("expected Ready, got {other:?}"),
    }
    for bad in [
        "",
        "?name=",
        "?name=%20%20",
        "?name=a%E2%80%AEb",
        "?name=%0A",
    ] {
        assert_eq!(gw.get(&format!("/dev/token{bad}")).0, 400, "{bad}");
    }
    let long = "x".repeat(33);
    assert_eq!(gw.get(&format!("/dev/token?name={long}")).0, 400);

    // Not through a proxy (it would hand tokens to everyone it serves).
    let (status, _) = http_raw_with(
        gw.addr,
        "GET /dev/token?name=ada HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
    let proxied = Gateway::start(&["--trusted-proxy", "127.0.0.2"]);
    assert_eq!(proxied.get("/dev/token?name=ada").0, 404);

    // With a real secret nobody can sign in through the page's shortcut.
    let secret = "a-real-secret-of-more-than-32-bytes-0123456789";
    let real = Gateway::start(&["--token-secret", secret]);
    assert_eq!(real.get("/dev/token?name=ada").0, 404);
    assert_eq!(real.get("/").0, 200);
}
