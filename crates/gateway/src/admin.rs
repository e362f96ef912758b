//! The server API: JSON over HTTP for the application's backend, on its
//! own listener (`admin_listen`, loopback by default), never on the
//! public port.
//!
//! Every method is `POST /api/<method>` with a JSON body and the key in
//! `Authorization: Bearer <key>` (compared in constant time); answers are
//! JSON, errors `{"error": "..."}` with a 4xx/5xx status. `GET /health`
//! and `GET /metrics` are served here too, without the key. Every method
//! works in a cluster: changes reach every node as control messages
//! ([`crate::control`]). PROTOCOL.md's "Server API" section documents the
//! schemas.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use chatgate_protocol::ClientFrame;
use chatgate_protocol::CloseCode;
use chatgate_protocol::limits::{HISTORY_DEFAULT_LIMIT, check_room};
use chatgate_protocol::payload::{Attachment, Cursor, Send as SendFrame};
use chatgate_storage::{Member, NewMessage, StoreError};

use crate::control::{self, Control, PresenceAnswer};
use crate::node::Node;
use crate::session::{OnAck, SendClaim, SendFailure, publish_message};

/// Largest request body (a bulk add of 1,000 members fits easily).
const MAX_BODY: usize = 1024 * 1024;
/// Users per bulk add or remove.
const MAX_USERS_PER_REQUEST: usize = 1000;
/// Concurrent server API connections.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Longest role name.
const MAX_ROLE_BYTES: usize = 32;
/// Concurrent server API connections from one address.
const MAX_CONNECTIONS_PER_PEER: usize = 32;
/// Time for a request head to arrive (the first, and each next one on a
/// kept-alive connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// One of a peer address's connection slots, given back on drop.
struct PeerSlot {
    map: Arc<dashmap::DashMap<std::net::IpAddr, usize>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        map: &Arc<dashmap::DashMap<std::net::IpAddr, usize>>,
        ip: std::net::IpAddr,
    ) -> Option<PeerSlot> {
        let mut n = map.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        drop(n);
        Some(PeerSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Some(mut n) = self.map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
        }
        self.map.remove_if(&self.ip, |_, n| *n == 0);
    }
}

type Body = Full<Bytes>;

/// A failed call: HTTP status and message.
struct Failure(StatusCode, String);

impl Failure {
    fn bad(msg: impl Into<String>) -> Failure {
        Failure(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        match e {
            StoreError::NotFound => Failure(StatusCode::NOT_FOUND, "not found".into()),
            e => Failure(StatusCode::SERVICE_UNAVAILABLE, format!("storage: {e}")),
        }
    }
}

impl From<chatgate_fanout::FanoutError> for Failure {
    fn from(e: chatgate_fanout::FanoutError) -> Failure {
        Failure(StatusCode::SERVICE_UNAVAILABLE, format!("fan-out: {e}"))
    }
}

/// The server API listener.
pub struct AdminServer {
    node: Arc<Node>,
    listener: TcpListener,
    /// SHA-256 of the configured key: compared digest to digest, so the
    /// comparison's length and time do not depend on the key.
    key: Option<[u8; 32]>,
    presence_seq: AtomicU64,
}

impl AdminServer {
    /// Binds `addr`; shared with the other processes on this host when
    /// the gateway shares its public port (`reuse_port`): any of them
    /// answers any call, since every call works cluster-wide.
    pub async fn bind(node: Arc<Node>, addr: SocketAddr) -> anyhow::Result<AdminServer> {
        let listener = crate::server::listen(addr, node.config.reuse_port, 128)?;
        let key = node
            .config
            .admin_api_key
            .as_ref()
            .map(|k| Sha256::digest(k.as_bytes()).into());
        Ok(AdminServer {
            node,
            listener,
            key,
            presence_seq: AtomicU64::new(1),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true.
    ///
    /// Connections are accepted first and refused at once past the caps
    /// (in all, and per peer address), so idle sockets cannot queue
    /// everyone else behind them; a connection that sends no request
    /// head within a few seconds is dropped.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let per_peer: Arc<dashmap::DashMap<std::net::IpAddr, usize>> = Arc::default();
        loop {
            let (stream, peer) = tokio::select! {
                r = this.listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "server API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            let Some(peer_slot) = PeerSlot::take(&per_peer, peer.ip()) else {
                continue;
            };
            let this = this.clone();
            tokio::spawn(async move {
                let _held = (permit, peer_slot);
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(want) = self.key else {
            return false;
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let got: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        // Every byte compared, whatever differs first.
        let diff = want
            .iter()
            .zip(got.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/health") => return crate::http::health_response(&self.node),
            (&Method::GET, "/metrics") => return crate::http::metrics_response(&self.node),
            _ => {}
        }
        let Some(method) = path.strip_prefix("/api/").map(str::to_owned) else {
            return reply(StatusCode::NOT_FOUND, json!({"error": "not found"}));
        };
        let status_of = |r: &Response<Body>| r.status().as_u16().to_string();
        let response = if req.method() != Method::POST {
            reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "use POST with a JSON body"}),
            )
        } else if self.key.is_none() {
            reply(
                StatusCode::FORBIDDEN,
                json!({"error": "the server API is disabled: set admin_api_key"}),
            )
        } else if !self.authorized(&req) {
            reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "missing or wrong API key (Authorization: Bearer <key>)"}),
            )
        } else {
            match self.call(&method, req).await {
                Ok(v) => reply(StatusCode::OK, v),
                Err(Failure(status, msg)) => reply(status, json!({ "error": msg })),
            }
        };
        let known = METHODS.contains(&method.as_str());
        self.node
            .metrics
            .api_requests
            .with_label_values(&[
                if known { &method } else { "unknown" },
                &status_of(&response),
            ])
            .inc();
        response
    }

