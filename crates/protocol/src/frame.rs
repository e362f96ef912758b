//! Typed frames for each direction and the fixed 6-byte header.

use serde::{Deserialize, Serialize};

use crate::Opcode;
use crate::payload::*;

/// Length of the fixed header: opcode (1), flags (1), request id (4, LE).
pub const HEADER_LEN: usize = 6;

/// Flag bit 0: the payload is raw-DEFLATE compressed. Bits 1..=7 are
/// reserved and must be zero.
pub const FLAG_COMPRESSED: u8 = 0b0000_0001;

/// The fixed header every frame starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub opcode: Opcode,
    /// Flag bits (see [`FLAG_COMPRESSED`]).
    pub flags: u8,
    /// Client-chosen id echoed by the reply; 0 on events and on requests
    /// whose success needs no reply.
    pub request_id: u32,
}

impl Header {
    /// True when the payload is compressed.
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// 0x01
    Identify(Identify),
    /// 0x02 (empty payload)
    Heartbeat,
    /// 0x03
    Join(Rooms),
    /// 0x04
    Leave(Rooms),
    /// 0x05
    Send(Send),
    /// 0x06
    Typing(Typing),
    /// 0x07
    React(React),
    /// 0x08
    History(History),
}

impl ClientFrame {
    /// The frame's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            ClientFrame::Identify(_) => Opcode::Identify,
            ClientFrame::Heartbeat => Opcode::Heartbeat,
            ClientFrame::Join(_) => Opcode::Join,
            ClientFrame::Leave(_) => Opcode::Leave,
            ClientFrame::Send(_) => Opcode::Send,
            ClientFrame::Typing(_) => Opcode::Typing,
            ClientFrame::React(_) => Opcode::React,
            ClientFrame::History(_) => Opcode::History,
        }
    }
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// 0x40
    Ready(Ready),
    /// 0x41
    HeartbeatAck(HeartbeatAck),
    /// 0x42
    Joined(Joined),
    /// 0x43
    Left(Rooms),
    /// 0x44
    MessageSent(MessageSent),
    /// 0x45
    Reacted(Reacted),
    /// 0x46 (empty payload)
    Ok,
    /// 0x47
    HistoryPage(HistoryPage),
    /// 0x48
    Resumed(Resumed),
    /// 0x49
    Error(ErrorBody),
    /// 0x60
    NewMessage(NewMessage),
    /// 0x61
    UserTyping(UserTyping),
    /// 0x62
    Reaction(Reaction),
    /// 0x7F
    Batch(Batch),
}

impl ServerFrame {
    /// The frame's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            ServerFrame::Ready(_) => Opcode::Ready,
            ServerFrame::HeartbeatAck(_) => Opcode::HeartbeatAck,
            ServerFrame::Joined(_) => Opcode::Joined,
            ServerFrame::Left(_) => Opcode::Left,
            ServerFrame::MessageSent(_) => Opcode::MessageSent,
            ServerFrame::Reacted(_) => Opcode::Reacted,
            ServerFrame::Ok => Opcode::Ok,
            ServerFrame::HistoryPage(_) => Opcode::HistoryPage,
            ServerFrame::Resumed(_) => Opcode::Resumed,
            ServerFrame::Error(_) => Opcode::Error,
            ServerFrame::NewMessage(_) => Opcode::NewMessage,
            ServerFrame::UserTyping(_) => Opcode::UserTyping,
            ServerFrame::Reaction(_) => Opcode::Reaction,
            ServerFrame::Batch(_) => Opcode::Batch,
        }
    }

    /// True for ephemeral events a slow consumer may lose without a gap
    /// (they carry no sequence number and are never replayed).
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, ServerFrame::UserTyping(_))
    }
}
