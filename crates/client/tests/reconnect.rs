//! The client library against a scripted server, for the failures a real
//! gateway produces only by bad luck: here a connection that dies while
//! the client re-sends its unanswered requests after a reconnect.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::time::Duration;

mod scripted;

use futures_util::StreamExt;
use tokio::net::TcpListener;

use chatgate_client::{Client, ClientConfig};
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ServerFrame};
use scripted::*;

#[tokio::test]
async fn a_failure_while_resending_after_a_reconnect_is_retried_not_final() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        // 1: Ready, take three requests, answer none, drop the socket.
        let mut ws = accept(&listener).await;
        ready(&mut ws, vec![]).await;
        for _ in 0..3 {
            next_request(&mut ws).await;
        }
        drop(ws);
        // 2: Ready, then closed at once: the re-sent requests meet a
        // closed socket, and the client's re-sending fails.
        let mut ws = accept(&listener).await;
        ready(&mut ws, vec![]).await;
        drop(ws);
        // 3: Ready, and every re-sent request is answered.
        let mut ws = accept(&listener).await;
        ready(&mut ws, vec![]).await;
        for _ in 0..3 {
            let (rid, frame) = next_request(&mut ws).await;
            assert!(matches!(frame, ClientFrame::Heartbeat), "{frame:?}");
            let ack = ServerFrame::HeartbeatAck(HeartbeatAck { server_time_ms: 1 });
            reply(&mut ws, rid, &ack).await;
        }
        // Keep the connection open until the test is done with it.
        let _ = ws.next().await;
    });

    let mut config = ClientConfig::new(url, "token");
    config.backoff_base = Duration::from_millis(5);
    config.backoff_max = Duration::from_millis(20);
    let (client, _events) = Client::connect(config).await.unwrap();
    let mut requests = Vec::new();
    for _ in 0..3 {
        let c = client.clone();
        requests.push(tokio::spawn(async move {
            c.request(ClientFrame::Heartbeat).await
        }));
    }
    for r in requests {
        let answer = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("answered")
            .unwrap();
        assert!(
            matches!(answer, Ok(ServerFrame::HeartbeatAck(_))),
            "the request survives both failures: {answer:?}"
        );
    }
    drop(client);
    server.abort();
}

/// Promise: a membership that ends reaches the application as
/// `Event::Removed`, and the application's disconnect (4107) as a final
/// `Event::Closed` with its reason: no reconnect follows.
#[tokio::test]
async fn a_removal_and_a_disconnect_reach_the_application() {
    use chatgate_client::Event;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut ws = accept(&listener).await;
        let room = RoomPosition {
            room: "team:1".into(),
            epoch: 1,
            seq: 0,
        };
        ready(&mut ws, vec![room]).await;
        let left = ServerFrame::Left(Rooms {
            rooms: vec!["team:1".into()],
        });
        reply(&mut ws, 0, &left).await;
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        ws.send(Message::Close(Some(CloseFrame {
            code: 4107.into(),
            reason: "banned by the moderators".into(),
        })))
        .await
        .unwrap();
        // A reconnect would be accepted here; the test fails if it comes.
        tokio::time::timeout(Duration::from_millis(500), listener.accept())
            .await
            .is_ok()
    });
    let mut config = ClientConfig::new(url, "token");
    config.backoff_base = Duration::from_millis(5);
    let (_client, mut events) = Client::connect(config).await.unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        let last = matches!(ev, Event::Closed { .. });
        seen.push(ev);
        if last {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Removed { rooms } if rooms == &["team:1"])),
        "{seen:?}"
    );
    assert!(
        matches!(seen.last(), Some(Event::Closed { code: Some(4107), reason }) if reason == "banned by the moderators"),
        "{seen:?}"
    );
    assert!(!server.await.unwrap(), "no reconnect after 4107");
}