    async fn call(&self, method: &str, req: Request<Incoming>) -> Result<Value, Failure> {
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| Failure(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?
            .to_bytes();
        let node = &self.node;
        match method {
            "members.add" => {
                let r: MembersAdd = parse(&body)?;
                check_room("room", &r.room).map_err(|e| Failure::bad(e.to_string()))?;
                let members = r
                    .members
                    .into_iter()
                    .map(|m| {
                        check_user(&m.user_id)?;
                        let role = m.role.unwrap_or_else(|| "member".into());
                        check_role(&role)?;
                        Ok(Member {
                            user_id: m.user_id,
                            role,
                            since_ms: 0,
                        })
                    })
                    .collect::<Result<Vec<_>, Failure>>()?;
                check_count(members.len())?;
                let stored = node.store.add_members(&r.room, &members).await;
                let changed: Vec<String> = members.into_iter().map(|m| m.user_id).collect();
                let added = changed.len();
                // Told to every node even when the store call failed: it
                // may have changed the database before failing (a cache
                // that could not be told), and forgetting costs nothing.
                let told = control::broadcast(
                    node,
                    &Control::Members {
                        room: r.room.clone(),
                        changed,
                        removed: Vec::new(),
                    },
                )
                .await;
                stored?;
                told?;
                Ok(json!({ "room": r.room, "granted": added }))
            }
            "members.remove" => {
                let r: MembersRemove = parse(&body)?;
                check_room("room", &r.room).map_err(|e| Failure::bad(e.to_string()))?;
                check_count(r.user_ids.len())?;
                for u in &r.user_ids {
                    check_user(u)?;
                }
                let removed = node.store.remove_members(&r.room, &r.user_ids).await;
                // Every named user is taken out of the room's live delivery,
                // even one the store had no row for (a token-allowed
                // member), and even when the store call failed (it may have
                // removed the rows before failing; the caller retries).
                let told = control::broadcast(
                    node,
                    &Control::Members {
                        room: r.room.clone(),
                        changed: Vec::new(),
                        removed: r.user_ids.clone(),
                    },
                )
                .await;
                let removed = removed?;
                told?;
                Ok(json!({ "room": r.room, "removed": removed }))
            }
            "members.list" => {
                let r: MembersList = parse(&body)?;
                check_room("room", &r.room).map_err(|e| Failure::bad(e.to_string()))?;
                let limit = r.limit.unwrap_or(100).clamp(1, 1000);
                let members = node
                    .store
                    .members(&r.room, r.after.as_deref(), limit)
                    .await?;
                let next = (members.len() as u32 == limit)
                    .then(|| members.last().map(|m| m.user_id.clone()))
                    .flatten();
                let members: Vec<Value> = members
                    .into_iter()
                    .map(|m| json!({"user_id": m.user_id, "role": m.role, "since_ms": m.since_ms}))
                    .collect();
                Ok(json!({ "room": r.room, "members": members, "next": next }))
            }
            "rooms.create" => {
                let r: RoomOnly = parse(&body)?;
                check_room("room", &r.room).map_err(|e| Failure::bad(e.to_string()))?;
                let created = node.store.create_room(&r.room).await?;
                Ok(json!({ "room": r.room, "created": created }))
            }
            "rooms.delete" => {
                let r: RoomOnly = parse(&body)?;
                check_room("room", &r.room).map_err(|e| Failure::bad(e.to_string()))?;
                let deleted = node.store.delete_room(&r.room).await;
                // What was deleted must not come back through a resume.
                let forgot = node.fanout.forget_room(&r.room).await;
                let told = control::broadcast(
                    node,
                    &Control::RoomDeleted {
                        room: r.room.clone(),
                    },
                )
                .await;
                let deleted = deleted?;
                forgot?;
                told?;
                Ok(json!({ "room": r.room, "deleted": deleted }))
            }
            "publish" => self.publish(parse(&body)?).await,
            "disconnect" => {
                let r: Disconnect = parse(&body)?;
                check_user(&r.user_id)?;
                let code = if r.reconnect {
                    CloseCode::Reconnect
                } else {
                    CloseCode::Disconnected
                };
                let reason = r.reason.unwrap_or_else(|| code.reason().to_owned());
                if reason.len() > 123 {
                    return Err(Failure::bad("reason longer than 123 bytes"));
                }
                control::broadcast(
                    node,
                    &Control::Disconnect {
                        user: r.user_id.clone(),
                        code: code.code(),
                        reason,
                    },
                )
                .await?;
                Ok(json!({ "user_id": r.user_id, "code": code.code() }))
            }
            "presence" => {
                let r: RoomOnly = parse(&body)?;
                check_room("room", &r.room).map_err(|e| Failure::bad(e.to_string()))?;
                self.presence(&r.room).await
            }
            "history" => {
                let r: HistoryRequest = parse(&body)?;
                check_room("room", &r.room).map_err(|e| Failure::bad(e.to_string()))?;
                let limit = match r.limit {
                    None | Some(0) => HISTORY_DEFAULT_LIMIT,
                    Some(n) => n.min(100),
                };
                let page = node.store.history(&r.room, r.before, limit, 0).await?;
                Ok(json!({ "room": r.room, "messages": page.messages, "next": page.next }))
            }
            _ => Err(Failure(
                StatusCode::NOT_FOUND,
                format!("no method {method:?}; methods: {}", METHODS.join(", ")),
            )),
        }
    }

    /// Stores, sequences and fans out a message as a user or as the
    /// system (empty sender id): the same path as a client's Send, so it
    /// is resumable and idempotent on (sender, client_msg_id).
    async fn publish(&self, r: Publish) -> Result<Value, Failure> {
        let node = &self.node;
        let sender = r.sender_id.unwrap_or_default();
        if !sender.is_empty() {
            check_user(&sender)?;
        }
        let client_msg_id = r.client_msg_id.unwrap_or_else(random_id);
        // The same limits as a client's Send (room, id, body, attachments).
        let frame = ClientFrame::Send(SendFrame {
            room: r.room.clone(),
            client_msg_id: client_msg_id.clone(),
            body: r.body.clone(),
            attachments: r.attachments.clone(),
        });
        frame.validate().map_err(|e| Failure::bad(e.to_string()))?;
        let name = r.sender_name.unwrap_or_else(|| sender.clone());
        check_display(&name)?;
        let msg = NewMessage {
            room: r.room,
            sender_id: sender.clone(),
            sender_name: name,
            sender_image: String::new(),
            client_msg_id: client_msg_id.clone(),
            body: r.body,
            attachments: r.attachments,
        };
        let Some(_claim) = SendClaim::take(node, (Arc::from(sender.as_str()), client_msg_id)).await
        else {
            return Err(Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "this message is still being stored; retry".into(),
            ));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ack: OnAck = Box::new(move |m| {
            let _ = tx.send(m);
        });
        publish_message(node, None, msg, ack)
            .await
            .map_err(|f| match f {
                SendFailure::Store(e) => Failure::from(e),
                SendFailure::NotDelivered(e) => Failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("stored, not delivered ({e}): retry with the same client_msg_id"),
                ),
                SendFailure::ReusedId => {
                    Failure::bad("client_msg_id already used for a different message")
                }
            })?;
        let sent = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .map_err(|_| {
                Failure(
                    StatusCode::GATEWAY_TIMEOUT,
                    "published; acknowledgement late".into(),
                )
            })?
            .map_err(|_| {
                Failure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no acknowledgement".into(),
                )
            })?;
        Ok(json!({
            "room": sent.room,
            "message_id": sent.message_id,
            "epoch": sent.epoch,
            "seq": sent.seq,
            "created_at_ms": sent.created_at_ms,
            "duplicate": sent.duplicate,
        }))
    }

