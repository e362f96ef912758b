//! A scripted chat.v1 server for the client library's tests: it accepts a
//! WebSocket, reads the client's requests and answers whatever the test
//! says, including what the gateway does only by bad luck.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // shared by several test files

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, Codec, ServerFrame};

#[allow(clippy::result_large_err)]
fn select_chat_v1(_: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    resp.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("chat.v1"),
    );
    Ok(resp)
}

pub async fn accept(listener: &TcpListener) -> WebSocketStream<TcpStream> {
    let (tcp, _) = listener.accept().await.unwrap();
    tokio_tungstenite::accept_hdr_async(tcp, select_chat_v1)
        .await
        .unwrap()
}

pub async fn next_request(ws: &mut WebSocketStream<TcpStream>) -> (u32, ClientFrame) {
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => return Codec::default().decode_client(&b).unwrap(),
            Message::Close(_) => panic!("client closed"),
            _ => {}
        }
    }
}

pub async fn reply(ws: &mut WebSocketStream<TcpStream>, rid: u32, frame: &ServerFrame) {
    let bytes = Codec::default().encode_server(rid, frame).unwrap();
    ws.send(Message::Binary(bytes)).await.unwrap();
}

pub async fn ready(ws: &mut WebSocketStream<TcpStream>, rooms: Vec<RoomPosition>) -> Identify {
    let (rid, frame) = next_request(ws).await;
    let ClientFrame::Identify(identify) = frame else {
        panic!("{frame:?}")
    };
    let ready = ServerFrame::Ready(Ready {
        session_id: [7; 16],
        user_id: "u".into(),
        user_name: "U".into(),
        rooms,
        heartbeat_interval_ms: 60_000,
        heartbeat_timeout_ms: 60_000,
        max_frame_bytes: 1 << 20,
        resuming: identify.resume.is_some(),
    });
    reply(ws, rid, &ready).await;
    identify
}
