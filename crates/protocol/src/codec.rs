//! The one place bytes become frames and frames become bytes.
//!
//! Payloads are written in bincode 2's *standard* configuration (little
//! endian, variable-length integers), which is exactly the encoding
//! PROTOCOL.md §4 specifies. Nothing else in the workspace calls bincode,
//! so the implementation could change without the wire changing.

use bincode::config::{self, Configuration};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::compress::{deflate, inflate};
use crate::frame::{FLAG_COMPRESSED, HEADER_LEN, Header};
use crate::payload::*;
use crate::template::write_varint;
use crate::{ClientFrame, CodecConfig, DecodeError, EncodeError, Opcode, ServerFrame};

fn wire_config() -> Configuration {
    config::standard()
}

/// Bytes `value` takes in a payload (PROTOCOL.md §4), counted without
/// writing them: for filling a frame up to its limit (a history page that
/// ends before the frame would overflow).
pub fn wire_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut counter = bincode::enc::write::SizeWriter::default();
    match bincode::serde::encode_into_writer(value, &mut counter, wire_config()) {
        Ok(()) => counter.bytes_written,
        // Only a type serde cannot describe fails; treat it as unsendable.
        Err(_) => usize::MAX,
    }
}

/// Encoder and decoder for both directions, holding the size caps and
/// compression policy. Cheap to copy; share one per process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Codec {
    config: CodecConfig,
}

impl Codec {
    /// A codec with the given limits.
    pub fn new(config: CodecConfig) -> Self {
        Codec { config }
    }

    /// The limits in force.
    pub fn config(&self) -> &CodecConfig {
        &self.config
    }

    /// Encodes a client frame.
    pub fn encode_client(
        &self,
        request_id: u32,
        frame: &ClientFrame,
    ) -> Result<Bytes, EncodeError> {
        let op = frame.opcode();
        match frame {
            ClientFrame::Identify(p) => self.encode_payload(op, request_id, p),
            ClientFrame::Heartbeat => self.encode_payload(op, request_id, &()),
            ClientFrame::Join(p) | ClientFrame::Leave(p) => self.encode_payload(op, request_id, p),
            ClientFrame::Send(p) => self.encode_payload(op, request_id, p),
            ClientFrame::Typing(p) => self.encode_payload(op, request_id, p),
            ClientFrame::React(p) => self.encode_payload(op, request_id, p),
            ClientFrame::History(p) => self.encode_payload(op, request_id, p),
        }
    }

