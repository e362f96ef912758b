//! The client library's positions (PROTOCOL.md
//! §9.5, §9.10) against a scripted server sending what the gateway may
//! legitimately send.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod scripted;

use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpListener;

use chatgate_client::{Client, ClientConfig, Event};
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ServerFrame};
use scripted::*;

fn new_message(epoch: u64, seq: u64) -> ServerFrame {
    ServerFrame::NewMessage(NewMessage {
        epoch,
        message: chatgate_protocol::payload::Message {
            id: seq,
            room: "r".into(),
            seq,
            sender_id: "other".into(),
            sender_name: "Other".into(),
            sender_image: String::new(),
            client_msg_id: format!("o-{seq}"),
            body: "hi".into(),
            attachments: vec![],
            reactions: vec![],
            created_at_ms: 1,
        },
    })
}

fn config(url: String) -> ClientConfig {
    let mut config = ClientConfig::new(url, "token");
    config.backoff_base = Duration::from_millis(5);
    config.backoff_max = Duration::from_millis(20);
    config
}

/// §9.5: "Events of a room numbered after that position MAY arrive just
/// before the room's Joined reply" (the gateway queues an event published
/// between its position lookup and the reply). The client applies the
/// event (position 11), then lets Joined move its position back to 10.
/// Its next resume presents 10, and the replay hands the application
/// event 11 a second time.
#[tokio::test]
async fn a_joined_after_a_newer_event_moves_the_position_back_and_the_resume_repeats_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let (resumed_tx, resumed_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let mut ws = accept(&listener).await;
        ready(&mut ws, vec![]).await;
        let (rid, frame) = next_request(&mut ws).await;
        assert!(matches!(frame, ClientFrame::Join(_)), "{frame:?}");
        reply(&mut ws, 0, &new_message(5, 11)).await;
        let joined = ServerFrame::Joined(Joined {
            rooms: vec![RoomPosition {
                room: "r".into(),
                epoch: 5,
                seq: 10,
            }],
        });
        reply(&mut ws, rid, &joined).await;
        // Let the client read both, then the connection drops.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(ws);
        let mut ws = accept(&listener).await;
        let identify = ready(&mut ws, vec![]).await;
        let _ = resumed_tx.send(identify.resume.unwrap().positions);
        let _ = ws.next().await;
    });
    let (client, mut events) = Client::connect(config(url)).await.unwrap();
    client.join(&["r"]).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
        got.push(format!("{e:?}").chars().take(40).collect::<String>());
    }
    let presented = tokio::time::timeout(Duration::from_secs(10), resumed_rx)
        .await
        .unwrap()
        .unwrap();
    server.abort();
    assert_eq!(
        presented
            .iter()
            .map(|p| (p.room.as_str(), p.epoch, p.seq))
            .collect::<Vec<_>>(),
        [("r", 5, 11)],
        "the application already has event 11 ({got:?}); resuming from 10 replays it again"
    );
}

/// §9.10: "on MessageSent / Reacted (e, s): ... as for an event at
/// (e, s)", and an event of another epoch than the position's means
/// "reload History". The library moves the position to the ack's new
/// epoch without reporting StreamLost, so the application never reloads;
/// the 4005 resume that follows then presents a position in the new
/// epoch and is answered `recovered = true`.
#[tokio::test]
async fn a_message_sent_in_a_new_epoch_reports_no_stream_loss() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut ws = accept(&listener).await;
        let start = vec![RoomPosition {
            room: "r".into(),
            epoch: 5,
            seq: 3,
        }];
        ready(&mut ws, start).await;
        let (rid, frame) = next_request(&mut ws).await;
        assert!(matches!(frame, ClientFrame::Send(_)), "{frame:?}");
        let sent = ServerFrame::MessageSent(MessageSent {
            room: "r".into(),
            message_id: 1,
            epoch: 9,
            seq: 1,
            created_at_ms: 1,
            duplicate: false,
        });
        reply(&mut ws, rid, &sent).await;
        let _ = ws.next().await;
    });
    let (client, mut events) = Client::connect(config(url)).await.unwrap();
    let _ready = events.recv().await;
    client.send("r", "hello").await.unwrap();
    let mut lost = false;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        lost |= matches!(e, Event::StreamLost { .. });
    }
    let positions = client.positions().await;
    server.abort();
    assert!(
        lost,
        "position moved from (5, 3) to {:?} with no StreamLost",
        positions.get("r")
    );
}
