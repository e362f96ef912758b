//! Payload types: what follows the 6-byte header, one struct per opcode.
//!
//! Field order is wire order (PROTOCOL.md §5 lists every field with its
//! encoding). Never reorder, insert or remove a field within v1: append
//! nothing either, since decoders reject trailing bytes. A change is a new
//! subprotocol version.
//!
//! Every `String` field deserializes through [`crate::wire`] so that a
//! lying length prefix cannot make the decoder allocate.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::wire;

/// Session ids are 16 random bytes chosen by the server.
pub type SessionId = [u8; 16];

/// A client's position in one room's event stream.
///
/// `epoch` identifies the stream incarnation: if the server lost a room's
/// stream (say, its Redis was flushed) it starts a new epoch, and a client
/// holding an older epoch knows its sequence numbers no longer line up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RoomPosition {
    /// Room name.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Stream incarnation of the room.
    pub epoch: u64,
    /// Sequence of the last event seen (0 = none yet).
    pub seq: u64,
}

/// Metadata about a file that lives elsewhere (object storage, CDN).
/// The gateway stores and relays it; it never carries file bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Where the file can be fetched.
    #[serde(deserialize_with = "wire::text")]
    pub url: String,
    /// Display name.
    #[serde(deserialize_with = "wire::text")]
    pub name: String,
    /// MIME type, e.g. `image/png`.
    #[serde(deserialize_with = "wire::text")]
    pub mime: String,
    /// Size in bytes.
    pub size: u64,
}

/// Keyset-pagination cursor: the (created_at, id) of the oldest message
/// of the previous page. Opaque to clients beyond "send it back".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    /// Creation time of the message, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Stored message id.
    pub message_id: u64,
}

/// How many users reacted to a message with one emoji.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionCount {
    /// The emoji (a short string, usually one grapheme).
    #[serde(deserialize_with = "wire::text")]
    pub emoji: String,
    /// Number of distinct users.
    pub count: u32,
}

/// A stored message, as delivered live and in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Stored id, unique across the service.
    pub id: u64,
    /// Room it was posted to.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Room sequence number assigned when it was posted.
    pub seq: u64,
    /// Sender's user id.
    #[serde(deserialize_with = "wire::text")]
    pub sender_id: String,
    /// Sender's display name at the time of sending.
    #[serde(deserialize_with = "wire::text")]
    pub sender_name: String,
    /// Sender's avatar URL at the time of sending (may be empty).
    #[serde(deserialize_with = "wire::text")]
    pub sender_image: String,
    /// The sender's idempotency key (lets the sender's other devices
    /// match their own optimistic copy).
    #[serde(deserialize_with = "wire::text")]
    pub client_msg_id: String,
    /// Message text.
    #[serde(deserialize_with = "wire::text")]
    pub body: String,
    /// Attachment metadata.
    #[serde(deserialize_with = "wire::list")]
    pub attachments: Vec<Attachment>,
    /// Reaction totals (empty on a new message).
    #[serde(deserialize_with = "wire::list")]
    pub reactions: Vec<ReactionCount>,
    /// Server time of storage, ms since the Unix epoch.
    pub created_at_ms: u64,
}

// ---------------------------------------------------------------- client

/// Resume state a reconnecting client presents in `Identify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The session id from the earlier `Ready`.
    pub session_id: SessionId,
    /// Last position seen in each room.
    #[serde(deserialize_with = "wire::list")]
    pub positions: Vec<RoomPosition>,
}

/// `Identify` (0x01).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identify {
    /// Signed access token.
    #[serde(deserialize_with = "wire::text")]
    pub token: String,
    /// Present when reconnecting.
    pub resume: Option<Resume>,
}

/// `Join` (0x03) and `Leave` (0x04).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rooms {
    /// Room names.
    #[serde(deserialize_with = "wire::texts")]
    pub rooms: Vec<String>,
}

/// `Send` (0x05).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Send {
    /// Target room; the sender must have joined it.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Idempotency key, unique per sender: a retry with the same key is
    /// acknowledged with the original message and delivered only once.
    #[serde(deserialize_with = "wire::text")]
    pub client_msg_id: String,
    /// Message text.
    #[serde(deserialize_with = "wire::text")]
    pub body: String,
    /// Attachment metadata.
    #[serde(deserialize_with = "wire::list")]
    pub attachments: Vec<Attachment>,
}

/// `Typing` (0x06).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Typing {
    /// Room the user is typing in.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
}

/// `React` (0x07).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct React {
    /// Room of the message.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Stored id of the message.
    pub message_id: u64,
    /// The emoji.
    #[serde(deserialize_with = "wire::text")]
    pub emoji: String,
    /// True to remove the caller's reaction instead of adding it.
    pub remove: bool,
}

