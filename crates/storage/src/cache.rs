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
use fred::types::Value;
use fred::types::scripts::Script;

use crate::model::{
    Cursor, Grant, Inserted, Member, Membership, NewMessage, Page, ReactionChange, ReactionOutcome,
    User,
};
use crate::{Store, StoreError};

/// A cached room list entry: the room and its grant (role, since).
type RoomRow = (String, Option<(String, u64)>);

/// Settings for [`CachedStore`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `redis://host:port/db` URL, or `rediss://` for TLS.
    pub url: String,
    /// TLS settings for a `rediss://` URL (default: Mozilla's and the system's roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
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
            tls: None,
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

/// Caches a room's grant for one user, unless the room's grants changed
/// since the caller read the generation (`ARGV[3]`, "" for none): a
/// database read racing a change must not put the old answer back.
/// KEYS: the room's grant hash, its generation. ARGV: user, value, gen,
/// TTL in seconds (the hash expires a TTL after it was created).
const FILL_GRANT: &str = r#"
local gen = redis.call('GET', KEYS[2]) or ''
if gen ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"#;

/// Drops cached grants after a change and gives the room a new
/// generation, in one step. KEYS: the grant hash, its generation. ARGV:
/// TTL, then the users (none: the whole hash). A generation is never
/// repeated, even after its key expired (a counter would start again at 1
/// and let a fill that read the old "1" through): Redis time, made to
/// grow within one microsecond.
const FORGET_GRANTS: &str = r#"
local t = redis.call('TIME')
local gen = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local old = redis.call('GET', KEYS[2]) or ''
if string.sub(old, 1, #gen) == gen then gen = old .. '+' end
redis.call('SET', KEYS[2], gen, 'EX', ARGV[1])
if #ARGV == 1 then
  redis.call('DEL', KEYS[1])
else
  for i = 2, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 1
"#;

/// A [`Store`] with a Redis cache in front of `inner`.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    redis: Client,
    fill_grant: Script,
    forget_grants: Script,
    config: CacheConfig,
    started: Instant,
    /// Milliseconds since `started` until which Redis is bypassed.
    open_until_ms: AtomicU64,
    stats: Arc<CacheStats>,
}

