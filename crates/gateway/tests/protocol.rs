//! Wire-level rules of PROTOCOL.md §1 checked against a real gateway.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use chatgate_client::RawConnection;
use chatgate_protocol::Codec;
use common::*;

/// RFC 6455 §4.1: subprotocol tokens are compared case-sensitively, so
/// only `chat.v1` selects the protocol; `chat.V1` is refused with 400.
#[tokio::test]
async fn the_subprotocol_is_matched_case_sensitively() {
    let gw = Gateway::start(&[]);
    let refused = RawConnection::connect_with(&gw.url(), Codec::default(), Some("chat.V1")).await;
    let Err(e) = refused else {
        panic!("chat.V1 must not be accepted");
    };
    assert!(e.to_string().contains("400"), "refused with 400: {e}");
    let accepted =
        RawConnection::connect_with(&gw.url(), Codec::default(), Some("x, chat.v1")).await;
    assert!(accepted.is_ok(), "chat.v1 among others is accepted");
}

/// A frame small on the wire whose payload inflates past the frame limit
/// is closed with 4103 (the cap applies after decompression, §2, §3),
/// and the gateway goes on serving everyone else.
#[tokio::test]
async fn a_payload_that_inflates_past_the_limit_is_4103() {
    use chatgate_protocol::payload::Send;
    use chatgate_protocol::{ClientFrame, CodecConfig};
    let gw = Gateway::start(&["--max-frame-bytes", "4096"]);
    let mut bystander = user(&gw, "bystander").await;
    let (mut raw, _) = identified(&gw, "inflater").await;
    let squeezing = Codec::new(CodecConfig {
        compress_threshold: 16,
        ..CodecConfig::default()
    });
    let frame = ClientFrame::Send(Send {
        room: "r".into(),
        client_msg_id: "big".into(),
        body: "a".repeat(10_000),
        attachments: vec![],
    });
    let bytes = squeezing.encode_client(7, &frame).unwrap();
    assert!(
        bytes.len() < 4096 && bytes[1] & 1 == 1,
        "small and compressed"
    );
    raw.send_bytes(bytes).await.unwrap();
    let mut c = Conn::new(raw);
    assert_eq!(c.close_code().await, Some(4103));
    assert!(bystander.alive().await);
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

/// The connect timeout is the client's: it covers the wait for the
/// Identify frame only. A backend that is slow while the session opens
/// (here Redis, paused) delays Ready; it never produces 4104, which tells
/// the client not to reconnect. A bad `resume` field is 4101, not 4100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_at_identify_is_not_the_clients_timeout() {
    use chatgate_protocol::payload::*;
    use chatgate_protocol::{ClientFrame, ServerFrame};
    let redis = PrivateRedis::start();
    let gw = Gateway::start(&[
        "--cluster",
        "--redis-url",
        &redis.url(),
        "--connect-timeout-ms",
        "300",
    ]);
    let pid = redis.child.id();
    signal(pid, "STOP");
    let mut raw = RawConnection::connect(&gw.url()).await.unwrap();
    let identify = Identify {
        token: token("patient"),
        resume: None,
    };
    raw.send(1, &ClientFrame::Identify(identify)).await.unwrap();
    let mut c = Conn::new(raw);
    let first = c.next(std::time::Duration::from_secs(15)).await;
    signal(pid, "CONT");
    assert!(
        matches!(first, Some((1, ServerFrame::Ready(_)))),
        "Ready once the backend answered or timed out, not 4104: {first:?} {:?}",
        c.closed
    );

    let mut raw = RawConnection::connect(&gw.url()).await.unwrap();
    let identify = Identify {
        token: token("careless"),
        resume: Some(Resume {
            session_id: [0; 16],
            positions: vec![RoomPosition {
                room: String::new(),
                epoch: 1,
                seq: 0,
            }],
        }),
    };
    raw.send(1, &ClientFrame::Identify(identify)).await.unwrap();
    assert_eq!(Conn::new(raw).close_code().await, Some(4101));
}
