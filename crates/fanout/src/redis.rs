//! Multi-node fan-out through Redis: sharded Pub/Sub for the live path,
//! a Redis Stream per room for recovery.
//!
//! # Keys
//! Every key of a room carries its partition's hash tag (a stable hash of
//! the room name, FNV-1a, the same on every node), so the publish
//! script's keys and the room's channel share a Redis Cluster slot and
//! rooms spread over the cluster's masters:
//!
//! | key | what |
//! |---|---|
//! | `{ns}:{p<N>}:room:<room>:state` | hash: `e` epoch, `s` last sequence number, `b`/`n` the log's bytes and entries, `x`/`p` when expiries were renewed; `r`/`c` written only so that a `WAIT` covers what came before (a retried publish, a fill's confirmation) |
//! | `{ns}:{p<N>}:room:<room>:log` | recovery stream, entry id `<seq>-1`, fields `f` (frame) and `o` (origin), capped and expiring |
//! | `{ns}:{p<N>}:room:<room>:published` | (sender, client message id) -> seq, so a retried publish whose first reply was lost is not published twice |
//! | `{ns}:{p<N>}:room:<room>:live` | the room's shard channel (Pub/Sub, holds nothing) |
//! | `{ns}:{p<N>}:control:{state,log,live}` | partition N's control messages, sequenced like a room |
//! | `{ns}:{p<N>}:incarnation` | written once; a new value means Redis lost the partition's data |
//!
//! # Publish
//! One Lua script, atomically: create the epoch if missing (Redis `TIME`
//! in ms — a Redis that lost its data starts a new epoch), `INCR` the
//! sequence, assemble the finished frame from the template
//! ([`chatgate_protocol::EventTemplate`]), append it to the room's
//! recovery stream and `SPUBLISH` it on the room's channel. A gap in a
//! sequence can therefore never exist, and an event is live only once it
//! is in the log. With `replicas` set, the script does not publish: the
//! publisher first waits (`WAIT`) until that many replicas hold the event,
//! then publishes it, so no node ever shows an event a failover can take
//! back (see [`RedisFanoutConfig::replicas`]).
//!
//! # Delivery
//! A node subscribes to the channels of the rooms its members are in and
//! to no others ([`crate::live`]): it receives, parses and delivers only
//! what its members need, and Redis writes each event once per interested
//! node. Pub/Sub keeps nothing for a subscriber that was away, so each
//! node numbers what it receives per room ([`crate::sequencer`]): a skip
//! is read from the room's log before anything after it is delivered, a
//! repeat is dropped, and after a reconnect every subscribed room's head
//! is compared with what was delivered. The node that published an event
//! runs its `OnSequenced` (which queues the sender's ack) right after
//! delivering it, so the ack neither overtakes earlier events nor trails
//! later ones.
//!
//! # Faults
//! Redis errors surface as [`FanoutError::Unavailable`] (a stored send is
//! then answered `not_delivered` and retried by its client with the same
//! id; stored-but-unpublished messages are published on the retry, and a
//! retry of an event whose live publish never happened publishes it).
//! A Redis that lost its data is noticed by the partitions' incarnations;
//! the node's members are then made to resume.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use fred::interfaces::ClusterInterface;
use fred::prelude::{
    Builder, Client, ClientLike, Config, HashesInterface, KeysInterface, PubsubInterface,
    ReconnectPolicy, ServerInterface, StreamsInterface,
};
use fred::types::Value;
use fred::types::scripts::Script;
use tokio::sync::oneshot;

use chatgate_protocol::{Codec, EventTemplate};

use crate::live::{Live, LiveConfig, Waiter, Waiters, channel_of};
use crate::{
    Fanout, FanoutError, LocalDelivery, OnSequenced, Position, Published, Replay, RoomEvent,
};

/// Settings for [`RedisStreamsFanout`].
#[derive(Debug, Clone)]
pub struct RedisFanoutConfig {
    /// `redis://host:port/db`, `rediss://` for TLS, or
    /// `redis-cluster://host:port?node=host:port` for a Redis Cluster.
    pub url: String,
    /// TLS settings for a `rediss://` URL (default: Mozilla's and the system's roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Key prefix, so several deployments (or tests) can share a Redis.
    /// Default `chat`.
    pub namespace: String,
    /// This node's id (unique in the cluster).
    pub node_id: String,
    /// Hash tags rooms are spread over (and control channels, one per
    /// tag). Default 16: enough to spread over a Redis Cluster's masters.
    pub partitions: u32,
    /// Events kept per room for resume. Default 10,000.
    pub max_log: u64,
    /// Bytes of events kept per room for resume. Default 8 MiB: 10,000
    /// events of the largest size would be ~400 MiB of Redis memory.
    pub max_log_bytes: u64,
    /// How long events stay replayable: a room's log and idempotency keys
    /// expire this long after its last event, and so does an epoch given
    /// to a room that never had one. Default 2 minutes.
    pub recovery_window: Duration,
    /// How long a room's epoch and counter outlive its last event.
    /// Default 24 h: quiet rooms keep their epoch, unused ones leave
    /// nothing in Redis.
    pub stream_idle_ttl: Duration,
    /// How long a publisher waits for its own node to deliver its event
    /// before it returns without it (the event is published either way;
    /// the node still queues the ack in its place when it gets there).
    /// Default 5 s.
    pub self_delivery_timeout: Duration,
    /// Replicas that must hold an event before it is published live and
    /// acknowledged (`WAIT`). 0 (default): the script publishes at once; a
    /// master that fails before its replica has the last events loses
    /// them, and its replica numbers new events with their numbers — set
    /// this to 1 when Redis has replicas, so a failover never takes back
    /// an event anyone has seen.
    pub replicas: u32,
    /// How long a publish waits for `replicas` (then it fails as an
    /// outage; the sender's retry publishes it). Default 1 s.
    pub replica_timeout: Duration,
    /// How long a gap in a room's numbers waits for the late event before
    /// it is read from the room's log. Default 50 ms.
    pub gap_patience: Duration,
}

