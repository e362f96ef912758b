//! Types shared by fan-out engines.

use bytes::Bytes;
use chatgate_protocol::ServerFrame;
use chatgate_protocol::payload::{Message, NewMessage, Reaction};

/// A position in a room's event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Stream incarnation; changes when the stream was lost.
    pub epoch: u64,
    /// Last sequence number (0 = no event yet in this epoch).
    pub seq: u64,
}

/// A stored event to publish; the engine fills in epoch and sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEvent {
    /// A new message (its `seq` field is overwritten).
    Message(Message),
    /// A reaction added or removed.
    Reaction {
        /// Message reacted to.
        message_id: u64,
        /// Who reacted.
        user_id: String,
        /// Emoji.
        emoji: String,
        /// True when removed.
        removed: bool,
    },
}

impl RoomEvent {
    /// A message's idempotency key, (sender, client message id) as one
    /// string: the sender's length first, so no choice of the two can
    /// spell another pair's key (a separator could occur in either).
    /// `None` for reactions, which have none.
    pub fn idempotency_key(&self) -> Option<String> {
        match self {
            RoomEvent::Message(m) => Some(format!(
                "{}:{}{}",
                m.sender_id.len(),
                m.sender_id,
                m.client_msg_id
            )),
            RoomEvent::Reaction { .. } => None,
        }
    }

    /// The event frame for `room` at (`epoch`, `seq`), as members get it.
    pub fn into_frame(self, room: &str, epoch: u64, seq: u64) -> ServerFrame {
        match self {
            RoomEvent::Message(mut message) => {
                message.seq = seq;
                ServerFrame::NewMessage(NewMessage { epoch, message })
            }
            RoomEvent::Reaction {
                message_id,
                user_id,
                emoji,
                removed,
            } => ServerFrame::Reaction(Reaction {
                room: room.to_owned(),
                epoch,
                seq,
                message_id,
                user_id,
                emoji,
                removed,
            }),
        }
    }
}

/// Told an event's position at the moment the engine hands the event to
/// this node's members, in the room's order. The publishing connection
/// queues its acknowledgement here: queued any later, an ack could land
/// behind the room's next events on that connection; any earlier, ahead
/// of events numbered before it.
///
/// The flag is true when the event had been published before (a retry
/// whose first attempt's record was lost): the position is the original
/// one, and this call is not the event's place in any stream.
pub type OnSequenced = Box<dyn FnOnce(Position, bool) + Send + Sync>;

/// What [`crate::Fanout::publish`] did.
#[derive(Debug, Clone)]
pub struct Published {
    /// The event's place in the room stream.
    pub position: Position,
    /// The encoded event frame, as members received it.
    pub frame: Bytes,
}

/// Answer to a replay request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Every event after the requested position, oldest first (may be
    /// empty when the client is up to date).
    Events {
        /// Encoded event frames.
        frames: Vec<Bytes>,
        /// Position after the last replayed event.
        position: Position,
    },
    /// The gap cannot be filled: other epoch, or older than the recovery
    /// window. The client reloads history and continues from `current`.
    NotRecoverable {
        /// The room's current position.
        current: Position,
    },
}

/// Why a fan-out call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FanoutError {
    /// The shared backend is unreachable; nothing was published.
    #[error("fan-out backend unavailable: {0}")]
    Unavailable(String),
    /// The event could not be encoded (larger than the frame limit).
    #[error("event could not be encoded: {0}")]
    Encode(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sender: &str, cid: &str) -> RoomEvent {
        RoomEvent::Message(Message {
            id: 1,
            room: "r".into(),
            seq: 0,
            sender_id: sender.into(),
            sender_name: String::new(),
            sender_image: String::new(),
            client_msg_id: cid.into(),
            body: "x".into(),
            attachments: vec![],
            reactions: vec![],
            created_at_ms: 0,
        })
    }

    /// Two different (sender, id) pairs never share a key, whatever
    /// characters either holds.
    #[test]
    fn idempotency_keys_cannot_collide() {
        let pairs = [
            ("a", "b\u{1f}c"),
            ("a\u{1f}b", "c"),
            ("ab", "c"),
            ("a", "bc"),
            ("1:a", "b"),
            ("1", ":ab"),
        ];
        let keys: std::collections::HashSet<String> = pairs
            .iter()
            .map(|(s, c)| message(s, c).idempotency_key().unwrap())
            .collect();
        assert_eq!(keys.len(), pairs.len());
        let reaction = RoomEvent::Reaction {
            message_id: 1,
            user_id: "u".into(),
            emoji: "+".into(),
            removed: false,
        };
        assert_eq!(reaction.idempotency_key(), None);
    }
}
