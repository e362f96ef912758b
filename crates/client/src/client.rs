//! The application-facing client: requests, events, heartbeats and
//! reconnect-with-resume, driven by one background task per client.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;

use chatgate_protocol::close::{ClientAction, action_for};
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, Codec, SUBPROTOCOL, ServerFrame};

use crate::raw::{Incoming, RawConnection, RawError};

/// How to reach the server and how hard to try.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`.
    pub url: String,
    /// Access token.
    pub token: String,
    /// Reconnect automatically after a "reconnect" close (4000..4099,
    /// 1000..1015) or a dropped connection. Default true.
    pub reconnect: bool,
    /// First backoff step. Default 250 ms.
    pub backoff_base: Duration,
    /// Largest backoff step. Default 30 s.
    pub backoff_max: Duration,
    /// Give up after this many consecutive failed attempts. Default 20.
    pub max_attempts: u32,
    /// TLS settings for a `wss://` URL. Default: Mozilla's and the system's roots; build
    /// others (a private CA) with [`chatgate_protocol::tls::client_config`].
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ClientConfig {
    /// Defaults for `url` and `token`.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            token: token.into(),
            reconnect: true,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            max_attempts: 20,
            tls: None,
        }
    }
}

/// Why a request or connect failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an Error frame.
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(ErrorBody),
    /// The connection closed for good (a "do not reconnect" code, or
    /// reconnecting gave up).
    #[error("connection closed (code {code:?}): {reason}")]
    Closed {
        /// Close code, when the server sent one.
        code: Option<u16>,
        /// Reason text or local explanation.
        reason: String,
    },
    /// The server replied with a frame this request does not expect.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// Transport failure while connecting.
    #[error("transport: {0}")]
    Transport(String),
}

impl From<RawError> for ClientError {
    fn from(e: RawError) -> Self {
        ClientError::Transport(e.to_string())
    }
}

/// Something the server pushed, or a change of connection state.
#[derive(Debug, Clone)]
pub enum Event {
    /// A session opened (first connect and every reconnect).
    Ready(Ready),
    /// A message from someone else.
    Message(NewMessage),
    /// Someone is typing.
    Typing(UserTyping),
    /// A reaction changed.
    Reaction(Reaction),
    /// A resume finished; rooms with `recovered = false` need a history
    /// reload.
    Resumed(Resumed),
    /// A room event arrived in another epoch than the room's known
    /// position: the room's stream was lost and events before this one
    /// may be missing. Reload the room's history (as for a resume with
    /// `recovered = false`); live events continue from (`epoch`, `seq`).
    StreamLost {
        /// Room.
        room: String,
        /// The new epoch.
        epoch: u64,
        /// Sequence number just before the event that revealed it.
        seq: u64,
    },
    /// A room event skipped ahead: events between `after` and `next`
    /// were missed on this connection. Reload the room's history (the
    /// protocol's answer to a gap, PROTOCOL.md §9.5).
    Missed {
        /// Room.
        room: String,
        /// The position before the gap.
        after: u64,
        /// The sequence number that arrived.
        next: u64,
    },
    /// The server took this connection out of rooms: the user's
    /// membership ended, the room was deleted, or a resume named rooms the
    /// user may no longer enter (an unsolicited Left, PROTOCOL.md §5.2).
    /// Their positions are dropped; do not rejoin them on your own.
    Removed {
        /// The rooms.
        rooms: Vec<String>,
    },
    /// The connection closed for good: a "do not reconnect" close code
    /// (4107 `disconnected` carries the application's reason), or
    /// reconnecting is off. No reconnect follows.
    Closed {
        /// Close code, if any.
        code: Option<u16>,
        /// The close frame's text.
        reason: String,
    },
    /// An Error frame not tied to a pending request.
    Error(ErrorBody),
    /// The connection dropped; `reconnecting` says whether the client
    /// is trying again.
    Disconnected {
        /// Close code, if any.
        code: Option<u16>,
        /// Whether a reconnect follows.
        reconnecting: bool,
    },
}

struct Request {
    frame: ClientFrame,
    reply: oneshot::Sender<Result<ServerFrame, ClientError>>,
}

