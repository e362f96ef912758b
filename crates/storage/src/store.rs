//! The storage contract.

use async_trait::async_trait;

use crate::StoreError;
use crate::model::{Cursor, Inserted, NewMessage, Page, ReactionChange, ReactionOutcome, User};

/// Everything the gateway persists. Engines: [`crate::MemoryStore`]
/// (embedded default) and the Postgres engine. Every method is safe to
/// call concurrently from many connections.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short engine name for `/health` and logs.
    fn engine(&self) -> &'static str;

    /// Probes the backend; `Err` when it is unreachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Creates the user or updates the profile (tokens carry the latest
    /// name, so every Identify refreshes it).
    async fn upsert_user(&self, user: &User) -> Result<(), StoreError>;

    /// Rooms the user belongs to, for the batch join at Identify.
    async fn memberships(&self, user_id: &str) -> Result<Vec<String>, StoreError>;

    /// Records the user as a member of each room (idempotent).
    async fn join(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError>;

    /// Removes the user's membership of each room (idempotent).
    async fn leave(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError>;

    /// Stores a message, or returns the already stored one when
    /// (sender, client message id) exists. Returns only when durable.
    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError>;

    /// Records the room stream position (epoch and sequence number) a
    /// message was published at.
    async fn set_seq(&self, message_id: u64, epoch: u64, seq: u64) -> Result<(), StoreError>;

    /// Adds or removes a reaction. `NotFound` when the message is not in
    /// that room.
    async fn react(&self, change: &ReactionChange) -> Result<ReactionOutcome, StoreError>;

    /// Messages of `room` strictly older than `before` (newest first when
    /// `None`), at most `limit`, with reactions and attachments, newest
    /// first.
    async fn history(
        &self,
        room: &str,
        before: Option<Cursor>,
        limit: u32,
    ) -> Result<Page, StoreError>;
}
