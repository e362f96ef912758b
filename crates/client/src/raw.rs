//! One WebSocket speaking `chat.v1` frames, with no policy of its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use chatgate_protocol::{ClientFrame, Codec, SUBPROTOCOL, ServerFrame};

/// What arrived on a connection.
#[derive(Debug)]
pub enum Incoming {
    /// One binary message, flattened if it was a batch: (request id, frame).
    Frames(Vec<(u32, ServerFrame)>),
    /// The server closed: close code and reason (`None` without a close
    /// frame, e.g. a dropped TCP connection).
    Closed(Option<(u16, String)>),
}

/// Why a raw operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// WebSocket or TCP failure.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("undecodable server frame: {0}")]
    Decode(#[from] chatgate_protocol::DecodeError),
    /// A frame could not be encoded.
    #[error("encode: {0}")]
    Encode(#[from] chatgate_protocol::EncodeError),
    /// A text message from the server (never valid in v1).
    #[error("unexpected text message")]
    Text,
    /// TLS settings could not be built (a bad CA file).
    #[error("{0}")]
    Tls(#[from] chatgate_protocol::tls::TlsError),
}

/// A connected socket.
pub struct RawConnection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    codec: Codec,
}

impl RawConnection {
    /// Opens `url` (e.g. `ws://127.0.0.1:8080/ws`) offering `chat.v1`.
    pub async fn connect(url: &str) -> Result<Self, RawError> {
        Self::connect_with(url, Codec::default(), Some(SUBPROTOCOL)).await
    }

    /// Opens `url` with a given codec and offered subprotocol (`None`
    /// offers none, to test the server's refusal).
    pub async fn connect_with(
        url: &str,
        codec: Codec,
        subprotocol: Option<&str>,
    ) -> Result<Self, RawError> {
        Self::connect_tls(url, codec, subprotocol, None).await
    }

    /// Opens `url`; a `wss://` URL is verified with `tls` (default:
    /// Mozilla's and the system's roots, see [`chatgate_protocol::tls`]). A `ws://` URL
    /// never uses TLS, and a `wss://` one never goes without.
    pub async fn connect_tls(
        url: &str,
        codec: Codec,
        subprotocol: Option<&str>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, RawError> {
        let mut req = url.into_client_request()?;
        if let Some(v) = subprotocol.and_then(|p| HeaderValue::from_str(p).ok()) {
            req.headers_mut().insert("Sec-WebSocket-Protocol", v);
        }
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(codec.config().max_frame_bytes.max(1 << 20) * 2));
        let connector = if req.uri().scheme_str() == Some("wss") {
            let tls = match tls {
                Some(tls) => tls,
                None => chatgate_protocol::tls::client_config(None)?,
            };
            Some(Connector::Rustls(tls))
        } else {
            None
        };
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, connector)
                .await?;
        Ok(RawConnection { ws, codec })
    }

    /// Wraps an already connected socket (the load harness binds source
    /// addresses itself).
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, codec: Codec) -> Self {
        RawConnection { ws, codec }
    }

    /// Sends one frame.
    pub async fn send(&mut self, request_id: u32, frame: &ClientFrame) -> Result<(), RawError> {
        let bytes = self.codec.encode_client(request_id, frame)?;
        self.ws.send(Message::Binary(bytes)).await?;
        Ok(())
    }

    /// Sends arbitrary bytes as one binary message.
    pub async fn send_bytes(&mut self, bytes: impl Into<Bytes>) -> Result<(), RawError> {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// Sends a text message (a protocol violation, for tests).
    pub async fn send_text(&mut self, text: &str) -> Result<(), RawError> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Waits for the next binary message or the close.
    pub async fn recv(&mut self) -> Result<Incoming, RawError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    return Ok(Incoming::Frames(self.codec.decode_server_all(&b)?));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Incoming::Closed(
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    ));
                }
                Some(Ok(Message::Text(_))) => return Err(RawError::Text),
                Some(Ok(_)) => continue,
                None => return Ok(Incoming::Closed(None)),
                Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed))
                | Some(Err(tokio_tungstenite::tungstenite::Error::AlreadyClosed)) => {
                    return Ok(Incoming::Closed(None));
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::Io(_)))
                | Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(_))) => {
                    return Ok(Incoming::Closed(None));
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// [`recv`](Self::recv) with a deadline; `Ok(None)` on timeout.
    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<Option<Incoming>, RawError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Starts a clean close (code 1000). The server answers with its own
    /// Close frame, which [`recv`](Self::recv) then returns.
    pub async fn close(&mut self) -> Result<(), RawError> {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        self.ws.close(Some(frame)).await?;
        Ok(())
    }
}