/// `History` (0x08).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Room to page through; the caller must have joined it.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Page strictly older than this; `None` for the newest page.
    pub before: Option<Cursor>,
    /// Page size, 1..=100 (0 means the server default, 50).
    pub limit: u32,
}

// ---------------------------------------------------------------- server

/// `Ready` (0x40).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Id to present when resuming.
    pub session_id: SessionId,
    /// Authenticated user id.
    #[serde(deserialize_with = "wire::text")]
    pub user_id: String,
    /// Display name.
    #[serde(deserialize_with = "wire::text")]
    pub user_name: String,
    /// Rooms the session is in (stored memberships), with the current
    /// position of each.
    #[serde(deserialize_with = "wire::list")]
    pub rooms: Vec<RoomPosition>,
    /// Send a `Heartbeat` at least this often.
    pub heartbeat_interval_ms: u32,
    /// Grace after a missed interval before the server closes with 4002.
    pub heartbeat_timeout_ms: u32,
    /// Largest frame the server accepts, in bytes.
    pub max_frame_bytes: u32,
    /// True when a replay follows, ended by `Resumed`.
    pub resuming: bool,
}

/// `HeartbeatAck` (0x41).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// Server clock, ms since the Unix epoch.
    pub server_time_ms: u64,
}

/// `Joined` (0x42).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    /// Each joined room with its current position.
    #[serde(deserialize_with = "wire::list")]
    pub rooms: Vec<RoomPosition>,
}

/// `MessageSent` (0x44): the message is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSent {
    /// Room.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Stored id.
    pub message_id: u64,
    /// Room stream epoch.
    pub epoch: u64,
    /// Room sequence number of the message.
    pub seq: u64,
    /// Server time of storage.
    pub created_at_ms: u64,
    /// True when this acknowledges a retry of an already stored message.
    pub duplicate: bool,
}

/// `Reacted` (0x45): the reaction change is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reacted {
    /// Room.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Message reacted to.
    pub message_id: u64,
    /// Room stream epoch.
    pub epoch: u64,
    /// Room sequence number of the reaction event.
    pub seq: u64,
}

/// `HistoryPage` (0x47).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Room.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Newest first.
    #[serde(deserialize_with = "wire::list")]
    pub messages: Vec<Message>,
    /// Cursor for the next (older) page; `None` at the beginning.
    pub next: Option<Cursor>,
}

/// Outcome of a resume for one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomResume {
    /// Room.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// True: every missed event was replayed. False: the gap could not be
    /// filled (outside the recovery window or a new epoch); reload history.
    pub recovered: bool,
    /// Number of events replayed for this room.
    pub replayed: u32,
    /// Current epoch.
    pub epoch: u64,
    /// Current sequence.
    pub seq: u64,
}

/// `Resumed` (0x48).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// One entry per room of the resumed session.
    #[serde(deserialize_with = "wire::list")]
    pub rooms: Vec<RoomResume>,
}

/// `Error` (0x49).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// An [`crate::ErrorCode`] value.
    pub code: u16,
    /// When non-zero, retrying earlier than this is pointless.
    pub retry_after_ms: u32,
    /// Human-readable detail (English, for logs; not for display).
    #[serde(deserialize_with = "wire::text")]
    pub message: String,
}

/// `NewMessage` (0x60).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Room stream epoch.
    pub epoch: u64,
    /// The message (carries room and sequence).
    pub message: Message,
}

/// `UserTyping` (0x61). Ephemeral: no sequence, never replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTyping {
    /// Room.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Who is typing.
    #[serde(deserialize_with = "wire::text")]
    pub user_id: String,
}

/// `Reaction` (0x62).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// Room.
    #[serde(deserialize_with = "wire::text")]
    pub room: String,
    /// Room stream epoch.
    pub epoch: u64,
    /// Room sequence number of this event.
    pub seq: u64,
    /// Message reacted to.
    pub message_id: u64,
    /// Who reacted.
    #[serde(deserialize_with = "wire::text")]
    pub user_id: String,
    /// The emoji.
    #[serde(deserialize_with = "wire::text")]
    pub emoji: String,
    /// True when the reaction was removed.
    pub removed: bool,
}

/// `Batch` (0x7F): complete inner frames (header + uncompressed payload),
/// delivered in order. Inner frames are never batches and never
/// compressed; the batch itself may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Encoded inner frames.
    #[serde(deserialize_with = "wire::blobs")]
    pub frames: Vec<Bytes>,
}
