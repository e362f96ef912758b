//! Redis read-through cache in front of another store (fred).
//!
//! Cached: a user's room list (read at every Identify, so a reconnect
//! storm does not become a database storm), user profiles (Identify
//! refreshes the profile; an unchanged one is not rewritten) and each
//! room's granted members (one hash per room, field per user, asked at
//! every join and resume of a `members` room: the channel-members cache of
//! the setup this replaces).
//! Entries expire after a TTL (default 5 minutes) and are deleted as soon
//! as the underlying data changes (join, leave, profile update), so a
//! change is visible at once.
//!
//! Redis is an optimisation, never a dependency: any Redis error falls
//! back to the inner store, and after one failure Redis is skipped for a
//! short while (a circuit breaker) so an outage does not add a timeout to
//! every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::{
    Builder, Client, ClientLike, Config, Expiration, HashesInterface, KeysInterface,
    ReconnectPolicy,
};
use fred::types::ExpireOptions;

use crate::model::{
    Cursor, Grant, Inserted, Member, Membership, NewMessage, Page, ReactionChange, ReactionOutcome,
    User,
};
use crate::{Store, StoreError};

/// Settings for [`CachedStore`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `redis://host:port/db` URL.
    pub url: String,
    /// Entry lifetime. Default 5 minutes.
    pub ttl: Duration,
    /// Per-command timeout. Default 250 ms: a cache slower than that is
    /// worse than the database.
    pub command_timeout: Duration,
    /// How long to bypass Redis after an error. Default 5 s.
    pub open_circuit_for: Duration,
    /// Key prefix (deployments sharing a Redis use different ones).
    /// Default `chat`.
    pub namespace: String,
}

impl CacheConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        CacheConfig {
            url: url.into(),
            ttl: Duration::from_secs(300),
            command_timeout: Duration::from_millis(250),
            open_circuit_for: Duration::from_secs(5),
            namespace: "chat".into(),
        }
    }
}

/// Counters a caller can export.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads answered from Redis.
    pub hits: AtomicU64,
    /// Reads that went to the inner store.
    pub misses: AtomicU64,
    /// Redis errors (each one falls back to the inner store).
    pub errors: AtomicU64,
}

/// A [`Store`] with a Redis cache in front of `inner`.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    redis: Client,
    config: CacheConfig,
    started: Instant,
    /// Milliseconds since `started` until which Redis is bypassed.
    open_until_ms: AtomicU64,
    stats: Arc<CacheStats>,
}

