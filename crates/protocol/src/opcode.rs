//! Opcodes: the first byte of every frame.
//!
//! The numbering carries meaning so a client can route a frame before it
//! parses the payload: `0x01..=0x3F` travel client to server,
//! `0x40..=0x5F` are the server's replies to a request (they echo its
//! request id), `0x60..=0x7E` are server-pushed events (request id 0),
//! and `0x7F` is the batch container.

/// Every opcode of protocol v1, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Client: authenticate, optionally resuming an earlier session.
    Identify = 0x01,
    /// Client: keep-alive; answered by `HeartbeatAck`.
    Heartbeat = 0x02,
    /// Client: join one or more rooms.
    Join = 0x03,
    /// Client: leave one or more rooms.
    Leave = 0x04,
    /// Client: post a message to a room.
    Send = 0x05,
    /// Client: "I am typing" in a room (ephemeral, not stored).
    Typing = 0x06,
    /// Client: add or remove a reaction on a stored message.
    React = 0x07,
    /// Client: fetch one page of a room's stored messages.
    History = 0x08,

    /// Server: the session is open.
    Ready = 0x40,
    /// Server: reply to `Heartbeat`.
    HeartbeatAck = 0x41,
    /// Server: reply to `Join`.
    Joined = 0x42,
    /// Server: reply to `Leave`.
    Left = 0x43,
    /// Server: reply to `Send`, once the message is durable.
    MessageSent = 0x44,
    /// Server: reply to `React`, once the reaction is durable.
    Reacted = 0x45,
    /// Server: empty success reply (to `Typing`).
    Ok = 0x46,
    /// Server: reply to `History`.
    HistoryPage = 0x47,
    /// Server: end of a resume replay, with the outcome per room.
    Resumed = 0x48,
    /// Server: a request failed (or, with request id 0, an unsolicited error).
    Error = 0x49,

    /// Server event: a message posted by someone else.
    NewMessage = 0x60,
    /// Server event: someone is typing.
    UserTyping = 0x61,
    /// Server event: a reaction was added or removed.
    Reaction = 0x62,

    /// Server: several frames delivered in one WebSocket message.
    Batch = 0x7F,
}

impl Opcode {
    /// Maps a wire byte to an opcode; `None` for bytes v1 does not define.
    pub fn from_u8(byte: u8) -> Option<Self> {
        use Opcode::*;
        Some(match byte {
            0x01 => Identify,
            0x02 => Heartbeat,
            0x03 => Join,
            0x04 => Leave,
            0x05 => Send,
            0x06 => Typing,
            0x07 => React,
            0x08 => History,
            0x40 => Ready,
            0x41 => HeartbeatAck,
            0x42 => Joined,
            0x43 => Left,
            0x44 => MessageSent,
            0x45 => Reacted,
            0x46 => Ok,
            0x47 => HistoryPage,
            0x48 => Resumed,
            0x49 => Error,
            0x60 => NewMessage,
            0x61 => UserTyping,
            0x62 => Reaction,
            0x7F => Batch,
            _ => return None,
        })
    }

    /// True for opcodes a client may send.
    pub fn is_client(self) -> bool {
        (self as u8) < 0x40
    }

    /// Stable lower-case name, used in metrics labels and logs.
    pub fn name(self) -> &'static str {
        use Opcode::*;
        match self {
            Identify => "identify",
            Heartbeat => "heartbeat",
            Join => "join",
            Leave => "leave",
            Send => "send",
            Typing => "typing",
            React => "react",
            History => "history",
            Ready => "ready",
            HeartbeatAck => "heartbeat_ack",
            Joined => "joined",
            Left => "left",
            MessageSent => "message_sent",
            Reacted => "reacted",
            Ok => "ok",
            HistoryPage => "history_page",
            Resumed => "resumed",
            Error => "error",
            NewMessage => "new_message",
            UserTyping => "user_typing",
            Reaction => "reaction",
            Batch => "batch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips_or_is_unknown() {
        let mut known = 0;
        for byte in 0..=u8::MAX {
            if let Some(op) = Opcode::from_u8(byte) {
                assert_eq!(op as u8, byte);
                known += 1;
            }
        }
        assert_eq!(known, 22);
    }
}