impl RedisFanoutConfig {
    /// Defaults for `url` and `node_id`.
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> Self {
        RedisFanoutConfig {
            url: url.into(),
            tls: None,
            namespace: "chat".into(),
            node_id: node_id.into(),
            partitions: 16,
            max_log: 10_000,
            max_log_bytes: 8 << 20,
            recovery_window: Duration::from_secs(120),
            stream_idle_ttl: Duration::from_secs(86_400),
            self_delivery_timeout: Duration::from_secs(5),
            replicas: 0,
            replica_timeout: Duration::from_secs(1),
            gap_patience: Duration::from_millis(50),
        }
    }
}

/// The publish script. KEYS: state, log, published. ARGV: frame head,
/// mid, tail; instance, conn, pid; max log entries, recovery window ms,
/// idempotency key, idle ttl ms, max log bytes, publish now ('1') or
/// return the live message ('0'), now (the gateway's clock, ms: it only
/// decides when expiries are renewed), the room's channel.
/// Returns { epoch, seq, repeated, live message or '' }.
///
/// The channel shares the keys' slot but is not declared as a key: Redis
/// counts a declared key it does not hold against a script while the slot
/// migrates, and a channel is never held, so every publish to the
/// partition would be refused for the whole of a resharding move.
///
/// The room's counters live in one hash (`state`: `e` epoch, `s` last
/// number, `b` and `n` the log's bytes and entries, `x` when expiries were
/// last renewed, `p` whether the idempotency hash has one): a publish
/// reads it once and writes it once. Expiries are renewed a quarter of
/// the shorter window after the last renewal, each set a quarter longer
/// than its window, so everything still lives a full window after the
/// last event and a publish usually sets none.
const PUBLISH: &str = r#"
local function varint(v)
  if v < 251 then return string.char(v) end
  local marker, n
  if v <= 65535 then marker, n = 251, 2
  elseif v <= 4294967295 then marker, n = 252, 4
  else marker, n = 253, 8 end
  local t = { string.char(marker) }
  for i = 1, n do
    t[#t + 1] = string.char(v % 256)
    v = math.floor(v / 256)
  end
  return table.concat(t)
end
local st = redis.call('HMGET', KEYS[1], 'e', 's', 'b', 'n', 'x', 'p')
local epoch = st[1]
local seq = (tonumber(st[2]) or 0) + 1
-- The idempotency record is claimed for this number at once (one call
-- for a new event); a claim already there is a retry.
if ARGV[9] ~= '' and redis.call('HSETNX', KEYS[3], ARGV[9], seq) == 0 then
  -- A retry of an event whose first publish succeeded but whose reply
  -- was lost: answer with the original position. A publisher that waits
  -- for replicas may have failed before publishing it live: it gets the
  -- live message back to publish (nodes drop it if they had it). Without
  -- an epoch the record belongs to a stream that is gone: a new event.
  local prev = epoch and redis.call('HGET', KEYS[3], ARGV[9])
  if not prev then
    redis.call('HSET', KEYS[3], ARGV[9], seq)
  else
    local again = ''
    if ARGV[12] == '0' then
      -- The publisher WAITs before publishing this again, and a WAIT
      -- covers what its connection wrote: a write here puts the original
      -- event (earlier in the master's stream) under that WAIT too.
      redis.call('HSET', KEYS[1], 'r', prev)
      local e = redis.call('XRANGE', KEYS[2], prev .. '-1', prev .. '-1')
      if #e == 1 then
        local f, frame, origin = e[1][2], nil, nil
        for i = 1, #f, 2 do
          if f[i] == 'f' then frame = f[i + 1] elseif f[i] == 'o' then origin = f[i + 1] end
        end
        if frame and origin then again = 's' .. origin .. '\n' .. frame end
      end
    end
    return { epoch, tonumber(prev), 1, again }
  end
end
local now, window, idle = tonumber(ARGV[13]), tonumber(ARGV[8]), tonumber(ARGV[10])
local renew = math.max(1, math.floor(math.min(window, idle) / 4))
local x = tonumber(st[5])
local bytes, count, dedupe_ttl = tonumber(st[3]) or 0, tonumber(st[4]) or 0, st[6]
-- Past its expiry the log (and the idempotency hash) is gone.
if not x or now - x >= window + renew or now < x then
  bytes, count, dedupe_ttl = 0, 0, nil
end
if not epoch then
  local t = redis.call('TIME')
  epoch = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local frame = ARGV[1] .. varint(tonumber(epoch)) .. ARGV[2] .. varint(seq) .. ARGV[3]
local origin = epoch .. ' ' .. seq .. ' ' .. ARGV[5] .. ' ' .. ARGV[6] .. ' ' .. ARGV[4]
local id = seq .. '-1'
redis.call('XADD', KEYS[2], id, 'f', frame, 'o', origin)
bytes, count = bytes + #frame, count + 1
-- The room's log is bounded by count and by bytes: past either, the
-- oldest entries go in one batch down to 1/64 below both, so a few
-- large events cannot hold what thousands of small ones would, and a
-- full log pays for a trim once per ~1.5% of its length.
local maxlen, maxbytes = tonumber(ARGV[7]), tonumber(ARGV[11])
if bytes > maxbytes or count > maxlen then
  local lowbytes = maxbytes - math.floor(maxbytes / 64)
  local lowlen = maxlen - math.floor(maxlen / 64)
  local done = false
  while not done and (bytes > lowbytes or count > lowlen) do
    local batch = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 64)
    local ids = {}
    for _, e in ipairs(batch) do
      if e[1] == id or (bytes <= lowbytes and count <= lowlen) then
        done = true
        break
      end
      local f = e[2]
      for i = 1, #f, 2 do
        if f[i] == 'f' then bytes = bytes - #f[i + 1] end
      end
      count = count - 1
      ids[#ids + 1] = e[1]
    end
    if #ids == 0 then break end
    redis.call('XDEL', KEYS[2], unpack(ids))
  end
  if bytes < #frame or count < 1 then
    bytes, count = #frame, redis.call('XLEN', KEYS[2])
  end
end
-- A room's stream lives while it is used: idle for ARGV[10] ms, its
-- state expires, and the next publish starts a stream with a new epoch
-- (a resume from the old one is told so). Its log and idempotency keys
-- live the recovery window.
local due = not x or now - x >= renew or now < x
if due then
  x = now
  dedupe_ttl = redis.call('PEXPIRE', KEYS[3], window + renew)
elseif ARGV[9] ~= '' and dedupe_ttl ~= '1' then
  dedupe_ttl = redis.call('PEXPIRE', KEYS[3], window + renew)
end
redis.call('HSET', KEYS[1], 'e', epoch, 's', seq, 'b', bytes, 'n', count, 'x', x, 'p', tostring(dedupe_ttl or 0))
if due then
  redis.call('PEXPIRE', KEYS[1], idle + renew)
  redis.call('PEXPIRE', KEYS[2], window + renew)
end
local live = 's' .. origin .. '\n' .. frame
if ARGV[12] == '1' then
  redis.call('SPUBLISH', ARGV[14], live)
  live = ''
end
return { epoch, seq, 0, live }
"#;

/// A control message, sequenced like a room's events. KEYS: state, log.
/// ARGV: payload, instance, entries kept, ttl ms, publish now, channel
/// (not a key, as in [`PUBLISH`]). Returns the live message when not
/// published.
const CONTROL: &str = r#"
local st = redis.call('HMGET', KEYS[1], 'e', 's')
local epoch = st[1]
if not epoch then
  local t = redis.call('TIME')
  epoch = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local seq = (tonumber(st[2]) or 0) + 1
redis.call('HSET', KEYS[1], 'e', epoch, 's', seq)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local origin = epoch .. ' ' .. seq .. ' 0 0 ' .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-1', 'f', ARGV[1], 'o', origin)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local live = 's' .. origin .. '\n' .. ARGV[1]
if ARGV[5] == '1' then
  redis.call('SPUBLISH', ARGV[6], live)
  live = ''
end
return live
"#;

/// A room's position. A room without a stream gets its epoch here, so a
/// member that joined before the first event can resume into it; the
/// state expires after the recovery window unless events keep it (a
/// resume or join naming made-up rooms leaves nothing for long). Asking
/// does not extend it. KEYS: state. ARGV: ttl ms for a new epoch.
pub(crate) const POSITION: &str = r#"
local st = redis.call('HMGET', KEYS[1], 'e', 's')
local epoch = st[1]
if not epoch then
  local t = redis.call('TIME')
  epoch = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  if redis.call('HSETNX', KEYS[1], 'e', epoch) == 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
  end
  epoch = redis.call('HGET', KEYS[1], 'e')
end
return { epoch, tonumber(st[2] or '0') }
"#;

/// Control messages kept per partition for nodes that were away.
const CONTROL_LOG: i64 = 1_000;

/// Stable 64-bit FNV-1a (the partition of a room must not depend on the
/// process, as Rust's default hasher does).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Health counters for `/metrics` and `/health`.
#[derive(Debug, Default)]
pub struct FanoutStats {
    /// True while the live path's last Redis call succeeded.
    pub connected: AtomicBool,
    /// Live path errors (each followed by a retry).
    pub read_errors: AtomicU64,
    /// Times the Pub/Sub connection came back (and every subscribed room
    /// was checked against its head).
    pub reconnects: AtomicU64,
    /// How long the oldest gap in a room's numbers has been waiting, ms.
    pub lag_ms: AtomicI64,
    /// Events delivered to this node's members.
    pub delivered: AtomicU64,
    /// Publish script failures.
    pub publish_errors: AtomicU64,
    /// Times the partitions were found emptied (Redis lost its data).
    pub streams_lost: AtomicU64,
    /// Events this node could neither receive live nor read from a room's
    /// log (trimmed, expired, lost with Redis): its members see the gap in
    /// the numbers and reload.
    pub overruns: AtomicU64,
}

/// How long a waiter whose event this node has not delivered is kept.
const WAITER_TTL: Duration = Duration::from_secs(120);

/// Connections a publisher that waits for replicas spreads over: `WAIT`
/// holds its connection until the replicas answer (and the publishes
/// queued behind it on that connection wait too).
const REPLICATED_PUBLISHERS: usize = 8;

/// Publishes that ran their script on one connection to one master wait
/// for one shared `WAIT`: it covers every write the connection sent
/// before it, so whoever registered before it was sent is covered, and
/// replication waits are grouped instead of holding a connection each.
#[derive(Default)]
struct Barrier {
    /// Waiting publishes, and whether a `WAIT` is under way.
    state: parking_lot::Mutex<(Vec<Replicated>, bool)>,
}

/// Told whether the replicas hold a publish.
type Replicated = oneshot::Sender<Result<(), FanoutError>>;

/// Barriers by (publishing connection, master).
type Barriers = DashMap<(usize, String), Arc<Barrier>>;

/// The Redis [`Fanout`].
pub struct RedisStreamsFanout {
    config: RedisFanoutConfig,
    /// `node_id@start_ms`, written into every event this process publishes.
    instance: String,
    codec: Codec,
    client: Client,
    /// Connections for publishes that wait for replicas (empty otherwise).
    replicated: Vec<Client>,
    next_replicated: AtomicUsize,
    barriers: Arc<Barriers>,
    publish: Script,
    control: Script,
    position: Script,
    waiters: Arc<Waiters>,
    next_pid: AtomicU64,
    stats: Arc<FanoutStats>,
    live: Live,
    sink: Arc<dyn LocalDelivery>,
}

pub(crate) fn err(e: impl std::fmt::Display) -> FanoutError {
    FanoutError::Unavailable(e.to_string())
}

/// `url` as a client configuration. A `rediss://` URL gets TLS with
/// `tls` (default: Mozilla's and the system's roots, see [`chatgate_protocol::tls`]), and
/// nothing else: never plaintext.
pub fn redis_config(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Config, FanoutError> {
    let (wants_tls, plain) = chatgate_protocol::tls::redis_url(url).map_err(err)?;
    let mut config = Config::from_url(&plain).map_err(err)?;
    if !wants_tls {
        return Ok(config);
    }
    // This workspace's TLS settings, not fred's default (which reads the
    // host's CA store only, and slim images lack one).
    let tls = match tls {
        Some(tls) => tls.clone(),
        None => chatgate_protocol::tls::client_config(None).map_err(err)?,
    };
    config.tls = Some(fred::types::config::TlsConnector::from((*tls).clone()).into());
    Ok(config)
}

/// Starts `client`'s connection task (it reconnects by itself, first
/// connect included) and gives it a moment; a Redis down at start does
/// not hold start-up: commands wait for the connection up to their
/// timeout, and `/readyz` says not ready until the live path is caught up.
pub async fn start_connecting(client: &Client) {
    let _task = client.connect();
    let _ = tokio::time::timeout(START_PROBE, client.wait_for_connect()).await;
}

/// A fred client configured for this engine; `command_timeout` bounds
/// each command (`None`: fred's default).
pub fn redis_client(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    command_timeout: Option<Duration>,
) -> Result<Client, FanoutError> {
    client_with(url, tls, command_timeout, None)
}

/// [`redis_client`], and for a Pub/Sub client the depth of its
/// notification channels.
fn client_with(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    command_timeout: Option<Duration>,
    backlog: Option<usize>,
) -> Result<Client, FanoutError> {
    let config = redis_config(url, tls)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            // One: a command is never sent again behind the caller's back.
            // A publish whose reply was lost is retried by its client
            // through the store's record (sent again here, it could be
            // answered by a Redis back without its data, before the live
            // path has told members of the loss). On a Redis Cluster a
            // redirection (MOVED/ASK) counts as a second attempt: the
            // command fails once the client has re-read the slot map,
            // and its retry (a send's, by its client) finds the new
            // owner.
            c.max_command_attempts = 1;
        })
        // A Redis unreachable at the first connect is retried like a lost
        // connection (`fail_fast` would give up on it for good).
        .with_config(|c| c.fail_fast = false)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    if let Some(t) = command_timeout {
        builder.with_performance_config(|p| p.default_command_timeout = t);
    }
    if let Some(depth) = backlog {
        builder.with_performance_config(|p| p.broadcast_channel_capacity = depth);
    }
    builder.build().map_err(err)
}

/// The Pub/Sub client: like [`redis_client`], with room for a burst of
/// messages between its connection and the live path's loop (fred's
/// default of 32 would count as lagging at once under load, and a lagging
/// receiver makes the node re-read every room's head).
fn subscriber_client(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Client, FanoutError> {
    client_with(
        url,
        tls,
        Some(Duration::from_secs(2)),
        Some(SUBSCRIBER_BACKLOG),
    )
}

/// Live messages the Pub/Sub client holds for the loop. fred allocates
/// every notification channel of the client at this size up front (at
/// 65,536 that was ~60 MB a node), so it stays modest: at 100,000
/// messages a second it is 40 ms of the loop falling behind.
const SUBSCRIBER_BACKLOG: usize = 4096;

impl RedisStreamsFanout {
    /// Connects and starts this node's live path.
    pub async fn connect(
        config: RedisFanoutConfig,
        codec: Codec,
        sink: Arc<dyn LocalDelivery>,
    ) -> Result<RedisStreamsFanout, FanoutError> {
        let client = redis_client(
            &config.url,
            config.tls.as_ref(),
            Some(Duration::from_secs(2)),
        )?;
        start_connecting(&client).await;
        // Subscriptions get their own connections: a subscribed RESP2
        // connection carries nothing else.
        let subscriber = subscriber_client(&config.url, config.tls.as_ref())?;
        let replicated = if config.replicas > 0 {
            let mut clients = Vec::with_capacity(REPLICATED_PUBLISHERS);
            for _ in 0..REPLICATED_PUBLISHERS {
                let c = client.clone_new();
                let _task = c.connect();
                clients.push(c);
            }
            // Ready (on a cluster: with the slot map) before the first
            // send, within the same bound as the command connection.
            let _ = tokio::time::timeout(START_PROBE, async {
                for c in &clients {
                    let _ = c.wait_for_connect().await;
                }
            })
            .await;
            clients
        } else {
            Vec::new()
        };
        let waiters: Arc<Waiters> = Arc::new(Waiters::new());
        let stats = Arc::new(FanoutStats::default());
        // Events name their publishing process, not only its node: the
        // publish ids and connection ids they carry restart with the
        // process, and a restarted node reusing its id must not take a
        // predecessor's events for its own. No whitespace: the instance
        // ends a space-separated header.
        let node: String = config
            .node_id
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        let instance = format!("{node}@{}", now_ms());
        let position = Script::from_lua(POSITION);
        let live = Live::start(
            LiveConfig {
                namespace: config.namespace.clone(),
                partitions: config.partitions.max(1),
                instance: instance.clone(),
                gap_patience: config.gap_patience,
                head_delay: if config.replicas > 0 {
                    config.replica_timeout
                } else {
                    Duration::ZERO
                },
                epoch_ttl_ms: config.recovery_window.as_millis().max(1) as i64,
                replicas: config.replicas,
                replica_timeout: config.replica_timeout,
            },
            subscriber,
            client.clone(),
            position.clone(),
            codec,
            sink.clone(),
            waiters.clone(),
            stats.clone(),
        );
        // Control channels are listened to before the node serves, so a
        // control published from now on reaches it (bounded: a Redis down
        // at start must not hold start-up).
        let _ = tokio::time::timeout(START_PROBE, live.started()).await;
        Ok(RedisStreamsFanout {
            instance,
            publish: Script::from_lua(PUBLISH),
            control: Script::from_lua(CONTROL),
            position,
            config,
            codec,
            client,
            replicated,
            next_replicated: AtomicUsize::new(0),
            barriers: Arc::new(Barriers::new()),
            waiters,
            next_pid: AtomicU64::new(1),
            stats,
            live,
            sink,
        })
    }

    /// The command connection (node registry and limits share it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn partition(&self, room: &str) -> u32 {
        (fnv1a(room) % u64::from(self.config.partitions.max(1))) as u32
    }

    /// `{ns}:{p<N>}:room:<room>`: the prefix of every key of the room.
    fn room_base(&self, room: &str) -> String {
        format!(
            "{}:{{p{}}}:room:{room}",
            self.config.namespace,
            self.partition(room)
        )
    }

    fn room_key(&self, room: &str, what: &str) -> String {
        format!("{}:{what}", self.room_base(room))
    }

    /// The connection a publish runs on (and its index among the
    /// replicated ones): with replicas to wait for, one of the dedicated
    /// ones (a `WAIT` must follow the write on the same connection).
    fn publisher(&self) -> (usize, &Client) {
        if self.replicated.is_empty() {
            return (0, &self.client);
        }
        let i = self.next_replicated.fetch_add(1, Ordering::Relaxed) % self.replicated.len();
        (i, &self.replicated[i])
    }

    /// Waits until `replicas` replicas hold what replicated connection
    /// `index` wrote to the master of `key`'s slot: one `WAIT` for every
    /// publish that registered before it was sent (see [`Barrier`]).
    async fn replicated(&self, index: usize, key: &str) -> Result<(), FanoutError> {
        let Some(client) = self.replicated.get(index) else {
            return Ok(());
        };
        // On a cluster the WAIT must reach the master the script ran on,
        // over the same connection (it counts that connection's writes).
        let server = if client.is_clustered() {
            let slot = fred::util::redis_keyslot(key.as_bytes());
            Some(
                client
                    .cached_cluster_state()
                    .and_then(|state| state.get_server(slot).cloned())
                    .ok_or_else(|| {
                        FanoutError::Unavailable("no master known for the slot".into())
                    })?,
            )
        } else {
            None
        };
        let name = server.as_ref().map(ToString::to_string).unwrap_or_default();
        let barrier = self
            .barriers
            .entry((index, name))
            .or_default()
            .value()
            .clone();
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = barrier.state.lock();
            state.0.push(tx);
            !std::mem::replace(&mut state.1, true)
        };
        if start {
            let client = client.clone();
            let want = i64::from(self.config.replicas);
            let timeout = self.config.replica_timeout.as_millis().max(1) as i64;
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut state = barrier.state.lock();
                        if state.0.is_empty() {
                            state.1 = false;
                            return;
                        }
                        std::mem::take(&mut state.0)
                    };
                    let acked: Result<i64, _> = match &server {
                        Some(server) => {
                            client
                                .with_cluster_node(server.clone())
                                .wait(want, timeout)
                                .await
                        }
                        None => client.wait(want, timeout).await,
                    };
                    let result = match acked {
                        Ok(n) if n >= want => Ok(()),
                        Ok(n) => Err(FanoutError::Unavailable(format!(
                            "{n} of {want} replicas acknowledged in time"
                        ))),
                        Err(e) => Err(err(e)),
                    };
                    for tx in batch {
                        let _ = tx.send(result.clone());
                    }
                }
            });
        }
        rx.await
            .map_err(|_| FanoutError::Unavailable("replica wait abandoned".into()))?
    }

    /// Waits for the replicas (see [`RedisStreamsFanout::replicated`]),
    /// then publishes `live` on `channel`.
    async fn replicate_then_publish(
        &self,
        index: usize,
        key: &str,
        channel: String,
        live: Bytes,
    ) -> Result<(), FanoutError> {
        self.replicated(index, key).await?;
        let _: i64 = self
            .client
            .spublish(channel, Value::Bytes(live))
            .await
            .map_err(err)?;
        Ok(())
    }
}

