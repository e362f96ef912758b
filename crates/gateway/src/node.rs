//! The node: everything a connection needs, built once at start and
//! shared as `Arc<Node>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use dashmap::DashMap;
use tokio::sync::Semaphore;

use chatgate_fanout::cluster::Cluster;
use chatgate_fanout::{
    Fanout, FanoutStats, LocalFanout, LocalFanoutConfig, RedisFanoutConfig, RedisStreamsFanout,
};
use chatgate_protocol::{Codec, CodecConfig};
use chatgate_storage::{CacheConfig, CachedStore, MemoryStore, PgConfig, PgStore, Store};

use crate::access::Rooms;
use crate::auth::{Authenticator, Verifier};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::users::Users;

/// Shared state of one gateway process.
pub struct Node {
    /// Resolved configuration.
    pub config: Config,
    /// Frame codec with this node's limits.
    pub codec: Codec,
    /// The same codec with compression off, for per-connection batches:
    /// their members are already encoded, and compressing per recipient
    /// is the cost this design avoids.
    pub batch_codec: Codec,
    /// Message storage.
    pub store: Arc<dyn Store>,
    /// The Redis cache inside `store`, when configured (for `/health`).
    cache: Option<Arc<CachedStore>>,
    store_up: AtomicBool,
    /// Room event fan-out.
    pub fanout: Arc<dyn Fanout>,
    /// Local room membership.
    pub hub: Arc<Hub>,
    /// Room policies and who may enter which room.
    pub rooms: Arc<Rooms>,
    /// Per-user connection counts and rate limits.
    pub users: Users,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Access-token verification (HS256 secrets, public keys, JWKS).
    pub auth: Authenticator,
    /// Mints development tokens with `token_secret` (tests, tooling).
    pub verifier: Verifier,
    /// Process start, for `/health` uptime.
    pub started: Instant,
    /// One permit per identified WebSocket session (`max_connections`).
    pub sessions: Arc<Semaphore>,
    /// Sockets before Identify: descriptor budget, pending pool,
    /// per-address caps.
    pub door: Arc<crate::admission::Door>,
    /// (user, client message id) of sends between store and publish on
    /// this node, so a concurrent retry does not publish twice.
    pub sends_in_flight: DashMap<(Arc<str>, String), Arc<tokio::sync::Notify>>,
    next_conn: AtomicU64,
    /// Cluster registry (node heartbeats), when clustered.
    pub cluster: Option<Arc<Cluster>>,
}

impl Node {
    /// Builds a node with the backends the configuration names: Postgres
    /// (with the Redis cache when `redis_url` is set) or the in-memory
    /// store; the local fan-out.
    pub async fn build(config: Config) -> anyhow::Result<Arc<Node>> {
        let (store, cache): (Arc<dyn Store>, Option<Arc<CachedStore>>) = match &config.database_url
        {
            None => {
                if config.redis_url.is_some() {
                    tracing::warn!("redis_url without database_url: nothing to cache, ignoring it");
                }
                (Arc::new(MemoryStore::default()), None)
            }
            Some(url) => {
                let mut pg = PgConfig::new(url.clone());
                pg.pool_size = config.db_pool_size;
                pg.tls = config.tls.clone();
                let pg: Arc<dyn Store> = Arc::new(connect_pg(pg).await?);
                match &config.redis_url {
                    None => (pg, None),
                    Some(url) => {
                        let cached = Arc::new(
                            CachedStore::connect(pg, {
                                let mut c = CacheConfig::new(url.clone());
                                c.namespace = config.redis_namespace.clone();
                                c.tls = config.tls.clone();
                                c
                            })
                            .await
                            .context("configuring the Redis cache")?,
                        );
                        (cached.clone(), Some(cached))
                    }
                }
            }
        };
        Node::assemble(config, store, cache).await
    }

    /// A node on a store built elsewhere: what in-process tests use to
    /// put a store with injected faults or delays under the session rules.
    /// The fan-out is chosen by the configuration, as in [`Node::build`].
    pub async fn with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Arc<Node>> {
        Node::assemble(config, store, None).await
    }

