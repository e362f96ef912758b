//! Multi-node fan-out through Redis Streams.
//!
//! # Keys
//! Rooms are spread over `partitions` delivery streams by a stable hash
//! of the room name (FNV-1a, the same on every node). Every key of a room
//! carries its partition's hash tag, so the publish script's keys share a
//! Redis Cluster slot and partitions spread over the cluster:
//!
//! | key | what |
//! |---|---|
//! | `{ns}:{p<N>}:events` | delivery stream of partition N, capped by entries and by bytes |
//! | `{ns}:{p<N>}:size` | hash: `bytes` the delivery stream's entries hold (their fields), `len` its length as last seen |
//! | `{ns}:{p<N>}:trimmed` | id of the newest entry trimmed off the delivery stream |
//! | `{ns}:{p<N>}:room:<room>:epoch` | the room stream's epoch |
//! | `{ns}:{p<N>}:room:<room>:seq` | last sequence number |
//! | `{ns}:{p<N>}:room:<room>:log` | recovery stream, entry id `<seq>-1`, capped and expiring |
//! | `{ns}:{p<N>}:room:<room>:published` | (sender, client message id) -> seq, so a retried publish whose first reply was lost is not published twice |
//!
//! # Publish
//! One Lua script, atomically: create the epoch if missing (Redis `TIME`
//! in ms — a Redis that lost its data starts a new epoch), `INCR` the
//! sequence, assemble the finished frame from the template
//! ([`chatgate_protocol::EventTemplate`]), append it to the room's
//! recovery stream and to the partition's delivery stream. A gap in a
//! sequence can therefore never exist.
//!
//! # Delivery
//! Every node, the publisher included, delivers from its own blocking
//! `XREAD` over all partitions, on a dedicated connection (a blocked
//! connection cannot carry other commands); on a Redis Cluster, where one
//! read cannot span slots, one such reader per partition. Reading in stream order is
//! what keeps a room's events in sequence order on every node. The
//! reader also runs the publisher's `OnSequenced` (which queues the
//! sender's ack) right after delivering that event, so the ack neither
//! overtakes earlier events nor trails later ones; the publisher returns
//! once that happened.
//!
//! # Faults
//! Redis errors surface as [`FanoutError::Unavailable`] (a stored send is
//! then answered `not_delivered` and retried by its client with the same
//! id; stored-but-unpublished messages are published on the retry). The
//! reader reconnects by itself and continues from the last entry it
//! delivered; if the stream went backwards (Redis restarted without its
//! data) it starts over from the beginning of the new stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use fred::prelude::{
    Builder, Client, ClientLike, Config, KeysInterface, ReconnectPolicy, StreamsInterface,
};
use fred::types::Value;
use fred::types::scripts::Script;
use tokio::sync::oneshot;

use chatgate_protocol::{Codec, EventTemplate};

use crate::{
    Fanout, FanoutError, LocalDelivery, OnSequenced, Position, Published, Replay, RoomEvent,
};

/// Settings for [`RedisStreamsFanout`].
#[derive(Debug, Clone)]
pub struct RedisFanoutConfig {
    /// `redis://host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// TLS settings for a `rediss://` URL (default: Mozilla's and the system's roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Key prefix, so several deployments (or tests) can share a Redis.
    /// Default `chat`.
    pub namespace: String,
    /// This node's id (unique in the cluster).
    pub node_id: String,
    /// Delivery streams. Default 16: enough to spread over a Redis
    /// Cluster; every node reads all of them in one XREAD.
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
    /// Delivery stream cap per partition. Default 100,000 entries: far
    /// more than any node falls behind by before it counts as lagging.
    pub partition_maxlen: u64,
    /// Delivery stream cap per partition, in bytes of entry fields.
    /// Default 64 MiB (1 GiB over 16 partitions): at the largest event
    /// (~41 KB) the entry cap alone would let a partition hold ~4 GB. A
    /// reader that falls further behind than this loses entries; its
    /// members see the gap in sequence numbers and reload (counted in
    /// `FanoutStats::overruns`).
    pub partition_max_bytes: u64,
    /// How long a publisher waits for its own reader before it returns
    /// without it (the event is in Redis either way; the reader still
    /// queues the ack in its place when it gets there). Default 5 s.
    pub self_delivery_timeout: Duration,
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
            partition_maxlen: 100_000,
            partition_max_bytes: 64 << 20,
            self_delivery_timeout: Duration::from_secs(5),
        }
    }
}

