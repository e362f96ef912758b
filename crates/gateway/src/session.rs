//! One identified connection's state and the handling of every request.
//!
//! Nothing here touches a socket: requests come in as decoded frames and
//! everything going out is pushed to the connection's [`Outbox`]. That
//! keeps the rules (membership, limits, idempotency, ordering) testable
//! without the network, and the socket loop a thin framing layer.
//!
//! Requests that wait on storage (Send, React, History) are returned as
//! futures the connection polls concurrently, so a slow database does not
//! stall deliveries; Join and Leave change this session's membership and
//! are handled in order.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use rand::RngCore;

use chatgate_fanout::{FanoutError, OnSequenced, Position, Replay, RoomEvent};
use chatgate_protocol::codec::wire_len;
use chatgate_protocol::limits::HISTORY_DEFAULT_LIMIT;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, CloseCode, ErrorCode, Opcode, ServerFrame};
use chatgate_storage::{
    NewMessage as StoreMessage, ReactionChange, ReactionOutcome, StoreError, User,
};

use crate::auth::Claims;
use crate::hub::Removed;
use crate::node::Node;
use crate::outbox::Outbox;
use crate::policy::HistoryVisibility;
use crate::users::Slot;

/// A request still running; the connection polls it to completion.
pub type Pending = Pin<Box<dyn Future<Output = ()> + std::marker::Send>>;

/// Replies go through the outbox like events, so that per room they keep
/// sequence order on the wire.
#[derive(Clone)]
struct Replier {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
}

impl Replier {
    /// A success reply; request id 0 asked for none (PROTOCOL.md §9.4),
    /// except where the reply carries what the client must not miss: a
    /// heartbeat's answer, and the position of its own message or
    /// reaction.
    fn send(&self, rid: u32, frame: &ServerFrame) {
        let always = matches!(
            frame,
            ServerFrame::HeartbeatAck(_) | ServerFrame::MessageSent(_) | ServerFrame::Reacted(_)
        );
        if rid == 0 && !always {
            return;
        }
        match self.node.codec.encode_server(rid, frame) {
            Ok(bytes) => {
                self.outbox.push(bytes, false);
            }
            Err(e) => {
                // Only a reply that outgrew the frame limit fails to encode;
                // asking again unchanged would fail again.
                tracing::warn!(error = %e, "reply could not be encoded");
                self.error(
                    rid,
                    ErrorCode::InvalidRequest,
                    0,
                    "reply larger than the frame limit; ask for less",
                );
            }
        }
    }

    fn error(&self, rid: u32, code: ErrorCode, retry_after_ms: u32, message: &str) {
        self.node.metrics.error(code);
        let frame = ServerFrame::Error(ErrorBody {
            code: code.code(),
            retry_after_ms,
            message: message.to_owned(),
        });
        if let Ok(bytes) = self.node.codec.encode_server(rid, &frame) {
            self.outbox.push(bytes, false);
        }
    }

    fn send_failure(&self, rid: u32, failure: &SendFailure) {
        match failure {
            SendFailure::Store(e) => self.store_error(rid, e),
            SendFailure::NotDelivered(e) => self.not_delivered(rid, e),
            SendFailure::ReusedId => self.error(
                rid,
                ErrorCode::InvalidRequest,
                0,
                "client_msg_id already used for a different message",
            ),
        }
    }

    fn store_error(&self, rid: u32, e: &StoreError) {
        match e {
            StoreError::NotFound => self.error(rid, ErrorCode::NotFound, 0, "not found"),
            StoreError::Unavailable(_) => {
                self.node.metrics.store_errors.inc();
                self.error(rid, ErrorCode::Unavailable, 1000, "storage unavailable")
            }
            StoreError::Internal(_) => {
                self.node.metrics.store_errors.inc();
                tracing::error!(error = %e, "store failure");
                self.error(rid, ErrorCode::Internal, 1000, "storage error")
            }
        }
    }

    fn fanout_error(&self, rid: u32, e: &FanoutError) {
        self.node.metrics.fanout_errors.inc();
        tracing::warn!(error = %e, "fan-out failure");
        self.error(
            rid,
            ErrorCode::Unavailable,
            1000,
            "fan-out unavailable, retry",
        )
    }

    /// A message stored but not published: the client must retry (with
    /// the same id) for the room to get it, and must know history may
    /// already show it.
    fn not_delivered(&self, rid: u32, e: &FanoutError) {
        self.node.metrics.fanout_errors.inc();
        tracing::warn!(error = %e, "stored message not published");
        self.error(
            rid,
            ErrorCode::NotDelivered,
            1000,
            "stored, not yet delivered: retry with the same client_msg_id",
        )
    }
}

