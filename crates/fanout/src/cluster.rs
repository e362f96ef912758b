//! Cluster membership and cluster-wide per-user limits, in Redis.
//!
//! - Nodes: every node writes a heartbeat (`{ns}:nodes`, a sorted set
//!   scored by time) each second; a node is live while its heartbeat is
//!   younger than 5 s. Any node's `/health` can list the live nodes.
//! - Connections per user: `{ns}:{u:<id>}:conns` hashes node -> count.
//!   The acquire script sums the counts of live nodes only (a node killed
//!   with SIGKILL stops counting once its heartbeat is stale) and refuses
//!   past the cap.
//! - Message rate: a token bucket per user in `{ns}:{u:<id>}:rate`,
//!   refilled from Redis time, so all nodes share one bucket.
//!
//! When Redis is unreachable every call returns an error and the caller
//! falls back to its per-node limits (documented in the README): a user
//! may then hold the cap on each node, never more than that.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::{Client, KeysInterface, ListInterface, SortedSetsInterface};
use fred::types::Value;
use fred::types::scripts::Script;

use crate::FanoutError;

const ACQUIRE: &str = r#"
local live = {}
for i = 3, #ARGV do live[ARGV[i]] = true end
-- Count only live node instances; a dead instance's field is ignored
-- (and expires with the key), never deleted on a possibly stale view.
local total = 0
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  if live[h[i]] then total = total + tonumber(h[i + 1]) end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
"#;

const RELEASE: &str = r#"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"#;

