//! Who may enter a room, answered on the hot path.
//!
//! A room's policy ([`crate::policy`]) says whether it is open or for
//! members. Membership comes from the application's grant (server API,
//! kept by the store), or from the user's token (`rooms` claim). Grants
//! are asked on every join and resume of a `members` room, so they are
//! cached twice: here, per node, in memory; and in Redis by the store's
//! cache when one is configured (shared by the nodes, 5 minutes).
//!
//! Every change through the server API reaches every node as a control
//! message ([`crate::control`]) that drops the changed entries here, so a
//! cached answer is never older than the last change the node has seen.
//! The TTL only bounds what a node that missed a change (it cannot: the
//! control messages ride the room streams) would keep.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use chatgate_storage::{Grant, Store, StoreError};

use crate::metrics::Metrics;
use crate::policy::{self, Access, HistoryVisibility, Policies, Policy};

/// Why a user may be in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The room is open to every authenticated user.
    Open,
    /// The user's token allows it.
    Token,
    /// The application granted it.
    Granted(Grant),
}

impl Entry {
    /// The granted role, if any.
    pub fn role(&self) -> Option<&str> {
        match self {
            Entry::Granted(g) => Some(&g.role),
            _ => None,
        }
    }
}

/// What a room's policy lets one user do there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    /// How the user may be in the room; `None`: they may not.
    pub entry: Option<Entry>,
    /// Whether they may post (send, react, typing).
    pub post: bool,
    /// Oldest history visible to them (ms since the Unix epoch; 0: all).
    pub history_since_ms: u64,
}

/// Local entries kept at most (a full cache is emptied and refills:
/// simple, and far above what one node's users ask within the TTL).
const MAX_ENTRIES: usize = 200_000;

/// How long a node trusts its own cached grant.
const TTL: Duration = Duration::from_secs(60);

/// (room, user).
type RoomUser = (Arc<str>, Arc<str>);

/// The node's membership answers.
pub struct Rooms {
    store: Arc<dyn Store>,
    policies: Policies,
    grants: DashMap<RoomUser, (Option<Grant>, Instant)>,
    /// Bumped by every `forget`: an answer read from the store while a
    /// change was being forgotten is not cached (it may predate it).
    generation: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Rooms {
    /// Answers from `store` under `policies`.
    pub fn new(store: Arc<dyn Store>, policies: Policies, metrics: Arc<Metrics>) -> Self {
        Rooms {
            store,
            policies,
            grants: DashMap::new(),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    /// The policy of `room`.
    pub fn policy(&self, room: &str) -> &Policy {
        self.policies.for_room(room)
    }

    /// Every policy (for logs).
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The application's grant, from this node's cache or the store.
    pub async fn grant(&self, room: &str, user: &str) -> Result<Option<Grant>, StoreError> {
        let key: (Arc<str>, Arc<str>) = (Arc::from(room), Arc::from(user));
        if let Some(hit) = self.grants.get(&key)
            && hit.1.elapsed() < TTL
        {
            self.metrics
                .membership_cache
                .with_label_values(&["hit"])
                .inc();
            return Ok(hit.0.clone());
        }
        self.metrics
            .membership_cache
            .with_label_values(&["miss"])
            .inc();
        let before = self.generation.load(Ordering::SeqCst);
        let grant = self.store.grant(room, user).await?;
        if self.grants.len() >= MAX_ENTRIES {
            self.grants.clear();
        }
        // Cached only if no change was forgotten while the store answered.
        // `forget` bumps the generation before it removes entries, and the
        // check runs under the entry's lock: a change either shows in the
        // generation here or removes this entry after it is written.
        match self.grants.entry(key) {
            dashmap::Entry::Occupied(mut e) => {
                if self.generation.load(Ordering::SeqCst) == before {
                    e.insert((grant.clone(), Instant::now()));
                } else {
                    e.remove();
                }
            }
            dashmap::Entry::Vacant(v) => {
                if self.generation.load(Ordering::SeqCst) == before {
                    v.insert((grant.clone(), Instant::now()));
                }
            }
        }
        Ok(grant)
    }

    /// What `user` (whose token allows `token_rooms`) may do in `room`.
    /// Open rooms and token-allowed rooms cost no lookup; a grant is
    /// looked up only when needed.
    pub async fn rights(
        &self,
        room: &str,
        user: &str,
        token_rooms: &[String],
    ) -> Result<Rights, StoreError> {
        let policy = self.policy(room);
        let token = policy::token_allows(token_rooms, room);
        // The grant is asked only when it can change the answer: entry to
        // a members room the token does not allow, a posting role, or the
        // time history starts from.
        let needs_grant = (policy.access == Access::Members && !token)
            || !policy.send_roles.is_empty()
            || policy.history == HistoryVisibility::SinceJoin;
        let grant = if needs_grant {
            self.grant(room, user).await?
        } else {
            None
        };
        let entry = match (grant, policy.access) {
            (Some(g), _) => Some(Entry::Granted(g)),
            (None, Access::Open) => Some(Entry::Open),
            (None, Access::Members) if token => Some(Entry::Token),
            (None, Access::Members) => None,
        };
        Ok(Self::finish(policy, entry))
    }

    fn finish(policy: &Policy, entry: Option<Entry>) -> Rights {
        let post = entry.as_ref().is_some_and(|e| policy.may_post(e.role()));
        let history_since_ms = match (&entry, policy.history) {
            (Some(Entry::Granted(g)), HistoryVisibility::SinceJoin) => g.since_ms,
            _ => 0,
        };
        Rights {
            entry,
            post,
            history_since_ms,
        }
    }

    /// Drops cached grants of `users` in `room` (a change through the
    /// server API, on any node).
    pub fn forget(&self, room: &str, users: &[String]) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for u in users {
            self.grants
                .remove(&(Arc::<str>::from(room), Arc::<str>::from(u.as_str())));
        }
    }

    /// Drops every cached grant of `room` (deleted).
    pub fn forget_room(&self, room: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.grants.retain(|(r, _), _| &**r != room);
    }

    /// Drops everything (the node may have missed changes).
    pub fn forget_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.grants.clear();
    }
}
