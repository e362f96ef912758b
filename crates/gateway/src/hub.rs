//! The node's room registry: which local connections are in which room.
//!
//! Sharded (`DashMap`), so joins, leaves and broadcasts in different rooms
//! do not contend; a broadcast holds one shard's read lock while it pushes
//! a `Bytes` handle into each member's [`Outbox`] — no allocation, no
//! encoding, no waiting per recipient.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use dashmap::DashMap;

use chatgate_fanout::LocalDelivery;
use chatgate_fanout::cluster::Cluster;
use chatgate_protocol::payload::Rooms as RoomList;
use chatgate_protocol::{CloseCode, Codec, ServerFrame};

use crate::access::Rooms;
use crate::control::{Control, PresenceAnswer};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed};

struct Member {
    conn: u64,
    user: Arc<str>,
    outbox: Arc<Outbox>,
}

/// One removal this node carried out: a room, and its users (`None`:
/// everyone, the room was deleted).
/// Users are kept as hashes: the log must stay small however many users
/// a removal names (a match is confirmed by asking the policy again).
struct Removal {
    seq: u64,
    /// `None`: every room (the node may have missed changes).
    room: Option<Arc<str>>,
    users: Option<Box<[u64]>>,
}

fn user_hash(user: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    user.hash(&mut h);
    h.finish()
}

/// What the removal log says of one (room, user) since a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// Not removed.
    No,
    /// Removed (or the room deleted).
    Yes,
    /// More removals happened than the log keeps: ask the room's policy
    /// again.
    Unknown,
}

/// Removals remembered for sessions whose join or resume is still in
/// flight (see [`Hub::removal_mark`]); past that, an older mark counts as
/// "maybe removed" and the session checks again.
const REMOVALS_KEPT: usize = 1024;

/// How often one user's typing in one room reaches anyone: one event per
/// interval, however many connections (and nodes) the user types from.
/// The web client sends at most one every 3 s; five tabs of one hostile
/// user delivered ~250 a second before this.
pub const TYPING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Lets one copy of a frame through per [`TYPING_INTERVAL`]. Typing
/// frames carry only room and user, so equal bytes are the same user
/// typing in the same room: no decode is needed to tell.
#[derive(Default)]
pub struct Coalescer {
    seen: DashMap<Bytes, std::time::Instant>,
}

impl Coalescer {
    /// True for the first copy of `frame` in the interval.
    pub fn first(&self, frame: &Bytes) -> bool {
        let now = std::time::Instant::now();
        match self.seen.entry(frame.clone()) {
            dashmap::Entry::Occupied(mut e) => {
                if now.duration_since(*e.get()) < TYPING_INTERVAL {
                    false
                } else {
                    e.insert(now);
                    true
                }
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(now);
                true
            }
        }
    }

    /// Forgets copies older than the interval (memory stays bounded by the
    /// typing of the last few seconds).
    pub fn sweep(&self) {
        self.seen.retain(|_, at| at.elapsed() < TYPING_INTERVAL);
    }
}

/// Room name -> local members; user -> local connections.
pub struct Hub {
    rooms: DashMap<Arc<str>, Vec<Member>>,
    /// Typing published from this node, and typing delivered on it: the
    /// first keeps a user's many connections from sending more than one
    /// an interval, the second does the same for typing from other nodes.
    pub typing_published: Coalescer,
    typing_delivered: Coalescer,
    /// Recent removals, newest last, and the last one's number.
    removals: parking_lot::Mutex<VecDeque<Removal>>,
    removal_seq: AtomicU64,
    users: DashMap<Arc<str>, Vec<(u64, Arc<Outbox>)>>,
    access: Arc<Rooms>,
    codec: Codec,
    cluster: OnceLock<Arc<Cluster>>,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// Forgets typing older than the coalescing interval.
    pub fn sweep_typing(&self) {
        self.typing_published.sweep();
        self.typing_delivered.sweep();
    }

    /// An empty registry; `access` is told of membership changes.
    pub fn new(metrics: Arc<Metrics>, access: Arc<Rooms>, codec: Codec) -> Self {
        Hub {
            rooms: DashMap::new(),
            typing_published: Coalescer::default(),
            typing_delivered: Coalescer::default(),
            removals: parking_lot::Mutex::new(VecDeque::new()),
            removal_seq: AtomicU64::new(0),
            users: DashMap::new(),
            access,
            codec,
            cluster: OnceLock::new(),
            metrics,
        }
    }

    /// Lets the hub answer presence questions of other nodes.
    pub fn set_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Registers an identified connection of `user` (for disconnects).
    pub fn connect(&self, user: &Arc<str>, conn: u64, outbox: &Arc<Outbox>) {
        self.users
            .entry(user.clone())
            .or_default()
            .push((conn, outbox.clone()));
    }