    /// Who is connected in `room`, on every node.
    async fn presence(&self, room: &str) -> Result<Value, Failure> {
        let node = &self.node;
        let (answers, expected) = match &node.cluster {
            None => (
                vec![PresenceAnswer {
                    node: node.config.node_id.clone(),
                    users: node.hub.local_users(room),
                }],
                1,
            ),
            Some(cluster) => {
                let key = cluster.presence_key(self.presence_seq.fetch_add(1, Ordering::Relaxed));
                let expected = cluster.live_nodes().len().max(1);
                control::broadcast(
                    node,
                    &Control::Presence {
                        room: room.to_owned(),
                        reply: key.clone(),
                    },
                )
                .await?;
                let raw = cluster
                    .presence_collect(&key, expected, Duration::from_secs(2))
                    .await?;
                let answers = raw
                    .iter()
                    .filter_map(|a| serde_json::from_str::<PresenceAnswer>(a).ok())
                    .collect();
                (answers, expected)
            }
        };
        let mut users: std::collections::BTreeMap<String, u32> = Default::default();
        for a in &answers {
            for (u, n) in &a.users {
                *users.entry(u.clone()).or_default() += n;
            }
        }
        let users: Vec<Value> = users
            .into_iter()
            .map(|(u, n)| json!({"user_id": u, "connections": n}))
            .collect();
        Ok(json!({
            "room": room,
            "users": users,
            "nodes_answered": answers.len(),
            "nodes_expected": expected,
            "complete": answers.len() >= expected,
        }))
    }
}