/// `url` as a client configuration; `rediss://` gets TLS with `tls`
/// (default: Mozilla's and the system's roots), never plaintext. (The fan-out has the same
/// rule; the crates do not depend on each other.)
fn redis_config(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Config, StoreError> {
    let internal = |e: &dyn std::fmt::Display| StoreError::Internal(e.to_string());
    let (wants_tls, plain) = chatgate_protocol::tls::redis_url(url).map_err(|e| internal(&e))?;
    let mut config = Config::from_url(&plain).map_err(|e| internal(&e))?;
    if !wants_tls {
        return Ok(config);
    }
    let tls = match tls {
        Some(tls) => tls.clone(),
        None => chatgate_protocol::tls::client_config(None).map_err(|e| internal(&e))?,
    };
    config.tls = Some(fred::types::config::TlsConnector::from((*tls).clone()).into());
    Ok(config)
}

impl CachedStore {
    /// Connects to Redis (reconnecting by itself later) and wraps `inner`.
    /// A Redis that is down at start is not an error: the cache starts
    /// with its circuit open and recovers when Redis does.
    pub async fn connect(
        inner: Arc<dyn Store>,
        config: CacheConfig,
    ) -> Result<CachedStore, StoreError> {
        let redis_config = redis_config(&config.url, config.tls.as_ref())?;
        let timeout = config.command_timeout;
        let redis = Builder::from_config(redis_config)
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 2; // a Redis Cluster redirection (MOVED/ASK) counts as one
            })
            // Down at start: retried like a lost connection, never given
            // up on (`fail_fast` would leave the cache off for good).
            .with_config(|c| c.fail_fast = false)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let _connection_task = redis.connect();
        let _ = tokio::time::timeout(Duration::from_secs(2), redis.wait_for_connect()).await;
        Ok(CachedStore {
            inner,
            redis,
            fill_grant: Script::from_lua(FILL_GRANT),
            forget_grants: Script::from_lua(FORGET_GRANTS),
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

    /// Bumped on every grant change of the room; outlives the grant hash
    /// (it is what tells a late fill that it is late).
    fn generation_key(&self, room: &str) -> String {
        format!("{}:{{r:{room}}}:gen", self.config.namespace)
    }

    fn profile_key(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:profile", self.config.namespace)
    }

    /// The user's cached room list, if any.
    async fn cached_rooms(&self, user_id: &str) -> Option<Vec<Membership>> {
        let rows: Vec<RoomRow> =
            serde_json::from_str(&self.get(&self.rooms_key(user_id)).await?).ok()?;
        Some(
            rows.into_iter()
                .map(|(room, grant)| Membership {
                    room,
                    grant: grant.map(|(role, since_ms)| Grant { role, since_ms }),
                })
                .collect(),
        )
    }

    async fn put_rooms(&self, user_id: &str, list: &[Membership]) {
        let rows: Vec<RoomRow> = list
            .iter()
            .map(|m| {
                let grant = m.grant.as_ref().map(|g| (g.role.clone(), g.since_ms));
                (m.room.clone(), grant)
            })
            .collect();
        self.put(
            &self.rooms_key(user_id),
            serde_json::json!(rows).to_string(),
        )
        .await;
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

    /// The room's grant generation ("" when none), read before the
    /// database so that a fill can tell whether it raced a change; `None`
    /// when Redis cannot say (then nothing is cached).
    async fn generation(&self, room: &str) -> Option<String> {
        if !self.usable() {
            return None;
        }
        match self
            .redis
            .get::<Option<String>, _>(self.generation_key(room))
            .await
        {
            Ok(v) => Some(v.unwrap_or_default()),
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    /// Caches a grant if the room's generation is still `generation`.
    async fn fill_grant(&self, room: &str, user: &str, value: String, generation: String) {
        if !self.usable() {
            return;
        }
        let ttl = self.config.ttl.as_secs().max(1) as i64;
        let keys = vec![self.members_key(room), self.generation_key(room)];
        let args: Vec<Value> = vec![user.into(), value.into(), generation.into(), ttl.into()];
        if let Err(e) = self
            .fill_grant
            .evalsha_with_reload::<Value, _, _>(&self.redis, keys, args)
            .await
        {
            self.failed(&e);
        }
    }

    /// Deletes `keys` one command each, in one pipeline: the keys of
    /// different users hash to different Redis Cluster slots, where one
    /// multi-key DEL is refused.
    async fn delete_each(&self, keys: &[String]) -> Result<(), fred::error::Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let pipeline = self.redis.pipeline();
        for key in keys {
            let _: () = pipeline.del(key.as_str()).await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Deletes keys after a change. Attempted even with the circuit open:
    /// a stale entry is worse than a slow delete.
    async fn invalidate(&self, keys: Vec<String>) {
        if let Err(e) = self.delete_each(&keys).await {
            self.failed(&e);
        }
    }
}

impl CachedStore {
    /// Drops the cached grants of `users` (all when `None`) in `room`,
    /// bumping its generation, and the users' room lists. A change the
    /// cache could not be told of is an error (the database has it; the
    /// caller retries, which is harmless) and is retried in the
    /// background until Redis takes it, so that a Redis that comes back
    /// does not serve the old grant for a TTL.
    async fn forget_members(&self, room: &str, users: Option<&[String]>) -> Result<(), StoreError> {
        let keys = vec![self.members_key(room), self.generation_key(room)];
        let ttl = (self.config.ttl.as_secs().max(1) * 2) as i64;
        let mut args: Vec<Value> = vec![ttl.into()];
        if let Some(users) = users {
            if users.is_empty() {
                return Ok(());
            }
            args.extend(users.iter().map(|u| Value::from(u.as_str())));
        }
        let lists: Vec<String> = users
            .unwrap_or_default()
            .iter()
            .map(|u| self.rooms_key(u))
            .collect();
        let forgot = self.forget_once(&keys, &args, &lists).await;
        if let Err(e) = forgot {
            self.failed(&e);
            let (redis, script) = (self.redis.clone(), self.forget_grants.clone());
            let give_up = self.config.ttl;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut wait = Duration::from_millis(100);
                while started.elapsed() < give_up {
                    tokio::time::sleep(wait).await;
                    let done = script
                        .evalsha_with_reload::<Value, _, _>(&redis, keys.clone(), args.clone())
                        .await
                        .is_ok()
                        && delete_lists(&redis, &lists).await.is_ok();
                    if done {
                        tracing::info!("cached grants dropped after Redis came back");
                        return;
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                tracing::warn!("cached grants could not be dropped; they expire with their TTL");
            });
            return Err(StoreError::Unavailable(format!(
                "changed, but the cache could not be told ({e}); retry"
            )));
        }
        Ok(())
    }

    async fn forget_once(
        &self,
        keys: &[String],
        args: &[Value],
        lists: &[String],
    ) -> Result<(), fred::error::Error> {
        self.forget_grants
            .evalsha_with_reload::<Value, _, _>(&self.redis, keys.to_vec(), args.to_vec())
            .await?;
        self.delete_each(lists).await
    }
}

/// The background retry's deletes (no `CachedStore` there), one command
/// per key like [`CachedStore::delete_each`].
async fn delete_lists(redis: &Client, keys: &[String]) -> Result<(), fred::error::Error> {
    for key in keys {
        redis.del::<i64, _>(key.as_str()).await?;
    }
    Ok(())
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
        if let Some(list) = self.cached_rooms(user_id).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(list);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let list = self.inner.memberships(user_id).await?;
        self.put_rooms(user_id, &list).await;
        Ok(list)
    }

    /// A returning user with both entries cached costs the database
    /// nothing; otherwise one round trip answers what is missing.
    async fn identify(&self, user: &User) -> Result<Vec<Membership>, StoreError> {
        let key = self.profile_key(&user.id);
        let profile = serde_json::json!([user.name, user.image]).to_string();
        let (cached_profile, cached_rooms) =
            tokio::join!(self.get(&key), self.cached_rooms(&user.id));
        let known = cached_profile.as_deref() == Some(profile.as_str());
        match (known, cached_rooms) {
            (true, Some(list)) => {
                self.stats.hits.fetch_add(2, Ordering::Relaxed);
                Ok(list)
            }
            (true, None) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let list = self.inner.memberships(&user.id).await?;
                self.put_rooms(&user.id, &list).await;
                Ok(list)
            }
            (false, _) => {
                self.stats.misses.fetch_add(2, Ordering::Relaxed);
                let list = self.inner.identify(user).await?;
                tokio::join!(self.put(&key, profile), self.put_rooms(&user.id, &list));
                Ok(list)
            }
        }
    }

    async fn grant(&self, room: &str, user_id: &str) -> Result<Option<Grant>, StoreError> {
        let key = self.members_key(room);
        if let Some(v) = self.hget(&key, user_id).await
            && let Ok((role, since_ms)) = serde_json::from_str::<(String, u64)>(&v)
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(Grant { role, since_ms }));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation(room).await;
        let grant = self.inner.grant(room, user_id).await?;
        // Only grants are cached here: a refusal for a made-up room would
        // let any client grow Redis by a key per name (the gateway keeps
        // refusals in its own bounded memory).
        if let (Some(g), Some(generation)) = (&grant, generation) {
            let value = serde_json::json!((g.role.clone(), g.since_ms)).to_string();
            self.fill_grant(room, user_id, value, generation).await;
        }
        Ok(grant)
    }

    async fn add_members(&self, room: &str, members: &[Member]) -> Result<(), StoreError> {
        self.inner.add_members(room, members).await?;
        let users: Vec<String> = members.iter().map(|m| m.user_id.clone()).collect();
        self.forget_members(room, Some(&users)).await
    }

    async fn remove_members(
        &self,
        room: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let removed = self.inner.remove_members(room, user_ids).await?;
        self.forget_members(room, Some(user_ids)).await?;
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
        // The granted members' room lists name the room: dropped with it.
        let mut granted = Vec::new();
        loop {
            let after = granted.last().map(|m: &Member| m.user_id.clone());
            let page = self.inner.members(room, after.as_deref(), 1000).await?;
            let done = page.len() < 1000;
            granted.extend(page);
            if done {
                break;
            }
        }
        let deleted = self.inner.delete_room(room).await?;
        let users: Vec<String> = granted.into_iter().map(|m| m.user_id).collect();
        self.invalidate(users.iter().map(|u| self.rooms_key(u)).collect())
            .await;
        // Other room lists that named it (open rooms) keep it until their
        // TTL; a fresh session asks the (now empty) grants and is refused
        // or finds an empty room.
        self.forget_members(room, None).await?;
        Ok(deleted)
    }

    async fn join(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError> {
        // Invalidated even when the cached list holds the rooms: a leave
        // on another node may have emptied the key and a third node cached
        // the list without them before this join wrote.
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

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    fn statement_counts(&self) -> Vec<(&'static str, u64)> {
        self.inner.statement_counts()
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