    /// Forgets a connection registered by [`Hub::connect`].
    pub fn disconnect(&self, user: &str, conn: u64) {
        if let Some(mut list) = self.users.get_mut(user) {
            list.retain(|(c, _)| *c != conn);
        }
        self.users.remove_if(user, |_, list| list.is_empty());
    }

    /// Closes every local connection of `user`; returns how many.
    pub fn close_user(&self, user: &str, code: CloseCode, reason: &str) -> usize {
        let Some(list) = self.users.get(user) else {
            return 0;
        };
        for (_, outbox) in list.iter() {
            outbox.close_with(code, Some(reason));
        }
        list.len()
    }

    /// The local members of `room`: (user, connections), by user id.
    pub fn local_users(&self, room: &str) -> Vec<(String, u32)> {
        let Some(members) = self.rooms.get(room) else {
            return Vec::new();
        };
        let mut counts: std::collections::BTreeMap<&str, u32> = Default::default();
        for m in members.iter() {
            *counts.entry(&m.user).or_default() += 1;
        }
        counts.into_iter().map(|(u, n)| (u.to_owned(), n)).collect()
    }

    /// Where the removal log stands. A join or resume takes a mark before
    /// it asks who may enter, and after joining the hub asks
    /// [`Hub::removed_since`]: a removal carried out in between found the
    /// connection not yet in the room (so told it nothing), and may have
    /// come after the answer was read.
    pub fn removal_mark(&self) -> u64 {
        self.removal_seq.load(Ordering::SeqCst)
    }

    /// Whether `user` was removed from `room` (or the room deleted) since
    /// `mark`. [`Removed::Unknown`] when the log no longer reaches back
    /// that far, when the node may have missed changes since (its streams
    /// were lost), or when a removal names a user of the same hash: the
    /// caller asks the room's policy again.
    pub fn removed_since(&self, mark: u64, room: &str, user: &str) -> Removed {
        let log = self.removals.lock();
        if log.front().is_some_and(|r| r.seq > mark + 1) {
            return Removed::Unknown;
        }
        let hash = user_hash(user);
        let mut answer = Removed::No;
        for r in log.iter().rev().take_while(|r| r.seq > mark) {
            match (&r.room, &r.users) {
                (None, _) => return Removed::Unknown,
                (Some(name), None) if **name == *room => return Removed::Yes,
                (Some(name), Some(users)) if **name == *room && users.contains(&hash) => {
                    answer = Removed::Unknown;
                }
                _ => {}
            }
        }
        answer
    }

    /// Logs a removal, before the hub is searched for its members (so a
    /// session joining meanwhile either is found or finds the entry).
    fn log_removal(&self, room: Option<&str>, users: Option<&[String]>) {
        let mut log = self.removals.lock();
        let seq = self.removal_seq.load(Ordering::SeqCst) + 1;
        log.push_back(Removal {
            seq,
            room: room.map(Arc::from),
            users: users.map(|list| list.iter().map(|u| user_hash(u)).collect()),
        });
        if log.len() > REMOVALS_KEPT {
            log.pop_front();
        }
        self.removal_seq.store(seq, Ordering::SeqCst);
    }

