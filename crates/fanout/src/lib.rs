//! Room event fan-out.
//!
//! A [`Fanout`] gives every stored room event its place in the room's
//! stream — an epoch and the next sequence number — encodes the event
//! frame once, keeps it replayable for the recovery window, and hands the
//! encoded bytes to the node's [`LocalDelivery`] (the gateway's room
//! registry), which copies a cheap `Bytes` handle to each local member.
//!
//! # Layout
//! - [`event`]: [`RoomEvent`], [`Position`], [`Replay`] and the error type.
//! - [`local`]: [`LocalFanout`], the single-node engine.
//! - [`redis`]: [`RedisStreamsFanout`], the cluster engine (one atomic
//!   script per event: number, recovery log and a sharded Pub/Sub publish).
//! - [`live`]: a node's subscriptions, by where its members are.
//! - [`sequencer`]: per-room ordering on a node (repeats dropped, gaps
//!   filled from the room's log).
//! - [`cluster`]: node registry and cluster-wide per-user limits.
//!
//! # Invariants
//! - Within a room and epoch, sequence numbers are 1, 2, 3... with no gap,
//!   and every node delivers them to its members in that order, each once
//!   (locally: before the next is assigned; in a cluster: the node's
//!   sequencer holds what is ahead of a gap until the room's log fills it).
//! - An event is encoded once per node, never per recipient.
//! - The publisher's `on_sequenced` runs in the room's delivery order on
//!   its node, so the sender's acknowledgement never overtakes an earlier
//!   event nor trails a later one on the sender's connection.

pub mod cluster;
pub mod event;
mod live;
pub mod local;
pub mod redis;
pub mod sequencer;

use async_trait::async_trait;
use bytes::Bytes;

pub use event::{FanoutError, OnSequenced, Position, Published, Replay, RoomEvent};
pub use local::{LocalFanout, LocalFanoutConfig};
pub use redis::{FanoutStats, RedisFanoutConfig, RedisStreamsFanout};

/// Where encoded room frames go on this node. Implemented by the
/// gateway's room registry; must not block (it only enqueues).
pub trait LocalDelivery: Send + Sync + 'static {
    /// Delivers `frame` to every local member of `room` except the
    /// connection `exclude` (the sender's own connection).
    fn deliver(&self, room: &str, frame: &Bytes, exclude: Option<u64>, ephemeral: bool);

    /// The shared streams were lost (Redis restarted without its data):
    /// every local member may have missed events it can no longer get
    /// live, so the node makes them resume (and reload what cannot be
    /// replayed). Called before anything of the new streams is delivered.
    fn streams_lost(&self) {}

    /// A control message of the application (membership changes, user
    /// disconnects...), delivered to every node in the order it was
    /// published relative to the room events of its key's partition. The
    /// fan-out does not look inside.
    fn control(&self, _payload: &[u8]) {}

    /// Whether `room` has a member on this node. A clustered engine
    /// listens to a room's events only while it has (and asks after the
    /// gateway added one, when it reads the room's position). Default:
    /// always, for sinks that do not keep rooms.
    fn has_members(&self, _room: &str) -> bool {
        true
    }
}

/// The fan-out engine of a node.
#[async_trait]
pub trait Fanout: Send + Sync + 'static {
    /// Short engine name for `/health` and logs.
    fn engine(&self) -> &'static str;

    /// Assigns the event its (epoch, seq), encodes it once, records it for
    /// replay and delivers it to local members except `exclude`, calling
    /// `on_sequenced` right after that delivery (or, for a publish that
    /// finds the event already published, with the original position).
    /// On `Err` it is not called.
    async fn publish(
        &self,
        room: &str,
        event: RoomEvent,
        exclude: Option<u64>,
        on_sequenced: Option<OnSequenced>,
    ) -> Result<Published, FanoutError>;

    /// Delivers an ephemeral, already-encoded frame (typing): no sequence,
    /// no replay, dropped first under pressure.
    async fn publish_ephemeral(
        &self,
        room: &str,
        frame: Bytes,
        exclude: Option<u64>,
    ) -> Result<(), FanoutError>;

    /// Sends `payload` to every node's [`LocalDelivery::control`], this
    /// one included. `key` (a room or user name) picks the partition: every
    /// node handles the control message before any event of that
    /// partition's rooms published after this call returned, and after
    /// every event published before it — except where the node missed one
    /// of them live (a reconnect) and read it from its log afterwards.
    async fn control(&self, key: &str, payload: Bytes) -> Result<(), FanoutError>;

    /// Drops the room's replayable events (the room was deleted): a
    /// resume from a position before now is answered "not recovered"
    /// instead of replaying what was deleted. Sequence numbers go on.
    async fn forget_room(&self, room: &str) -> Result<(), FanoutError>;

    /// The room's current position (the last assigned sequence).
    async fn position(&self, room: &str) -> Result<Position, FanoutError>;

    /// The events after `since`, or why they cannot be replayed: also
    /// when there are more than `limit` of them (checked before any is
    /// read, so a resume far behind costs a position lookup, not a log).
    async fn replay(
        &self,
        room: &str,
        since: Position,
        limit: usize,
    ) -> Result<Replay, FanoutError>;

    /// Periodic housekeeping (the node calls it every few seconds).
    fn maintain(&self) {}

    /// Health of the shared backend, for `/health` and `/metrics`; `None`
    /// for an engine without one.
    fn stats(&self) -> Option<std::sync::Arc<FanoutStats>> {
        None
    }
}
