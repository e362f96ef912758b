//! Gateway configuration: defaults that run locally, overridden by a TOML
//! file, then `CHAT_*` environment variables, then command-line flags.
//!
//! Every field's default and the reason for it is documented here; the
//! README's configuration table is generated from the same words.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

use crate::admission::Cidr;
use crate::auth::{AuthConfig, AuthFile, AuthOverrides};
use crate::policy::Policies;

/// The development-only token secret. Accepted only while the gateway
/// listens on a loopback address; a public listener needs a real secret.
pub const DEV_SECRET: &str = "chatgate-dev-secret-not-for-production";

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address. Default `127.0.0.1:8080`: loopback, so nothing is
    /// exposed until an operator chooses to.
    pub listen: SocketAddr,
    /// HMAC-SHA256 secret for access tokens. Default [`DEV_SECRET`], which
    /// is refused on non-loopback addresses.
    pub token_secret: String,
    /// Identified WebSocket sessions this process holds. Default: what
    /// the open-files limit leaves after the pending sockets, the pools
    /// and a reserve ([`Config::fd_budget`]; the gateway raises its soft
    /// limit to the hard one first), and at most half the memory the
    /// process may use at [`PER_CONNECTION_MEMORY`] each. A value past
    /// the open-files budget is refused at start.
    pub max_connections: usize,
    /// Sockets not identified yet (HTTP requests, upgraded sockets before
    /// Identify), a pool of their own so that they never take session
    /// slots. Default 1,024 (an eighth of the open-files limit when that
    /// is small); past it, new sockets get 503 at once.
    pub max_pending_connections: usize,
    /// Unidentified sockets one source address may hold. Default 128.
    /// 0: no cap.
    pub max_pending_per_ip: u32,
    /// Sockets of any kind one source address may hold. Default 0 (no
    /// cap: many users share an address behind NAT); set it where they
    /// do not.
    pub max_connections_per_ip: u32,
    /// New sockets per second from one source address (burst twice
    /// that). Default 0 (no cap).
    pub new_connections_per_ip: u32,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` names
    /// the client for the per-address caps. Default none: the header is
    /// ignored, and the peer address counts.
    pub trusted_proxies: Vec<Cidr>,
    /// Concurrent connections per user. Default 5, as in the setup this
    /// replaces; the 6th is closed with 4105.
    pub max_connections_per_user: u32,
    /// Messages (sends and reactions) per user per minute, token bucket
    /// shared by all the user's connections. Default 60.
    pub messages_per_minute: u32,
    /// Heartbeat interval announced to clients. Default 25 s.
    pub heartbeat_interval: Duration,
    /// Grace after a missed heartbeat before closing with 4002. Default 20 s.
    pub heartbeat_timeout: Duration,
    /// Time from upgrade to Identify before closing with 4104. Default 10 s.
    pub connect_timeout: Duration,
    /// Largest frame accepted or sent. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Payloads above this are compressed. Default 1 KiB.
    pub compress_threshold: usize,
    /// Frames queued per connection before it counts as a slow consumer
    /// (4001). Default 1,024: absorbs a burst in a busy room.
    pub outbound_queue_frames: usize,
    /// Bytes queued per connection before it counts as slow. Default 4 MiB.
    pub outbound_queue_bytes: usize,
    /// Rooms one session may be in. Default 1,000.
    pub max_rooms_per_session: usize,
    /// Frames per second one connection may send, every opcode counted
    /// (token bucket, charged before decoding; sends and reactions also
    /// have the per-user message limit). Default 50: far above any
    /// person, far below a flood.
    pub requests_per_second: u32,
    /// Burst for `requests_per_second`. Default 100.
    pub request_burst: u32,
    /// How long room events stay replayable for resume. Default 120 s.
    pub recovery_window: Duration,
    /// How long a room's stream (epoch, counter) outlives its last event,
    /// in this node's memory and in Redis. Default 24 h: quiet rooms keep
    /// their epoch, unused ones go; an epoch given to a room that never
    /// had an event goes after the recovery window.
    pub stream_idle_ttl: Duration,
    /// On SIGTERM, how long to wait for connections to close. Default 10 s.
    pub shutdown_grace: Duration,
    /// WebSocket read buffer per connection, and the most read per
    /// syscall. Default 512 bytes: a typical client frame (Send, Typing,
    /// a JWT in Identify) fits in one read, and idle sockets stay cheap —
    /// measured 5.0 KiB per idle connection at 19,000 connections with
    /// 512, 5.5 KiB with 1 KiB, 8.8 KiB with 4 KiB (BENCHMARKS.md). Large
    /// client frames just take more reads.
    pub ws_read_buffer: usize,
    /// PostgreSQL URL. Unset (the default): the in-memory store.
    pub database_url: Option<String>,
    /// Pooled Postgres connections. Default 16.
    pub db_pool_size: usize,
    /// Redis URL: the cache of hot data (with a database) and, with
    /// `cluster`, the fan-out between nodes. Unset: neither.
    pub redis_url: Option<String>,
    /// Run as one node of a cluster: room events go through Redis
    /// Streams and per-user limits are shared. Default off (one node).
    pub cluster: bool,
    /// This node's id in the cluster. Default: a random one per start.
    pub node_id: String,
    /// Prefix of every Redis key. Default `chat`; separate deployments
    /// sharing one Redis use different prefixes. No braces: keys carry
    /// their Redis Cluster slot in a `{...}` tag after it.
    pub redis_namespace: String,
    /// Hash tags rooms hash onto (each a Redis Cluster slot, and a
    /// control channel every node listens to). Default 16.
    pub stream_partitions: u32,
    /// Redis replicas that must hold an event before it is delivered and
    /// acknowledged (`WAIT`). Default 0; set 1 when Redis has replicas,
    /// so that a failover never takes back an event anyone has seen.
    pub redis_wait_replicas: u32,
    /// TLS settings for the backends (Postgres with `sslmode=require`,
    /// Redis with `rediss://`): Mozilla's and the system's roots plus the CA in
    /// `tls_ca_file` when set. Built (and its file read) at load, so a
    /// bad file stops the start instead of a backend connect.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Share the listening port with other gateway processes on this host
    /// (SO_REUSEPORT): several processes, each under its open-files limit,
    /// serve one port. Default off.
    pub reuse_port: bool,
    /// How access tokens are verified beyond `token_secret`: more HS256
    /// secrets, RS256/ES256 public keys, a JWKS URL, issuer, audience and
    /// leeway (see [`crate::auth`]).
    pub auth: AuthConfig,
    /// Room policies by name prefix (see [`crate::policy`]). Default
    /// `public:=open` and everything else `members`.
    pub room_policies: Policies,
    /// Address of the server API listener (JSON over HTTP for the
    /// application backend: members, rooms, publish, disconnect,
    /// presence, history; also `/health` and `/metrics`). Default
    /// `127.0.0.1:9090`: loopback, never the public port.
    pub admin_listen: Option<SocketAddr>,
    /// Key the server API requires (`Authorization: Bearer <key>`),
    /// compared in constant time. Unset: the API answers 403 to every
    /// request but `/health` and `/metrics`.
    pub admin_api_key: Option<String>,
    /// Runtime worker threads. Default: one per core. Several processes
    /// sharing a host's cores (SO_REUSEPORT under a low open-files limit)
    /// do better with fewer each: a single-threaded gateway spent ~10 %
    /// less CPU per delivery than a two-threaded one on the same two
    /// cores, with nothing spent on work stealing (BENCHMARKS.md).
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        let mut c = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token_secret: DEV_SECRET.to_owned(),
            max_connections: 0,
            max_pending_connections: default_pending(open_files_limit()),
            max_pending_per_ip: 128,
            max_connections_per_ip: 0,
            new_connections_per_ip: 0,
            trusted_proxies: Vec::new(),
            max_connections_per_user: 5,
            messages_per_minute: 60,
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            max_frame_bytes: 1024 * 1024,
            compress_threshold: 1024,
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            max_rooms_per_session: 1000,
            requests_per_second: 50,
            request_burst: 100,
            recovery_window: Duration::from_secs(120),
            stream_idle_ttl: Duration::from_secs(86_400),
            shutdown_grace: Duration::from_secs(10),
            ws_read_buffer: 512,
            database_url: None,
            db_pool_size: 16,
            redis_url: None,
            cluster: false,
            node_id: random_node_id(),
            redis_namespace: "chat".into(),
            stream_partitions: 16,
            redis_wait_replicas: 0,
            tls: None,
            reuse_port: false,
            auth: AuthConfig::default(),
            room_policies: Policies::default(),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            admin_api_key: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        c.max_connections = c.default_max_connections();
        c
    }
}

