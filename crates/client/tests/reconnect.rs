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
