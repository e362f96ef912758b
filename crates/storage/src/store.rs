//! The storage contract.

use async_trait::async_trait;

use crate::StoreError;
use crate::model::{
    Cursor, Grant, Inserted, Member, Membership, NewMessage, Page, ReactionChange, ReactionOutcome,
    User,
};

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

    /// What a session needs when it opens: refreshes the user's profile
    /// (writing nothing when it is unchanged) and returns their room list.
    /// Engines answer it in one round trip where they can.
    async fn identify(&self, user: &User) -> Result<Vec<Membership>, StoreError> {
        self.upsert_user(user).await?;
        self.memberships(&user.id).await
    }

    /// The user's room list (what a fresh session joins), each with the
    /// application's grant when there is one, ordered by room name.
    async fn memberships(&self, user_id: &str) -> Result<Vec<Membership>, StoreError>;

    /// Puts each room on the user's room list (idempotent). Grants
    /// nothing: the caller has checked the room's policy.
    async fn join(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError>;

    /// Takes each room off the user's room list (idempotent). A grant
    /// stays: the user may join again.
    async fn leave(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError>;

    /// The application's grant of `room` to the user, if any.
    async fn grant(&self, room: &str, user_id: &str) -> Result<Option<Grant>, StoreError>;

    /// Grants each user membership of `room` with their role, and puts
    /// the room on their room lists; creates the room and unknown users
    /// (named by their id until they connect). Granting again updates
    /// the role and keeps `since_ms`.
    async fn add_members(&self, room: &str, members: &[Member]) -> Result<(), StoreError>;

    /// Takes each user's grant of `room` away and the room off their
    /// lists. Returns the users who had a grant or listed the room.
    async fn remove_members(
        &self,
        room: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>, StoreError>;

    /// Granted members of `room` ordered by user id, after `after`, at
    /// most `limit`.
    async fn members(
        &self,
        room: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Member>, StoreError>;

    /// Registers a room; `false` when it existed.
    async fn create_room(&self, room: &str) -> Result<bool, StoreError>;

    /// Deletes a room with its messages, grants and list entries; `false`
    /// when there was nothing to delete.
    async fn delete_room(&self, room: &str) -> Result<bool, StoreError>;

    /// Stores a message, or returns the already stored one when
    /// (sender, client message id) exists. Returns only when durable.
    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError>;

    /// Records the room stream position (epoch and sequence number) a
    /// message was published at. An engine may write it later, with
    /// other writes (Postgres: with the next message insert, so a send
    /// costs one commit); reads that return positions see it at once, a
    /// crash before it is written loses it. `NotFound` when the engine
    /// can tell the message does not exist.
    async fn set_seq(&self, message_id: u64, epoch: u64, seq: u64) -> Result<(), StoreError>;

    /// Writes whatever the engine holds back (positions), before a clean
    /// exit.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Statements sent to the backend so far, by kind (empty for an
    /// engine without statements), for `chat_store_statements_total`.
    fn statement_counts(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// Adds or removes a reaction. `NotFound` when the message is not in
    /// that room.
    async fn react(&self, change: &ReactionChange) -> Result<ReactionOutcome, StoreError>;

    /// Messages of `room` strictly older than `before` (newest first when
    /// `None`) and not older than `since_ms` (0: no bound; a policy that
    /// hides history from before a member joined sets it), at most
    /// `limit`, with reactions and attachments, newest first.
    async fn history(
        &self,
        room: &str,
        before: Option<Cursor>,
        limit: u32,
        since_ms: u64,
    ) -> Result<Page, StoreError>;
}