/// Every method, for the 404 text and the metrics label.
const METHODS: &[&str] = &[
    "members.add",
    "members.remove",
    "members.list",
    "rooms.create",
    "rooms.delete",
    "publish",
    "disconnect",
    "presence",
    "history",
];

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure::bad(format!("bad JSON body: {e}")))
}

fn check_count(n: usize) -> Result<(), Failure> {
    if n == 0 || n > MAX_USERS_PER_REQUEST {
        return Err(Failure::bad(format!(
            "name 1 to {MAX_USERS_PER_REQUEST} users per request"
        )));
    }
    Ok(())
}

fn check_user(id: &str) -> Result<(), Failure> {
    // The rules a token's `sub` follows: an id the API accepts must be
    // one a user can have.
    let hidden = chatgate_protocol::limits::find_hidden_char(id).is_some();
    if id.is_empty() || id.len() > 128 || hidden {
        return Err(Failure::bad(format!("bad user id {id:?}")));
    }
    Ok(())
}

fn check_role(role: &str) -> Result<(), Failure> {
    let ok = !role.is_empty()
        && role.len() <= MAX_ROLE_BYTES
        && role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        return Err(Failure::bad(format!(
            "bad role {role:?}: 1 to {MAX_ROLE_BYTES} of a-z 0-9 _ -"
        )));
    }
    Ok(())
}

fn check_display(name: &str) -> Result<(), Failure> {
    if name.chars().count() > 64
        || name
            .chars()
            .any(|c| c.is_control() || chatgate_protocol::limits::is_invisible_control(c))
    {
        return Err(Failure::bad(
            "sender_name: at most 64 characters, no controls",
        ));
    }
    Ok(())
}

fn random_id() -> String {
    use rand::Rng;
    format!("api-{:032x}", rand::rng().random::<u128>())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    user_id: String,
    role: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersAdd {
    room: String,
    members: Vec<NewMember>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersRemove {
    room: String,
    user_ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersList {
    room: String,
    after: Option<String>,
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomOnly {
    room: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Disconnect {
    user_id: String,
    reason: Option<String>,
    #[serde(default)]
    reconnect: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRequest {
    room: String,
    before: Option<Cursor>,
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    room: String,
    body: String,
    sender_id: Option<String>,
    sender_name: Option<String>,
    client_msg_id: Option<String>,
    #[serde(default)]
    attachments: Vec<Attachment>,
}