fn random_node_id() -> String {
    use rand::Rng;
    format!("node-{:08x}", rand::rng().random::<u32>())
}

/// Raises this process's soft open-files limit to its hard limit, as
/// servers holding many sockets do (a container's soft limit is often
/// 1,024 while the hard one allows far more); call before the
/// configuration is loaded, since `max_connections` defaults from it.
/// Returns the soft limit before and after; an error leaves it as it was.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let (before, _) = rlimit::Resource::NOFILE.get()?;
    let after = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((before, after))
}

/// Descriptors kept for what is not a client socket or a pooled database
/// connection: Redis clients, listeners, logs, JWKS fetches.
const FD_RESERVE: usize = 64;

/// Memory budgeted per session when `max_connections` follows memory:
/// an idle session measured ~6 KiB of process memory (BENCHMARKS.md),
/// and kernel socket buffers, a burst's queued frames and the rooms it is
/// in take the rest. A busy connection can queue up to
/// `outbound_queue_bytes` more for a moment.
pub const PER_CONNECTION_MEMORY: u64 = 64 * 1024;

fn default_pending(nofile: usize) -> usize {
    1024.min(nofile / 8).max(16)
}

/// Sessions half the process's memory holds at [`PER_CONNECTION_MEMORY`]
/// each: the cgroup's limit when it has one (containers), else the host's.
fn memory_sessions() -> usize {
    let host = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|t| t.trim().parse::<u64>().ok());
    let limit = match (host, cgroup) {
        (Some(h), Some(c)) => h.min(c),
        (Some(h), None) => h,
        (None, Some(c)) => c,
        (None, None) => return usize::MAX,
    };
    (limit / 2 / PER_CONNECTION_MEMORY).min(usize::MAX as u64) as usize
}