/// A connected client. Cheap to clone; the connection lives until every
/// clone is dropped or [`Client::close`] is called.
#[derive(Clone)]
pub struct Client {
    requests: mpsc::Sender<Request>,
    positions: Arc<Mutex<BTreeMap<String, (u64, u64)>>>,
    user_id: Arc<str>,
}

impl Client {
    /// Connects, identifies and waits for Ready. Events (including that
    /// first Ready) arrive on the returned receiver.
    pub async fn connect(
        config: ClientConfig,
    ) -> Result<(Client, mpsc::Receiver<Event>), ClientError> {
        let (events_tx, events_rx) = mpsc::channel(4096);
        let positions = Arc::new(Mutex::new(BTreeMap::new()));
        let mut driver = Driver {
            config,
            events: events_tx,
            positions: positions.clone(),
            session_id: None,
            pending: HashMap::new(),
            next_rid: 1,
            heartbeat_every: Duration::from_secs(25),
            dead_after: Duration::from_secs(45),
        };
        let (conn, ready) = driver.open(false).await?;
        let user_id: Arc<str> = Arc::from(ready.user_id.as_str());
        let (requests, requests_rx) = mpsc::channel(256);
        tokio::spawn(driver.run(conn, requests_rx));
        Ok((
            Client {
                requests,
                positions,
                user_id,
            },
            events_rx,
        ))
    }

