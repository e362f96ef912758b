//! The abuse suite: what one hostile (or merely unlucky) client could do
//! to a node or to other users, tried against a real gateway process.
//! Each test fails on a gateway without the bound it checks.

#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use chatgate_protocol::ClientFrame;
use chatgate_protocol::ServerFrame;
use chatgate_protocol::limits::{MAX_ATTACHMENTS, MAX_BODY_BYTES};
use chatgate_protocol::payload::*;
use common::*;
use rand::Rng;

/// Text that does not compress (so no frame shrinks below its limit).
fn noise(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(rng.random_range(b'!'..=b'~')))
        .collect()
}

/// The largest message §6 allows.
fn largest_message(room: &str, cid: &str) -> ClientFrame {
    let attachment = || Attachment {
        url: format!("https://files.test/{}", noise(2048 - 19)),
        name: noise(255),
        mime: noise(127),
        size: u64::MAX,
    };
    ClientFrame::Send(Send {
        room: room.into(),
        client_msg_id: cid.into(),
        body: noise(MAX_BODY_BYTES),
        attachments: (0..MAX_ATTACHMENTS).map(|_| attachment()).collect(),
    })
}

/// Forty maximum-size messages are more than one frame holds: pages end
/// early with a cursor, and paging on reads every message once, in order.
#[tokio::test]
async fn history_of_maximum_size_messages_pages_instead_of_failing() {
    let gw = Gateway::start(&["--messages-per-minute", "1000", "--request-burst", "1000"]);
    let mut alice = user(&gw, "alice").await;
    let room = "public:big";
    join(&mut alice, &[room]).await;
    let mut sent = Vec::new();
    for i in 0..40u32 {
        match alice
            .request(10 + i, largest_message(room, &format!("m{i}")))
            .await
        {
            ServerFrame::MessageSent(s) => sent.push(s.message_id),
            other => panic!("send {i}: {other:?}"),
        }
    }
    let mut reader = user(&gw, "bob").await;
    join(&mut reader, &[room]).await;
    let mut seen = Vec::new();
    let mut before = None;
    let mut pages = 0;
    loop {
        let page = reader
            .request(
                100 + pages,
                ClientFrame::History(History {
                    room: room.into(),
                    before,
                    limit: 50,
                }),
            )
            .await;
        let ServerFrame::HistoryPage(page) = page else {
            panic!("page {pages}: {page:?}");
        };
        pages += 1;
        assert!(
            !page.messages.is_empty() || page.next.is_none(),
            "empty page with a cursor"
        );
        seen.extend(page.messages.iter().map(|m| m.id));
        match page.next {
            Some(c) => before = Some(c),
            None => break,
        }
        assert!(pages < 20, "paging does not end");
    }
    sent.reverse();
    assert_eq!(seen, sent, "every message once, newest first");
    assert!(pages >= 2, "one frame cannot hold forty such messages");
}

