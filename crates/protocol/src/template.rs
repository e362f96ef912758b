//! Room-event frames with their epoch and sequence left open.
//!
//! In a cluster, an event's sequence number is assigned inside Redis, in
//! the same atomic script that appends the event to the room's streams.
//! So that the stored entry is already the finished frame (and no node
//! re-encodes it per recipient), the publishing node sends the frame in
//! three pieces around the two varint fields, and the script writes
//! `head ‖ varint(epoch) ‖ mid ‖ varint(seq) ‖ tail` — the exact bytes
//! [`crate::Codec::encode_server`] would produce, uncompressed.
//!
//! Layouts (PROTOCOL.md §5.3): NewMessage is `header, epoch, message.id,
//! message.room, message.seq, ...`; Reaction is `header, room, epoch, seq,
//! ...`.

use crate::payload::{NewMessage, Reaction};
use crate::{Codec, CodecConfig, EncodeError, HEADER_LEN, ServerFrame};

/// A frame split around its epoch and sequence fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTemplate {
    /// Bytes before the epoch.
    pub head: Vec<u8>,
    /// Bytes between the epoch and the sequence number.
    pub mid: Vec<u8>,
    /// Bytes after the sequence number.
    pub tail: Vec<u8>,
}

/// Appends `v` in the protocol's varint form (PROTOCOL.md §4.1).
pub fn write_varint(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else if v <= u16::MAX as u64 {
        out.push(0xFB);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(0xFC);
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        out.push(0xFD);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn varint_len(v: u64) -> usize {
    match v {
        0..=250 => 1,
        251..=0xFFFF => 3,
        0x1_0000..=0xFFFF_FFFF => 5,
        _ => 9,
    }
}

impl EventTemplate {
    /// The template of a NewMessage or Reaction frame (request id 0);
    /// `None` for any other frame. The frame's own epoch and sequence are
    /// ignored.
    pub fn of(
        frame: &ServerFrame,
        max_frame_bytes: usize,
    ) -> Result<Option<EventTemplate>, EncodeError> {
        let plain = Codec::new(CodecConfig {
            max_frame_bytes,
            max_payload_bytes: max_frame_bytes,
            compress_threshold: usize::MAX,
            ..CodecConfig::default()
        });
        // Encode with epoch = seq = 0 (one byte each), then cut them out.
        let (bytes, epoch_at, seq_at) = match frame {
            ServerFrame::NewMessage(m) => {
                let mut m: NewMessage = m.clone();
                m.epoch = 0;
                m.message.seq = 0;
                let room = m.message.room.len();
                let seq_at =
                    HEADER_LEN + 1 + varint_len(m.message.id) + varint_len(room as u64) + room;
                (
                    plain.encode_server(0, &ServerFrame::NewMessage(m))?,
                    HEADER_LEN,
                    seq_at,
                )
            }
            ServerFrame::Reaction(r) => {
                let mut r: Reaction = r.clone();
                r.epoch = 0;
                r.seq = 0;
                let epoch_at = HEADER_LEN + varint_len(r.room.len() as u64) + r.room.len();
                (
                    plain.encode_server(0, &ServerFrame::Reaction(r))?,
                    epoch_at,
                    epoch_at + 1,
                )
            }
            _ => return Ok(None),
        };
        Ok(Some(EventTemplate {
            head: bytes[..epoch_at].to_vec(),
            mid: bytes[epoch_at + 1..seq_at].to_vec(),
            tail: bytes[seq_at + 1..].to_vec(),
        }))
    }

    /// The finished frame (what the cluster script builds).
    pub fn fill(&self, epoch: u64, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head.len() + self.mid.len() + self.tail.len() + 18);
        out.extend_from_slice(&self.head);
        write_varint(&mut out, epoch);
        out.extend_from_slice(&self.mid);
        write_varint(&mut out, seq);
        out.extend_from_slice(&self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Message;

    fn message(id: u64, room: &str, body: &str) -> ServerFrame {
        ServerFrame::NewMessage(NewMessage {
            epoch: 0,
            message: Message {
                id,
                room: room.into(),
                seq: 0,
                sender_id: "u".into(),
                sender_name: "U".into(),
                sender_image: String::new(),
                client_msg_id: "c".into(),
                body: body.into(),
                attachments: vec![],
                reactions: vec![],
                created_at_ms: 7,
            },
        })
    }

    #[test]
    fn filled_templates_equal_direct_encoding() {
        let plain = Codec::new(CodecConfig {
            compress_threshold: usize::MAX,
            ..CodecConfig::default()
        });
        let values = [
            0u64,
            1,
            250,
            251,
            65_535,
            65_536,
            u32::MAX as u64,
            1 << 32,
            1_795_000_000_000,
            u64::MAX,
        ];
        for id in [0u64, 300, 70_000, 1 << 40] {
            for room in ["r", &"x".repeat(300)] {
                let t = EventTemplate::of(&message(id, room, "hello"), 1 << 20)
                    .unwrap()
                    .unwrap();
                for &epoch in &values {
                    for &seq in &values {
                        let ServerFrame::NewMessage(mut m) = message(id, room, "hello") else {
                            unreachable!()
                        };
                        m.epoch = epoch;
                        m.message.seq = seq;
                        let direct = plain.encode_server(0, &ServerFrame::NewMessage(m)).unwrap();
                        assert_eq!(
                            t.fill(epoch, seq),
                            direct.to_vec(),
                            "id {id} epoch {epoch} seq {seq}"
                        );
                    }
                }
                let reaction = |epoch, seq| {
                    ServerFrame::Reaction(Reaction {
                        room: room.into(),
                        epoch,
                        seq,
                        message_id: id,
                        user_id: "u".into(),
                        emoji: "👍".into(),
                        removed: false,
                    })
                };
                let t = EventTemplate::of(&reaction(5, 5), 1 << 20)
                    .unwrap()
                    .unwrap();
                for &epoch in &values {
                    for &seq in &values {
                        let direct = plain.encode_server(0, &reaction(epoch, seq)).unwrap();
                        assert_eq!(t.fill(epoch, seq), direct.to_vec());
                    }
                }
            }
        }
        assert!(
            EventTemplate::of(&ServerFrame::Ok, 1 << 20)
                .unwrap()
                .is_none()
        );
    }
}