/// Lua shared by every script that appends to a delivery stream: the
/// append, the byte count, and the trim that keeps the stream under both
/// caps. Trimming removes the oldest entries down to 1/64 below the caps
/// in one go, so a stream at its cap pays for a trim once per ~1.5% of
/// its size, not once per entry; the entry just added is never trimmed.
/// Every entry's size is counted the same way when added and when
/// trimmed (the lengths of its field names and values), and the stream's
/// length is kept beside it: entries added or removed by something else
/// (a node of an earlier version in a rolling upgrade, an operator's
/// XTRIM) show as a length that differs, and are counted at the average
/// entry size (exact again once they are trimmed or the stream empties).
/// No scan of the stream ever: every call costs the same.
const PARTITION_APPEND: &str = r#"
local function entry_size(fields)
  local size = 0
  for i = 1, #fields do size = size + #fields[i] end
  return size
end
local function partition_append(stream, sizekey, trimmedkey, maxlen, maxbytes, fields)
  local id = redis.call('XADD', stream, '*', unpack(fields))
  local size = entry_size(fields)
  local len = redis.call('XLEN', stream)
  local kept = redis.call('HMGET', sizekey, 'bytes', 'len')
  local bytes = (tonumber(kept[1]) or 0) + size
  local known = (tonumber(kept[2]) or 0) + 1
  if len == 1 then
    bytes = size
  elseif len ~= known then
    -- Entries added or removed by something else (a node of an earlier
    -- version, an operator's XTRIM): counted at the average size kept.
    local average = (known > 1) and ((bytes - size) / (known - 1)) or size
    bytes = math.max(size, math.floor(bytes + (len - known) * average))
  end
  if bytes > maxbytes or len > maxlen then
    local lowbytes = maxbytes - math.floor(maxbytes / 64)
    local lowlen = maxlen - math.floor(maxlen / 64)
    local trimmed
    local done = false
    while not done and (bytes > lowbytes or len > lowlen) do
      local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
      local ids = {}
      for _, e in ipairs(batch) do
        if e[1] == id or (bytes <= lowbytes and len <= lowlen) then
          done = true
          break
        end
        bytes = bytes - entry_size(e[2])
        len = len - 1
        ids[#ids + 1] = e[1]
      end
      if #ids == 0 then break end
      redis.call('XDEL', stream, unpack(ids))
      trimmed = ids[#ids]
    end
    if len == 1 or bytes < size then bytes = size end
    if trimmed then redis.call('SET', trimmedkey, trimmed) end
  end
  redis.call('HSET', sizekey, 'bytes', bytes, 'len', len)
  return id
end
"#;

/// Appends one entry to a delivery stream (typing, control messages):
/// KEYS stream, size, trimmed; ARGV maxlen, maxbytes, then field, value...
const APPEND: &str = r#"
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
return partition_append(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]), fields)
"#;

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
local epoch = redis.call('GET', KEYS[1])
if epoch and ARGV[11] ~= '' then
  -- A retry of an event whose first publish succeeded but whose reply
  -- was lost: answer with the original position, publish nothing.
  local prev = redis.call('HGET', KEYS[5], ARGV[11])
  if prev then return { epoch, tonumber(prev), 1 } end
end
if not epoch then
  local t = redis.call('TIME')
  epoch = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('SET', KEYS[1], epoch)
end
local seq = redis.call('INCR', KEYS[2])
-- A room's stream lives while it is used: idle for ARGV[12] ms, its
-- epoch and counter expire, and the next publish starts a stream with a
-- new epoch (a resume from the old one is told so).
redis.call('PEXPIRE', KEYS[1], ARGV[12])
redis.call('PEXPIRE', KEYS[2], ARGV[12])
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[11], seq)
  redis.call('PEXPIRE', KEYS[5], ARGV[10])
