//! The in-memory store with hooks at the steps tests need to hold, slow
//! down or fail: one delegating store for every in-process race test.
//! `Hooked<H>` derefs to its hook, so a test reaches the hook's state
//! (`store.gate`, `store.slow`) and the store through `store.inner`.

use std::ops::Deref;
use std::sync::Arc;

use async_trait::async_trait;
use chatgate_storage::model::{Cursor, Page};
use chatgate_storage::*;

/// What a test does at a step; every step does nothing by default.
#[async_trait]
pub trait Hook: Send + Sync + 'static {
    /// Before a message is stored; an error fails the insert.
    async fn before_insert(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Before a message's position is recorded.
    async fn before_set_seq(&self) {}
    /// After a message's position was recorded.
    fn after_set_seq(&self) {}
    /// After a user's room list was read.
    async fn after_memberships(&self) {}
    /// After a grant was read.
    async fn after_grant(&self) {}
    /// After a join was written.
    async fn after_join(&self) {}
}

/// [`MemoryStore`] with `hook` at its steps.
pub struct Hooked<H> {
    pub inner: MemoryStore,
    hook: H,
}

impl<H: Hook> Hooked<H> {
    pub fn new(hook: H) -> Arc<Hooked<H>> {
        Arc::new(Hooked {
            inner: MemoryStore::default(),
            hook,
        })
    }
}

impl<H> Deref for Hooked<H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.hook
    }
}

#[async_trait]
impl<H: Hook> Store for Hooked<H> {
    fn engine(&self) -> &'static str {
        "hooked"
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        self.inner.upsert_user(user).await
    }
    async fn memberships(&self, user: &str) -> Result<Vec<Membership>, StoreError> {
        let read = self.inner.memberships(user).await;
        self.hook.after_memberships().await;
        read
    }
    async fn grant(&self, room: &str, user: &str) -> Result<Option<Grant>, StoreError> {
        let read = self.inner.grant(room, user).await;
        self.hook.after_grant().await;
        read
    }
    async fn add_members(&self, room: &str, members: &[Member]) -> Result<(), StoreError> {
        self.inner.add_members(room, members).await
    }
    async fn remove_members(
        &self,
        room: &str,
        users: &[String],
    ) -> Result<Vec<String>, StoreError> {
        self.inner.remove_members(room, users).await
    }
    async fn members(
        &self,
        room: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Member>, StoreError> {
        self.inner.members(room, after, limit).await
    }
    async fn create_room(&self, room: &str) -> Result<bool, StoreError> {
        self.inner.create_room(room).await
    }
    async fn delete_room(&self, room: &str) -> Result<bool, StoreError> {
        self.inner.delete_room(room).await
    }
    async fn join(&self, user: &str, rooms: &[String]) -> Result<(), StoreError> {
        let written = self.inner.join(user, rooms).await;
        self.hook.after_join().await;
        written
    }
    async fn leave(&self, user: &str, rooms: &[String]) -> Result<(), StoreError> {
        self.inner.leave(user, rooms).await
    }
    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        self.hook.before_insert().await?;
        self.inner.insert_message(msg).await
    }
    async fn set_seq(&self, id: u64, epoch: u64, seq: u64) -> Result<(), StoreError> {
        self.hook.before_set_seq().await;
        let recorded = self.inner.set_seq(id, epoch, seq).await;
        self.hook.after_set_seq();
        recorded
    }
    async fn react(&self, change: &ReactionChange) -> Result<ReactionOutcome, StoreError> {
        self.inner.react(change).await
    }
    async fn history(
        &self,
        room: &str,
        before: Option<Cursor>,
        limit: u32,
        since_ms: u64,
    ) -> Result<Page, StoreError> {
        self.inner.history(room, before, limit, since_ms).await
    }
}
