//! Per-user limits: the connection cap and the message rate limit (a
//! token bucket, so the 61st message within a minute is refused while a
//! steady 1/s never is).
//!
//! On one node the state lives here. In a cluster the authoritative
//! counts live in Redis ([`Cluster`]), shared by every node; if Redis
//! cannot be reached the node falls back to its own counts, so limits
//! degrade to per-node rather than disappearing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use chatgate_fanout::cluster::Cluster;

struct UserState {
    connections: u32,
    tokens: f64,
    refilled: Instant,
    /// Tokens this node took from the user's shared bucket and has not
    /// spent yet, and when (a lease expires unspent after [`LEASE_TTL`]).
    leased: u32,
    leased_at: Instant,
}

/// How long a node keeps tokens it took from a user's shared bucket. The
/// tokens are gone from the bucket when taken, so a lease never lets a
/// user past the cap; unspent ones are simply lost.
const LEASE_TTL: Duration = Duration::from_secs(2);

/// Registry of active users.
pub struct Users {
    users: DashMap<Arc<str>, UserState>,
    max_connections: u32,
    per_minute: f64,
    cluster: Option<Arc<Cluster>>,
}

/// A claimed connection slot; give it back with [`Users::disconnect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Also counted in the cluster (Redis) and to be released there.
    pub in_cluster: bool,
}

impl Users {
    /// `max_connections` per user, `per_minute` messages per user.
    pub fn new(max_connections: u32, per_minute: u32) -> Self {
        Users {
            users: DashMap::new(),
            max_connections,
            per_minute: per_minute as f64,
            cluster: None,
        }
    }

    /// Shares the limits with the cluster through Redis.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Claims a connection slot for `user`, cluster-wide when clustered;
    /// `None` at the cap. Cancel-safe: dropped while Redis answers, it
    /// gives back the local count and whatever Redis granted.
    pub async fn connect(&self, user: &Arc<str>) -> Option<Slot> {
        if !self.connect_local(user) {
            return None;
        }
        let Some(cluster) = &self.cluster else {
            return Some(Slot { in_cluster: false });
        };
        let acquire = {
            let (cluster, user, cap) = (cluster.clone(), user.clone(), self.max_connections);
            tokio::spawn(async move { cluster.acquire_connection(&user, cap).await })
        };
        let mut claim = Claim {
            users: self,
            user: user.clone(),
            acquire: Some(acquire),
            kept: false,
        };
        let answer = match claim.acquire.as_mut() {
            Some(task) => task.await,
            None => return None,
        };
        claim.acquire = None;
        match answer {
            Ok(Ok(true)) => {
                claim.keep();
                Some(Slot { in_cluster: true })
            }
            Ok(Ok(false)) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster connection count unavailable; per-node cap only");
                claim.keep();
                Some(Slot { in_cluster: false })
            }
            Err(e) => {
                tracing::error!(error = %e, "cluster connection count task failed");
                None
            }
        }
    }

    /// Releases a slot from [`Users::connect`].
    pub fn disconnect(&self, user: &Arc<str>, slot: Slot) {
        self.disconnect_local(user);
        if let (true, Some(cluster)) = (slot.in_cluster, &self.cluster) {
            let cluster = cluster.clone();
            let user = user.clone();
            tokio::spawn(async move {
                if let Err(e) = cluster.release_connection(&user).await {
                    tracing::warn!(error = %e, "could not release a cluster connection slot");
                }
            });
        }
    }

    /// Takes one message token (cluster-wide when clustered). In a
    /// cluster a node takes a few tokens at once from the user's shared
    /// bucket and spends them here ([`Users::lease_size`]): one Redis call
    /// per few sends, and never more than the cap, since what a node
    /// holds is already gone from the bucket.
    pub async fn take_message(&self, user: &str) -> Result<(), Duration> {
        if let Some(cluster) = &self.cluster {
            if self.spend_lease(user) {
                return Ok(());
            }
            let want = self.lease_size();
            match cluster
                .take_messages(user, self.per_minute as u32, want)
                .await
            {
                Ok((granted, _)) if granted > 0 => {
                    self.keep_lease(user, granted - 1);
                    return Ok(());
                }
                Ok((_, wait)) => return Err(wait.unwrap_or(Duration::from_millis(1))),
                Err(e) => {
                    tracing::debug!(error = %e, "cluster rate limit unavailable; per-node bucket")
                }
            }
        }
        self.take_message_local(user)
    }

    /// Tokens taken from the shared bucket at once: a sixteenth of a
    /// minute's allowance (3 at the default 60), at most 256.
    fn lease_size(&self) -> u32 {
        ((self.per_minute / 16.0) as u32).clamp(1, 256)
    }

    fn spend_lease(&self, user: &str) -> bool {
        let Some(mut s) = self.users.get_mut(user) else {
            return false;
        };
        if s.leased > 0 && s.leased_at.elapsed() < LEASE_TTL {
            s.leased -= 1;
            return true;
        }
        s.leased = 0;
        false
    }

    fn keep_lease(&self, user: &str, tokens: u32) {
        if let Some(mut s) = self.users.get_mut(user) {
            s.leased = tokens;
            s.leased_at = Instant::now();
        }
    }

    /// Counts a new connection for `user` on this node; `false` at the cap.
    pub fn connect_local(&self, user: &Arc<str>) -> bool {
        let mut e = self.users.entry(user.clone()).or_insert_with(|| UserState {
            connections: 0,
            tokens: self.per_minute,
            refilled: Instant::now(),
            leased: 0,
            leased_at: Instant::now(),
        });
        if e.connections >= self.max_connections {
            return false;
        }
        e.connections += 1;
        true
    }

    /// Releases a connection slot. The entry is kept while its bucket is
    /// not full, so reconnecting cannot reset a rate limit.
    pub fn disconnect_local(&self, user: &str) {
        if let Some(mut e) = self.users.get_mut(user) {
            e.connections = e.connections.saturating_sub(1);
        }
        let per_minute = self.per_minute;
        self.users.remove_if(user, |_, s| {
            s.connections == 0 && tokens_now(s, per_minute) >= per_minute
        });
    }

    /// Takes one token from this node's bucket; `Err(wait)` says when
    /// one will be free.
    pub fn take_message_local(&self, user: &str) -> Result<(), Duration> {
        let Some(mut s) = self.users.get_mut(user) else {
            return Ok(());
        };
        let tokens = refill(&mut s, self.per_minute);
        if tokens >= 1.0 {
            s.tokens -= 1.0;
            Ok(())
        } else {
            let per_sec = self.per_minute / 60.0;
            Err(Duration::from_secs_f64(
                ((1.0 - tokens) / per_sec).max(0.001),
            ))
        }
    }

    /// Drops idle users whose buckets are full again (periodic sweep).
    pub fn sweep(&self) {
        let per_minute = self.per_minute;
        self.users
            .retain(|_, s| s.connections > 0 || tokens_now(s, per_minute) < per_minute);
    }

    /// Users with state on this node.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when no user has state on this node.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// A local connection count taken while the cluster's answer is awaited.
