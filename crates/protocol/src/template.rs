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

/// Where a room event frame (NewMessage or Reaction) sits: its room,
/// epoch and sequence number, read from the start of the payload without
/// decoding the rest (and, when compressed, inflating only the start).
/// `None` for any other frame. For the per-recipient checks a broadcast
/// must stay cheap for (the encode-once rule).
pub fn event_position(frame: &[u8]) -> Option<(String, u64, u64)> {
    let (&op, rest) = frame.split_first()?;
    let flags = *rest.first()?;
    let payload = frame.get(HEADER_LEN..)?;
    // Enough for the fields wanted: varints (9) and a room (130).
    const PREFIX: usize = 3 * 9 + 3 + crate::limits::MAX_ROOM_NAME_BYTES + 16;
    let owned;
    let p: &[u8] = if flags & 1 != 0 {
        owned = crate::compress::inflate_prefix(payload, PREFIX)?;
        &owned
    } else {
        payload
    };
    let mut r = Reader(p);
    if op == crate::Opcode::NewMessage as u8 {
        let epoch = r.varint()?;
        let _id = r.varint()?;
        let room = r.text()?;
        let seq = r.varint()?;
        Some((room, epoch, seq))
    } else if op == crate::Opcode::Reaction as u8 {
        let room = r.text()?;
        let epoch = r.varint()?;
        let seq = r.varint()?;
        Some((room, epoch, seq))
    } else {
        None
    }
}

/// Reads §4 fields off the front of a payload.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn varint(&mut self) -> Option<u64> {
        let first = *self.take(1)?.first()?;
        let wide = |b: &[u8]| {
            let mut v = [0u8; 8];
            v[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(v)
        };
        match first {
            0..=250 => Some(u64::from(first)),
            0xFB => self.take(2).map(wide),
            0xFC => self.take(4).map(wide),
            0xFD => self.take(8).map(wide),
            _ => None,
        }
    }

    fn text(&mut self) -> Option<String> {
        let n = usize::try_from(self.varint()?).ok()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).ok()
    }
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

    /// The peek agrees with a full decode, compressed or not.
    #[test]
    fn event_position_reads_what_decoding_reads() {
        let message =
            |room: &str, body: &str, epoch: u64, seq: u64| match message(77_000, room, body) {
                ServerFrame::NewMessage(mut m) => {
                    m.epoch = epoch;
                    m.message.seq = seq;
                    ServerFrame::NewMessage(m)
                }
                other => other,
            };
        let reaction = ServerFrame::Reaction(crate::payload::Reaction {
            room: "r\u{e9}".into(),
            epoch: u64::MAX,
            seq: 300,
            message_id: 1,
            user_id: "u".into(),
            emoji: "+".into(),
            removed: false,
        });
        let frames = [
            (
                message("room", "hi", 1_796_000_000_000, 1),
                ("room", 1_796_000_000_000, 1),
            ),
            (
                message(&"x".repeat(128), &"long ".repeat(2000), 7, 70_000),
                ("", 7, 70_000),
            ),
            (reaction, ("r\u{e9}", u64::MAX, 300)),
        ];
        for (frame, (room, epoch, seq)) in frames {
            for threshold in [0, usize::MAX] {
                let codec = Codec::new(CodecConfig {
                    compress_threshold: threshold,
                    ..Default::default()
                });
                let bytes = codec.encode_server(0, &frame).unwrap();
                let (r, e, s) = event_position(&bytes).unwrap();
                if !room.is_empty() {
                    assert_eq!(r, room);
                } else {
                    assert_eq!(r.len(), 128);
                }
                assert_eq!((e, s), (epoch, seq));
            }
        }
        let ok = Codec::default().encode_server(0, &ServerFrame::Ok).unwrap();
        assert_eq!(event_position(&ok), None);
        assert_eq!(event_position(&[0x60, 1, 0, 0, 0, 0, 0xFF]), None);
        assert_eq!(event_position(&[0x60]), None);
    }
}