/// The soft open-files limit of this process (Linux), or 1024.
pub fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// Settings from flags and `CHAT_*` variables (flags win). Unset ones
/// fall back to the file, then the defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long, env = "CHAT_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Listen address, e.g. 0.0.0.0:8080.
    #[arg(long, env = "CHAT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HMAC secret for access tokens.
    #[arg(long, env = "CHAT_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Maximum WebSocket sessions in this process.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Maximum sockets not identified yet.
    #[arg(long, env = "CHAT_MAX_PENDING_CONNECTIONS")]
    pub max_pending_connections: Option<usize>,
    /// Unidentified sockets per source address (0: no cap).
    #[arg(long, env = "CHAT_MAX_PENDING_PER_IP")]
    pub max_pending_per_ip: Option<u32>,
    /// Sockets per source address (0: no cap).
    #[arg(long, env = "CHAT_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<u32>,
    /// New sockets per second per source address (0: no cap).
    #[arg(long, env = "CHAT_NEW_CONNECTIONS_PER_IP")]
    pub new_connections_per_ip: Option<u32>,
    /// Trusted proxy address or CIDR block (repeatable; comma-separated
    /// in the variable).
    #[arg(
        long = "trusted-proxy",
        env = "CHAT_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Maximum connections per user.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<u32>,
    /// Messages per user per minute.
    #[arg(long, env = "CHAT_MESSAGES_PER_MINUTE")]
    pub messages_per_minute: Option<u32>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "CHAT_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Heartbeat timeout in milliseconds.
    #[arg(long, env = "CHAT_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Identify deadline in milliseconds.
    #[arg(long, env = "CHAT_CONNECT_TIMEOUT_MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Maximum frame size in bytes.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Compression threshold in bytes.
    #[arg(long, env = "CHAT_COMPRESS_THRESHOLD")]
    pub compress_threshold: Option<usize>,
    /// Outbound queue length (frames) per connection.
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE_FRAMES")]
    pub outbound_queue_frames: Option<usize>,
    /// Outbound queue size (bytes) per connection.
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,
    /// Maximum rooms per session.
    #[arg(long, env = "CHAT_MAX_ROOMS_PER_SESSION")]
    pub max_rooms_per_session: Option<usize>,
    /// Requests per second per connection.
    #[arg(long, env = "CHAT_REQUESTS_PER_SECOND")]
    pub requests_per_second: Option<u32>,
    /// Request burst per connection.
    #[arg(long, env = "CHAT_REQUEST_BURST")]
    pub request_burst: Option<u32>,
    /// Recovery window in seconds.
    #[arg(long, env = "CHAT_RECOVERY_WINDOW_SECS")]
    pub recovery_window_secs: Option<u64>,
    /// How long an idle room's stream is kept, in seconds.
    #[arg(long, env = "CHAT_STREAM_IDLE_TTL_SECS")]
    pub stream_idle_ttl_secs: Option<u64>,
    /// Shutdown grace period in milliseconds.
    #[arg(long, env = "CHAT_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// WebSocket read buffer per connection, bytes.
    #[arg(long, env = "CHAT_WS_READ_BUFFER")]
    pub ws_read_buffer: Option<usize>,
    /// PostgreSQL URL (unset: in-memory store).
    #[arg(long, env = "CHAT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Pooled Postgres connections.
    #[arg(long, env = "CHAT_DB_POOL_SIZE")]
    pub db_pool_size: Option<usize>,
    /// Redis URL (cache of hot data; cluster fan-out).
    #[arg(long, env = "CHAT_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Join the cluster through Redis Streams (needs --redis-url).
    #[arg(long, env = "CHAT_CLUSTER", num_args = 0..=1, default_missing_value = "true")]
    pub cluster: Option<bool>,
    /// Node id (default random).
    #[arg(long, env = "CHAT_NODE_ID")]
    pub node_id: Option<String>,
    /// Redis key prefix.
    #[arg(long, env = "CHAT_REDIS_NAMESPACE")]
    pub redis_namespace: Option<String>,
    /// Hash tags rooms spread over in Redis.
    #[arg(long, env = "CHAT_STREAM_PARTITIONS")]
    pub stream_partitions: Option<u32>,
    /// Redis replicas that must hold an event before it is delivered.
    #[arg(long, env = "CHAT_REDIS_WAIT_REPLICAS")]
    pub redis_wait_replicas: Option<u32>,
    /// PEM file of a CA to trust for Postgres and Redis TLS, besides
    /// Mozilla's and the system's roots.
    #[arg(long, env = "CHAT_TLS_CA_FILE")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Share the port with other processes (SO_REUSEPORT).
    #[arg(long, env = "CHAT_REUSE_PORT", num_args = 0..=1, default_missing_value = "true")]
    pub reuse_port: Option<bool>,
    /// Runtime worker threads (default: one per core).
    #[arg(long, env = "CHAT_THREADS")]
    pub threads: Option<usize>,
    /// Room policy PREFIX=open|members[,send=ROLE|ROLE][,history=all|since_join]
    /// (repeatable; in the environment, separated by `;`). Replaces the
    /// defaults (`public:=open`, everything else members).
    #[arg(
        long = "room-policy",
        env = "CHAT_ROOM_POLICIES",
        value_delimiter = ';'
    )]
    pub room_policies: Vec<String>,
    /// Server API listen address, or `off`.
    #[arg(long, env = "CHAT_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Server API key.
    #[arg(long, env = "CHAT_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// Token verification (identity providers).
    #[command(flatten)]
    pub auth: AuthOverrides,
}