end
local frame = ARGV[1] .. varint(tonumber(epoch)) .. ARGV[2] .. varint(seq) .. ARGV[3]
redis.call('XADD', KEYS[3], seq .. '-1', 'f', frame)
-- The room's log is bounded by count and by bytes (KEYS[6] keeps its
-- size): the oldest entries go until both hold, so a few large events
-- cannot hold what thousands of small ones would.
local bytes = redis.call('INCRBY', KEYS[6], #frame)
local maxlen, maxbytes = tonumber(ARGV[8]), tonumber(ARGV[13])
while bytes > maxbytes or redis.call('XLEN', KEYS[3]) > maxlen do
  local oldest = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
  if #oldest == 0 then
    redis.call('SET', KEYS[6], 0)
    break
  end
  redis.call('XDEL', KEYS[3], oldest[1][1])
  bytes = redis.call('DECRBY', KEYS[6], #oldest[1][2][2])
end
redis.call('PEXPIRE', KEYS[3], ARGV[10])
redis.call('PEXPIRE', KEYS[6], ARGV[10])
partition_append(KEYS[4], KEYS[7], KEYS[8], tonumber(ARGV[9]), tonumber(ARGV[14]), {
  'r', ARGV[4], 'f', frame, 'n', ARGV[5], 'c', ARGV[6], 'p', ARGV[7], 'h', epoch, 'q', tostring(seq) })
return { epoch, seq, 0 }
"#;

/// A partition's incarnation: written once (first writer wins) and read
/// back. A different value than the one a reader remembers means the
/// partition's data was lost since it last looked.
const INCARNATION: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

/// A room's position. A room without a stream gets its epoch here, so a
/// member that joined before the first event can resume into it; the key
/// expires after the recovery window unless events keep it (a resume or
/// join naming made-up rooms leaves nothing for long). Asking does not
/// extend it.
const POSITION: &str = r#"
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  local t = redis.call('TIME')
  epoch = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('SET', KEYS[1], epoch, 'NX', 'PX', ARGV[1])
  epoch = redis.call('GET', KEYS[1])
end
local seq = redis.call('GET', KEYS[2]) or '0'
return { epoch, tonumber(seq) }
"#;

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
    /// True while the reader's last XREAD succeeded.
    pub connected: AtomicBool,
    /// Reader errors (each followed by a reconnect attempt).
    pub read_errors: AtomicU64,
    /// Times the reader recovered after errors.
    pub reconnects: AtomicU64,
    /// Age in ms of the last delivered entry when it was delivered.
    pub lag_ms: AtomicI64,
    /// Entries delivered from the streams.
    pub delivered: AtomicU64,
    /// Publish script failures.
    pub publish_errors: AtomicU64,
    /// Times the partitions were found emptied (Redis lost its data).
    pub streams_lost: AtomicU64,
    /// Times a delivery stream was found trimmed past what this node had
    /// read (it fell further behind than `partition_max_bytes`).
    pub overruns: AtomicU64,
}

/// A publish waiting for this node's reader to deliver its event.
struct Waiter {
    delivered: oneshot::Sender<(Bytes, Position)>,
    on_sequenced: Option<OnSequenced>,
    since: std::time::Instant,
}

/// How long a waiter whose event the reader has not delivered is kept
/// (the reader is behind or Redis lost the entry; in the second case the
/// node's members are made to resume and the sender's retry is answered
/// from the record).
const WAITER_TTL: Duration = Duration::from_secs(120);

type Waiters = DashMap<u64, Waiter>;

/// The Redis Streams [`Fanout`].
pub struct RedisStreamsFanout {
    config: RedisFanoutConfig,
    /// `node_id@start_ms`, written into every entry this process adds.
    instance: String,
    codec: Codec,
    client: Client,
    publish: Script,
    append: Script,
    position: Script,
    waiters: Arc<Waiters>,
    next_pid: AtomicU64,
    stats: Arc<FanoutStats>,
    /// One reader task over every partition, or one per partition on a
    /// Redis Cluster.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

fn err(e: impl std::fmt::Display) -> FanoutError {
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
/// timeout, and `/readyz` says not ready until the reader reads.
pub async fn start_connecting(client: &Client) {
    let _task = client.connect();
    let _ = tokio::time::timeout(START_PROBE, client.wait_for_connect()).await;
}

/// A fred client configured for this engine. `blocking` clients get no
/// command timeout (a BLOCK read is long by design).
pub fn redis_client(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    command_timeout: Option<Duration>,
) -> Result<Client, FanoutError> {
    let config = redis_config(url, tls)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            // One: a command is never sent again behind the caller's back.
            // The reader must see a lost connection (it checks what
            // survived before reading on: a Redis back without its data
            // must be told to members first), and a publish whose reply
            // was lost is retried by its client through the store's
            // record. On a Redis Cluster a MOVED/ASK during resharding or
            // failover therefore fails the command (for a slot being
            // moved, every command on it until the move ends); the send
            // is retried like any outage.
            c.max_command_attempts = 1;
        })
        // A Redis unreachable at the first connect is retried like a lost
        // connection (`fail_fast` would give up on it for good).
        .with_config(|c| c.fail_fast = false)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    if let Some(t) = command_timeout {
        builder.with_performance_config(|p| p.default_command_timeout = t);
    }
    builder.build().map_err(err)
}

impl RedisStreamsFanout {
    /// Connects and starts this node's reader.
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
        let reader_client = redis_client(&config.url, config.tls.as_ref(), None)?;
        let waiters: Arc<Waiters> = Arc::new(DashMap::new());
        let stats = Arc::new(FanoutStats::default());
        // Entries name their publishing process, not only its node: the
        // publish ids and connection ids they carry restart with the
        // process, and a restarted node reusing its id must not take a
        // predecessor's entries for its own.
        let instance = format!("{}@{}", config.node_id, now_ms());
        // One Redis: one blocking XREAD over every partition. A Redis
        // Cluster refuses a read over keys of several slots (CROSSSLOT),
        // and each partition is its own slot: a reader per partition, each
        // on its own connections (a blocked connection carries nothing
        // else). Order only matters within a partition, so nothing is
        // lost by reading them apart.
        let groups: Vec<Vec<u32>> = if reader_client.is_clustered() {
            (0..config.partitions).map(|p| vec![p]).collect()
        } else {
            vec![(0..config.partitions).collect()]
        };
        let mut readers = Vec::with_capacity(groups.len());
        let mut started = Vec::with_capacity(groups.len());
        for (i, partitions) in groups.into_iter().enumerate() {
            let client = if i == 0 {
                reader_client.clone()
            } else {
                reader_client.clone_new()
            };
            let ns = &config.namespace;
            let reader = Reader {
                client,
                keys: partitions.iter().map(|p| partition_key(ns, *p)).collect(),
                incarnation_keys: partitions
                    .iter()
                    .map(|p| format!("{ns}:{{p{p}}}:incarnation"))
                    .collect(),
                trimmed_keys: partitions
                    .iter()
                    .map(|p| partition_side_key(ns, *p, "trimmed"))
                    .collect(),
                incarnation: Script::from_lua(INCARNATION),
                checks: AtomicU64::new(0),
                instance: instance.clone(),
                codec,
                sink: sink.clone(),
                waiters: waiters.clone(),
                stats: stats.clone(),
            };
            let (probed, probe) = oneshot::channel::<()>();
            started.push(probe);
            readers.push(tokio::spawn(async move {
                start_connecting(&reader.client).await;
                // Bounded: the reader's connection has no command timeout
                // (its reads block by design), and a Redis unreachable at
                // start must not hold the node's start-up; the reader
                // starts over by itself.
                let start_ids = tokio::time::timeout(START_PROBE, reader.current_ids())
                    .await
                    .ok()
                    .flatten();
                let known = match tokio::time::timeout(START_PROBE, reader.incarnations()).await {
                    Ok(Ok(known)) => Some(known),
                    _ => None,
                };
                drop(probed);
                reader.run(start_ids, known).await;
            }));
        }
        // Every reader knows where it starts before the node serves: what
        // is published from now on reaches it.
        for probe in started {
            let _ = probe.await;
        }
        Ok(RedisStreamsFanout {
            instance,
            publish: Script::from_lua(format!("{PARTITION_APPEND}{PUBLISH}")),
            append: Script::from_lua(format!("{PARTITION_APPEND}{APPEND}")),
            position: Script::from_lua(POSITION),
            config,
            codec,
            client,
            waiters,
            next_pid: AtomicU64::new(1),
            stats,
            readers,
        })
    }

    /// The command connection (node registry and limits share it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn partition(&self, room: &str) -> u32 {
        (fnv1a(room) % u64::from(self.config.partitions.max(1))) as u32
    }

    /// The keys of partition `p`'s delivery stream, its size and its trim
    /// mark (one hash tag: one Redis Cluster slot).
    fn partition_keys(&self, p: u32) -> [String; 3] {
        let ns = &self.config.namespace;
        [
            partition_key(ns, p),
            partition_side_key(ns, p, "size"),
            partition_side_key(ns, p, "trimmed"),
        ]
    }

    /// Appends an entry outside the publish script (typing, control
    /// messages) to the delivery stream of `key`'s partition, under the
    /// same caps as published events.
    async fn append(&self, key: &str, fields: Vec<(&str, Value)>) -> Result<(), FanoutError> {
        let mut args: Vec<Value> = Vec::with_capacity(2 + 2 * fields.len());
        args.push((self.config.partition_maxlen as i64).into());
        args.push((self.config.partition_max_bytes as i64).into());
        for (name, value) in fields {
            args.push(name.into());
            args.push(value);
        }
        let keys = self.partition_keys(self.partition(key)).to_vec();
        self.append
            .evalsha_with_reload::<Value, _, _>(&self.client, keys, args)
            .await
            .map_err(err)?;
        Ok(())
    }

    fn room_key(&self, room: &str, what: &str) -> String {
        format!(
            "{}:{{p{}}}:room:{room}:{what}",
            self.config.namespace,
            self.partition(room)
        )
    }
}

