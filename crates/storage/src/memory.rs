//! In-memory engine: the embedded default, so the gateway runs with
//! nothing installed. Data lives as long as the process.
//!
//! Memory is bounded: each room keeps its newest messages, at most
//! `max_messages_per_room` of them and `max_bytes_per_room` of their text
//! (older ones, their reactions and idempotency keys are dropped), so a
//! long-running development server cannot grow without limit.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use parking_lot::Mutex;

use chatgate_protocol::payload::ReactionCount;

use crate::model::{
    Cursor, Grant, Inserted, Member, Membership, Message, NewMessage, Page, ReactionChange,
    ReactionOutcome, User,
};
use crate::{Store, StoreError};

/// Tuning for [`MemoryStore`].
#[derive(Debug, Clone, Copy)]
pub struct MemoryStoreConfig {
    /// Messages kept per room; the oldest are dropped beyond this.
    /// Default 10,000: deep enough for development and demos, and a
    /// few MiB per busy room at most.
    pub max_messages_per_room: usize,
    /// Bytes of message text (bodies, attachments, names) kept per room.
    /// Default 8 MiB: 10,000 messages of the largest size would be
    /// ~400 MiB, a count alone does not bound memory.
    pub max_bytes_per_room: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        MemoryStoreConfig {
            max_messages_per_room: 10_000,
            max_bytes_per_room: 8 << 20,
        }
    }
}

/// What a stored message costs, roughly: its strings and a fixed part.
fn cost(m: &Message) -> usize {
    128 + m.room.len()
        + m.sender_id.len()
        + m.sender_name.len()
        + m.sender_image.len()
        + m.client_msg_id.len()
        + m.body.len()
        + m.attachments
            .iter()
            .map(|a| 32 + a.url.len() + a.name.len() + a.mime.len())
            .sum::<usize>()
}

struct Stored {
    message: Message,
    /// Epoch of the room stream `message.seq` belongs to.
    epoch: u64,
    reactions: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Default)]
struct RoomData {
    /// Oldest first; (created_at_ms, id) strictly increasing.
    messages: VecDeque<Stored>,
    /// [`cost`] of `messages`.
    bytes: usize,
}

impl RoomData {
    fn position_of(&self, id: u64) -> Option<usize> {
        // Ids are assigned under this room's lock, so they increase along
        // the deque and binary search applies.
        self.messages
            .binary_search_by_key(&id, |s| s.message.id)
            .ok()
    }
}

/// The in-memory [`Store`].
pub struct MemoryStore {
    config: MemoryStoreConfig,
    next_id: AtomicU64,
    users: DashMap<String, User>,
    /// user -> rooms on their list.
    listed: DashMap<String, HashSet<String>>,
    /// room -> user -> the application's grant.
    grants: DashMap<String, BTreeMap<String, Grant>>,
    /// Rooms registered through the server API or by a grant.
    registered: DashMap<String, ()>,
    rooms: DashMap<String, Arc<Mutex<RoomData>>>,
    /// (sender, client message id) -> (room, message id).
    idempotency: DashMap<(String, String), (String, u64)>,
    /// message id -> room.
    message_rooms: DashMap<u64, String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(MemoryStoreConfig::default())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn with_reactions(s: &Stored) -> Message {
    let mut m = s.message.clone();
    m.reactions = s
        .reactions
        .iter()
        .filter(|(_, users)| !users.is_empty())
        .map(|(emoji, users)| ReactionCount {
            emoji: emoji.clone(),
            count: users.len() as u32,
        })
        .collect();
    m
}

impl MemoryStore {
    /// An empty store.
    pub fn new(config: MemoryStoreConfig) -> Self {
        MemoryStore {
            config,
            next_id: AtomicU64::new(1),
            users: DashMap::new(),
            listed: DashMap::new(),
            grants: DashMap::new(),
            registered: DashMap::new(),
            rooms: DashMap::new(),
            idempotency: DashMap::new(),
            message_rooms: DashMap::new(),
        }
    }

    fn room(&self, room: &str) -> Arc<Mutex<RoomData>> {
        if let Some(r) = self.rooms.get(room) {
            return r.clone();
        }
        self.rooms.entry(room.to_owned()).or_default().clone()
    }