/// Every frame costs the connection's request budget, Heartbeat included,
/// and a client that keeps sending past its refusals is read no faster
/// than its budget refills: 1,000 heartbeats sent at once get ~20 answers
/// in the first second, not 1,000.
#[tokio::test]
async fn a_heartbeat_flood_is_metered_and_read_no_faster_than_the_budget() {
    let gw = Gateway::start(&["--requests-per-second", "10", "--request-burst", "10"]);
    let mut flooder = user(&gw, "flooder").await;
    let started = std::time::Instant::now();
    let codec = chatgate_protocol::Codec::default();
    let heartbeat = codec.encode_client(7, &ClientFrame::Heartbeat).unwrap();
    for _ in 0..1000 {
        flooder.raw.send_bytes(heartbeat.clone()).await.unwrap();
    }
    let (mut acks, mut refused) = (0u32, 0u32);
    while let Some((_, frame)) = flooder.next(std::time::Duration::from_millis(300)).await {
        match frame {
            ServerFrame::HeartbeatAck(_) => acks += 1,
            ServerFrame::Error(e) if e.code == chatgate_protocol::ErrorCode::RateLimited.code() => {
                refused += 1
            }
            other => panic!("{other:?}"),
        }
        if started.elapsed() > std::time::Duration::from_secs(1) {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // The burst (10) plus 10 a second, and as many refusals.
    let allowed = 10.0 + 10.0 * secs + 1.0;
    assert!(
        f64::from(acks) <= allowed,
        "{acks} heartbeats answered in {secs:.2} s; at most {allowed:.0} allowed"
    );
    assert!(refused >= 1, "none refused");
    assert!(
        // Refusals are answered at the same pace; reading pauses past them.
        f64::from(acks + refused) <= 4.0 * allowed,
        "{acks} answered and {refused} refused in {secs:.2} s: reading did not slow down"
    );
    assert!(flooder.closed.is_none(), "throttled, not closed");
}

/// A compressed request inflates no further than the largest payload its
/// opcode can legally have: a 1 KiB Send claiming 1 MiB ends the
/// connection with 4103 after ~41 KiB of work, not 1 MiB.
#[tokio::test]
async fn a_compressed_send_stops_inflating_at_the_largest_legal_send() {
    let gw = Gateway::start(&[]);
    let mut bomber = user(&gw, "bomber").await;
    join(&mut bomber, &["public:r"]).await;
    let packing = chatgate_protocol::Codec::new(chatgate_protocol::CodecConfig {
        compress_threshold: 0,
        ..Default::default()
    });
    let bomb = packing
        .encode_client(5, &send_frame("public:r", "b", &"a".repeat(1_000_000)))
        .unwrap();
    assert!(bomb.len() < 8192, "{} bytes", bomb.len());
    bomber.raw.send_bytes(bomb).await.unwrap();
    assert_eq!(bomber.close_code().await, Some(4103));
    // Others are unaffected.
    let mut other = user(&gw, "other").await;
    join(&mut other, &["public:r"]).await;
    assert!(matches!(
        other.request(9, send_frame("public:r", "ok", "fine")).await,
        ServerFrame::MessageSent(_)
    ));
}

// ------------------------------------------------------------ before Identify

/// A TCP connection to `gw` from the source address `from` (127.0.0.x).
fn tcp_from(gw: &Gateway, from: &str) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let src: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    s.connect(&gw.addr.into()).unwrap();
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s
}

/// Sends one keep-alive GET and reads its status line and head.
fn get_on(s: &mut std::net::TcpStream, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8(head).unwrap();
    // Skip the body (Content-Length).
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(head)
}

/// Whether the peer closed `s` (EOF) within its read timeout.
fn closed(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Upgraded sockets that never identify do not take session slots: with
/// room for 3 sessions, 8 silent upgrades leave a real user able to
/// connect and identify (the slot is claimed once the token checks out).
#[tokio::test]
async fn silent_upgrades_do_not_take_session_slots() {
    let gw = Gateway::start(&["--max-connections", "3"]);
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            chatgate_client::RawConnection::connect(&gw.url())
                .await
                .expect("an upgrade that will never identify"),
        );
    }
    // The eight, and the socket asking.
    assert_eq!(gw.health()["pending"], 9);
    let mut real = user(&gw, "real").await;
    assert!(real.alive().await);
    assert_eq!(gw.health()["connections"], 1);
    drop(silent);
}

