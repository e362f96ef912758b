//! Control messages between nodes: what the server API changes, every
//! node acts on.
//!
//! They ride the fan-out ([`chatgate_fanout::Fanout::control`]): on one
//! node straight to the [`crate::hub::Hub`], in a cluster through the room
//! (or user) stream, so every node handles a removal before any event of
//! the room published after the API call returned. A removed member
//! therefore receives nothing posted after their removal, on any node.

use serde::{Deserialize, Serialize};

use chatgate_fanout::FanoutError;

use crate::node::Node;

/// One control message (JSON on the stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Control {
    /// Grants of `room` changed: nodes forget their cached answers for
    /// `changed` and `removed`, and take `removed` out of the room's live
    /// delivery at once.
    Members {
        /// Room.
        room: String,
        /// Users granted (or given a new role).
        #[serde(default)]
        changed: Vec<String>,
        /// Users whose membership ended.
        #[serde(default)]
        removed: Vec<String>,
    },
    /// The room was deleted: every member is taken out of it.
    RoomDeleted {
        /// Room.
        room: String,
    },
    /// Close every connection of `user` with `code` and `reason`.
    Disconnect {
        /// User id.
        user: String,
        /// Close code (4006 reconnect or 4107 do not).
        code: u16,
        /// Close frame text.
        reason: String,
    },
    /// Who of `room` is connected to each node: every node appends its
    /// answer to the Redis list `reply`.
    Presence {
        /// Room.
        room: String,
        /// Where the answers go.
        reply: String,
    },
}

impl Control {
    /// The stream key: the room's, or the user's for a disconnect.
    fn key(&self) -> &str {
        match self {
            Control::Members { room, .. }
            | Control::RoomDeleted { room }
            | Control::Presence { room, .. } => room,
            Control::Disconnect { user, .. } => user,
        }
    }
}

/// One node's answer to [`Control::Presence`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceAnswer {
    /// The answering node.
    pub node: String,
    /// (user id, connections of that user in the room on this node).
    pub users: Vec<(String, u32)>,
}

/// Sends `control` to every node, this one included.
pub async fn broadcast(node: &Node, control: &Control) -> Result<(), FanoutError> {
    let payload = serde_json::to_vec(control)
        .map_err(|e| FanoutError::Unavailable(format!("encoding a control message: {e}")))?;
    node.fanout
        .control(control.key(), bytes::Bytes::from(payload))
        .await
}
