//! The abuse suite: what one hostile (or merely unlucky) client could do
//! to a node or to other users, tried against a real gateway process.
//! Each test fails on a gateway without the bound it checks.

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