/// An HTTP connection holds a pending slot only for the connect timeout
/// and at most 100 requests, however it paces them, and the oldest makes
/// room when the pool is full: keep-alive sockets filling the pending
/// pool are closed, and new sockets get answered.
#[test]
fn keep_alive_sockets_cannot_hold_the_pending_pool() {
    let gw = Gateway::start(&[
        "--max-pending-connections",
        "8",
        "--max-pending-per-ip",
        "0",
        "--connect-timeout-ms",
        "1500",
    ]);
    let started = std::time::Instant::now();
    // One at a time, each answered before the next connects: admitted in
    // this order, so hogs[0] is the oldest.
    let mut hogs = Vec::new();
    for _ in 0..8 {
        let mut h = tcp_from(&gw, "127.0.0.1");
        assert!(get_on(&mut h, "/nope").is_some());
        hogs.push(h);
    }
    // Full now: a ninth socket makes room by evicting the oldest, and is
    // answered at once.
    let mut ninth = tcp_from(&gw, "127.0.0.1");
    let answer = get_on(&mut ninth, "/health").unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // Well before its connect timeout (1.5 s after it was admitted).
    hogs[0]
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    assert!(
        closed(&mut hogs[0]),
        "the oldest keep-alive socket made room"
    );
    hogs[0]
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    drop(ninth);
    // The hogs keep asking, well inside any per-request timeout...
    while started.elapsed() < std::time::Duration::from_millis(1000) {
        for h in &mut hogs {
            let _ = get_on(h, "/nope");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // ...and are closed when their connect timeout is up.
    for (i, h) in hogs.iter_mut().enumerate() {
        assert!(closed(h), "keep-alive socket {i} still open");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "closed late: {:?}",
        started.elapsed()
    );
    assert_eq!(gw.get("/health").0, 200);
    // One connection may make at most 100 requests (with time enough).
    let gw = Gateway::start(&[]);
    let mut busy = tcp_from(&gw, "127.0.0.1");
    let mut answered = 0;
    while let Some(head) = get_on(&mut busy, "/nope") {
        answered += 1;
        if head.to_ascii_lowercase().contains("connection: close") {
            break;
        }
        assert!(answered < 200, "never told to close");
    }
    assert_eq!(answered, 100);
    assert!(closed(&mut busy));
}

/// One source address may hold only so many unidentified sockets; other
/// addresses are served. Behind a trusted proxy the address is the one it
/// appends to X-Forwarded-For; from anyone else the header is ignored.
#[test]
fn unidentified_sockets_are_capped_per_source_address() {
    let gw = Gateway::start(&["--max-pending-per-ip", "4", "--trusted-proxy", "127.0.0.3"]);
    let _idle: Vec<_> = (0..4).map(|_| tcp_from(&gw, "127.0.0.2")).collect();
    // The four, and the socket asking.
    gw.wait_health("4 pending", |h| h["pending"] == 5);
    let mut fifth = tcp_from(&gw, "127.0.0.2");
    let answer = get_on(&mut fifth, "/health").unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    let mut other = tcp_from(&gw, "127.0.0.4");
    let answer = get_on(&mut other, "/health").unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(gw.metric("chat_connections_refused_source_total") >= 1.0);

    // Through the trusted proxy, each client counts on its own: five
    // upgrades for five forwarded clients all pass, four for one client
    // then a fifth is refused.
    let upgrade = |from: &str, client: &str| {
        use std::io::Write;
        let mut s = tcp_from(&gw, from);
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: chat.v1\r\nX-Forwarded-For: 6.6.6.6, {client}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        std::io::Read::read_exact(&mut s, &mut head).unwrap();
        (String::from_utf8_lossy(&head).into_owned(), s)
    };
    let mut held = Vec::new();
    for i in 0..5 {
        let (status, s) = upgrade("127.0.0.3", &format!("198.51.100.{i}"));
        assert_eq!(status, "HTTP/1.1 101", "client {i}");
        held.push(s);
    }
    for _ in 0..3 {
        let (status, s) = upgrade("127.0.0.3", "198.51.100.0");
        assert_eq!(status, "HTTP/1.1 101");
        held.push(s);
    }
    let (status, _) = upgrade("127.0.0.3", "198.51.100.0");
    assert_eq!(status, "HTTP/1.1 503", "a fifth for one forwarded client");
    // An untrusted peer's header is ignored: its own address counts.
    for _ in 0..4 {
        held.push(upgrade("127.0.0.5", "198.51.100.77").1);
    }
    let (status, _) = upgrade("127.0.0.5", "198.51.100.78");
    assert_eq!(status, "HTTP/1.1 503", "the header of an untrusted peer");
}

/// Behind a trusted proxy, a client over its own cap is refused at the
/// door without evicting anyone: the proxy's request head is read ahead
/// for the client's address. (The client used to be counted only at the
/// upgrade, after its socket had already pushed the oldest one out.)
#[test]
fn a_client_behind_the_proxy_cannot_evict_others() {
    let mut args = vec![
        "--max-pending-connections",
        "6",
        "--max-pending-per-ip",
        "2",
        "--trusted-proxy",
        "127.0.0.3",
    ];
    args.extend(API_ARGS);
    let gw = Gateway::start(&args);
    let api = gw.api.unwrap();
    let upgrade = |client: &str| {
        use std::io::Write;
        let mut s = tcp_from(&gw, "127.0.0.3");
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: chat.v1\r\nX-Forwarded-For: {client}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        let status = match std::io::Read::read_exact(&mut s, &mut head) {
            Ok(()) => String::from_utf8_lossy(&head).into_owned(),
            Err(_) => "closed".into(),
        };
        (status, s)
    };
    let mut held = Vec::new();
    for i in 1..=4 {
        let (status, s) = upgrade(&format!("198.51.100.{i}"));
        assert_eq!(status, "HTTP/1.1 101", "client {i}");
        held.push(s);
    }
    for _ in 0..2 {
        let (status, s) = upgrade("203.0.113.9");
        assert_eq!(status, "HTTP/1.1 101");
        held.push(s);
    }
    // The pool is full; the hostile client keeps asking.
    for _ in 0..5 {
        let (status, _) = upgrade("203.0.113.9");
        assert_ne!(status, "HTTP/1.1 101");
    }
    assert_eq!(
        gw.api_metric("chat_connections_evicted_total"),
        0.0,
        "a client over its cap pushed others out"
    );
    assert_eq!(gw.api_metric("chat_connections_refused_source_total"), 5.0);
    let (_, health) = http_raw(api, "GET", "/health", None, "");
    assert!(health.contains("\"pending\":6"), "{health}");
    drop(held);
}

/// Before Identify no frame larger than the largest legal request (a
/// resuming Identify, ~148 KiB) is read: a 200 KiB frame closes with 4103
/// instead of being read whole (1 MiB was allowed).
#[tokio::test]
async fn no_frame_past_the_largest_legal_request_is_read() {
    let gw = Gateway::start(&[]);
    let mut c = chatgate_client::RawConnection::connect(&gw.url())
        .await
        .unwrap();
    let identify = ClientFrame::Identify(Identify {
        token: "x".repeat(200 * 1024),
        resume: None,
    });
    let codec = chatgate_protocol::Codec::new(chatgate_protocol::CodecConfig {
        compress_threshold: usize::MAX,
        ..Default::default()
    });
    c.send_bytes(codec.encode_client(1, &identify).unwrap())
        .await
        .unwrap();
    let mut conn = Conn::new(c);
    assert_eq!(conn.close_code().await, Some(4103));
}

/// Every socket, upgraded or not, holds one descriptor permit for its
/// whole life: under a flood of 300 sockets the process's open files stay
/// within sessions + pending + its own, where upgraded sockets used to
/// give their permit back and let HTTP-phase sockets take more.
#[tokio::test]
async fn open_files_stay_within_the_socket_budget() {
    let gw = Gateway::start(&[
        "--max-connections",
        "20",
        "--max-pending-connections",
        "20",
        "--max-pending-per-ip",
        "0",
    ]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .count()
    };
    let baseline = fds();
    let mut sessions = Vec::new();
    for i in 0..20 {
        sessions.push(user(&gw, &format!("u{i}")).await);
    }
    // 300 more sockets: connect() completes in the backlog whether or not
    // the gateway accepts, so each may hold a file there or not.
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = tokio::net::TcpStream::connect(gw.addr).await {
            flood.push(s);
        }
    }
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(fds());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        peak <= baseline + 20 + 20 + 2,
        "{peak} open files with 20 sessions and 20 pending allowed (baseline {baseline})"
    );
    // The sessions still work.
    assert!(sessions[0].alive().await);
}