/// Dropped without [`Claim::keep`] (refused, failed, or the waiting
/// future cancelled) it gives the count back, and releases the cluster
/// slot if Redis granted one after all.
struct Claim<'a> {
    users: &'a Users,
    user: Arc<str>,
    acquire: Option<tokio::task::JoinHandle<Result<bool, chatgate_fanout::FanoutError>>>,
    kept: bool,
}

impl Claim<'_> {
    fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.users.disconnect_local(&self.user);
        if let (Some(task), Some(cluster)) = (self.acquire.take(), &self.users.cluster) {
            let (cluster, user) = (cluster.clone(), self.user.clone());
            tokio::spawn(async move {
                if let Ok(Ok(true)) = task.await
                    && let Err(e) = cluster.release_connection(&user).await
                {
                    tracing::warn!(error = %e, "could not release a cluster connection slot");
                }
            });
        }
    }
}

fn tokens_now(s: &UserState, per_minute: f64) -> f64 {
    let elapsed = s.refilled.elapsed().as_secs_f64();
    (s.tokens + elapsed * per_minute / 60.0).min(per_minute)
}

fn refill(s: &mut UserState, per_minute: f64) -> f64 {
    let now = Instant::now();
    let elapsed = now.duration_since(s.refilled).as_secs_f64();
    s.tokens = (s.tokens + elapsed * per_minute / 60.0).min(per_minute);
    s.refilled = now;
    s.tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Identify abandoned while Redis answers (its connection closed,
    /// or it timed out) must not keep the user's connection counted.
    #[tokio::test]
    async fn a_connect_cancelled_while_redis_answers_counts_nothing() {
        let url = std::env::var("CHAT_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        let client = chatgate_fanout::redis::redis_client(&url, None, Some(Duration::from_secs(2)))
            .expect("redis client");
        use fred::prelude::ClientLike;
        client.init().await.expect("the test Redis must run");
        let ns = format!("t{:x}", rand::random::<u64>());
        let cluster = Arc::new(Cluster::new(client, &ns, "n"));
        cluster.heartbeat().await.expect("heartbeat");
        let u = Users::new(2, 60).with_cluster(cluster.clone());
        let a: Arc<str> = Arc::from("a");
        for i in 0..20 {
            // Polled once: counted locally, then dropped mid-wait.
            let mut connecting = Box::pin(u.connect(&a));
            let polled = futures_util::poll!(connecting.as_mut());
            assert!(
                polled.is_pending(),
                "after {i} cancelled connects: {polled:?} (slots leaked)"
            );
            drop(connecting);
        }
        // Both slots are still free, locally and in the cluster.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (one, two) = (u.connect(&a).await, u.connect(&a).await);
            if one == Some(Slot { in_cluster: true }) && two == Some(Slot { in_cluster: true }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "slots leaked: {one:?} {two:?} (local count {:?})",
                u.users.get("a").map(|s| s.connections)
            );
            for s in [one, two].into_iter().flatten() {
                u.disconnect(&a, s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(u.connect(&a).await, None, "and the cap still holds");
    }

    #[test]
    fn cap_and_bucket() {
        let u = Users::new(2, 3);
        let a: Arc<str> = Arc::from("a");
        assert!(u.connect_local(&a));
        assert!(u.connect_local(&a));
        assert!(!u.connect_local(&a), "third connection refused");
        for _ in 0..3 {
            assert!(u.take_message_local("a").is_ok());
        }
        let wait = u.take_message_local("a").unwrap_err();
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        u.disconnect_local("a");
        u.disconnect_local("a");
        assert_eq!(u.len(), 1, "an empty bucket outlives the connections");
        assert!(u.connect_local(&a));
        assert!(
            u.take_message_local("a").is_err(),
            "reconnecting does not reset the limit"
        );
    }
}