/// The TOML file: the same keys as the flags, with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    token_secret: Option<String>,
    max_connections: Option<usize>,
    max_pending_connections: Option<usize>,
    max_pending_per_ip: Option<u32>,
    max_connections_per_ip: Option<u32>,
    new_connections_per_ip: Option<u32>,
    trusted_proxies: Option<Vec<String>>,
    max_connections_per_user: Option<u32>,
    messages_per_minute: Option<u32>,
    heartbeat_interval_ms: Option<u64>,
    heartbeat_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    max_frame_bytes: Option<usize>,
    compress_threshold: Option<usize>,
    outbound_queue_frames: Option<usize>,
    outbound_queue_bytes: Option<usize>,
    max_rooms_per_session: Option<usize>,
    requests_per_second: Option<u32>,
    request_burst: Option<u32>,
    recovery_window_secs: Option<u64>,
    stream_idle_ttl_secs: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    ws_read_buffer: Option<usize>,
    database_url: Option<String>,
    db_pool_size: Option<usize>,
    redis_url: Option<String>,
    cluster: Option<bool>,
    node_id: Option<String>,
    redis_namespace: Option<String>,
    stream_partitions: Option<u32>,
    redis_wait_replicas: Option<u32>,
    tls_ca_file: Option<std::path::PathBuf>,
    reuse_port: Option<bool>,
    threads: Option<usize>,
    room_policies: Option<Vec<String>>,
    admin_listen: Option<String>,
    admin_api_key: Option<String>,
    auth: Option<AuthFile>,
}