/// An identified session.
pub struct Session {
    node: Arc<Node>,
    conn: u64,
    user_id: Arc<str>,
    user_name: Arc<str>,
    user_image: Arc<str>,
    /// Rooms (or patterns) the token allows beyond the application's
    /// grants (`rooms` claim).
    token_rooms: Arc<[String]>,
    slot: Slot,
    /// This session's slot in `max_connections`.
    _permit: tokio::sync::OwnedSemaphorePermit,
    outbox: Arc<Outbox>,
    rooms: HashSet<Arc<str>>,
    /// Per room, the position the client was told (Ready, Joined, replay).
    /// Queued events at or before it are dropped, so the client never sees
    /// a sequence number go backwards. Cleared at the first newer event.
    watermarks: Vec<(Arc<str>, Position)>,
    /// Flood guard for every frame this connection sends, taken before
    /// the frame is decoded: refilled at `requests_per_second`.
    requests: Bucket,
    /// Refusals of frames over the request budget are answered up to
    /// `request_burst` a second; past that the connection stops reading
    /// until one refills, so a client that ignores `retry_after_ms` costs
    /// a bounded number of frames a second, not what its link can carry.
    refusals: Bucket,
    /// Completion of the newest request started by [`Session::in_order`].
    last_in_order: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// What one resume may still replay, across all its rooms.
struct ReplayBudget {
    frames: usize,
    bytes: usize,
}

impl ReplayBudget {
    /// Takes a room's replay from the budget, or leaves the budget as it
    /// is and says no.
    fn take(&mut self, frames: &[Bytes]) -> bool {
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        if frames.len() > self.frames || bytes > self.bytes {
            return false;
        }
        self.frames -= frames.len();
        self.bytes -= bytes;
        true
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` a second.
struct Bucket {
    tokens: f32,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32) -> Bucket {
        Bucket {
            tokens: burst as f32,
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: u32, burst: u32) -> Result<(), Duration> {
        let rate = rate.max(1) as f32;
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f32();
        self.at = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst.max(1) as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f32((1.0 - self.tokens) / rate))
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Session {
    /// Authenticates `identify`, claims a per-user slot, joins the user's
    /// rooms and, when resuming, collects the replay. Returns the session
    /// and the frames to write before anything queued: Ready, then (when
    /// resuming) the replayed events and Resumed.
    pub async fn open(
        node: Arc<Node>,
        conn: u64,
        outbox: Arc<Outbox>,
        rid: u32,
        identify: Identify,
    ) -> Result<(Session, Vec<Bytes>), CloseCode> {
        let claims = Session::verify(&node, &identify).await?;
        Session::open_verified(node, conn, outbox, rid, identify, claims).await
    }

    /// Checks the Identify's token (4100 when refused). Separate from
    /// [`Session::open_verified`] so the connection can keep a socket
    /// evictable until it is known to be a user's.
    pub async fn verify(node: &Node, identify: &Identify) -> Result<Claims, CloseCode> {
        node.auth.verify(&identify.token).await.map_err(|e| {
            node.metrics.auth_failures.inc();
            tracing::debug!(error = %e, "identify refused");
            CloseCode::InvalidToken
        })
    }

    /// [`Session::open`] for a token already verified into `claims`.
    pub async fn open_verified(
        node: Arc<Node>,
        conn: u64,
        outbox: Arc<Outbox>,
        rid: u32,
        identify: Identify,
        claims: Claims,
    ) -> Result<(Session, Vec<Bytes>), CloseCode> {
        let user_id: Arc<str> = Arc::from(claims.sub.as_str());
        let user_name: Arc<str> = Arc::from(claims.name.as_deref().unwrap_or(&claims.sub));
        let user_image: Arc<str> = Arc::from(claims.picture.as_deref().unwrap_or(""));
        // The node's session slot is claimed only now, once the token
        // checked out: sockets that never identify cannot hold one.
        let Ok(permit) = node.sessions.clone().try_acquire_owned() else {
            node.metrics.refused_overload.inc();
            return Err(CloseCode::Overloaded);
        };
        let Some(slot) = node.users.connect(&user_id).await else {
            node.metrics.refused_user_limit.inc();
            return Err(CloseCode::ConnectionLimit);
        };
        node.hub.connect(&user_id, conn, &outbox);
        let mut session_id = [0u8; 16];
        rand::rng().fill_bytes(&mut session_id);
        // From here on, Drop releases the user slot and memberships.
        let mut session = Session {
            node: node.clone(),
            conn,
            user_id,
            user_name,
            user_image,
            token_rooms: claims.rooms.clone().into(),
            slot,
            _permit: permit,
            outbox,
            rooms: HashSet::new(),
            watermarks: Vec::new(),
            requests: Bucket::full(node.config.request_burst),
            refusals: Bucket::full(node.config.request_burst),
            last_in_order: None,
        };
        let user = User {
            id: claims.sub.clone(),
            name: session.user_name.to_string(),
            image: session.user_image.to_string(),
        };
        // Taken before anything is read: a removal carried out while this
        // session opens is caught once it has joined the hub (below).
        let removals = node.hub.removal_mark();
        let stored = node.store.identify(&user).await;
        // A store outage must not lock users out: they get a session with
        // the rooms they ask to resume (each still checked), and can join
        // more.
        let listed = stored.unwrap_or_else(|e| {
            node.metrics.store_errors.inc();
            tracing::warn!(error = %e, "memberships unavailable at identify");
            Vec::new()
        });
        // The room list says which rooms to try, never who may enter: a
        // list cached before a membership ended must not let anyone back
        // in. Every room is asked of its policy (open rooms and rooms the
        // token allows cost no lookup; grants come from the caches).
        let mut candidates: Vec<String> = listed.into_iter().map(|m| m.room).collect();
        let from_list = candidates.len();
        if let Some(resume) = &identify.resume {
            for p in &resume.positions {
                if !candidates.contains(&p.room) {
                    candidates.push(p.room.clone());
                }
            }
            // Rooms named only by the resume cost like a Join: a request
            // per 100 rooms.
            for _ in 0..(candidates.len() - from_list).div_ceil(100) {
                if session.take_request_token().is_err() {
                    node.metrics.rate_limited.inc();
                    return Err(CloseCode::Overloaded);
                }
            }
        }
        let user_id = session.user_id.clone();
        let token_rooms = session.token_rooms.clone();
        let answers: Vec<_> = futures_util::stream::iter(candidates.into_iter().enumerate())
            .map(|(i, room)| {
                let (node, user_id, token_rooms) = (&node, &user_id, &token_rooms);
                async move {
                    let rights = node.rooms.rights(&room, user_id, token_rooms).await;
                    (i, room, rights)
                }
            })
            .buffered(16)
            .collect()
            .await;
        let mut wanted: Vec<String> = Vec::with_capacity(answers.len());
        let mut refused = Vec::new();
        for (i, room, rights) in answers {
            let named_by_resume = i >= from_list;
            match rights {
                Ok(r) if r.entry.is_some() => wanted.push(room),
                // A listed room the user may no longer enter is left out;
                // one the resume named is refused aloud.
                Ok(_) if named_by_resume => {
                    node.metrics
                        .forbidden
                        .with_label_values(&[Opcode::Identify.name()])
                        .inc();
                    refused.push(room);
                }
                Ok(_) => {}
                // Unknown is not allowed: the client resumes it later.
                Err(e) => {
                    node.metrics.store_errors.inc();
                    tracing::warn!(error = %e, "membership unavailable at identify");
                    if named_by_resume {
                        refused.push(room);
                    }
                }
            }
        }
        // Past the session's room cap the rest are named in the
        // unsolicited Left, never dropped in silence.
        if wanted.len() > node.config.max_rooms_per_session {
            let over = wanted.split_off(node.config.max_rooms_per_session);
            tracing::debug!(
                rooms = over.len(),
                "rooms past max_rooms_per_session at identify"
            );
            refused.extend(over);
        }
        for room in &wanted {
            if let Some(name) = node.hub.join(room, conn, &session.user_id, &session.outbox) {
                session.rooms.insert(name);
            }
        }
        // A removal carried out while this session opened found it in no
        // room, and may have come after its answer was read: undone here.
        let mut kept = Vec::with_capacity(wanted.len());
        for room in wanted {
            if session.settle(&room, removals).await {
                kept.push(room);
            } else {
                session.rooms.remove(room.as_str());
                refused.push(room);
            }
        }
        let wanted = kept;

        let mut positions = Vec::with_capacity(wanted.len());
        let mut replay_frames = Vec::new();
        // A resume replays no more than an outbox holds: a few hundred
        // bytes of Identify must not make the node write a room's whole
        // recovery log. A room past the budget is "not recovered" (the
        // client reloads it from History).
        let mut replay_budget = ReplayBudget {
            frames: node.config.outbound_queue_frames,
            bytes: node.config.outbound_queue_bytes,
        };
        let mut outcomes = Vec::new();
        for room in &wanted {
            let name = session.room_name(room);
            let claimed = identify
                .resume
                .as_ref()
                .and_then(|r| r.positions.iter().find(|p| &p.room == room));
            // `told`: where Ready puts the client (§9.5: nothing at or
            // before it follows). `mark`: what it has once the replay is
            // written, so live events queued meanwhile are not repeated.
            let (told, mark) = match claimed {
                None => {
                    let current = node
                        .fanout
                        .position(room)
                        .await
                        .unwrap_or(Position { epoch: 0, seq: 0 });
                    if identify.resume.is_some() {
                        outcomes.push(RoomResume {
                            room: room.clone(),
                            recovered: false,
                            replayed: 0,
                            epoch: current.epoch,
                            seq: current.seq,
                        });
                    }
                    (current, current)
                }
                Some(p) => {
                    let since = Position {
                        epoch: p.epoch,
                        seq: p.seq,
                    };
                    // A room that hides history from before a member
                    // joined is never replayed: the replay knows positions,
                    // not who may see what (a claimed position could reach
                    // back before the grant). History, which filters, fills
                    // the gap.
                    let replay = if node.rooms.policy(room).history == HistoryVisibility::SinceJoin
                    {
                        node.fanout
                            .position(room)
                            .await
                            .map(|current| Replay::NotRecoverable { current })
                    } else {
                        node.fanout.replay(room, since, replay_budget.frames).await
                    };
                    let replay = match replay {
                        Ok(Replay::Events { frames, position }) if !replay_budget.take(&frames) => {
                            node.metrics.replays_cut.inc();
                            Ok(Replay::NotRecoverable { current: position })
                        }
                        other => other,
                    };
                    match replay {
                        Ok(Replay::Events { frames, position }) => {
                            outcomes.push(RoomResume {
                                room: room.clone(),
                                recovered: true,
                                replayed: frames.len() as u32,
                                epoch: position.epoch,
                                seq: position.seq,
                            });
                            replay_frames.extend(frames);
                            // The replay follows Ready: Ready says where the
                            // client was, Resumed where it is after it.
                            (since, position)
                        }
                        Ok(Replay::NotRecoverable { current }) => {
                            outcomes.push(RoomResume {
                                room: room.clone(),
                                recovered: false,
                                replayed: 0,
                                epoch: current.epoch,
                                seq: current.seq,
                            });
                            (current, current)
                        }
                        Err(e) => {
                            node.metrics.fanout_errors.inc();
                            tracing::warn!(error = %e, "replay unavailable");
                            outcomes.push(RoomResume {
                                room: room.clone(),
                                recovered: false,
                                replayed: 0,
                                epoch: 0,
                                seq: 0,
                            });
                            (Position { epoch: 0, seq: 0 }, Position { epoch: 0, seq: 0 })
                        }
                    }
                }
            };
            session.watermarks.push((name, mark));
            positions.push(RoomPosition {
                room: room.clone(),
                epoch: told.epoch,
                seq: told.seq,
            });
        }

        let ready = ServerFrame::Ready(Ready {
            session_id,
            user_id: claims.sub,
            user_name: session.user_name.to_string(),
            rooms: positions,
            heartbeat_interval_ms: node.config.heartbeat_interval.as_millis() as u32,
            heartbeat_timeout_ms: node.config.heartbeat_timeout.as_millis() as u32,
            max_frame_bytes: node.config.max_frame_bytes.min(u32::MAX as usize) as u32,
            resuming: identify.resume.is_some(),
        });
        let mut first = Vec::with_capacity(2 + replay_frames.len());
        first.push(
            node.codec
                .encode_server(rid, &ready)
                .map_err(|_| CloseCode::ServerError)?,
        );
        if identify.resume.is_some() {
            first.extend(replay_frames);
            let resumed = ServerFrame::Resumed(Resumed { rooms: outcomes });
            first.push(
                node.codec
                    .encode_server(0, &resumed)
                    .map_err(|_| CloseCode::ServerError)?,
            );
            // Rooms of the resume the user may not (or no longer) enter:
            // not in Ready or Resumed, and named here, as when a
            // membership ends during a session.
            if !refused.is_empty() {
                let left = ServerFrame::Left(Rooms { rooms: refused });
                first.push(
                    node.codec
                        .encode_server(0, &left)
                        .map_err(|_| CloseCode::ServerError)?,
                );
            }
        }
        Ok((session, first))
    }

    fn room_name(&self, room: &str) -> Arc<str> {
        self.rooms
            .get(room)
            .cloned()
            .unwrap_or_else(|| Arc::from(room))
    }

    fn replier(&self) -> Replier {
        Replier {
            node: self.node.clone(),
            outbox: self.outbox.clone(),
        }
    }

    /// Takes one request token; `Err(ms)` until one is available.
    fn take_request_token(&mut self) -> Result<(), u32> {
        let c = &self.node.config;
        self.requests
            .take(c.requests_per_second, c.request_burst)
            .map_err(|wait| wait.as_micros().div_ceil(1000).clamp(1, u32::MAX as u128) as u32)
    }

    /// Charges a frame (any opcode, Heartbeat and Send included) to the
    /// connection's request budget *before* it is decoded, so a flood
    /// costs a header read per frame, not an inflate and a decode; the
    /// per-user message limit applies to Send and React on top. `Ok`:
    /// decode and handle it. `Err(pause)`: it was answered `rate_limited`;
    /// with `Some`, stop reading for that long.
    pub fn admit(&mut self, rid: u32) -> Result<(), Option<Duration>> {
        let Err(wait) = self.take_request_token() else {
            return Ok(());
        };
        self.node.metrics.rate_limited.inc();
        self.replier().error(
            rid,
            ErrorCode::RateLimited,
            wait,
            "too many requests on this connection",
        );
        let c = &self.node.config;
        Err(self.refusals.take(c.request_burst, c.request_burst).err())
    }

    /// Boxes a storage-bound request for the connection to poll, timing it
    /// for the request-latency histogram (fast requests are timed by the
    /// connection loop).
    fn timed(
        &self,
        opcode: Opcode,
        work: impl Future<Output = ()> + std::marker::Send + 'static,
    ) -> Pending {
        let node = self.node.clone();
        Box::pin(async move {
            let started = Instant::now();
            work.await;
            node.metrics
                .request(opcode, started.elapsed().as_secs_f64());
        })
    }

    /// True when the session is in `room`; otherwise answers `NotInRoom`.
    fn in_room(&self, rid: u32, room: &str) -> bool {
        let member = self.rooms.contains(room);
        if !member {
            self.replier()
                .error(rid, ErrorCode::NotInRoom, 0, "join the room first");
        }
        member
    }

    /// After joining `room` in the hub: whether the session may stay,
    /// given the removals carried out since `mark` (taken before its
    /// answer was read). A removal logged since means no; one the log no
    /// longer reaches means: leave, ask again, and rejoin only if still
    /// allowed (out of the hub meanwhile, so nothing of the room reaches a
    /// session that may no longer see it). Leaves the hub when the answer
    /// is no.
    async fn settle(&self, room: &str, mut mark: u64) -> bool {
        for _ in 0..3 {
            match self.node.hub.removed_since(mark, room, &self.user_id) {
                Removed::No => return true,
                Removed::Yes => break,
                Removed::Unknown => {
                    self.node.hub.leave(room, self.conn);
                    mark = self.node.hub.removal_mark();
                    let allowed = self
                        .node
                        .rooms
                        .rights(room, &self.user_id, &self.token_rooms)
                        .await
                        .is_ok_and(|r| r.entry.is_some());
                    if !allowed {
                        return false;
                    }
                    self.node
                        .hub
                        .join(room, self.conn, &self.user_id, &self.outbox);
                }
            }
        }
        self.node.hub.leave(room, self.conn);
        false
    }

    /// Refuses a request the room's policy does not allow (`forbidden`);
    /// true when it may go on. Costs a lookup only in rooms whose policy
    /// reserves posting to some roles.
    async fn may_post(&self, rid: u32, opcode: Opcode, room: &str) -> bool {
        if self.node.rooms.policy(room).send_roles.is_empty() {
            return true;
        }
        match self
            .node
            .rooms
            .rights(room, &self.user_id, &self.token_rooms)
            .await
        {
            Ok(r) if r.post => true,
            Ok(_) => {
                self.forbidden(rid, opcode, "this room's policy does not let you post here");
                false
            }
            Err(e) => {
                self.replier().store_error(rid, &e);
                false
            }
        }
    }

    fn forbidden(&self, rid: u32, opcode: Opcode, message: &str) {
        self.node
            .metrics
            .forbidden
            .with_label_values(&[opcode.name()])
            .inc();
        self.replier().error(rid, ErrorCode::Forbidden, 0, message);
    }

    /// Handles one request. Fast requests complete here; storage-bound
    /// ones come back as [`Pending`]. `Err` closes the connection.
    pub async fn handle(
        &mut self,
        rid: u32,
        frame: ClientFrame,
    ) -> Result<Option<Pending>, CloseCode> {
        let reply = self.replier();
        // The request budget was charged by `admit`, before decoding.
        if let Err(invalid) = frame.validate() {
            reply.error(rid, ErrorCode::InvalidRequest, 0, &invalid.to_string());
            return Ok(None);
        }
        match frame {
            ClientFrame::Identify(_) => Err(CloseCode::AlreadyIdentified),
            ClientFrame::Heartbeat => {
                reply.send(
                    rid,
                    &ServerFrame::HeartbeatAck(HeartbeatAck {
                        server_time_ms: now_ms(),
                    }),
                );
                Ok(None)
            }
            ClientFrame::Join(r) => {
                self.join(rid, r.rooms).await;
                Ok(None)
            }
            ClientFrame::Leave(r) => {
                self.leave(rid, r.rooms).await;
                Ok(None)
            }
            ClientFrame::Typing(t) => {
                if !self.in_room(rid, &t.room) || !self.may_post(rid, Opcode::Typing, &t.room).await
                {
                    return Ok(None);
                }
                let frame = ServerFrame::UserTyping(UserTyping {
                    room: t.room.clone(),
                    user_id: self.user_id.to_string(),
                });
                let Ok(bytes) = self.node.codec.encode_server(0, &frame) else {
                    reply.error(rid, ErrorCode::Internal, 0, "typing event too large");
                    return Ok(None);
                };
                // Another of this user's connections said so a moment
                // ago: the room already knows.
                if !self.node.hub.typing_published.first(&bytes) {
                    self.node.metrics.typing_coalesced.inc();
                    reply.send(rid, &ServerFrame::Ok);
                    return Ok(None);
                }
                let fanout = &self.node.fanout;
                if let Err(e) = fanout
                    .publish_ephemeral(&t.room, bytes, Some(self.conn))
                    .await
                {
                    reply.fanout_error(rid, &e);
                    return Ok(None);
                }
                reply.send(rid, &ServerFrame::Ok);
                Ok(None)
            }
            ClientFrame::Send(s) => Ok(self.send(rid, s).await),
            ClientFrame::React(r) => Ok(self.react(rid, r).await),
            ClientFrame::History(h) => Ok(self.history(rid, h).await),
        }
    }

    /// Joins the rooms this connection is not in yet. A room it is
    /// already in is left exactly as it is: its stream goes on from where
    /// this connection is, so nothing queued for it is skipped (moving
    /// the watermark to the head here would drop queued events silently).
    /// `Joined` lists the newly joined rooms, each once, with the
    /// position their stream starts after.
    async fn join(&mut self, rid: u32, rooms: Vec<String>) {
        let reply = self.replier();
        let mut new = each_once(rooms);
        new.retain(|room| !self.rooms.contains(room.as_str()));
        if self.rooms.len() + new.len() > self.node.config.max_rooms_per_session {
            reply.error(
                rid,
                ErrorCode::TooManyRooms,
                0,
                "room limit per session reached",
            );
            return;
        }
        // All or nothing: one room the user may not enter refuses the
        // request (the first one found; the rest are not looked up), and
        // nothing changes.
        let removals = self.node.hub.removal_mark();
        for room in &new {
            match self
                .node
                .rooms
                .rights(room, &self.user_id, &self.token_rooms)
                .await
            {
                Ok(r) if r.entry.is_some() => {}
                Ok(_) => {
                    self.forbidden(rid, Opcode::Join, &format!("not a member of {room}"));
                    return;
                }
                Err(e) => {
                    reply.store_error(rid, &e);
                    return;
                }
            }
        }
        if !new.is_empty()
            && let Err(e) = self.node.store.join(&self.user_id, &new).await
        {
            reply.store_error(rid, &e);
            return;
        }
        let mut joined = Vec::with_capacity(new.len());
        let mut undone = Vec::new();
        for room in &new {
            if let Some(name) = self
                .node
                .hub
                .join(room, self.conn, &self.user_id, &self.outbox)
            {
                self.rooms.insert(name);
            }
            // A removal carried out since the answer was read found this
            // connection not yet in the room (so told it nothing): the room
            // is given up. Settled before the position is read, so that the
            // position is one the connection was in the room for.
            if !self.settle(room, removals).await {
                undone.push(room.clone());
                continue;
            }
            // Position after joining: an event racing the join is either
            // counted in it (and dropped from the queue by the watermark)
            // or numbered after it.
            let position = match self.node.fanout.position(room).await {
                Ok(p) => p,
                Err(e) => {
                    // All or nothing: a room joined without a position to
                    // tell the client would look joined to a retry, which
                    // would then be answered with nothing for it.
                    for done in joined.iter().map(|r: &RoomPosition| &r.room).chain([room]) {
                        self.node.hub.leave(done, self.conn);
                        self.rooms.remove(done.as_str());
                        self.watermarks.retain(|(r, _)| **r != **done);
                    }
                    for gone in &undone {
                        self.rooms.remove(gone.as_str());
                    }
                    reply.fanout_error(rid, &e);
                    return;
                }
            };
            let name = self.room_name(room);
            self.watermarks.retain(|(r, _)| **r != **room);
            self.watermarks.push((name, position));
            joined.push(RoomPosition {
                room: room.clone(),
                epoch: position.epoch,
                seq: position.seq,
            });
        }
        // A removal after that took the connection out again (and told it
        // with a Left, which precedes this reply): not listed as joined.
        let mut kept = Vec::with_capacity(joined.len());
        for r in joined {
            if self.node.hub.is_member(&r.room, self.conn) {
                kept.push(r);
            } else {
                undone.push(r.room);
            }
        }
        let joined = kept;
        for room in &undone {
            self.node.hub.leave(room, self.conn);
            self.rooms.remove(room.as_str());
            self.watermarks.retain(|(r, _)| **r != **room);
        }
        if !undone.is_empty() && joined.is_empty() {
            self.forbidden(rid, Opcode::Join, "the membership ended while joining");
            return;
        }
        reply.send(rid, &ServerFrame::Joined(Joined { rooms: joined }));
    }

    async fn leave(&mut self, rid: u32, named: Vec<String>) {
        let rooms = each_once(named);
        for room in &rooms {
            self.node.hub.leave(room, self.conn);
            self.rooms.remove(room.as_str());
            self.watermarks.retain(|(r, _)| **r != **room);
        }
        let reply = self.replier();
        if let Err(e) = self.node.store.leave(&self.user_id, &rooms).await {
            reply.store_error(rid, &e);
            return;
        }
        reply.send(rid, &ServerFrame::Left(Rooms { rooms }));
    }

    async fn rate_limited(&self, rid: u32) -> bool {
        match self.node.users.take_message(&self.user_id).await {
            Ok(()) => false,
            Err(wait) => {
                self.node.metrics.rate_limited.inc();
                let ms = wait.as_millis().min(u32::MAX as u128) as u32;
                self.replier().error(
                    rid,
                    ErrorCode::RateLimited,
                    ms,
                    &format!(
                        "rate limit: {} messages per minute",
                        self.node.config.messages_per_minute
                    ),
                );
                true
            }
        }
    }

    async fn send(&mut self, rid: u32, s: Send) -> Option<Pending> {
        let reply = self.replier();
        if !self.in_room(rid, &s.room) || !self.may_post(rid, Opcode::Send, &s.room).await {
            return None;
        }
        let msg = StoreMessage {
            room: s.room,
            sender_id: self.user_id.to_string(),
            sender_name: self.user_name.to_string(),
            sender_image: self.user_image.to_string(),
            client_msg_id: s.client_msg_id,
            body: s.body,
            attachments: s.attachments,
        };
        // Refused before anything is stored: a stored message whose event
        // cannot be framed could never be delivered.
        if !self.fits_a_frame(&msg) {
            reply.error(
                rid,
                ErrorCode::InvalidRequest,
                0,
                "message too large for the frame limit once framed",
            );
            return None;
        }
        if self.rate_limited(rid).await {
            return None;
        }
        let node = self.node.clone();
        let conn = self.conn;
        let key = (self.user_id.clone(), msg.client_msg_id.clone());
        Some(self.in_order(Opcode::Send, async move {
            let Some(_claim) = SendClaim::take(&node, key).await else {
                reply.error(
                    rid,
                    ErrorCode::Unavailable,
                    250,
                    "this message is still being stored; retry",
                );
                return;
            };
            let ack: OnAck = {
                let reply = reply.clone();
                Box::new(move |m| reply.send(rid, &ServerFrame::MessageSent(m)))
            };
            if let Err(failure) = publish_message(&node, Some(conn), msg, ack).await {
                reply.send_failure(rid, &failure);
            }
        }))
    }

    /// Runs a request that stores and publishes a room event (Send,
    /// React) in its own task, after this connection's previous one has
    /// finished:
    /// - in request order, so a client's messages take their places in
    ///   the room in the order it sent them (tasks running side by side
    ///   would reach the fan-out in any order);
    /// - to its end even if the connection closes meanwhile: abandoned
    ///   between publish and record, a retry could not tell the message
    ///   had been delivered and would deliver it again.
    ///
    /// The chain costs an idle session one handle, no task.
    fn in_order(
        &mut self,
        opcode: Opcode,
        work: impl Future<Output = ()> + std::marker::Send + 'static,
    ) -> Pending {
        let previous = self.last_in_order.take();
        let (done, next) = tokio::sync::oneshot::channel::<()>();
        self.last_in_order = Some(next);
        let task = tokio::spawn(async move {
            if let Some(previous) = previous {
                // Ok or dropped: either way the previous one is over.
                let _ = previous.await;
            }
            work.await;
            drop(done);
        });
        self.timed(opcode, async move {
            let _ = task.await;
        })
    }

    /// Whether the NewMessage event for `msg` fits the frame limit. Every
    /// field is bounded (§6), so only a limit configured far below the
    /// default needs the trial encoding.
    fn fits_a_frame(&self, msg: &StoreMessage) -> bool {
        const LARGEST_LEGAL_EVENT: usize = 64 * 1024;
        if self.node.config.max_frame_bytes >= LARGEST_LEGAL_EVENT {
            return true;
        }
        let probe = RoomEvent::Message(msg.clone().stored(u64::MAX, u64::MAX));
        let frame = probe.into_frame(&msg.room, u64::MAX, u64::MAX);
        self.node.codec.encode_server(0, &frame).is_ok()
    }

    async fn react(&mut self, rid: u32, r: React) -> Option<Pending> {
        let reply = self.replier();
        if !self.in_room(rid, &r.room) || !self.may_post(rid, Opcode::React, &r.room).await {
            return None;
        }
        if self.rate_limited(rid).await {
            return None;
        }
        let node = self.node.clone();
        let conn = self.conn;
        let user_id = self.user_id.to_string();
        Some(self.in_order(Opcode::React, async move {
            let change = ReactionChange {
                room: r.room.clone(),
                message_id: r.message_id,
                user_id: user_id.clone(),
                emoji: r.emoji.clone(),
                remove: r.remove,
            };
            let (room, message_id) = (r.room.clone(), r.message_id);
            let reacted = move |p: Position| {
                ServerFrame::Reacted(Reacted {
                    room,
                    message_id,
                    epoch: p.epoch,
                    seq: p.seq,
                })
            };
            match node.store.react(&change).await {
                Err(e) => reply.store_error(rid, &e),
                // Nothing changed, nothing published: no position to report
                // (PROTOCOL.md §9.5: a Reacted with seq 0 moves nothing).
                Ok(ReactionOutcome::Unchanged) => {
                    reply.send(rid, &reacted(Position { epoch: 0, seq: 0 }))
                }
                Ok(ReactionOutcome::Changed) => {
                    let event = RoomEvent::Reaction {
                        message_id: r.message_id,
                        user_id,
                        emoji: r.emoji.clone(),
                        removed: r.remove,
                    };
                    let ack: OnSequenced = {
                        let reply = reply.clone();
                        Box::new(move |p, _| reply.send(rid, &reacted(p)))
                    };
                    let published = node.fanout.publish(&r.room, event, Some(conn), Some(ack));
                    if let Err(e) = published.await {
                        // Undone, so that the client's retry changes the
                        // store again and publishes (a reaction has no
                        // idempotency key telling a retry from a repeat).
                        let undo = ReactionChange {
                            remove: !change.remove,
                            ..change
                        };
                        if let Err(undo_error) = node.store.react(&undo).await {
                            tracing::warn!(error = %undo_error, "could not undo an unpublished reaction");
                        }
                        reply.fanout_error(rid, &e);
                    }
                }
            }
        }))
    }

    async fn history(&self, rid: u32, h: History) -> Option<Pending> {
        let reply = self.replier();
        if !self.in_room(rid, &h.room) {
            return None;
        }
        // Only a policy that hides history from before a member joined
        // needs the grant's time.
        let since_ms = if self.node.rooms.policy(&h.room).history == HistoryVisibility::SinceJoin {
            match self
                .node
                .rooms
                .rights(&h.room, &self.user_id, &self.token_rooms)
                .await
            {
                Ok(r) => r.history_since_ms,
                Err(e) => {
                    reply.store_error(rid, &e);
                    return None;
                }
            }
        } else {
            0
        };
        let node = self.node.clone();
        Some(self.timed(Opcode::History, async move {
            let limit = if h.limit == 0 {
                HISTORY_DEFAULT_LIMIT
            } else {
                h.limit
            };
            match node.store.history(&h.room, h.before, limit, since_ms).await {
                Ok(page) => {
                    let mut page = HistoryPage {
                        room: h.room,
                        messages: page.messages,
                        next: page.next,
                    };
                    fit_page(node.codec.payload_budget(), &mut page);
                    reply.send(rid, &ServerFrame::HistoryPage(page))
                }
                Err(e) => reply.store_error(rid, &e),
            }
        }))
    }

    /// Whether a queued frame should be written. Drops room events the
    /// client already has by position (see `watermarks`).
    pub fn should_deliver(&mut self, frame: &[u8]) -> bool {
        let op = frame.first().copied().unwrap_or(0);
        if op == Opcode::Left as u8 {
            // Request id 0: the server took the connection out of rooms
            // (membership ended, room deleted). (A reply to the client's
            // own Leave has its request's id, and was applied then.)
            if let Ok((0, ServerFrame::Left(left))) = self.node.codec.decode_server(frame) {
                for room in &left.rooms {
                    self.rooms.remove(room.as_str());
                    self.watermarks.retain(|(r, _)| **r != **room);
                }
            }
            return true;
        }
        if self.watermarks.is_empty() {
            return true;
        }
        if op != Opcode::NewMessage as u8 && op != Opcode::Reaction as u8 {
            return true;
        }
        // Read off the frame's start, not decoded: every recipient of a
        // broadcast may ask this right after it joined or resumed.
        let Some((room, epoch, seq)) = chatgate_protocol::template::event_position(frame) else {
            return true;
        };
        let Some(i) = self.watermarks.iter().position(|(r, _)| **r == *room) else {
            return true;
        };
        let mark = self.watermarks[i].1;
        if epoch == mark.epoch && seq <= mark.seq {
            return false;
        }
        self.watermarks.swap_remove(i);
        if self.watermarks.is_empty() {
            self.watermarks = Vec::new();
        }
        true
    }
}

/// Ends a history page early when all of it would not fit one frame
/// (`budget` payload bytes): the page keeps the newest messages that fit
/// and `next` points just past the last one kept, so paging on fetches
/// the rest. Forty maximum-size messages would otherwise make every page
/// of 50 unanswerable. A single message too large for any frame (only
/// possible under a frame limit configured below the message limits) is
/// skipped rather than blocking the pages behind it.
fn fit_page(budget: usize, page: &mut HistoryPage) {
    let cursor = |m: &chatgate_protocol::payload::Message| Cursor {
        created_at_ms: m.created_at_ms,
        message_id: m.id,
    };
    // The room, the longest list length and the longest cursor.
    let mut used = wire_len(&HistoryPage {
        room: page.room.clone(),
        messages: Vec::new(),
        next: Some(Cursor {
            created_at_ms: u64::MAX,
            message_id: u64::MAX,
        }),
    }) + 9;
    let mut keep = 0;
    for m in &page.messages {
        used = used.saturating_add(wire_len(m));
        if used > budget {
            break;
        }
        keep += 1;
    }
    if keep == page.messages.len() {
        return;
    }
    let last = if keep == 0 { 0 } else { keep - 1 };
    if keep == 0 {
        tracing::warn!(room = %page.room, id = page.messages[0].id, "a stored message is larger than any frame; skipped in history");
    }
    page.next = Some(cursor(&page.messages[last]));
    page.messages.truncate(keep);
}

/// This node is storing and publishing (user, client message id): a
/// concurrent retry of the same message waits for it, then finds it
/// stored. Released on drop.
pub(crate) struct SendClaim {
    node: Arc<Node>,
    key: (Arc<str>, String),
}

impl SendClaim {
    /// How long a retry waits for the first attempt before it is told to
    /// come back (store and fan-out calls time out well before this).
    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    pub(crate) async fn take(node: &Arc<Node>, key: (Arc<str>, String)) -> Option<SendClaim> {
        let deadline = tokio::time::Instant::now() + Self::WAIT;
        loop {
            let released = match node.sends_in_flight.entry(key.clone()) {
                dashmap::Entry::Vacant(v) => {
                    v.insert(Arc::new(tokio::sync::Notify::new()));
                    return Some(SendClaim {
                        node: node.clone(),
                        key,
                    });
                }
                // Registered before the entry's lock is let go, so the
                // release (which takes that lock) cannot be missed.
                dashmap::Entry::Occupied(o) => {
                    let notify = o.get().clone();
                    let mut released = Box::pin(notify.notified_owned());
                    released.as_mut().enable();
                    released
                }
            };
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return None;
            }
        }
    }
}

impl Drop for SendClaim {
    fn drop(&mut self) {
        if let Some((_, notify)) = self.node.sends_in_flight.remove(&self.key) {
            notify.notify_waiters();
        }
    }
}

/// The room names of a Join or Leave, each once, in request order (a
/// request names at most 100, so the quadratic check costs nothing).
fn each_once(named: Vec<String>) -> Vec<String> {
    let mut rooms: Vec<String> = Vec::with_capacity(named.len());
    for room in named {
        if !rooms.contains(&room) {
            rooms.push(room);
        }
    }
    rooms
}

/// Attempts at recording a published message's position (about 20 s of
/// backoff in all).
const RECORD_ATTEMPTS: u32 = 7;

/// What a retry of a Send must repeat to be the same message.
fn fingerprint(room: &str, body: &str, attachments: &[Attachment]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (room, body).hash(&mut h);
    for a in attachments {
        (&a.url, &a.name, &a.mime, a.size).hash(&mut h);
    }
    h.finish()
}

/// How far the fan-out's clock (which dates epochs) may run ahead of the
/// store's (which dates messages) without a retry being mistaken for one
/// whose room stream began after it was stored. Both are one host's clock
/// in the embedded and single-host setups; NTP keeps separate hosts well
/// inside this.
const EPOCH_CLOCK_MARGIN_MS: u64 = 20;

/// Why a message was not acknowledged.
pub(crate) enum SendFailure {
    /// Not stored (or not known to be): retry.
    Store(StoreError),
    /// Stored, not delivered: retry with the same client message id.
    NotDelivered(FanoutError),
    /// The client message id names a different message.
    ReusedId,
}

/// Receives a message's acknowledgement, in the room's delivery order.
pub(crate) type OnAck = Box<dyn FnOnce(MessageSent) + std::marker::Send + Sync>;

/// Stores, publishes and acknowledges one message. A retry of a message
/// already published is answered with its original position; one stored
/// but never published (the node died in between, or fan-out failed) is
/// published now, once (the Redis engine remembers what it published).
pub(crate) async fn publish_message(
    node: &Arc<Node>,
    conn: Option<u64>,
    msg: StoreMessage,
    on_ack: OnAck,
) -> Result<(), SendFailure> {
    let asked = fingerprint(&msg.room, &msg.body, &msg.attachments);
    let inserted = node
        .store
        .insert_message(msg)
        .await
        .map_err(SendFailure::Store)?;
    let message = inserted.message;
    // An idempotency key names one message: reused for a different one,
    // acknowledging the original would silently drop the new text.
    if inserted.duplicate
        && fingerprint(&message.room, &message.body, &message.attachments) != asked
    {
        return Err(SendFailure::ReusedId);
    }
    let (room, id, created_at_ms) = (message.room.clone(), message.id, message.created_at_ms);
    let sent = move |p: Position, duplicate: bool| MessageSent {
        room,
        message_id: id,
        epoch: p.epoch,
        seq: p.seq,
        created_at_ms,
        duplicate,
    };
    if inserted.duplicate && message.seq != 0 {
        let original = Position {
            epoch: inserted.epoch,
            seq: message.seq,
        };
        on_ack(sent(original, true));
        return Ok(());
    }
    if inserted.duplicate {
        // Stored before and never recorded as published: the first attempt
        // may have been delivered under a room stream lost since (its reply
        // lost with it). A stream that began after the message was stored
        // cannot hold it, and every member of the lost one is made to
        // reload (4005, `recovered = false`), so the message reaches them
        // through History; published again it would reach them twice.
        // Otherwise the fan-out's own record answers whether it was
        // published, and it is published at most once.
        let current = match node.fanout.position(&message.room).await {
            Ok(p) => p,
            Err(e) => return Err(SendFailure::NotDelivered(e)),
        };
        if current.epoch > created_at_ms.saturating_add(EPOCH_CLOCK_MARGIN_MS) {
            node.metrics.history_only_sends.inc();
            let history_only = Position {
                epoch: current.epoch,
                seq: 0,
            };
            on_ack(sent(history_only, true));
            return Ok(());
        }
    }
    // Queued by the fan-out in the room's order (see `OnSequenced`).
    // `duplicate` says whether the message reached the room before this
    // request, not whether the store had it: a retry that publishes it
    // for the first time takes its place in this connection's stream.
    let ack: OnSequenced = Box::new(move |p, published_before| on_ack(sent(p, published_before)));
    let room = message.room.clone();
    let published = match node
        .fanout
        .publish(&room, RoomEvent::Message(message), conn, Some(ack))
        .await
    {
        Ok(p) => p.position,
        Err(e) => return Err(SendFailure::NotDelivered(e)),
    };
    // The record is what tells a retry, after the fan-out has forgotten
    // (past the recovery window), that the message was delivered. The
    // store may hold it to write with its next insert (one commit per
    // send) and refuses it only when too many wait through an outage:
    // worth a few attempts. This task runs off the connection, so nobody
    // waits on it.
    let mut wait = std::time::Duration::from_millis(200);
    for attempt in 1..=RECORD_ATTEMPTS {
        match node.store.set_seq(id, published.epoch, published.seq).await {
            Ok(()) => break,
            Err(e) => {
                node.metrics.store_errors.inc();
                tracing::warn!(error = %e, message_id = id, attempt, "could not record the position");
                if attempt == RECORD_ATTEMPTS {
                    break;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
    Ok(())
}

impl Drop for Session {
    fn drop(&mut self) {
        for room in &self.rooms {
            self.node.hub.leave(room, self.conn);
        }
        self.node.hub.disconnect(&self.user_id, self.conn);
        self.node.users.disconnect(&self.user_id, self.slot);
    }
}