// ------------------------------------------------------------ after Identify

/// One user typing from five connections reaches the room as one typing
/// event per 2 s, not one per request (~250 a second before).
#[tokio::test]
async fn typing_from_many_connections_is_coalesced_per_user_and_room() {
    let gw = Gateway::start(&[]);
    let room = "public:t";
    let mut peer = user(&gw, "peer").await;
    join(&mut peer, &[room]).await;
    let mut tabs = Vec::new();
    for _ in 0..5 {
        let mut tab = user(&gw, "typer").await;
        join(&mut tab, &[room]).await;
        tabs.push(tab);
    }
    let started = std::time::Instant::now();
    for round in 0..20u32 {
        for tab in &mut tabs {
            let reply = tab
                .request(
                    100 + round,
                    ClientFrame::Typing(Typing { room: room.into() }),
                )
                .await;
            assert!(matches!(reply, ServerFrame::Ok), "{reply:?}");
        }
    }
    peer.raw.send(9, &ClientFrame::Heartbeat).await.unwrap();
    let mut typing = 0;
    loop {
        match peer.expect().await {
            (9, ServerFrame::HeartbeatAck(_)) => break,
            (_, ServerFrame::UserTyping(t)) => {
                assert_eq!(t.user_id, "typer");
                typing += 1
            }
            other => panic!("{other:?}"),
        }
    }
    let intervals = 1 + (started.elapsed().as_secs() / 2) as usize;
    assert!(
        (1..=intervals).contains(&typing),
        "{typing} typing events for 100 requests in {:?}",
        started.elapsed()
    );
    assert!(gw.metric("chat_typing_coalesced_total") >= 90.0);
}

