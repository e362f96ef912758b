//! The node's room registry: which local connections are in which room.
//!
//! Sharded (`DashMap`), so joins, leaves and broadcasts in different rooms
//! do not contend; a broadcast holds one shard's read lock while it pushes
//! a `Bytes` handle into each member's [`Outbox`] — no allocation, no
//! encoding, no waiting per recipient.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;

use chatgate_fanout::LocalDelivery;
use chatgate_protocol::CloseCode;

use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed};

struct Member {
    conn: u64,
    outbox: Arc<Outbox>,
}

/// Room name -> local members.
pub struct Hub {
    rooms: DashMap<Arc<str>, Vec<Member>>,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Hub {
            rooms: DashMap::new(),
            metrics,
        }
    }

    /// Adds the connection to the room; returns the shared room name
    /// (sessions keep it) or `None` when it was already a member.
    pub fn join(&self, room: &str, conn: u64, outbox: &Arc<Outbox>) -> Option<Arc<str>> {
        let (name, created) = {
            let (mut entry, created) = match self.rooms.get_mut(room) {
                Some(e) => (e, false),
                None => {
                    let e = self.rooms.entry(Arc::from(room)).or_default();
                    let created = e.is_empty();
                    (e, created)
                }
            };
            if entry.iter().any(|m| m.conn == conn) {
                return None;
            }
            entry.push(Member {
                conn,
                outbox: outbox.clone(),
            });
            (entry.key().clone(), created)
        };
        // Outside the shard lock: len() visits every shard.
        if created {
            self.metrics.rooms.set(self.rooms.len() as i64);
        }
        Some(name)
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
        self.rooms.remove_if(room, |_, members| members.is_empty());
        self.metrics.rooms.set(self.rooms.len() as i64);
    }

    /// Rooms with at least one local member.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

impl LocalDelivery for Hub {
    fn streams_lost(&self) {
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