    /// Whether the connection is in the room on this node.
    pub fn is_member(&self, room: &str, conn: u64) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|members| members.iter().any(|m| m.conn == conn))
    }

    /// Takes the connections of `users` (every member when `None`) out of
    /// `room` and tells each with an unsolicited `Left` (request id 0):
    /// nothing of the room reaches them any more, and the session drops
    /// the room when that frame passes it.
    pub fn remove_from_room(&self, room: &str, users: Option<&[String]>) -> usize {
        self.log_removal(Some(room), users);
        // A set, so a bulk removal in a big room stays linear (the room's
        // shard is locked meanwhile).
        let named: Option<std::collections::HashSet<&str>> =
            users.map(|list| list.iter().map(String::as_str).collect());
        let gone: Vec<Arc<Outbox>> = {
            let Some(mut members) = self.rooms.get_mut(room) else {
                return 0;
            };
            let mut gone = Vec::new();
            members.retain(|m| {
                let hit = named.as_ref().is_none_or(|set| set.contains(&*m.user));
                if hit {
                    gone.push(m.outbox.clone());
                }
                !hit
            });
            gone
        };
        if self
            .rooms
            .remove_if(room, |_, members| members.is_empty())
            .is_some()
        {
            self.metrics.rooms.dec();
        }
        if gone.is_empty() {
            return 0;
        }
        let notice = ServerFrame::Left(RoomList {
            rooms: vec![room.to_owned()],
        });
        match self.codec.encode_server(0, &notice) {
            Ok(frame) => {
                for outbox in &gone {
                    // A full queue closes the connection (4001): its resume
                    // is then refused for the room. Either way it is out.
                    outbox.push(frame.clone(), false);
                }
            }
            Err(_) => {
                for outbox in &gone {
                    outbox.close(CloseCode::ServerError);
                }
            }
        }
        self.metrics.memberships_revoked.inc_by(gone.len() as u64);
        gone.len()
    }

    /// Adds the connection to the room; returns the shared room name
    /// (sessions keep it) or `None` when it was already a member.
    pub fn join(
        &self,
        room: &str,
        conn: u64,
        user: &Arc<str>,
        outbox: &Arc<Outbox>,
    ) -> Option<Arc<str>> {
        let mut entry = match self.rooms.get_mut(room) {
            Some(e) => e,
            None => match self.rooms.entry(Arc::from(room)) {
                dashmap::Entry::Occupied(o) => o.into_ref(),
                // Counted where the map really gains the room (and below,
                // where it really loses it): exact under any interleaving.
                dashmap::Entry::Vacant(v) => {
                    self.metrics.rooms.inc();
                    v.insert(Vec::new())
                }
            },
        };
        if entry.iter().any(|m| m.conn == conn) {
            return None;
        }
        entry.push(Member {
            conn,
            user: user.clone(),
            outbox: outbox.clone(),
        });
        Some(entry.key().clone())
    }

    /// Removes the connection from the room; drops the room when empty.
    pub fn leave(&self, room: &str, conn: u64) {
        if let Some(mut members) = self.rooms.get_mut(room) {
            if let Some(i) = members.iter().position(|m| m.conn == conn) {
                members.swap_remove(i);
            }
            if members.capacity() > 2 * members.len() + 4 {
                members.shrink_to_fit();
            }
        }
        if self
            .rooms
            .remove_if(room, |_, members| members.is_empty())
            .is_some()
        {
            self.metrics.rooms.dec();
        }
    }

    /// Rooms with at least one local member.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

impl LocalDelivery for Hub {
    fn control(&self, payload: &[u8]) {
        let control: Control = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable control message ignored");
                return;
            }
        };
        match control {
            Control::Members {
                room,
                changed,
                removed,
            } => {
                self.access.forget(&room, &changed);
                self.access.forget(&room, &removed);
                if !removed.is_empty() {
                    self.remove_from_room(&room, Some(&removed));
                }
            }
            Control::RoomDeleted { room } => {
                self.access.forget_room(&room);
                self.remove_from_room(&room, None);
            }
            Control::Disconnect { user, code, reason } => {
                let code = CloseCode::from_u16(code).unwrap_or(CloseCode::Disconnected);
                let closed = self.close_user(&user, code, &reason);
                if closed > 0 {
                    tracing::info!(%user, closed, code = code.code(), "user disconnected by the application");
                }
            }
            Control::Presence { room, reply } => {
                let Some(cluster) = self.cluster.get().cloned() else {
                    return;
                };
                let answer = PresenceAnswer {
                    node: cluster.node_id().to_owned(),
                    users: self.local_users(&room),
                };
                let Ok(answer) = serde_json::to_string(&answer) else {
                    return;
                };
                tokio::spawn(async move {
                    if let Err(e) = cluster.presence_reply(&reply, answer).await {
                        tracing::warn!(error = %e, "could not answer a presence question");
                    }
                });
            }
        }
    }

    fn has_members(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    fn streams_lost(&self) {
        // Grant changes published on the lost streams were never seen:
        // cached answers go, and sessions joining meanwhile ask again.
        self.access.forget_all();
        self.log_removal(None, None);
        let mut closed = 0usize;
        for room in self.rooms.iter() {
            for m in room.value() {
                m.outbox.close(CloseCode::StreamsLost);
                closed += 1;
            }
        }
        tracing::warn!(
            memberships = closed,
            "room streams lost; members closed with 4005 to resume"
        );
    }

    fn deliver(&self, room: &str, frame: &Bytes, exclude: Option<u64>, ephemeral: bool) {
        let Some(members) = self.rooms.get(room) else {
            return;
        };
        if ephemeral && !self.typing_delivered.first(frame) {
            self.metrics.typing_coalesced.inc();
            return;
        }
        let mut delivered = 0u64;
        let mut shed = 0u64;
        for m in members.iter() {
            if Some(m.conn) == exclude {
                continue;
            }
            match m.outbox.push(frame.clone(), ephemeral) {
                Pushed::Queued => delivered += 1,
                Pushed::Shed => shed += 1,
                // The connection task sees the closed queue and closes
                // with 4001; counted there.
                Pushed::Overflow | Pushed::Closed => {}
            }
        }
        drop(members);
        self.metrics.deliveries.inc_by(delivered);
        if shed > 0 {
            self.metrics.ephemeral_dropped.inc_by(shed);
        }
    }
}