    /// Encodes a server frame. A broadcast calls this once and hands the
    /// resulting `Bytes` to every recipient.
    pub fn encode_server(
        &self,
        request_id: u32,
        frame: &ServerFrame,
    ) -> Result<Bytes, EncodeError> {
        let op = frame.opcode();
        match frame {
            ServerFrame::Ready(p) => self.encode_payload(op, request_id, p),
            ServerFrame::HeartbeatAck(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Joined(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Left(p) => self.encode_payload(op, request_id, p),
            ServerFrame::MessageSent(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Reacted(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Ok => self.encode_payload(op, request_id, &()),
            ServerFrame::HistoryPage(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Resumed(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Error(p) => self.encode_payload(op, request_id, p),
            ServerFrame::NewMessage(p) => self.encode_payload(op, request_id, p),
            ServerFrame::UserTyping(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Reaction(p) => self.encode_payload(op, request_id, p),
            ServerFrame::Batch(p) => self.batch(request_id, &p.frames),
        }
    }

    /// Wraps already-encoded server frames into one `Batch` frame. The
    /// gateway does this once per recipient per write, so the bytes are
    /// laid out directly (the `seq<bytes>` of PROTOCOL.md §4.2, exactly
    /// what the serde path writes) into one buffer of the final size.
    pub fn encode_batch(&self, frames: &[Bytes]) -> Result<Bytes, EncodeError> {
        self.batch(0, frames)
    }

    fn batch(&self, request_id: u32, frames: &[Bytes]) -> Result<Bytes, EncodeError> {
        let mut len = HEADER_LEN + 9;
        for inner in frames {
            check_batch_member(inner).map_err(|e| match e {
                DecodeError::NestedBatch => EncodeError::InvalidBatchMember("nested batch"),
                DecodeError::CompressedInBatch => {
                    EncodeError::InvalidBatchMember("compressed frame")
                }
                _ => EncodeError::InvalidBatchMember("not a server frame"),
            })?;
            len += 9 + inner.len();
        }
        let mut buf = Vec::with_capacity(len);
        buf.push(Opcode::Batch as u8);
        buf.push(0);
        buf.extend_from_slice(&request_id.to_le_bytes());
        write_varint(&mut buf, frames.len() as u64);
        for inner in frames {
            write_varint(&mut buf, inner.len() as u64);
            buf.extend_from_slice(inner);
        }
        self.finish(Bytes::from(buf))
    }

    /// Compression (above the threshold) and the size cap, for every
    /// frame this codec produces.
    fn finish(&self, frame: Bytes) -> Result<Bytes, EncodeError> {
        // The receiver refuses a payload past its cap even when the
        // compressed frame is small: never send one it would refuse.
        let payload = frame.len().saturating_sub(HEADER_LEN);
        if payload > self.config.max_payload_bytes {
            return Err(EncodeError::TooLarge {
                len: payload,
                max: self.config.max_payload_bytes,
            });
        }
        let frame = self.compress_frame(frame);
        if frame.len() > self.config.max_frame_bytes {
            return Err(EncodeError::TooLarge {
                len: frame.len(),
                max: self.config.max_frame_bytes,
            });
        }
        Ok(frame)
    }

    fn encode_payload<T: Serialize>(
        &self,
        op: Opcode,
        request_id: u32,
        payload: &T,
    ) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::with_capacity(128);
        buf.put_u8(op as u8);
        buf.put_u8(0);
        buf.put_u32_le(request_id);
        let mut writer = buf.writer();
        bincode::serde::encode_into_std_write(payload, &mut writer, wire_config())
            .map_err(|e| EncodeError::Serialize(e.to_string()))?;
        self.finish(writer.into_inner().freeze())
    }

    /// The largest uncompressed payload a frame may carry: what the peer
    /// accepts after inflating, and what fits a frame uncompressed (so
    /// also compressed, which is only chosen when smaller).
    pub fn payload_budget(&self) -> usize {
        (self.config.max_payload_bytes).min(self.config.max_frame_bytes.saturating_sub(HEADER_LEN))
    }

    /// Compresses an already-encoded, uncompressed frame when its payload
    /// passes the threshold (and shrinks); otherwise returns it as is.
    /// Frames assembled elsewhere (the cluster script) go through this
    /// once per node before fan-out.
    pub fn compress_frame(&self, frame: Bytes) -> Bytes {
        if frame.len() <= HEADER_LEN
            || frame[1] & FLAG_COMPRESSED != 0
            || frame.len() - HEADER_LEN <= self.config.compress_threshold
        {
            return frame;
        }
        let mut z = Vec::with_capacity(frame.len() / 2 + HEADER_LEN);
        z.extend_from_slice(&frame[..HEADER_LEN]);
        deflate(&frame[HEADER_LEN..], self.config.compression_level, &mut z);
        if z.len() > HEADER_LEN && z.len() < frame.len() {
            z[1] |= FLAG_COMPRESSED;
            Bytes::from(z)
        } else {
            frame
        }
    }

    /// Reads and checks the header: size, opcode known, reserved flags
    /// clear. Does not look at the payload.
    pub fn header(&self, frame: &[u8]) -> Result<Header, DecodeError> {
        if frame.len() > self.config.max_frame_bytes {
            return Err(DecodeError::FrameTooLarge {
                len: frame.len(),
                max: self.config.max_frame_bytes,
            });
        }
        parse_header(frame)
    }

    /// Decodes a frame a client sent. Returns the request id and frame.
    pub fn decode_client(&self, frame: &[u8]) -> Result<(u32, ClientFrame), DecodeError> {
        let h = self.header(frame)?;
        if !h.opcode.is_client() {
            return Err(DecodeError::UnknownOpcode(h.opcode as u8));
        }
        let payload = self.payload(&h, frame)?;
        let p = &payload[..];
        let f = match h.opcode {
            Opcode::Identify => ClientFrame::Identify(read(p)?),
            Opcode::Heartbeat => {
                read::<()>(p)?;
                ClientFrame::Heartbeat
            }
            Opcode::Join => ClientFrame::Join(read(p)?),
            Opcode::Leave => ClientFrame::Leave(read(p)?),
            Opcode::Send => ClientFrame::Send(read(p)?),
            Opcode::Typing => ClientFrame::Typing(read(p)?),
            Opcode::React => ClientFrame::React(read(p)?),
            Opcode::History => ClientFrame::History(read(p)?),
            other => return Err(DecodeError::UnknownOpcode(other as u8)),
        };
        Ok((h.request_id, f))
    }

    /// Decodes a frame the server sent. A `Batch` comes back as its raw
    /// inner frames (headers checked); [`Codec::decode_server_all`]
    /// flattens it.
    pub fn decode_server(&self, frame: &[u8]) -> Result<(u32, ServerFrame), DecodeError> {
        let h = self.header(frame)?;
        if h.opcode.is_client() {
            return Err(DecodeError::UnknownOpcode(h.opcode as u8));
        }
        let payload = self.payload(&h, frame)?;
        let p = &payload[..];
        let f = match h.opcode {
            Opcode::Ready => ServerFrame::Ready(read(p)?),
            Opcode::HeartbeatAck => ServerFrame::HeartbeatAck(read(p)?),
            Opcode::Joined => ServerFrame::Joined(read(p)?),
            Opcode::Left => ServerFrame::Left(read(p)?),
            Opcode::MessageSent => ServerFrame::MessageSent(read(p)?),
            Opcode::Reacted => ServerFrame::Reacted(read(p)?),
            Opcode::Ok => {
                read::<()>(p)?;
                ServerFrame::Ok
            }
            Opcode::HistoryPage => ServerFrame::HistoryPage(read(p)?),
            Opcode::Resumed => ServerFrame::Resumed(read(p)?),
            Opcode::Error => ServerFrame::Error(read(p)?),
            Opcode::NewMessage => ServerFrame::NewMessage(read(p)?),
            Opcode::UserTyping => ServerFrame::UserTyping(read(p)?),
            Opcode::Reaction => ServerFrame::Reaction(read(p)?),
            Opcode::Batch => {
                let batch: Batch = read(p)?;
                for inner in &batch.frames {
                    check_batch_member(inner)?;
                }
                ServerFrame::Batch(batch)
            }
            other => return Err(DecodeError::UnknownOpcode(other as u8)),
        };
        Ok((h.request_id, f))
    }

    /// Decodes a server frame and, if it is a batch, its inner frames, so
    /// the caller sees a flat, ordered list of (request id, frame).
    pub fn decode_server_all(&self, frame: &[u8]) -> Result<Vec<(u32, ServerFrame)>, DecodeError> {
        match self.decode_server(frame)? {
            (_, ServerFrame::Batch(batch)) => {
                let mut out = Vec::with_capacity(batch.frames.len());
                for inner in &batch.frames {
                    out.push(self.decode_server(inner)?);
                }
                Ok(out)
            }
            single => Ok(vec![single]),
        }
    }

    fn payload<'a>(&self, h: &Header, frame: &'a [u8]) -> Result<Payload<'a>, DecodeError> {
        let raw = &frame[HEADER_LEN..];
        if h.compressed() {
            // A client request can be no larger than its §6 limits allow,
            // so inflating one stops there: a 1 KiB Send that claims
            // 1 MiB costs what a legal Send costs. (An uncompressed
            // payload is already in memory at its size.)
            let cap = match crate::limits::max_client_payload(h.opcode) {
                Some(legal) => legal.min(self.config.max_payload_bytes),
                None => self.config.max_payload_bytes,
            };
            Ok(Payload::Owned(inflate(raw, cap)?))
        } else {
            if raw.len() > self.config.max_payload_bytes {
                return Err(DecodeError::PayloadTooLarge {
                    max: self.config.max_payload_bytes,
                });
            }
            Ok(Payload::Borrowed(raw))
        }
    }
}

enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Payload<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

fn parse_header(frame: &[u8]) -> Result<Header, DecodeError> {
    let Some(head) = frame.get(..HEADER_LEN) else {
        return Err(DecodeError::TruncatedHeader { len: frame.len() });
    };
    let opcode = Opcode::from_u8(head[0]).ok_or(DecodeError::UnknownOpcode(head[0]))?;
    let flags = head[1];
    if flags & !FLAG_COMPRESSED != 0 {
        return Err(DecodeError::ReservedFlags(flags));
    }
    let request_id = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    Ok(Header {
        opcode,
        flags,
        request_id,
    })
}

/// A batch member must be a complete, uncompressed, non-batch server frame.
fn check_batch_member(inner: &[u8]) -> Result<(), DecodeError> {
    let h = parse_header(inner)?;
    if h.opcode.is_client() {
        return Err(DecodeError::UnknownOpcode(h.opcode as u8));
    }
    if h.opcode == Opcode::Batch {
        return Err(DecodeError::NestedBatch);
    }
    if h.compressed() {
        return Err(DecodeError::CompressedInBatch);
    }
    Ok(())
}

/// Decodes one payload, requiring every byte to be consumed.
fn read<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let (value, used): (T, usize) =
        bincode::serde::borrow_decode_from_slice(payload, wire_config())
            .map_err(|e| DecodeError::MalformedPayload(e.to_string()))?;
    if used != payload.len() {
        return Err(DecodeError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}
