//! Storage for the chat gateway: users, room memberships, messages and
//! reactions, behind one [`Store`] trait.
//!
//! # Layout
//! - [`store`]: the [`Store`] trait, the contract every engine meets.
//! - [`model`]: the records passed in and out ([`NewMessage`], [`Page`]...).
//! - [`error`]: [`StoreError`], classified by who is at fault.
//! - [`memory`]: [`MemoryStore`], the embedded default (no services needed).
//! - `batch`: group commit for [`PgStore`]'s concurrent writes.
//! - [`pg`]: [`PgStore`], PostgreSQL, what production uses.
//! - [`migrate`]: the numbered SQL files of `migrations/`, applied at start.
//! - [`cache`]: [`CachedStore`], a Redis read-through cache in front of a
//!   store; Redis trouble falls back to the store.
//! - [`suite`] (feature `testsuite`): one behavioural test suite that every
//!   engine runs, so engines cannot drift apart.
//!
//! # Invariants
//! - A message write returns only once the message is durable for that
//!   engine; the gateway acknowledges nothing before.
//! - Message writes are idempotent on (sender, client message id).
//! - History is keyset-paginated on (created_at, id), newest first.

mod batch;
pub mod cache;
pub mod error;
pub mod memory;
pub mod migrate;
pub mod model;
pub mod pg;
pub mod store;
#[cfg(feature = "testsuite")]
pub mod suite;

pub use cache::{CacheConfig, CacheStats, CachedStore};
pub use error::StoreError;
pub use memory::{MemoryStore, MemoryStoreConfig};
pub use model::{
    Grant, Inserted, Member, Membership, NewMessage, Page, ReactionChange, ReactionOutcome, User,
};
pub use pg::{PgConfig, PgStore};
pub use store::Store;
