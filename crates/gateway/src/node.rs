//! The node: everything a connection needs, built once at start and
//! shared as `Arc<Node>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dashmap::DashSet;
use tokio::sync::Semaphore;

use chatgate_fanout::{Fanout, LocalFanout, LocalFanoutConfig};
use chatgate_protocol::{Codec, CodecConfig};
use chatgate_storage::{MemoryStore, Store};

use crate::auth::Verifier;
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
    /// Room event fan-out.
    pub fanout: Arc<dyn Fanout>,
    /// Local room membership.
    pub hub: Arc<Hub>,
    /// Per-user connection counts and rate limits.
    pub users: Users,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Access-token verifier.
    pub verifier: Verifier,
    /// Process start, for `/health` uptime.
    pub started: Instant,
    /// One permit per WebSocket session (`max_connections`).
    pub sessions: Arc<Semaphore>,
    /// (user, client message id) of sends between store and publish on
    /// this node, so a concurrent retry does not publish twice.
    pub sends_in_flight: DashSet<(Arc<str>, String)>,
    next_conn: AtomicU64,
    local_fanout: Option<Arc<LocalFanout>>,
}

impl Node {
    /// A node on the embedded engines: in-memory store, local fan-out.
    pub fn embedded(config: Config) -> Arc<Node> {
        let metrics = Arc::new(Metrics::new());
        let codec = codec_for(&config);
        let hub = Arc::new(Hub::new(metrics.clone()));
        let fanout = Arc::new(LocalFanout::new(
            codec,
            LocalFanoutConfig {
                recovery_window: config.recovery_window,
                ..Default::default()
            },
            hub.clone(),
        ));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        Arc::new(Node {
            codec,
            batch_codec: Codec::new(CodecConfig {
                compress_threshold: usize::MAX,
                ..*codec.config()
            }),
            store,
            fanout: fanout.clone(),
            hub,
            users: Users::new(config.max_connections_per_user, config.messages_per_minute),
            verifier: Verifier::new(config.token_secret.as_bytes()),
            started: Instant::now(),
            sessions: Arc::new(Semaphore::new(config.max_connections)),
            sends_in_flight: DashSet::new(),
            next_conn: AtomicU64::new(1),
            local_fanout: Some(fanout),
            metrics,
            config,
        })
    }

    /// A fresh connection id, unique within this process.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Periodic housekeeping: expire replay logs, forget idle users.
    pub fn maintain(&self) {
        if let Some(f) = &self.local_fanout {
            f.sweep();
        }
        self.users.sweep();
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