impl Config {
    /// Layers defaults, the file named by `--config`, and the overrides,
    /// then checks the result.
    pub fn load(o: &Overrides) -> anyhow::Result<Config> {
        let file = match &o.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let ms = Duration::from_millis;
        let token_secret = o
            .token_secret
            .clone()
            .or(file.token_secret.clone())
            .unwrap_or(d.token_secret.clone());
        let auth = AuthConfig::resolve(&o.auth, file.auth, &token_secret)?;
        let c = Config {
            listen: o.listen.or(file.listen).unwrap_or(d.listen),
            token_secret,
            auth,
            // Resolved below, once what else takes descriptors is known.
            max_connections: o.max_connections.or(file.max_connections).unwrap_or(0),
            max_pending_connections: o
                .max_pending_connections
                .or(file.max_pending_connections)
                .unwrap_or(d.max_pending_connections),
            max_pending_per_ip: o
                .max_pending_per_ip
                .or(file.max_pending_per_ip)
                .unwrap_or(d.max_pending_per_ip),
            max_connections_per_ip: o
                .max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(d.max_connections_per_ip),
            new_connections_per_ip: o
                .new_connections_per_ip
                .or(file.new_connections_per_ip)
                .unwrap_or(d.new_connections_per_ip),
            trusted_proxies: {
                let specs = if o.trusted_proxies.is_empty() {
                    file.trusted_proxies.unwrap_or_default()
                } else {
                    o.trusted_proxies.clone()
                };
                specs
                    .iter()
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| Cidr::parse(s))
                    .collect::<anyhow::Result<Vec<_>>>()?
            },
            max_connections_per_user: o
                .max_connections_per_user
                .or(file.max_connections_per_user)
                .unwrap_or(d.max_connections_per_user),
            messages_per_minute: o
                .messages_per_minute
                .or(file.messages_per_minute)
                .unwrap_or(d.messages_per_minute),
            heartbeat_interval: o
                .heartbeat_interval_ms
                .or(file.heartbeat_interval_ms)
                .map(ms)
                .unwrap_or(d.heartbeat_interval),
            heartbeat_timeout: o
                .heartbeat_timeout_ms
                .or(file.heartbeat_timeout_ms)
                .map(ms)
                .unwrap_or(d.heartbeat_timeout),
            connect_timeout: o
                .connect_timeout_ms
                .or(file.connect_timeout_ms)
                .map(ms)
                .unwrap_or(d.connect_timeout),
            max_frame_bytes: o
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(d.max_frame_bytes),
            compress_threshold: o
                .compress_threshold
                .or(file.compress_threshold)
                .unwrap_or(d.compress_threshold),
            outbound_queue_frames: o
                .outbound_queue_frames
                .or(file.outbound_queue_frames)
                .unwrap_or(d.outbound_queue_frames),
            outbound_queue_bytes: o
                .outbound_queue_bytes
                .or(file.outbound_queue_bytes)
                .unwrap_or(d.outbound_queue_bytes),
            max_rooms_per_session: o
                .max_rooms_per_session
                .or(file.max_rooms_per_session)
                .unwrap_or(d.max_rooms_per_session),
            requests_per_second: o
                .requests_per_second
                .or(file.requests_per_second)
                .unwrap_or(d.requests_per_second),
            request_burst: o
                .request_burst
                .or(file.request_burst)
                .unwrap_or(d.request_burst),
            recovery_window: o
                .recovery_window_secs
                .or(file.recovery_window_secs)
                .map(Duration::from_secs)
                .unwrap_or(d.recovery_window),
            stream_idle_ttl: o
                .stream_idle_ttl_secs
                .or(file.stream_idle_ttl_secs)
                .map(Duration::from_secs)
                .unwrap_or(d.stream_idle_ttl),
            shutdown_grace: o
                .shutdown_grace_ms
                .or(file.shutdown_grace_ms)
                .map(ms)
                .unwrap_or(d.shutdown_grace),
            ws_read_buffer: o
                .ws_read_buffer
                .or(file.ws_read_buffer)
                .unwrap_or(d.ws_read_buffer),
            database_url: o.database_url.clone().or(file.database_url),
            db_pool_size: o
                .db_pool_size
                .or(file.db_pool_size)
                .unwrap_or(d.db_pool_size),
            redis_url: o.redis_url.clone().or(file.redis_url),
            cluster: o.cluster.or(file.cluster).unwrap_or(d.cluster),
            node_id: o.node_id.clone().or(file.node_id).unwrap_or(d.node_id),
            redis_namespace: o
                .redis_namespace
                .clone()
                .or(file.redis_namespace)
                .unwrap_or(d.redis_namespace),
            stream_partitions: o
                .stream_partitions
                .or(file.stream_partitions)
                .unwrap_or(d.stream_partitions),
            redis_wait_replicas: o
                .redis_wait_replicas
                .or(file.redis_wait_replicas)
                .unwrap_or(d.redis_wait_replicas),
            tls: match o.tls_ca_file.as_ref().or(file.tls_ca_file.as_ref()) {
                None => None,
                Some(path) => {
                    let pem = std::fs::read(path)
                        .with_context(|| format!("reading tls_ca_file {}", path.display()))?;
                    Some(
                        chatgate_protocol::tls::client_config(Some(&pem))
                            .with_context(|| format!("tls_ca_file {}", path.display()))?,
                    )
                }
            },
            reuse_port: o.reuse_port.or(file.reuse_port).unwrap_or(d.reuse_port),
            threads: o.threads.or(file.threads).unwrap_or(d.threads),
            room_policies: {
                let specs = if o.room_policies.is_empty() {
                    file.room_policies.unwrap_or_default()
                } else {
                    o.room_policies.clone()
                };
                if specs.is_empty() {
                    d.room_policies
                } else {
                    Policies::from_specs(&specs)?
                }
            },
            admin_listen: match o.admin_listen.clone().or(file.admin_listen) {
                None => d.admin_listen,
                Some(v) if v == "off" => None,
                Some(v) => Some(
                    v.parse()
                        .with_context(|| format!("admin_listen {v:?} is not an address"))?,
                ),
            },
            admin_api_key: o.admin_api_key.clone().or(file.admin_api_key),
        };
        let mut c = c;
        let budget = c.fd_budget(open_files_limit());
        if c.max_connections == 0 {
            c.max_connections = c.default_max_connections();
        } else if c.max_connections > budget {
            bail!(
                "max_connections {} does not fit the open-files limit {}: with {} pending \
                 sockets, {} pooled backend connections and a reserve, at most {budget} \
                 sessions fit; lower it or raise the limit (ulimit -n / LimitNOFILE)",
                c.max_connections,
                open_files_limit(),
                c.max_pending_connections,
                c.db_pool_size,
            );
        }
        c.validate()?;
        Ok(c)
    }

    /// The default `max_connections`: what the open files and half the
    /// memory allow.
    fn default_max_connections(&self) -> usize {
        self.fd_budget(open_files_limit())
            .min(memory_sessions())
            .max(1)
    }

    /// Sessions that fit `nofile` open files, after what else the process
    /// holds: pending sockets, the Postgres pool, the server API's
    /// connections and a reserve for Redis, logs and listeners. The one
    /// budget every socket comes out of, so `accept` never takes the
    /// descriptor a backend connection needs.
    pub fn fd_budget(&self, nofile: usize) -> usize {
        let api = if self.admin_api_key.is_some() {
            crate::admin::MAX_CONNECTIONS
        } else {
            0
        };
        nofile
            .saturating_sub(self.max_pending_connections)
            .saturating_sub(self.db_pool_size)
            .saturating_sub(api)
            .saturating_sub(FD_RESERVE)
    }

    /// Refuses settings that are unsafe or cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.database_url {
            chatgate_storage::pg::check_url_tls(url)?;
        }
        if let Some(url) = &self.redis_url {
            chatgate_protocol::tls::redis_url(url)?;
        }
        // Keys carry their slot in a `{...}` hash tag after the prefix; a
        // brace in the prefix would become the tag and scatter a room's
        // keys over slots, which a Redis Cluster refuses (CROSSSLOT).
        if self.redis_namespace.is_empty()
            || self
                .redis_namespace
                .contains(|c: char| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            bail!(
                "redis_namespace must be non-empty, without braces, spaces or control characters (got {:?})",
                self.redis_namespace
            );
        }
        if !self.listen.ip().is_loopback() {
            let weak = self.auth.weak_secrets();
            if weak.contains(&1) {
                bail!(
                    "refusing to listen on {} with the development or a guessable token \
                     secret; set CHAT_TOKEN_SECRET (or --token-secret) to a long random \
                     value, such as `openssl rand -hex 32`",
                    self.listen
                );
            }
            if let Some(n) = weak.first() {
                bail!(
                    "refusing to listen on {} with a guessable HS256 secret (#{n}); \
                     use long random values",
                    self.listen
                );
            }
        }
        if self.token_secret.len() < crate::auth::MIN_SECRET_BYTES {
            bail!(
                "the token secret must be at least {} bytes",
                crate::auth::MIN_SECRET_BYTES
            );
        }
        // A zero rate would refuse everything (and divide by zero).
        if self.messages_per_minute == 0 {
            bail!("messages_per_minute must be positive");
        }
        if self.requests_per_second == 0 || self.request_burst == 0 {
            bail!("requests_per_second and request_burst must be positive");
        }
        if self.max_connections_per_user == 0 {
            bail!("max_connections_per_user must be positive");
        }
        if self.max_frame_bytes < 1024 {
            bail!("max_frame_bytes must be at least 1024");
        }
        if self.heartbeat_interval.is_zero() || self.connect_timeout.is_zero() {
            bail!("heartbeat interval and connect timeout must be positive");
        }
        if self.outbound_queue_frames < 16 {
            bail!("outbound_queue_frames must be at least 16");
        }
        if self.cluster && self.redis_url.is_none() {
            bail!("cluster mode needs redis_url (CHAT_REDIS_URL)");
        }
        if self.stream_partitions == 0 {
            bail!("stream_partitions must be positive");
        }
        if self.max_connections == 0 || self.max_pending_connections == 0 {
            bail!("max_connections and max_pending_connections must be positive");
        }
        if self.threads == 0 {
            bail!("threads must be positive");
        }
        if let Some(key) = &self.admin_api_key
            && key.len() < 16
        {
            bail!("the server API key must be at least 16 bytes");
        }
        if let Some(admin) = self.admin_listen
            && admin == self.listen
            && admin.port() != 0
        {
            bail!("the server API must not share the public listen address");
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = std::env::temp_dir().join(format!("chatgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "messages_per_minute = 10\nmax_connections_per_user = 2\nthreads = 1\n",
        )
        .unwrap();
        let o = Overrides {
            config: Some(path),
            max_connections_per_user: Some(3),
            ..Default::default()
        };
        let c = Config::load(&o).unwrap();
        assert_eq!(c.messages_per_minute, 10);
        assert_eq!(c.max_connections_per_user, 3);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(25));
        assert_eq!(c.threads, 1);
        let zero = Overrides {
            threads: Some(0),
            ..Default::default()
        };
        assert!(Config::load(&zero).is_err(), "zero threads is refused");
    }

    #[test]
    fn dev_secret_is_refused_on_a_public_address() {
        let o = Overrides {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            ..Default::default()
        };
        assert!(Config::load(&o).is_err());
        let o = Overrides {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            token_secret: Some("a-long-production-secret".into()),
            ..Default::default()
        };
        assert!(Config::load(&o).is_err(), "shorter than 32 bytes");
        let o = Overrides {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            token_secret: Some("3f9a0c1e5b7d2468ace13579bdf02468".into()),
            ..Default::default()
        };
        assert!(Config::load(&o).is_ok());
        for weak in [
            "a".repeat(40),
            "12".repeat(20),
            "please-changeme-before-going-live-0123".to_owned(),
            DEV_SECRET.to_owned(),
        ] {
            let public = Overrides {
                listen: Some("0.0.0.0:8080".parse().unwrap()),
                token_secret: Some(weak.clone()),
                ..Default::default()
            };
            assert!(Config::load(&public).is_err(), "{weak:?} accepted");
            let local = Overrides {
                token_secret: Some(weak.clone()),
                ..Default::default()
            };
            assert!(Config::load(&local).is_ok(), "{weak:?} refused on loopback");
        }
    }

    #[test]
    fn a_namespace_that_would_be_a_hash_tag_is_refused() {
        for bad in ["x{}", "{chat}", "a}b", "", "two words"] {
            let o = Overrides {
                redis_namespace: Some(bad.into()),
                ..Default::default()
            };
            assert!(Config::load(&o).is_err(), "{bad:?} accepted");
        }
        let o = Overrides {
            redis_namespace: Some("chat-eu.1".into()),
            ..Default::default()
        };
        assert!(Config::load(&o).is_ok());
    }

    #[test]
    fn zero_rates_are_refused_at_start() {
        let zero = [
            Overrides {
                messages_per_minute: Some(0),
                ..Default::default()
            },
            Overrides {
                requests_per_second: Some(0),
                ..Default::default()
            },
            Overrides {
                request_burst: Some(0),
                ..Default::default()
            },
            Overrides {
                max_connections_per_user: Some(0),
                ..Default::default()
            },
        ];
        for o in zero {
            assert!(Config::load(&o).is_err(), "{o:?} accepted");
        }
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = std::env::temp_dir().join(format!("chatgate-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "mesages_per_minute = 10\n").unwrap();
        assert!(
            Config::load(&Overrides {
                config: Some(path),
                ..Default::default()
            })
            .is_err()
        );
    }
}
