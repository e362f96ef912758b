//! The client library against a scripted server, for the failures a real
//! gateway produces only by bad luck: here a connection that dies while
//! the client re-sends its unanswered requests after a reconnect.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

use chatgate_client::{Client, ClientConfig};
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, Codec, ServerFrame};

/// tungstenite's callback signature returns its (large) error type.
#[allow(clippy::result_large_err)]
fn select_chat_v1(_: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    resp.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("chat.v1"),
    );
    Ok(resp)
}

async fn accept(listener: &TcpListener) -> WebSocketStream<TcpStream> {
    let (tcp, _) = listener.accept().await.unwrap();
    tokio_tungstenite::accept_hdr_async(tcp, select_chat_v1)
        .await
        .unwrap()
}

async fn next_request(ws: &mut WebSocketStream<TcpStream>) -> (u32, ClientFrame) {
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => return Codec::default().decode_client(&b).unwrap(),
            Message::Close(_) => panic!("client closed"),
            _ => {}
        }
    }
}

async fn reply(ws: &mut WebSocketStream<TcpStream>, rid: u32, frame: &ServerFrame) {
    let bytes = Codec::default().encode_server(rid, frame).unwrap();
    ws.send(Message::Binary(bytes)).await.unwrap();
}

/// Reads Identify and answers Ready.
async fn ready(ws: &mut WebSocketStream<TcpStream>) {
    let (rid, frame) = next_request(ws).await;
    assert!(matches!(frame, ClientFrame::Identify(_)), "{frame:?}");
    let ready = ServerFrame::Ready(Ready {
        session_id: [7; 16],
        user_id: "u".into(),
        user_name: "U".into(),
        rooms: vec![],
        heartbeat_interval_ms: 60_000,
        heartbeat_timeout_ms: 60_000,
        max_frame_bytes: 1 << 20,
        resuming: false,
    });
    reply(ws, rid, &ready).await;
}

#[tokio::test]
async fn a_failure_while_resending_after_a_reconnect_is_retried_not_final() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        // 1: Ready, take three requests, answer none, drop the socket.
        let mut ws = accept(&listener).await;
        ready(&mut ws).await;
        for _ in 0..3 {
            next_request(&mut ws).await;
        }
        drop(ws);
        // 2: Ready, then closed at once: the re-sent requests meet a
        // closed socket, and the client's re-sending fails.
        let mut ws = accept(&listener).await;
        ready(&mut ws).await;
        drop(ws);
        // 3: Ready, and every re-sent request is answered.
        let mut ws = accept(&listener).await;
        ready(&mut ws).await;
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