    /// The authenticated user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, frame: ClientFrame) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        let closed = || ClientError::Closed {
            code: None,
            reason: "client stopped".into(),
        };
        self.requests
            .send(Request { frame, reply: tx })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Joins rooms; returns each room's position.
    pub async fn join(&self, rooms: &[&str]) -> Result<Joined, ClientError> {
        let rooms = rooms.iter().map(|r| r.to_string()).collect();
        match self.request(ClientFrame::Join(Rooms { rooms })).await? {
            ServerFrame::Joined(j) => Ok(j),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves rooms.
    pub async fn leave(&self, rooms: &[&str]) -> Result<(), ClientError> {
        let rooms = rooms.iter().map(|r| r.to_string()).collect();
        match self.request(ClientFrame::Leave(Rooms { rooms })).await? {
            ServerFrame::Left(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a message with a fresh idempotency key.
    pub async fn send(&self, room: &str, body: &str) -> Result<MessageSent, ClientError> {
        self.send_with_id(room, &new_client_msg_id(), body, vec![])
            .await
    }

    /// Sends a message with a caller-chosen idempotency key (retrying with
    /// the same key never duplicates the message).
    pub async fn send_with_id(
        &self,
        room: &str,
        client_msg_id: &str,
        body: &str,
        attachments: Vec<Attachment>,
    ) -> Result<MessageSent, ClientError> {
        let frame = ClientFrame::Send(Send {
            room: room.into(),
            client_msg_id: client_msg_id.into(),
            body: body.into(),
            attachments,
        });
        match self.request(frame).await? {
            ServerFrame::MessageSent(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    /// Signals typing in a room.
    pub async fn typing(&self, room: &str) -> Result<(), ClientError> {
        match self
            .request(ClientFrame::Typing(Typing { room: room.into() }))
            .await?
        {
            ServerFrame::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Adds or removes a reaction.
    pub async fn react(
        &self,
        room: &str,
        message_id: u64,
        emoji: &str,
        remove: bool,
    ) -> Result<Reacted, ClientError> {
        let frame = ClientFrame::React(React {
            room: room.into(),
            message_id,
            emoji: emoji.into(),
            remove,
        });
        match self.request(frame).await? {
            ServerFrame::Reacted(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Fetches one page of history (newest first).
    pub async fn history(
        &self,
        room: &str,
        before: Option<Cursor>,
        limit: u32,
    ) -> Result<HistoryPage, ClientError> {
        match self
            .request(ClientFrame::History(History {
                room: room.into(),
                before,
                limit,
            }))
            .await?
        {
            ServerFrame::HistoryPage(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// The client's position in each room (what a resume would present).
    pub async fn positions(&self) -> BTreeMap<String, (u64, u64)> {
        self.positions.lock().await.clone()
    }
}

fn unexpected(frame: ServerFrame) -> ClientError {
    ClientError::Unexpected(format!("{:?}", frame.opcode()))
}

/// A random idempotency key (128 bits, hex).
pub fn new_client_msg_id() -> String {
    let v: u128 = rand::rng().random();
    format!("{v:032x}")
}

struct Driver {
    config: ClientConfig,
    events: mpsc::Sender<Event>,
    positions: Arc<Mutex<BTreeMap<String, (u64, u64)>>>,
    session_id: Option<SessionId>,
    /// Unanswered requests by request id; re-sent after a reconnect.
    pending: HashMap<u32, Request>,
    next_rid: u32,
    heartbeat_every: Duration,
    dead_after: Duration,
}

enum Stop {
    /// Reconnect (after this close code, if any).
    Reconnect(Option<u16>),
    /// Stop for good.
    Final(ClientError),
}

impl Driver {
    fn rid(&mut self) -> u32 {
        let rid = self.next_rid;
        self.next_rid = self.next_rid.wrapping_add(1).max(1);
        rid
    }

    /// Connects and identifies (resuming when `resume`); returns at Ready.
    async fn open(&mut self, resume: bool) -> Result<(RawConnection, Ready), ClientError> {
        let mut conn = RawConnection::connect_tls(
            &self.config.url,
            Codec::default(),
            Some(SUBPROTOCOL),
            self.config.tls.clone(),
        )
        .await?;
        let resume = match (resume, self.session_id) {
            (true, Some(session_id)) => {
                let positions = self
                    .positions
                    .lock()
                    .await
                    .iter()
                    .map(|(room, (epoch, seq))| RoomPosition {
                        room: room.clone(),
                        epoch: *epoch,
                        seq: *seq,
                    })
                    .collect();
                Some(Resume {
                    session_id,
                    positions,
                })
            }
            _ => None,
        };
        let rid = self.rid();
        conn.send(
            rid,
            &ClientFrame::Identify(Identify {
                token: self.config.token.clone(),
                resume,
            }),
        )
        .await?;
        loop {
            match conn.recv().await? {
                Incoming::Closed(c) => {
                    let (code, reason) = c
                        .map(|(c, r)| (Some(c), r))
                        .unwrap_or((None, "closed".into()));
                    return Err(ClientError::Closed { code, reason });
                }
                Incoming::Frames(frames) => {
                    let mut frames = frames.into_iter();
                    if let Some((_, ServerFrame::Ready(ready))) = frames.next() {
                        self.on_ready(&ready).await;
                        let _ = self.events.send(Event::Ready(ready.clone())).await;
                        for (rid, f) in frames {
                            self.on_frame(rid, f).await;
                        }
                        return Ok((conn, ready));
                    }
                }
            }
        }
    }

    async fn on_ready(&mut self, ready: &Ready) {
        self.session_id = Some(ready.session_id);
        self.heartbeat_every = Duration::from_millis(ready.heartbeat_interval_ms.max(100) as u64);
        self.dead_after =
            self.heartbeat_every + Duration::from_millis(ready.heartbeat_timeout_ms as u64);
        let mut pos = self.positions.lock().await;
        for r in &ready.rooms {
            pos.insert(r.room.clone(), (r.epoch, r.seq));
        }
    }

    async fn advance(&self, room: &str, epoch: u64, seq: u64) {
        let mut pos = self.positions.lock().await;
        let e = pos.entry(room.to_owned()).or_insert((epoch, 0));
        if e.0 != epoch || seq > e.1 {
            *e = (epoch, seq);
        }
    }

    /// A room event at (`epoch`, `seq`): `false` when the client already
    /// has it (at or before its position: PROTOCOL.md §9.5). Otherwise
    /// advances the position, first reporting a lost stream when the
    /// epoch is not the position's.
    async fn event_at(&self, room: &str, epoch: u64, seq: u64) -> bool {
        let known = self.positions.lock().await.get(room).copied();
        if let Some((e, s)) = known
            && e == epoch
            && seq <= s
        {
            return false;
        }
        match known {
            Some((known, _)) if known != 0 && known != epoch => {
                let lost = Event::StreamLost {
                    room: room.to_owned(),
                    epoch,
                    seq: seq.saturating_sub(1),
                };
                let _ = self.events.send(lost).await;
            }
            // Skipped ahead in the same epoch: events were missed
            // (PROTOCOL.md §9.5). The application reloads; the position
            // moves on so the next resume does not ask for them again.
            Some((e, s)) if e == epoch && seq > s + 1 => {
                let missed = Event::Missed {
                    room: room.to_owned(),
                    after: s,
                    next: seq,
                };
                let _ = self.events.send(missed).await;
            }
            _ => {}
        }
        self.advance(room, epoch, seq).await;
        true
    }

    async fn on_frame(&mut self, rid: u32, frame: ServerFrame) {
        let fresh = match &frame {
            ServerFrame::NewMessage(m) => {
                self.event_at(&m.message.room, m.epoch, m.message.seq).await
            }
            ServerFrame::Reaction(r) => self.event_at(&r.room, r.epoch, r.seq).await,
            _ => true,
        };
        if !fresh {
            return;
        }
        match &frame {
            ServerFrame::Joined(j) => {
                // Events after the joined position may arrive just before
                // Joined (§9.5): never move back within an epoch.
                let mut pos = self.positions.lock().await;
                for r in &j.rooms {
                    let e = pos.entry(r.room.clone()).or_insert((r.epoch, r.seq));
                    if e.0 != r.epoch || e.1 < r.seq {
                        *e = (r.epoch, r.seq);
                    }
                }
            }
            ServerFrame::Left(l) => {
                let mut pos = self.positions.lock().await;
                for r in &l.rooms {
                    pos.remove(r);
                }
            }
            // A duplicate's ack repeats the original position, which this
            // connection may be past (or which is of an older epoch); a
            // Reacted with seq 0 published nothing (PROTOCOL.md §9.5).
            // Otherwise it is the sender's own event: same checks.
            ServerFrame::MessageSent(m) if !m.duplicate && m.seq != 0 => {
                self.event_at(&m.room, m.epoch, m.seq).await;
            }
            ServerFrame::Reacted(r) if r.seq != 0 => {
                self.event_at(&r.room, r.epoch, r.seq).await;
            }
            ServerFrame::Resumed(r) => {
                let mut pos = self.positions.lock().await;
                for room in &r.rooms {
                    pos.insert(room.room.clone(), (room.epoch, room.seq));
                }
            }
            _ => {}
        }
        if let Some(req) = self.pending.remove(&rid).filter(|_| rid != 0) {
            let result = match frame {
                ServerFrame::Error(e) => Err(ClientError::Server(e)),
                other => Ok(other),
            };
            let _ = req.reply.send(result);
            return;
        }
        let event = match frame {
            ServerFrame::NewMessage(m) => Event::Message(m),
            ServerFrame::UserTyping(t) => Event::Typing(t),
            ServerFrame::Reaction(r) => Event::Reaction(r),
            ServerFrame::Resumed(r) => Event::Resumed(r),
            ServerFrame::Error(e) => Event::Error(e),
            ServerFrame::Left(l) if rid == 0 => Event::Removed { rooms: l.rooms },
            _ => return,
        };
        // A full event queue means the application stopped reading;
        // block here rather than drop (the server will shed or resume).
        let _ = self.events.send(event).await;
    }

    async fn run(mut self, mut conn: RawConnection, mut requests: mpsc::Receiver<Request>) {
        loop {
            let stop = self.serve(&mut conn, &mut requests).await;
            let code = match stop {
                Stop::Final(e) => {
                    if let ClientError::Closed { code, reason } = &e {
                        let closed = Event::Closed {
                            code: *code,
                            reason: reason.clone(),
                        };
                        let _ = self.events.send(closed).await;
                    }
                    return self.fail_all(e).await;
                }
                Stop::Reconnect(code) => code,
            };
            let _ = self
                .events
                .send(Event::Disconnected {
                    code,
                    reconnecting: true,
                })
                .await;
            match self.reconnect().await {
                Ok(c) => conn = c,
                Err(e) => {
                    let code = match &e {
                        ClientError::Closed { code, .. } => *code,
                        _ => None,
                    };
                    let _ = self
                        .events
                        .send(Event::Disconnected {
                            code,
                            reconnecting: false,
                        })
                        .await;
                    return self.fail_all(e).await;
                }
            }
        }
    }

    async fn fail_all(&mut self, e: ClientError) {
        for (_, req) in self.pending.drain() {
            let _ = req.reply.send(Err(e.clone()));
        }
    }

    async fn reconnect(&mut self) -> Result<RawConnection, ClientError> {
        let mut attempt = 0u32;
        loop {
            let step = self
                .config
                .backoff_base
                .saturating_mul(1 << attempt.min(16))
                .min(self.config.backoff_max);
            let jittered = step.mul_f64(rand::rng().random_range(0.5..=1.0));
            tokio::time::sleep(jittered).await;
            let opened = match self.open(true).await {
                // A connection that fails while the unanswered requests are
                // re-sent is one more failed attempt, not the end.
                Ok((conn, _ready)) => self.resend_pending(conn).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(conn) => return Ok(conn),
                Err(ClientError::Closed {
                    code: Some(code),
                    reason,
                }) if action_for(code) == ClientAction::DoNotReconnect => {
                    return Err(ClientError::Closed {
                        code: Some(code),
                        reason,
                    });
                }
                Err(e) => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "reconnect failed");
                    if attempt >= self.config.max_attempts {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Re-sends what was never answered, in request order (sends keep
    /// their client message ids, so a retry is never stored twice).
    async fn resend_pending(&self, mut conn: RawConnection) -> Result<RawConnection, ClientError> {
        let mut rids: Vec<u32> = self.pending.keys().copied().collect();
        rids.sort_unstable();
        for rid in rids {
            if let Some(req) = self.pending.get(&rid) {
                conn.send(rid, &req.frame).await?;
            }
        }
        Ok(conn)
    }

    async fn serve(
        &mut self,
        conn: &mut RawConnection,
        requests: &mut mpsc::Receiver<Request>,
    ) -> Stop {
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.tick().await;
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                req = requests.recv() => {
                    let Some(req) = req else {
                        let _ = conn.close().await;
                        return Stop::Final(ClientError::Closed { code: None, reason: "client closed".into() });
                    };
                    let rid = self.rid();
                    let sent = conn.send(rid, &req.frame).await;
                    self.pending.insert(rid, req);
                    if sent.is_err() {
                        return self.stop_for(None);
                    }
                }
                incoming = conn.recv() => {
                    last_heard = Instant::now();
                    match incoming {
                        Ok(Incoming::Frames(frames)) => {
                            for (rid, f) in frames {
                                self.on_frame(rid, f).await;
                            }
                        }
                        Ok(Incoming::Closed(c)) => {
                            let (code, reason) = match c {
                                Some((code, reason)) => (Some(code), reason),
                                None => (None, String::new()),
                            };
                            return self.stop_with(code, reason);
                        }
                        Err(_) => return self.stop_for(None),
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > self.dead_after {
                        return self.stop_for(None);
                    }
                    let rid = self.rid();
                    if conn.send(rid, &ClientFrame::Heartbeat).await.is_err() {
                        return self.stop_for(None);
                    }
                }
            }
        }
    }

    fn stop_for(&self, code: Option<u16>) -> Stop {
        self.stop_with(code, String::new())
    }

    /// Reconnect or stop for good, by the close code; a final stop keeps
    /// the server's reason (the application's words for a 4107).
    fn stop_with(&self, code: Option<u16>, reason: String) -> Stop {
        let reconnect = self.config.reconnect
            && code.is_none_or(|c| action_for(c) == ClientAction::ReconnectAndResume);
        if reconnect {
            Stop::Reconnect(code)
        } else {
            let reason = if reason.is_empty() {
                "server closed the connection".into()
            } else {
                reason
            };
            Stop::Final(ClientError::Closed { code, reason })
        }
    }
}