impl CachedStore {
    /// Connects to Redis (reconnecting by itself later) and wraps `inner`.
    /// A Redis that is down at start is not an error: the cache starts
    /// with its circuit open and recovers when Redis does.
    pub async fn connect(
        inner: Arc<dyn Store>,
        config: CacheConfig,
    ) -> Result<CachedStore, StoreError> {
        let redis_config =
            Config::from_url(&config.url).map_err(|e| StoreError::Internal(e.to_string()))?;
        let timeout = config.command_timeout;
        let redis = Builder::from_config(redis_config)
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
            })
            .with_config(|c| c.fail_fast = true)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let _connection_task = redis.init().await;
        Ok(CachedStore {
            inner,
            redis,
            config,
            started: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            stats: Arc::new(CacheStats::default()),
        })
    }

    fn rooms_key(&self, user: &str) -> String {
        // The hash tag keeps a user's keys in one Redis Cluster slot.
        format!("{}:{{u:{user}}}:rooms", self.config.namespace)
    }

    fn members_key(&self, room: &str) -> String {
        format!("{}:{{r:{room}}}:members", self.config.namespace)
    }

    fn profile_key(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:profile", self.config.namespace)
    }

    /// Hit/miss/error counters.
    pub fn stats(&self) -> Arc<CacheStats> {
        self.stats.clone()
    }

    /// True while Redis is being bypassed after an error.
    pub fn degraded(&self) -> bool {
        self.started.elapsed().as_millis() as u64 <= self.open_until_ms.load(Ordering::Relaxed)
    }

    fn usable(&self) -> bool {
        !self.degraded()
    }

    fn failed(&self, e: &fred::error::Error) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let until = self.started.elapsed() + self.config.open_circuit_for;
        self.open_until_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
        tracing::warn!(error = %e, "redis cache unavailable; using the database");
    }

    async fn get(&self, key: &str) -> Option<String> {
        if !self.usable() {
            return None;
        }
        match self.redis.get::<Option<String>, _>(key).await {
            Ok(v) => v,
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    async fn put(&self, key: &str, value: String) {
        if !self.usable() {
            return;
        }
        let ttl = Expiration::EX(self.config.ttl.as_secs().max(1) as i64);
        if let Err(e) = self
            .redis
            .set::<(), _, _>(key, value, Some(ttl), None, false)
            .await
        {
            self.failed(&e);
        }
    }

    async fn hget(&self, key: &str, field: &str) -> Option<String> {
        if !self.usable() {
            return None;
        }
        match self.redis.hget::<Option<String>, _, _>(key, field).await {
            Ok(v) => v,
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    /// Caches one field; the hash expires a TTL after it was created (a
    /// later field does not extend it), so every entry is at most a TTL old.
    async fn hput(&self, key: &str, field: &str, value: String) {
        if !self.usable() {
            return;
        }
        let ttl = self.config.ttl.as_secs().max(1) as i64;
        let set = self.redis.hset::<i64, _, _>(key, (field, value)).await;
        let expire = match set {
            Ok(_) => {
                self.redis
                    .expire::<i64, _>(key, ttl, Some(ExpireOptions::NX))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = expire {
            self.failed(&e);
        }
    }

    /// Deletes keys after a change. Attempted even with the circuit open:
    /// a stale entry is worse than a slow delete.
    async fn invalidate(&self, keys: Vec<String>) {
        if let Err(e) = self.redis.del::<i64, _>(keys).await {
            self.failed(&e);
        }
    }
}

impl CachedStore {
    /// Drops the cached grants of `users` in `room` and their room lists.
    async fn forget_members(&self, room: &str, users: &[String]) {
        if users.is_empty() {
            return;
        }
        if let Err(e) = self
            .redis
            .hdel::<i64, _, _>(self.members_key(room), users.to_vec())
            .await
        {
            self.failed(&e);
        }
        self.invalidate(users.iter().map(|u| self.rooms_key(u)).collect())
            .await;
    }
}

#[async_trait]
impl Store for CachedStore {
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        let key = self.profile_key(&user.id);
        let value = serde_json::json!([user.name, user.image]).to_string();
        if self.get(&key).await.as_deref() == Some(value.as_str()) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.inner.upsert_user(user).await?;
        self.put(&key, value).await;
        Ok(())
    }

    async fn memberships(&self, user_id: &str) -> Result<Vec<Membership>, StoreError> {
        type Row = (String, Option<(String, u64)>);
        let key = self.rooms_key(user_id);
        if let Some(rows) = self
            .get(&key)
            .await
            .and_then(|v| serde_json::from_str::<Vec<Row>>(&v).ok())
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(rows
                .into_iter()
                .map(|(room, grant)| Membership {
                    room,
                    grant: grant.map(|(role, since_ms)| Grant { role, since_ms }),
                })
                .collect());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let list = self.inner.memberships(user_id).await?;
        let rows: Vec<Row> = list
            .iter()
            .map(|m| {
                let grant = m.grant.as_ref().map(|g| (g.role.clone(), g.since_ms));
                (m.room.clone(), grant)
            })
            .collect();
        self.put(&key, serde_json::json!(rows).to_string()).await;
        Ok(list)
    }

    async fn grant(&self, room: &str, user_id: &str) -> Result<Option<Grant>, StoreError> {
        let key = self.members_key(room);
        if let Some(v) = self.hget(&key, user_id).await
            && let Ok(cached) = serde_json::from_str::<Option<(String, u64)>>(&v)
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(cached.map(|(role, since_ms)| Grant { role, since_ms }));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let grant = self.inner.grant(room, user_id).await?;
        // A refusal is cached too: a hostile client asking for a room it
        // may not enter must not reach the database each time.
        let value = grant.as_ref().map(|g| (g.role.clone(), g.since_ms));
        self.hput(&key, user_id, serde_json::json!(value).to_string())
            .await;
        Ok(grant)
    }

    async fn add_members(&self, room: &str, members: &[Member]) -> Result<(), StoreError> {
        self.inner.add_members(room, members).await?;
        let users: Vec<String> = members.iter().map(|m| m.user_id.clone()).collect();
        self.forget_members(room, &users).await;
        Ok(())
    }

    async fn remove_members(
        &self,
        room: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let removed = self.inner.remove_members(room, user_ids).await?;
        self.forget_members(room, user_ids).await;
        Ok(removed)
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
        let deleted = self.inner.delete_room(room).await?;
        // Room lists that named the room keep it until their TTL; a fresh
        // session then finds it without a grant (refused) or empty.
        self.invalidate(vec![self.members_key(room)]).await;
        Ok(deleted)
    }

    async fn join(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError> {
        self.inner.join(user_id, rooms).await?;
        self.invalidate(vec![self.rooms_key(user_id)]).await;
        Ok(())
    }

    async fn leave(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError> {
        self.inner.leave(user_id, rooms).await?;
        self.invalidate(vec![self.rooms_key(user_id)]).await;
        Ok(())
    }

    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        self.inner.insert_message(msg).await
    }

    async fn set_seq(&self, message_id: u64, epoch: u64, seq: u64) -> Result<(), StoreError> {
        self.inner.set_seq(message_id, epoch, seq).await
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