impl Drop for RedisStreamsFanout {
    fn drop(&mut self) {
        quit_later(self.replicated.iter().cloned());
    }
}

/// Closes `clients` in the background (from a `Drop`: nothing to close
/// outside a runtime, where spawning would panic).
pub(crate) fn quit_later(clients: impl IntoIterator<Item = Client>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        for client in clients {
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::String(s) => s.parse().ok(),
        Value::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

pub(crate) fn as_bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b.clone()),
        Value::String(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

pub(crate) fn as_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => String::from_utf8(b.to_vec()).ok(),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

pub(crate) fn pair(v: Value) -> Result<(u64, u64), FanoutError> {
    match v {
        Value::Array(a) if a.len() == 2 => match (as_u64(&a[0]), as_u64(&a[1])) {
            (Some(e), Some(s)) => Ok((e, s)),
            _ => Err(FanoutError::Unavailable("unexpected script reply".into())),
        },
        other => Err(FanoutError::Unavailable(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}

/// Stream entries as (id, field -> value).
pub(crate) fn entries(v: &Value) -> Vec<(String, HashMap<String, Value>)> {
    let Value::Array(list) = v else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| match e {
            Value::Array(parts) if parts.len() == 2 => {
                let id = as_str(&parts[0])?;
                let mut fields = HashMap::new();
                match &parts[1] {
                    Value::Array(kv) => {
                        for chunk in kv.chunks(2) {
                            if let [k, v] = chunk {
                                fields.insert(as_str(k)?, v.clone());
                            }
                        }
                    }
                    Value::Map(m) => {
                        for (k, v) in m.clone().inner() {
                            fields.insert(k.as_str()?.to_string(), v.clone());
                        }
                    }
                    _ => return None,
                }
                Some((id, fields))
            }
            _ => None,
        })
        .collect()
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl Fanout for RedisStreamsFanout {
    fn engine(&self) -> &'static str {
        "redis-streams"
    }

    async fn publish(
        &self,
        room: &str,
        event: RoomEvent,
        exclude: Option<u64>,
        on_sequenced: Option<OnSequenced>,
    ) -> Result<Published, FanoutError> {
        // The idempotency key (sender, client message id) is unique across
        // the cluster; stored ids are not when nodes use separate stores.
        let dedupe = event.idempotency_key().unwrap_or_default();
        let frame = event.into_frame(room, 0, 0);
        let template = EventTemplate::of(&frame, self.codec.config().max_frame_bytes)
            .map_err(|e| FanoutError::Encode(e.to_string()))?
            .ok_or_else(|| FanoutError::Encode("not a room event".into()))?;
        let base = self.room_base(room);
        let channel = channel_of(&base);
        let keys = vec![
            format!("{base}:state"),
            format!("{base}:log"),
            format!("{base}:published"),
        ];
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(
            pid,
            Waiter {
                delivered: tx,
                on_sequenced,
                since: std::time::Instant::now(),
                room: room.to_owned(),
            },
        );
        let publish_now = self.config.replicas == 0;
        let args: Vec<Value> = vec![
            Value::Bytes(template.head.into()),
            Value::Bytes(template.mid.into()),
            Value::Bytes(template.tail.into()),
            self.instance.as_str().into(),
            (exclude.unwrap_or(0) as i64).into(),
            (pid as i64).into(),
            (self.config.max_log as i64).into(),
            (self.config.recovery_window.as_millis() as i64).into(),
            dedupe.into(),
            (self.config.stream_idle_ttl.as_millis().max(1) as i64).into(),
            (self.config.max_log_bytes as i64).into(),
            if publish_now { "1" } else { "0" }.into(),
            now_ms().into(),
            channel.as_str().into(),
        ];
        let (index, client) = self.publisher();
        let reply: Result<Value, _> = self.publish.evalsha_with_reload(client, keys, args).await;
        let mut rx = rx;
        let outcome = reply.map_err(err).and_then(published_reply);
        let outcome = match outcome {
            Ok((position, repeated, live)) if !live.is_empty() => self
                .replicate_then_publish(index, &base, channel, live)
                .await
                .map(|()| (position, repeated)),
            Ok((position, repeated, _)) => Ok((position, repeated)),
            Err(e) => Err(e),
        };
        let (position, repeated) = match outcome {
            Ok(v) => v,
            Err(e) => {
                // The script may have run with only its reply lost (Redis
                // went away right after it). Then the event is live, and
                // this node acknowledges it in its place once it delivers
                // it: give it a moment (Redis back from a restart) before
                // calling this a failure, or the sender would be told "not
                // delivered" of a message the room has, and its retry
                // answered only as a duplicate.
                if self.live.tracks(room) {
                    let wait = self.config.self_delivery_timeout.min(LOST_REPLY_WAIT);
                    if let Ok(Ok((frame, position))) = tokio::time::timeout(wait, &mut rx).await {
                        return Ok(Published { position, frame });
                    }
                }
                if self.waiters.remove(&pid).is_none() {
                    // Delivered meanwhile and acknowledged in its place:
                    // one reply per request, this is a success.
                    if let Ok((frame, position)) = rx.await {
                        return Ok(Published { position, frame });
                    }
                }
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        if repeated {
            // Published before; its delivery is already under way.
            if let Some((_, w)) = self.waiters.remove(&pid) {
                w.finish(position, true, Bytes::new());
            }
            return Ok(Published {
                position,
                frame: Bytes::new(),
            });
        }
        // This node delivers the event and runs `on_sequenced` in the
        // room's order (so the sender's ack keeps its place among the
        // room's events); if it will not deliver it (no member here, or it
        // started listening after the event), it acknowledges at once.
        self.live.published(&base, pid, position);
        let frame = match tokio::time::timeout(self.config.self_delivery_timeout, &mut rx).await {
            Ok(Ok((frame, _))) => frame,
            _ => {
                // The event is published; only this node is behind. The
                // ack stays with the waiter, for the node to queue in its
                // place when it gets there: queued now, it would overtake
                // the events not delivered yet.
                tracing::warn!(
                    room,
                    seq = position.seq,
                    "own event not delivered in time; it will be acknowledged in its place"
                );
                Bytes::new()
            }
        };
        Ok(Published { position, frame })
    }

    async fn publish_ephemeral(
        &self,
        room: &str,
        frame: Bytes,
        exclude: Option<u64>,
    ) -> Result<(), FanoutError> {
        // Typing is best effort: live only, no number, no log.
        let header = format!("e{} {}\n", exclude.unwrap_or(0), self.instance);
        let mut message = Vec::with_capacity(header.len() + frame.len());
        message.extend_from_slice(header.as_bytes());
        message.extend_from_slice(&frame);
        let _: i64 = self
            .client
            .spublish(self.room_key(room, "live"), Value::Bytes(message.into()))
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn forget_room(&self, room: &str) -> Result<(), FanoutError> {
        // The epoch and sequence stay: positions go on counting, and a
        // resume from before finds the log short (not recovered). The
        // log's counters go with it (the next publish renews expiries).
        self.client
            .del::<i64, _>(vec![
                self.room_key(room, "log"),
                self.room_key(room, "published"),
            ])
            .await
            .map_err(err)?;
        self.client
            .hdel::<i64, _, _>(self.room_key(room, "state"), vec!["b", "n", "x", "p"])
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn control(&self, key: &str, payload: Bytes) -> Result<(), FanoutError> {
        // Sequenced on the key's partition's control channel: every node
        // listens to all of them, in order with that partition's rooms
        // (one slot, one connection), and reads what it missed from the
        // control log.
        let base = crate::live::control_base(&self.config.namespace, self.partition(key));
        let channel = channel_of(&base);
        let publish_now = self.config.replicas == 0;
        let (index, client) = self.publisher();
        let live: Value = self
            .control
            .evalsha_with_reload(
                client,
                vec![format!("{base}:state"), format!("{base}:log")],
                vec![
                    Value::Bytes(payload),
                    self.instance.as_str().into(),
                    CONTROL_LOG.into(),
                    (self.config.stream_idle_ttl.as_millis().max(1) as i64).into(),
                    if publish_now { "1" } else { "0" }.into(),
                    channel.as_str().into(),
                ],
            )
            .await
            .map_err(err)?;
        match as_bytes(&live) {
            Some(live) if !live.is_empty() => {
                self.replicate_then_publish(index, &base, channel, live)
                    .await
            }
            _ => Ok(()),
        }
    }

    async fn position(&self, room: &str) -> Result<Position, FanoutError> {
        let base = self.room_base(room);
        // A room with members here is listened to from now on (the caller
        // has just added one): subscribed before the position is read, so
        // every event after it reaches them.
        if self.sink.has_members(room)
            && let Some(started) = self
                .live
                .track(room, base.clone(), self.config.self_delivery_timeout)
                .await?
        {
            return Ok(started);
        }
        let reply: Value = self
            .position
            .evalsha_with_reload(
                &self.client,
                vec![format!("{base}:state")],
                vec![Value::from(
                    self.config.recovery_window.as_millis().max(1) as i64
                )],
            )
            .await
            .map_err(err)?;
        let (epoch, seq) = pair(reply)?;
        Ok(Position { epoch, seq })
    }

    fn stats(&self) -> Option<Arc<FanoutStats>> {
        Some(self.stats.clone())
    }

    fn maintain(&self) {
        self.waiters.retain(|_, w| w.since.elapsed() < WAITER_TTL);
    }

    async fn replay(
        &self,
        room: &str,
        since: Position,
        limit: usize,
    ) -> Result<Replay, FanoutError> {
        let current = self.position(room).await?;
        if since.epoch != current.epoch
            || since.seq > current.seq
            || current.seq - since.seq > limit as u64
        {
            return Ok(Replay::NotRecoverable { current });
        }
        if since.seq == current.seq {
            return Ok(Replay::Events {
                frames: Vec::new(),
                position: current,
            });
        }
        let start = format!("{}-1", since.seq + 1);
        let reply: Value = self
            .client
            .xrange(
                self.room_key(room, "log"),
                start,
                "+",
                Some(self.config.max_log),
            )
            .await
            .map_err(err)?;
        let list = entries(&reply);
        let first_ok = list
            .first()
            .and_then(|(id, _)| id.split('-').next()?.parse::<u64>().ok())
            .is_some_and(|s| s == since.seq + 1);
        if !first_ok {
            return Ok(Replay::NotRecoverable { current });
        }
        let mut last = since.seq;
        let mut frames = Vec::with_capacity(list.len());
        for (id, fields) in &list {
            let Some(seq) = id.split('-').next().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if seq != last + 1 {
                return Ok(Replay::NotRecoverable { current });
            }
            let Some(frame) = fields.get("f").and_then(as_bytes) else {
                continue;
            };
            frames.push(self.codec.compress_frame(frame));
            last = seq;
        }
        // Short of the head (the read's COUNT, or a log trimmed under it):
        // the rest cannot be replayed, and saying "recovered" would leave
        // a silent gap.
        if last < current.seq {
            return Ok(Replay::NotRecoverable { current });
        }
        Ok(Replay::Events {
            frames,
            position: Position {
                epoch: current.epoch,
                seq: last,
            },
        })
    }
}

/// How long start-up waits for the control channels before leaving it to
/// the live path (Redis unreachable at start).
const START_PROBE: Duration = Duration::from_secs(2);

/// How long a publish whose reply was lost waits for this node to
/// deliver the event anyway (see `publish`).
const LOST_REPLY_WAIT: Duration = Duration::from_secs(2);

/// The publish script's reply: position, whether it was published before,
/// and the live message still to publish (empty when the script did).
fn published_reply(v: Value) -> Result<(Position, bool, Bytes), FanoutError> {
    match v {
        Value::Array(a) if a.len() == 4 => match (as_u64(&a[0]), as_u64(&a[1]), as_u64(&a[2])) {
            (Some(epoch), Some(seq), Some(r)) => Ok((
                Position { epoch, seq },
                r == 1,
                as_bytes(&a[3]).unwrap_or_default(),
            )),
            _ => Err(FanoutError::Unavailable("unexpected script reply".into())),
        },
        other => Err(FanoutError::Unavailable(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable() {
        // Fixed values: every node must agree, across builds.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        // Computed independently of this code (FNV-1a, 64-bit, offset
        // basis 0xcbf29ce484222325, prime 0x100000001b3).
        assert_eq!(fnv1a("general"), 0x9e27_5796_a0d9_a90b);
        assert_eq!(fnv1a("general") % 16, 11, "general's partition of 16");
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