/// Takes up to ARGV[2] whole tokens (at least one, or none and how long
/// until one is free). Returns { granted, wait ms }.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = cap / 60000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1]) or cap
local ts = tonumber(v[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local granted = math.min(tonumber(ARGV[2]), math.floor(tokens))
local wait = 0
if granted >= 1 then tokens = tokens - granted else granted = 0; wait = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
return { granted, wait }
"#;

/// How long a node's heartbeat counts as alive.
pub const NODE_TTL: Duration = Duration::from_secs(5);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn err(e: impl std::fmt::Display) -> FanoutError {
    FanoutError::Unavailable(e.to_string())
}

/// Cluster registry and limits for one node.
pub struct Cluster {
    client: Client,
    namespace: String,
    node_id: String,
    /// `node_id@start_ms`: a restarted node with the same id is a new
    /// instance, so counts left by the old one never come back to life.
    instance: String,
    refreshed: parking_lot::Mutex<std::time::Instant>,
    acquire: Script,
    release: Script,
    take: Script,
    live: parking_lot::Mutex<Vec<String>>,
}

impl Cluster {
    /// Uses `client` (shared with the fan-out's command connection).
    pub fn new(client: Client, namespace: &str, node_id: &str) -> Cluster {
        Cluster {
            client,
            namespace: namespace.to_owned(),
            node_id: node_id.to_owned(),
            instance: format!("{node_id}@{}", now_ms()),
            refreshed: parking_lot::Mutex::new(std::time::Instant::now()),
            acquire: Script::from_lua(ACQUIRE),
            release: Script::from_lua(RELEASE),
            take: Script::from_lua(TAKE),
            live: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// Where the nodes answer one presence question (`seq` unique on this
    /// node).
    pub fn presence_key(&self, seq: u64) -> String {
        format!("{}:presence:{}:{seq}", self.namespace, self.node_id)
    }

    /// One node's answer to a presence question: appended to its list,
    /// which expires soon (an answer nobody collects must not stay).
    pub async fn presence_reply(&self, key: &str, answer: String) -> Result<(), FanoutError> {
        self.client
            .rpush::<i64, _, _>(key, answer)
            .await
            .map_err(err)?;
        self.client
            .pexpire::<i64, _>(key, 10_000, None)
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Collects the answers to a presence question: returns once
    /// `expected` nodes answered or `wait` passed (a node that died since
    /// its last heartbeat never answers), with what arrived.
    pub async fn presence_collect(
        &self,
        key: &str,
        expected: usize,
        wait: Duration,
    ) -> Result<Vec<String>, FanoutError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let n: i64 = self.client.llen(key).await.map_err(err)?;
            if n as usize >= expected || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answers: Vec<String> = self.client.lrange(key, 0, -1).await.map_err(err)?;
        let _ = self.client.del::<i64, _>(key).await;
        Ok(answers)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.namespace)
    }

    /// Writes this node's heartbeat and refreshes the live-node list.
    /// Call about once a second.
    pub async fn heartbeat(&self) -> Result<Vec<String>, FanoutError> {
        let now = now_ms();
        let key = self.nodes_key();
        self.client
            .zadd::<Value, _, _>(
                &key,
                None,
                None,
                false,
                false,
                (now as f64, self.instance.as_str()),
            )
            .await
            .map_err(err)?;
        let stale = (now - 10 * NODE_TTL.as_millis() as i64) as f64;
        let _: Result<Value, _> = self.client.zremrangebyscore(&key, f64::MIN, stale).await;
        let since = (now - NODE_TTL.as_millis() as i64) as f64;
        let live: Vec<String> = self
            .client
            .zrangebyscore(&key, since, f64::MAX, false, None)
            .await
            .map_err(err)?;
        *self.live.lock() = live.clone();
        *self.refreshed.lock() = std::time::Instant::now();
        Ok(live)
    }

    /// Node instances (`id@start`) seen alive at the last heartbeat.
    pub fn live_nodes(&self) -> Vec<String> {
        self.live.lock().clone()
    }

    /// The live list, refreshed first when older than half a second (so
    /// a node that just joined is counted almost at once).
    async fn fresh_live(&self) -> Vec<String> {
        let stale = self.refreshed.lock().elapsed() > Duration::from_millis(500);
        if stale {
            let since = (now_ms() - NODE_TTL.as_millis() as i64) as f64;
            let r: Result<Vec<String>, _> = self
                .client
                .zrangebyscore(self.nodes_key(), since, f64::MAX, false, None)
                .await;
            if let Ok(live) = r {
                *self.live.lock() = live;
                *self.refreshed.lock() = std::time::Instant::now();
            }
        }
        self.live_nodes()
    }

    fn user_key(&self, user: &str, what: &str) -> String {
        format!("{}:{{u:{user}}}:{what}", self.namespace)
    }

    /// Claims a connection slot for `user` if the cluster-wide count of
    /// live nodes' connections is below `cap`.
    pub async fn acquire_connection(&self, user: &str, cap: u32) -> Result<bool, FanoutError> {
        let mut args: Vec<Value> = vec![self.instance.as_str().into(), i64::from(cap).into()];
        let mut live = self.fresh_live().await;
        if !live.contains(&self.instance) {
            live.push(self.instance.clone());
        }
        args.extend(live.into_iter().map(Value::from));
        let r: i64 = self
            .acquire
            .evalsha_with_reload(&self.client, vec![self.user_key(user, "conns")], args)
            .await
            .map_err(err)?;
        Ok(r == 1)
    }

    /// Returns a slot claimed by [`Cluster::acquire_connection`].
    pub async fn release_connection(&self, user: &str) -> Result<(), FanoutError> {
        let _: i64 = self
            .release
            .evalsha_with_reload(
                &self.client,
                vec![self.user_key(user, "conns")],
                vec![Value::from(self.instance.as_str())],
            )
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Takes one message token from the user's shared bucket; `Ok(None)`
    /// when allowed, `Ok(Some(wait))` when limited.
    pub async fn take_message(
        &self,
        user: &str,
        per_minute: u32,
    ) -> Result<Option<Duration>, FanoutError> {
        let (_, wait) = self.take_messages(user, per_minute, 1).await?;
        Ok(wait)
    }

    /// Takes up to `want` tokens at once from the user's shared bucket (a
    /// node's lease, spent locally): how many it got (at least one), or
    /// none and how long until one is free.
    pub async fn take_messages(
        &self,
        user: &str,
        per_minute: u32,
        want: u32,
    ) -> Result<(u32, Option<Duration>), FanoutError> {
        let reply: Vec<i64> = self
            .take
            .evalsha_with_reload(
                &self.client,
                vec![self.user_key(user, "rate")],
                vec![
                    Value::from(i64::from(per_minute)),
                    Value::from(i64::from(want.max(1))),
                ],
            )
            .await
            .map_err(err)?;
        let (granted, wait) = match reply.as_slice() {
            [g, w] => (*g, *w),
            _ => return Err(FanoutError::Unavailable("unexpected limit reply".into())),
        };
        let granted = u32::try_from(granted.max(0)).unwrap_or(0);
        let wait = (granted == 0).then(|| Duration::from_millis(wait.max(1) as u64));
        Ok((granted, wait))
    }
}