/// A resume replays no more than one outbox holds: behind by more events
/// than that, the room is "not recovered" (reload from History) instead
/// of the node writing its whole recovery log at once. Within the bound
/// the replay is whole.
#[tokio::test]
async fn a_resume_replays_no_more_than_an_outbox_holds() {
    let gw = Gateway::start(&[
        "--outbound-queue-frames",
        "64",
        "--messages-per-minute",
        "10000",
        "--request-burst",
        "1000",
    ]);
    let room = "public:log";
    let (mut reader, ready) = identify_as(&gw, "reader", &[], None).await;
    join(&mut reader, &[room]).await;
    let session_id = ready.session_id;
    let mut writer = user(&gw, "writer").await;
    join(&mut writer, &[room]).await;
    let mut sent = 0u32;
    let mut send = |n: u32| {
        let frames: Vec<ClientFrame> = (sent..sent + n)
            .map(|i| send_frame(room, &format!("m{i}"), "x"))
            .collect();
        sent += n;
        frames
    };
    let resume_from = |seq: u64, epoch: u64| Resume {
        session_id,
        positions: vec![RoomPosition {
            room: room.into(),
            epoch,
            seq,
        }],
    };
    // Sends `n` messages; the last one's sequence number.
    async fn sent_up_to(writer: &mut Conn, frames: Vec<ClientFrame>) -> u64 {
        let mut last = 0;
        for f in frames {
            match writer.request(3, f).await {
                ServerFrame::MessageSent(s) => last = s.seq,
                other => panic!("{other:?}"),
            }
        }
        last
    }
    // The epoch, from a first message.
    let at = sent_up_to(&mut writer, send(1)).await;
    let epoch = match reader.expect().await.1 {
        ServerFrame::NewMessage(m) => m.epoch,
        other => panic!("{other:?}"),
    };
    drop(reader);
    // 10 behind: replayed whole.
    let last = sent_up_to(&mut writer, send(10)).await;
    let (mut back, _) = identify_as(&gw, "reader", &[], Some(resume_from(at, epoch))).await;
    let resumed = loop {
        match back.expect().await.1 {
            ServerFrame::Resumed(r) => break r,
            ServerFrame::NewMessage(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(resumed.rooms[0].recovered, "{resumed:?}");
    assert_eq!(resumed.rooms[0].replayed, 10);
    drop(back);
    // 200 behind: more than the outbox holds.
    sent_up_to(&mut writer, send(200)).await;
    let (mut back, _) = identify_as(&gw, "reader", &[], Some(resume_from(last, epoch))).await;
    match back.expect().await.1 {
        ServerFrame::Resumed(r) => {
            assert!(!r.rooms[0].recovered, "{r:?}");
            assert_eq!(r.rooms[0].replayed, 0);
        }
        other => panic!("expected Resumed without a replay, got {other:?}"),
    }
}

/// Rooms past `max_rooms_per_session` at Identify are named in the
/// unsolicited Left, never dropped in silence.
#[tokio::test]
async fn rooms_past_the_session_cap_at_identify_are_named() {
    let gw = Gateway::start(&["--max-rooms-per-session", "3"]);
    let rooms: Vec<String> = (0..5).map(|i| format!("public:cap{i}")).collect();
    let resume = Resume {
        session_id: [7; 16],
        positions: rooms
            .iter()
            .map(|r| RoomPosition {
                room: r.clone(),
                epoch: 1,
                seq: 0,
            })
            .collect(),
    };
    let (mut c, ready) = identify_as(&gw, "many", &[], Some(resume)).await;
    assert_eq!(ready.rooms.len(), 3);
    let mut left = None;
    for _ in 0..2 {
        match c.expect().await {
            (0, ServerFrame::Left(l)) => left = Some(l.rooms),
            (_, ServerFrame::Resumed(r)) => assert_eq!(r.rooms.len(), 3),
            other => panic!("{other:?}"),
        }
    }
    let mut named: Vec<String> = left.expect("a Left for the rooms past the cap");
    named.extend(rooms_of(&ready.rooms).iter().map(|r| r.to_string()));
    named.sort();
    assert_eq!(named, rooms);
}

/// Unidentified sockets from many addresses fill the pending pool: a real
/// client still connects and identifies, the oldest silent socket making
/// room for it (closed with 4004), where it used to get 503.
#[tokio::test]
async fn a_full_pending_pool_lets_a_real_client_in() {
    let mut args = vec![
        "--max-pending-connections",
        "16",
        "--max-pending-per-ip",
        "2",
    ];
    args.extend(API_ARGS);
    let gw = Gateway::start(&args);
    // Counters read on the server API's own listener: a probe on the
    // public port would take (or make) room in the pool itself.
    let api = gw.api.unwrap();
    let mut silent = Vec::new();
    for i in 0..16 {
        let from = format!("127.0.0.{}", 10 + i / 2);
        silent.push(tcp_from(&gw, &from));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, health) = http_raw(api, "GET", "/health", None, "");
        if health.contains("\"pending\":16") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gw.api_metric("chat_connections_evicted_total"), 0.0);
    let mut real = user(&gw, "real").await;
    assert!(real.alive().await);
    assert_eq!(gw.api_metric("chat_connections_refused_pending_total"), 0.0);
    assert_eq!(
        gw.api_metric("chat_connections_evicted_total"),
        1.0,
        "one silent socket made room for the real client"
    );
    drop(silent);
}

/// An upgraded socket evicted before it identified is told to come back
/// (4004), not that it is broken.
#[tokio::test]
async fn an_evicted_upgrade_is_closed_with_4004() {
    let gw = Gateway::start(&[
        "--max-pending-connections",
        "2",
        "--max-pending-per-ip",
        "0",
    ]);
    let first = chatgate_client::RawConnection::connect(&gw.url())
        .await
        .unwrap();
    let _second = chatgate_client::RawConnection::connect(&gw.url())
        .await
        .unwrap();
    let mut real = user(&gw, "real").await;
    assert!(real.alive().await);
    let mut first = Conn::new(first);
    assert_eq!(first.close_code().await, Some(4004));
}

/// A socket whose token is still being checked can still make room: an
/// Identify that waits on the identity provider (a JWKS refetch for an
/// unknown key id, up to 5 s) is evicted for a real client, not spared
/// while the idle socket behind it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_whose_token_is_being_checked_can_still_make_room() {
    // A JWKS URL that accepts connections and never answers.
    let provider = hold_address("127.0.0.1:0".parse().unwrap());
    let jwks = provider.local_addr().unwrap().as_socket().unwrap();
    let url = format!("http://{jwks}/jwks");
    let gw = Gateway::start(&[
        "--max-pending-connections",
        "2",
        "--max-pending-per-ip",
        "0",
        "--jwks-url",
        &url,
    ]);
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.c2ln",
        b64(serde_json::json!({"alg": "RS256", "kid": "rotated-in"})),
        b64(serde_json::json!({"sub": "slow", "exp": 4_000_000_000u64}))
    );
    let mut waiting = chatgate_client::RawConnection::connect(&gw.url())
        .await
        .unwrap();
    waiting
        .send(
            1,
            &ClientFrame::Identify(Identify {
                token,
                resume: None,
            }),
        )
        .await
        .unwrap();
    let _idle = chatgate_client::RawConnection::connect(&gw.url())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut real = user(&gw, "real").await;
    assert!(real.alive().await);
    let mut waiting = Conn::new(waiting);
    assert_eq!(waiting.close_code().await, Some(4004));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "closed only when the provider gave up: {:?}",
        started.elapsed()
    );
}
