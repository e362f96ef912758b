//! Records exchanged with a [`crate::Store`]. Messages and cursors are the
//! protocol's own types, so history pages go to the wire without copying
//! field by field.

pub use chatgate_protocol::payload::{Attachment, Cursor, Message};

/// A user profile as the gateway knows it (from the access token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Stable user id (the token's subject).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Avatar URL, possibly empty.
    pub image: String,
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Room.
    pub room: String,
    /// Sender's user id.
    pub sender_id: String,
    /// Sender's display name at send time.
    pub sender_name: String,
    /// Sender's avatar URL at send time.
    pub sender_image: String,
    /// Idempotency key, unique per sender.
    pub client_msg_id: String,
    /// Text.
    pub body: String,
    /// Attachment metadata.
    pub attachments: Vec<Attachment>,
}

impl NewMessage {
    /// The stored form, once the store has assigned `id` and the time:
    /// no sequence number yet (see [`crate::Store::set_seq`]), no reactions.
    pub fn stored(self, id: u64, created_at_ms: u64) -> Message {
        Message {
            id,
            room: self.room,
            seq: 0,
            sender_id: self.sender_id,
            sender_name: self.sender_name,
            sender_image: self.sender_image,
            client_msg_id: self.client_msg_id,
            body: self.body,
            attachments: self.attachments,
            reactions: Vec::new(),
            created_at_ms,
        }
    }
}

/// Result of an idempotent insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inserted {
    /// The stored message (the original one when `duplicate`). Its `seq`
    /// is 0 until [`crate::Store::set_seq`] records the room sequence.
    pub message: Message,
    /// True when (sender, client id) was already stored.
    pub duplicate: bool,
    /// The room stream's epoch the message was published under, recorded
    /// with its `seq` (both 0 until then).
    pub epoch: u64,
}

/// A reaction being added or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionChange {
    /// Room the message must belong to.
    pub room: String,
    /// Message id.
    pub message_id: u64,
    /// Reacting user.
    pub user_id: String,
    /// Emoji.
    pub emoji: String,
    /// Remove instead of add.
    pub remove: bool,
}

/// What a reaction change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReactionOutcome {
    /// The reaction set changed; the change should be published.
    Changed,
    /// Nothing to do (already present, or already absent).
    Unchanged,
}

/// One page of history, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Messages, newest first, each with its reactions and attachments.
    pub messages: Vec<Message>,
    /// Cursor for the next older page; `None` when this page reached the
    /// beginning of the room.
    pub next: Option<Cursor>,
}

/// A room in a user's room list (the rooms a fresh session is placed in),
/// with the membership the application granted, if any.
///
/// The list and the grant are separate on purpose: a client's Leave takes
/// the room off the list (its next sessions stop joining it) but keeps the
/// grant (it may join again); only the application's server API takes a
/// grant away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Room name.
    pub room: String,
    /// The application's grant; `None` for a room the user joined on its
    /// own (an `open` room, or one its token allowed).
    pub grant: Option<Grant>,
}

/// A membership granted by the application (server API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Role in the room (`member` unless the application says otherwise);
    /// room policies may reserve posting to some roles.
    pub role: String,
    /// When the membership was first granted (ms since the Unix epoch):
    /// policies that hide history from before a member joined count from
    /// here. Changing the role keeps it.
    pub since_ms: u64,
}

/// A member of a room as the server API lists and adds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// User id.
    pub user_id: String,
    /// Role in the room.
    pub role: String,
    /// When the membership was granted (ms since the Unix epoch); ignored
    /// when adding.
    pub since_ms: u64,
}