    fn find(&self, room: &str, id: u64) -> Option<(Message, u64)> {
        let data = self.rooms.get(room)?.clone();
        let data = data.lock();
        data.position_of(id).map(|i| {
            let stored = &data.messages[i];
            (with_reactions(stored), stored.epoch)
        })
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn engine(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        self.users.insert(user.id.clone(), user.clone());
        Ok(())
    }

    async fn memberships(&self, user_id: &str) -> Result<Vec<Membership>, StoreError> {
        let mut rooms: Vec<String> = self
            .listed
            .get(user_id)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        rooms.sort();
        Ok(rooms
            .into_iter()
            .map(|room| {
                let grant = self.grants.get(&room).and_then(|g| g.get(user_id).cloned());
                Membership { room, grant }
            })
            .collect())
    }

    async fn join(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError> {
        let mut set = self.listed.entry(user_id.to_owned()).or_default();
        set.extend(rooms.iter().cloned());
        Ok(())
    }

    async fn leave(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError> {
        if let Some(mut set) = self.listed.get_mut(user_id) {
            for r in rooms {
                set.remove(r);
            }
        }
        self.listed.remove_if(user_id, |_, set| set.is_empty());
        Ok(())
    }

    async fn grant(&self, room: &str, user_id: &str) -> Result<Option<Grant>, StoreError> {
        Ok(self.grants.get(room).and_then(|g| g.get(user_id).cloned()))
    }

    async fn add_members(&self, room: &str, members: &[Member]) -> Result<(), StoreError> {
        self.registered.insert(room.to_owned(), ());
        let now = now_ms();
        {
            let mut grants = self.grants.entry(room.to_owned()).or_default();
            for m in members {
                grants
                    .entry(m.user_id.clone())
                    .and_modify(|g| g.role.clone_from(&m.role))
                    .or_insert_with(|| Grant {
                        role: m.role.clone(),
                        since_ms: now,
                    });
            }
        }
        for m in members {
            self.users.entry(m.user_id.clone()).or_insert_with(|| User {
                id: m.user_id.clone(),
                name: m.user_id.clone(),
                image: String::new(),
            });
            self.listed
                .entry(m.user_id.clone())
                .or_default()
                .insert(room.to_owned());
        }
        Ok(())
    }

    async fn remove_members(
        &self,
        room: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut removed = Vec::new();
        for user in user_ids {
            let granted = self
                .grants
                .get_mut(room)
                .is_some_and(|mut g| g.remove(user).is_some());
            let listed = self
                .listed
                .get_mut(user)
                .is_some_and(|mut set| set.remove(room));
            self.listed.remove_if(user, |_, set| set.is_empty());
            if (granted || listed) && !removed.contains(user) {
                removed.push(user.clone());
            }
        }
        self.grants.remove_if(room, |_, g| g.is_empty());
        Ok(removed)
    }

    async fn members(
        &self,
        room: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Member>, StoreError> {
        let Some(grants) = self.grants.get(room) else {
            return Ok(Vec::new());
        };
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_owned()),
            None => std::ops::Bound::Unbounded,
        };
        Ok(grants
            .range((from, std::ops::Bound::Unbounded))
            .take(limit as usize)
            .map(|(user, g)| Member {
                user_id: user.clone(),
                role: g.role.clone(),
                since_ms: g.since_ms,
            })
            .collect())
    }

    async fn create_room(&self, room: &str) -> Result<bool, StoreError> {
        Ok(self.registered.insert(room.to_owned(), ()).is_none())
    }

    async fn delete_room(&self, room: &str) -> Result<bool, StoreError> {
        let mut existed = self.registered.remove(room).is_some();
        existed |= self.grants.remove(room).is_some();
        for mut set in self.listed.iter_mut() {
            existed |= set.remove(room);
        }
        self.listed.retain(|_, set| !set.is_empty());
        if let Some((_, data)) = self.rooms.remove(room) {
            existed = true;
            let gone: Vec<Message> = data.lock().messages.drain(..).map(|s| s.message).collect();
            for old in gone {
                self.idempotency.remove(&(old.sender_id, old.client_msg_id));
                self.message_rooms.remove(&old.id);
            }
        }
        Ok(existed)
    }

    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        let key = (msg.sender_id.clone(), msg.client_msg_id.clone());
        let mut evicted = Vec::new();
        let inserted = match self.idempotency.entry(key) {
            MapEntry::Occupied(e) => {
                let (room, id) = e.get().clone();
                drop(e);
                let (message, epoch) = self.find(&room, id).ok_or_else(|| {
                    StoreError::Internal("idempotency key without message".into())
                })?;
                return Ok(Inserted {
                    message,
                    duplicate: true,
                    epoch,
                });
            }
            MapEntry::Vacant(slot) => {
                let data = self.room(&msg.room);
                let mut data = data.lock();
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let last = data
                    .messages
                    .back()
                    .map(|s| s.message.created_at_ms)
                    .unwrap_or(0);
                let room = msg.room.clone();
                let message = msg.stored(id, now_ms().max(last));
                data.bytes += cost(&message);
                data.messages.push_back(Stored {
                    message: message.clone(),
                    epoch: 0,
                    reactions: BTreeMap::new(),
                });
                while data.messages.len() > self.config.max_messages_per_room
                    || (data.bytes > self.config.max_bytes_per_room && data.messages.len() > 1)
                {
                    if let Some(old) = data.messages.pop_front() {
                        data.bytes = data.bytes.saturating_sub(cost(&old.message));
                        evicted.push(old.message);
                    }
                }
                drop(data);
                slot.insert((room, id));
                self.message_rooms.insert(id, message.room.clone());
                Inserted {
                    message,
                    duplicate: false,
                    epoch: 0,
                }
            }
        };
        // Outside the room lock: the idempotency map is locked before room
        // locks on insert, never after.
        for old in evicted {
            self.idempotency.remove(&(old.sender_id, old.client_msg_id));
            self.message_rooms.remove(&old.id);
        }
        Ok(inserted)
    }

    async fn set_seq(&self, message_id: u64, epoch: u64, seq: u64) -> Result<(), StoreError> {
        let Some(room) = self.message_rooms.get(&message_id).map(|r| r.clone()) else {
            return Err(StoreError::NotFound);
        };
        let data = self.room(&room);
        let mut data = data.lock();
        let i = data.position_of(message_id).ok_or(StoreError::NotFound)?;
        data.messages[i].message.seq = seq;
        data.messages[i].epoch = epoch;
        Ok(())
    }

    async fn react(&self, change: &ReactionChange) -> Result<ReactionOutcome, StoreError> {
        let data = self
            .rooms
            .get(&change.room)
            .map(|r| r.clone())
            .ok_or(StoreError::NotFound)?;
        let mut data = data.lock();
        let i = data
            .position_of(change.message_id)
            .ok_or(StoreError::NotFound)?;
        let reactions = &mut data.messages[i].reactions;
        let changed = if change.remove {
            let changed = reactions
                .get_mut(&change.emoji)
                .is_some_and(|users| users.remove(&change.user_id));
            reactions.retain(|_, users| !users.is_empty());
            changed
        } else {
            reactions
                .entry(change.emoji.clone())
                .or_default()
                .insert(change.user_id.clone())
        };
        Ok(if changed {
            ReactionOutcome::Changed
        } else {
            ReactionOutcome::Unchanged
        })
    }

    async fn history(
        &self,
        room: &str,
        before: Option<Cursor>,
        limit: u32,
        since_ms: u64,
    ) -> Result<Page, StoreError> {
        let Some(data) = self.rooms.get(room).map(|r| r.clone()) else {
            return Ok(Page {
                messages: Vec::new(),
                next: None,
            });
        };
        let data = data.lock();
        let end = match before {
            None => data.messages.len(),
            Some(c) => data.messages.partition_point(|s| {
                (s.message.created_at_ms, s.message.id) < (c.created_at_ms, c.message_id)
            }),
        };
        let first = data
            .messages
            .partition_point(|s| s.message.created_at_ms < since_ms);
        let start = end.saturating_sub(limit as usize).max(first.min(end));
        let messages: Vec<Message> = data
            .messages
            .range(start..end)
            .rev()
            .map(with_reactions)
            .collect();
        let next = if start > first {
            messages.last().map(|m| Cursor {
                created_at_ms: m.created_at_ms,
                message_id: m.id,
            })
        } else {
            None
        };
        Ok(Page { messages, next })
    }
}