    async fn assemble(
        config: Config,
        store: Arc<dyn Store>,
        cache: Option<Arc<CachedStore>>,
    ) -> anyhow::Result<Arc<Node>> {
        // `token_secret` is always a verifying secret, however the
        // configuration was built (files and flags put it first already).
        let mut auth_config = config.auth.clone();
        if !auth_config.hs256_secrets.contains(&config.token_secret) {
            auth_config
                .hs256_secrets
                .insert(0, config.token_secret.clone());
        }
        let auth = Authenticator::new(&auth_config)
            .await
            .context("setting up token verification")?;
        let metrics = Arc::new(Metrics::new());
        metrics
            .max_connections
            .set(i64::try_from(config.max_connections).unwrap_or(i64::MAX));
        let codec = codec_for(&config);
        let rooms = Arc::new(Rooms::new(
            store.clone(),
            config.room_policies.clone(),
            metrics.clone(),
        ));
        let hub = Arc::new(Hub::new(metrics.clone(), rooms.clone(), codec));
        let mut users = Users::new(config.max_connections_per_user, config.messages_per_minute);
        let (fanout, cluster): (Arc<dyn Fanout>, _) = match (&config.redis_url, config.cluster) {
            (Some(url), true) => {
                if config.database_url.is_none() {
                    tracing::warn!(
                        "cluster mode with the in-memory store: fan-out and resume work across \
                             nodes, but each node keeps its own history; use Postgres in production"
                    );
                }
                let mut rc = RedisFanoutConfig::new(url.clone(), config.node_id.clone());
                rc.namespace = config.redis_namespace.clone();
                rc.tls = config.tls.clone();
                rc.partitions = config.stream_partitions;
                rc.replicas = config.redis_wait_replicas;
                rc.recovery_window = config.recovery_window;
                rc.stream_idle_ttl = config.stream_idle_ttl.max(config.recovery_window);
                let redis = Arc::new(
                    RedisStreamsFanout::connect(rc, codec, hub.clone())
                        .await
                        .map_err(|e| anyhow::anyhow!(e))
                        .context("starting the Redis Streams fan-out")?,
                );
                let cluster = Arc::new(Cluster::new(
                    redis.client().clone(),
                    &config.redis_namespace,
                    &config.node_id,
                ));
                if let Err(e) = cluster.heartbeat().await {
                    tracing::warn!(error = %e, "first cluster heartbeat failed; will retry");
                }
                users = users.with_cluster(cluster.clone());
                hub.set_cluster(cluster.clone());
                (redis, Some(cluster))
            }
            _ => {
                let local: Arc<dyn Fanout> = Arc::new(LocalFanout::new(
                    codec,
                    LocalFanoutConfig {
                        recovery_window: config.recovery_window,
                        stream_idle_ttl: config.stream_idle_ttl.max(config.recovery_window),
                        ..Default::default()
                    },
                    hub.clone(),
                ));
                (local, None)
            }
        };
        Ok(Arc::new(Node {
            codec,
            batch_codec: Codec::new(CodecConfig {
                compress_threshold: usize::MAX,
                ..*codec.config()
            }),
            store,
            cache,
            store_up: AtomicBool::new(true),
            fanout,
            cluster,
            hub,
            rooms,
            users,
            auth,
            verifier: Verifier::new(config.token_secret.as_bytes()),
            started: Instant::now(),
            sessions: Arc::new(Semaphore::new(config.max_connections)),
            door: crate::admission::Door::new(&config),
            sends_in_flight: DashMap::new(),
            next_conn: AtomicU64::new(1),
            metrics,
            config,
        }))
    }

    /// Probes the store (called every few seconds) and records the result
    /// for `/health` and the `backend_up` metric.
    pub async fn check_backends(&self) {
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await,
            Ok(Ok(()))
        );
        if up != self.store_up.swap(up, Ordering::Relaxed) {
            if up {
                tracing::info!(engine = self.store.engine(), "store reachable again");
            } else {
                tracing::warn!(engine = self.store.engine(), "store unreachable");
            }
        }
        self.metrics
            .backend_up
            .with_label_values(&["store"])
            .set(i64::from(up));
        if let Some(cache) = &self.cache {
            self.metrics
                .backend_up
                .with_label_values(&["cache"])
                .set(i64::from(!cache.degraded()));
        }
        if let Some(cluster) = &self.cluster {
            let up = cluster.heartbeat().await.is_ok();
            self.metrics
                .backend_up
                .with_label_values(&["cluster"])
                .set(i64::from(up));
        }
        if let Some(stats) = self.fanout_stats() {
            let m = &self.metrics;
            m.backend_up
                .with_label_values(&["fanout"])
                .set(i64::from(stats.connected.load(Ordering::Relaxed)));
            m.fanout_lag_ms.set(stats.lag_ms.load(Ordering::Relaxed));
            m.fanout_read_errors
                .set(stats.read_errors.load(Ordering::Relaxed) as i64);
            m.fanout_reconnects
                .set(stats.reconnects.load(Ordering::Relaxed) as i64);
            m.fanout_streams_lost
                .set(stats.streams_lost.load(Ordering::Relaxed) as i64);
            m.fanout_overruns
                .set(stats.overruns.load(Ordering::Relaxed) as i64);
        }
    }

    /// Redis fan-out health counters, when clustered.
    pub fn fanout_stats(&self) -> Option<Arc<FanoutStats>> {
        self.fanout.stats()
    }

    /// Whether the last store probe succeeded.
    pub fn store_up(&self) -> bool {
        self.store_up.load(Ordering::Relaxed)
    }

    /// Whether the Redis cache is currently bypassed (`None`: no cache).
    pub fn cache_degraded(&self) -> Option<bool> {
        self.cache.as_ref().map(|c| c.degraded())
    }

    /// A fresh connection id, unique within this process.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Periodic housekeeping: expire replay logs, forget idle users.
    pub fn maintain(&self) {
        self.fanout.maintain();
        self.users.sweep();
        self.door.sweep();
        self.hub.sweep_typing();
    }

    /// Open WebSocket sessions.
    pub fn connections(&self) -> usize {
        self.config.max_connections - self.sessions.available_permits()
    }
}

/// The codec settings a config implies.
pub fn codec_for(config: &Config) -> Codec {
    Codec::new(CodecConfig {
        max_frame_bytes: config.max_frame_bytes,
        max_payload_bytes: config.max_frame_bytes,
        compress_threshold: config.compress_threshold,
        ..CodecConfig::default()
    })
}

/// Connects to Postgres (and applies migrations).
async fn connect_pg(config: PgConfig) -> anyhow::Result<PgStore> {
    // One attempt: start-up retries the whole build with backoff (and
    // says what it waits for), see `chatgate`'s `build_when_reachable`.
    PgStore::connect(config)
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("connecting to the database")
}
