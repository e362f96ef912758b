//! Redis read-through cache in front of another store (fred).
//!
//! Cached: a user's room memberships (read at every Identify, so a
//! reconnect storm does not become a database storm) and user profiles
//! (Identify refreshes the profile; an unchanged one is not rewritten).
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
    Builder, Client, ClientLike, Config, Expiration, KeysInterface, ReconnectPolicy,
};

use crate::model::{Cursor, Inserted, NewMessage, Page, ReactionChange, ReactionOutcome, User};
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

    /// Deletes keys after a change. Attempted even with the circuit open:
    /// a stale entry is worse than a slow delete.
    async fn invalidate(&self, keys: Vec<String>) {
        if let Err(e) = self.redis.del::<i64, _>(keys).await {
            self.failed(&e);
        }
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

    async fn memberships(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let key = self.rooms_key(user_id);
        if let Some(rooms) = self
            .get(&key)
            .await
            .and_then(|v| serde_json::from_str::<Vec<String>>(&v).ok())
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(rooms);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let rooms = self.inner.memberships(user_id).await?;
        self.put(&key, serde_json::json!(rooms).to_string()).await;
        Ok(rooms)
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
    ) -> Result<Page, StoreError> {
        self.inner.history(room, before, limit).await
    }
}