impl Drop for RedisStreamsFanout {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

fn partition_key(namespace: &str, p: u32) -> String {
    format!("{namespace}:{{p{p}}}:events")
}

fn partition_side_key(namespace: &str, p: u32, what: &str) -> String {
    format!("{namespace}:{{p{p}}}:{what}")
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        Value::String(s) => s.parse().ok(),
        Value::Bytes(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn as_bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b.clone()),
        Value::String(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => String::from_utf8(b.to_vec()).ok(),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn pair(v: Value) -> Result<(u64, u64), FanoutError> {
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

fn triple(v: Value) -> Result<(u64, u64, bool), FanoutError> {
    match v {
        Value::Array(a) if a.len() == 3 => match (as_u64(&a[0]), as_u64(&a[1]), as_u64(&a[2])) {
            (Some(e), Some(s), Some(r)) => Ok((e, s, r == 1)),
            _ => Err(FanoutError::Unavailable("unexpected script reply".into())),
        },
        other => Err(FanoutError::Unavailable(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}

/// Stream entries as (id, field -> value).
fn entries(v: &Value) -> Vec<(String, HashMap<String, Value>)> {
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

fn now_ms() -> i64 {
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
        let [stream, size, trimmed] = self.partition_keys(self.partition(room));
        let keys = vec![
            self.room_key(room, "epoch"),
            self.room_key(room, "seq"),
            self.room_key(room, "log"),
            stream,
            self.room_key(room, "published"),
            self.room_key(room, "logbytes"),
            size,
            trimmed,
        ];
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(
            pid,
            Waiter {
                delivered: tx,
                on_sequenced,
                since: std::time::Instant::now(),
            },
        );
        let args: Vec<Value> = vec![
            Value::Bytes(template.head.into()),
            Value::Bytes(template.mid.into()),
            Value::Bytes(template.tail.into()),
            room.into(),
            self.instance.as_str().into(),
            (exclude.unwrap_or(0) as i64).into(),
            (pid as i64).into(),
            (self.config.max_log as i64).into(),
            (self.config.partition_maxlen as i64).into(),
            (self.config.recovery_window.as_millis() as i64).into(),
            dedupe.into(),
            (self.config.stream_idle_ttl.as_millis().max(1) as i64).into(),
            (self.config.max_log_bytes as i64).into(),
            (self.config.partition_max_bytes as i64).into(),
        ];
        let reply: Result<Value, _> = self
            .publish
            .evalsha_with_reload(&self.client, keys, args)
            .await;
        let mut rx = rx;
        let (epoch, seq, repeated) = match reply.map_err(err).and_then(triple) {
            Ok(v) => v,
            Err(e) => {
                // The script may have run with only its reply lost (Redis
                // went away right after it). Then the entry is in the
                // stream, and this node's reader acknowledges it in its
                // place once it reads it: give the reader a moment (Redis
                // back from a restart) before calling this a failure, or
                // the sender would be told "not delivered" of a message
                // the room has, and its retry answered only as a duplicate.
                let wait = self.config.self_delivery_timeout.min(LOST_REPLY_WAIT);
                if let Ok(Ok((frame, position))) = tokio::time::timeout(wait, &mut rx).await {
                    return Ok(Published { position, frame });
                }
                if self.waiters.remove(&pid).is_none() {
                    // The script ran and only its reply was lost: this
                    // node's reader has delivered the event and queued
                    // the ack. One reply per request: this is a success.
                    if let Ok((frame, position)) = rx.await {
                        return Ok(Published { position, frame });
                    }
                }
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let position = Position { epoch, seq };
        if repeated {
            // Published before; its delivery is already in the stream.
            if let Some((_, w)) = self.waiters.remove(&pid)
                && let Some(ack) = w.on_sequenced
            {
                ack(position, true);
            }
            return Ok(Published {
                position,
                frame: Bytes::new(),
            });
        }
        // This node's reader delivers the event and runs `on_sequenced`
        // in stream order (so the sender's ack keeps its place among the
        // room's events); wait for that before returning.
        let frame = match tokio::time::timeout(self.config.self_delivery_timeout, &mut rx).await {
            Ok(Ok((frame, _))) => frame,
            _ => {
                // The event is published; only this node's reader is
                // behind. The ack stays with the waiter, for the reader to
                // queue in its place when it gets there: queued now, it
                // would overtake the events the reader has not delivered.
                tracing::warn!(
                    room,
                    seq,
                    "own event not read back in time; the reader will acknowledge it"
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
        // Typing is best effort: it rides the delivery stream (so other
        // nodes see it) but takes no sequence and no log entry.
        let fields: Vec<(&str, Value)> = vec![
            ("r", room.into()),
            ("f", Value::Bytes(frame)),
            ("n", self.instance.as_str().into()),
            ("c", (exclude.unwrap_or(0) as i64).into()),
            ("e", 1.into()),
        ];
        self.append(room, fields).await
    }

    async fn forget_room(&self, room: &str) -> Result<(), FanoutError> {
        // The epoch and sequence stay: positions go on counting, and a
        // resume from before finds the log short (not recovered).
        self.client
            .del::<i64, _>(vec![
                self.room_key(room, "log"),
                self.room_key(room, "published"),
                self.room_key(room, "logbytes"),
            ])
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn control(&self, key: &str, payload: Bytes) -> Result<(), FanoutError> {
        // Rides the key's delivery stream: every node reads it in order
        // with that stream's events, and a lost stream is noticed for it
        // as for them (incarnations).
        let fields: Vec<(&str, Value)> = vec![
            ("x", Value::Bytes(payload)),
            ("n", self.instance.as_str().into()),
        ];
        self.append(key, fields).await
    }

    async fn position(&self, room: &str) -> Result<Position, FanoutError> {
        let keys = vec![self.room_key(room, "epoch"), self.room_key(room, "seq")];
        let reply: Value = self
            .position
            .evalsha_with_reload(
                &self.client,
                keys,
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

/// How long start-up asks Redis for the partitions' positions before
/// leaving it to the reader (Redis unreachable at start).
const START_PROBE: Duration = Duration::from_secs(2);

/// How long a publish whose reply was lost waits for this node's reader
/// to find the event anyway (see `publish`).
const LOST_REPLY_WAIT: Duration = Duration::from_secs(2);

/// How often a reader that never lost its connection checks that the
/// partitions were not emptied under it (FLUSHALL, a failover to an
/// empty replica).
const INCARNATION_CHECK: Duration = Duration::from_secs(5);

/// This node's reader of every partition stream.
struct Reader {
    client: Client,
    keys: Vec<String>,
    incarnation_keys: Vec<String>,
    /// Per partition: the newest entry trimmed off (see `check_overruns`).
    trimmed_keys: Vec<String>,
    incarnation: Script,
    /// Incarnation checks made; with the time, makes every candidate
    /// value new (a partition recreated must never get its old value).
    checks: AtomicU64,
    /// This process's `node_id@start_ms` (see `RedisStreamsFanout`).
    instance: String,
    codec: Codec,
    sink: Arc<dyn LocalDelivery>,
    waiters: Arc<Waiters>,
    stats: Arc<FanoutStats>,
}

impl Reader {
    /// The last id of every partition now: a new node starts with what is
    /// published after it started.
    /// `None` while Redis cannot be reached: the reader must not guess
    /// (reading from `0-0` would redeliver every retained entry).
    async fn current_ids(&self) -> Option<Vec<String>> {
        let mut ids = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            let last: Value = self.client.xrevrange(key, "+", "-", Some(1)).await.ok()?;
            let id = entries(&last).into_iter().next().map(|(id, _)| id);
            ids.push(id.unwrap_or_else(|| "0-0".into()));
        }
        Some(ids)
    }

    /// Every partition's incarnation (see [`INCARNATION`]).
    async fn incarnations(&self) -> Result<Vec<String>, FanoutError> {
        let check = self.checks.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}#{check}@{}", self.instance, now_ms());
        let mut out = Vec::with_capacity(self.incarnation_keys.len());
        for key in &self.incarnation_keys {
            let v: Value = self
                .incarnation
                .evalsha_with_reload(
                    &self.client,
                    vec![key.clone()],
                    vec![Value::from(token.as_str())],
                )
                .await
                .map_err(err)?;
            out.push(as_str(&v).unwrap_or_default());
        }
        Ok(out)
    }

    /// Compares the partitions' incarnations with the remembered ones. A
    /// partition whose data was lost is read again from its start, and the
    /// node's members are made to resume before anything of the new
    /// streams reaches them (they may have missed events of the old ones).
    /// `Err` while Redis cannot be reached.
    async fn check_incarnations(
        &self,
        ids: &mut [String],
        known: &mut Option<Vec<String>>,
    ) -> Result<(), FanoutError> {
        let now = self.incarnations().await?;
        let mut lost = false;
        if let Some(before) = known.as_ref() {
            for (i, (was, is)) in before.iter().zip(&now).enumerate() {
                if was != is {
                    lost = true;
                    ids[i] = "0-0".into();
                }
            }
        }
        *known = Some(now);
        if lost {
            self.stats.streams_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("Redis lost the room streams (restarted without its data?)");
            self.sink.streams_lost();
        }
        self.check_overruns(ids).await
    }

    /// Counts partitions trimmed past the last entry this node read: it
    /// fell further behind than the streams' caps, and entries it never
    /// read are gone. Its members notice the gap in sequence numbers and
    /// reload those rooms (PROTOCOL.md §9.5); this makes it visible to the
    /// operator (`chat_fanout_overruns`).
    async fn check_overruns(&self, ids: &[String]) -> Result<(), FanoutError> {
        for (key, read) in self.trimmed_keys.iter().zip(ids) {
            let trimmed: Option<String> = self.client.get(key).await.map_err(err)?;
            if let Some(trimmed) = trimmed
                && read != "0-0"
                && stream_id(&trimmed) > stream_id(read)
            {
                self.stats.overruns.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    stream = key,
                    read,
                    trimmed,
                    "this node fell behind the delivery stream's cap; entries were trimmed unread"
                );
            }
        }
        Ok(())
    }

    async fn run(self, start: Option<Vec<String>>, mut known: Option<Vec<String>>) {
        let mut failing = start.is_none();
        let mut ids = start.unwrap_or_default();
        let mut backoff = Duration::from_millis(50);
        let mut checked = tokio::time::Instant::now();
        loop {
            if ids.is_empty() {
                // Started while Redis was unreachable: begin with what is
                // published from now on, as a node that started normally.
                match self.current_ids().await {
                    Some(now) => ids = now,
                    None => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            if failing || checked.elapsed() >= INCARNATION_CHECK {
                // Back from an outage (or due): see what survived before
                // reading on, so nothing of a new stream is delivered to
                // members who were not told of the loss.
                if let Err(e) = self.check_incarnations(&mut ids, &mut known).await {
                    tracing::debug!(error = %e, "incarnation check failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    failing = true;
                    continue;
                }
                checked = tokio::time::Instant::now();
                if failing {
                    failing = false;
                    backoff = Duration::from_millis(50);
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("fan-out reader reconnected");
                }
            }
            let reply: Result<Value, _> = self
                .client
                .xread(Some(1000), Some(1000), self.keys.clone(), ids.clone())
                .await;
            match reply {
                Ok(v) => {
                    self.stats.connected.store(true, Ordering::Relaxed);
                    self.deliver(v, &mut ids);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "fan-out reader lost Redis; retrying");
                    }
                    failing = true;
                    self.stats.connected.store(false, Ordering::Relaxed);
                    self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn deliver(&self, reply: Value, ids: &mut [String]) {
        // XREAD: [[key, [[id, [f, v, ...]], ...]], ...] (or a map in RESP3).
        let streams: Vec<(String, Value)> = match reply {
            Value::Array(list) => list
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => {
                        let entries = kv.pop()?;
                        Some((as_str(&kv[0])?, entries))
                    }
                    _ => None,
                })
                .collect(),
            Value::Map(m) => m
                .inner()
                .into_iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v)))
                .collect(),
            _ => Vec::new(),
        };
        for (key, list) in streams {
            let Some(i) = self.keys.iter().position(|k| *k == key) else {
                continue;
            };
            for (id, fields) in entries(&list) {
                ids[i] = id.clone();
                if let Some(payload) = fields.get("x").and_then(as_bytes) {
                    self.sink.control(&payload);
                    continue;
                }
                let (Some(room), Some(frame)) = (
                    fields.get("r").and_then(as_str),
                    fields.get("f").and_then(as_bytes),
                ) else {
                    continue;
                };
                let node = fields.get("n").and_then(as_str).unwrap_or_default();
                let conn = fields.get("c").and_then(as_u64).unwrap_or(0);
                let ephemeral = fields.contains_key("e");
                let mine = node == self.instance;
                let exclude = if mine && conn != 0 { Some(conn) } else { None };
                let frame = if ephemeral {
                    frame
                } else {
                    self.codec.compress_frame(frame)
                };
                self.sink.deliver(&room, &frame, exclude, ephemeral);
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                let (ms, _) = stream_id(&id);
                self.stats
                    .lag_ms
                    .store(now_ms() - ms as i64, Ordering::Relaxed);
                if mine
                    && let Some(pid) = fields.get("p").and_then(as_u64)
                    && let Some((_, w)) = self.waiters.remove(&pid)
                    && let (Some(epoch), Some(seq)) = (
                        fields.get("h").and_then(as_u64),
                        fields.get("q").and_then(as_u64),
                    )
                {
                    let position = Position { epoch, seq };
                    if let Some(ack) = w.on_sequenced {
                        ack(position, false);
                    }
                    let _ = w.delivered.send((frame, position));
                }
            }
        }
    }
}

fn stream_id(id: &str) -> (u64, u64) {
    let mut parts = id.split('-');
    let ms = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let seq = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (ms, seq)
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

    #[test]
    fn stream_ids_order_numerically() {
        assert!(stream_id("10-0") > stream_id("9-5"));
        assert!(stream_id("1795000000000-2") > stream_id("1795000000000-1"));
    }
}
