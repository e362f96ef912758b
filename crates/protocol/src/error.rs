//! Codec errors. Every way an input can be wrong has its own variant, a
//! stable [`DecodeError::kind`] string (used by the test vectors) and a
//! close code, so the gateway's mapping is one function call.

use crate::CloseCode;

/// Why bytes could not be decoded into a frame. Decoding never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than the configured maximum frame size (checked first,
    /// before any other work).
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Actual length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// Fewer than the 6 header bytes.
    #[error("frame of {len} bytes is shorter than the 6-byte header")]
    TruncatedHeader {
        /// Actual length.
        len: usize,
    },
    /// An opcode v1 does not define, or one for the other direction.
    #[error("unknown opcode 0x{0:02x} for this direction")]
    UnknownOpcode(u8),
    /// A flag bit other than bit 0 was set.
    #[error("reserved flag bits set: 0x{0:02x}")]
    ReservedFlags(u8),
    /// The compressed payload is not valid raw DEFLATE.
    #[error("payload is not valid raw DEFLATE")]
    BadCompression,
    /// The payload (after inflating, if compressed) exceeds the payload
    /// cap. Inflation stops at the cap, so a deflate bomb ends here.
    #[error("payload exceeds the {max}-byte limit")]
    PayloadTooLarge {
        /// Configured limit.
        max: usize,
    },
    /// The payload does not match the opcode's layout (truncated field,
    /// invalid UTF-8, a bool that is not 0 or 1, an oversized varint...).
    #[error("malformed payload: {0}")]
    MalformedPayload(String),
    /// Bytes left over after the payload's last field.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    /// A batch inside a batch.
    #[error("a batch may not contain a batch")]
    NestedBatch,
    /// A compressed frame inside a batch.
    #[error("frames inside a batch may not be compressed")]
    CompressedInBatch,
}

impl DecodeError {
    /// Stable name, used by `proto-spec/vectors/*.json` (`"error"` field).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::FrameTooLarge { .. } => "frame_too_large",
            DecodeError::TruncatedHeader { .. } => "truncated_header",
            DecodeError::UnknownOpcode(_) => "unknown_opcode",
            DecodeError::ReservedFlags(_) => "reserved_flags",
            DecodeError::BadCompression => "bad_compression",
            DecodeError::PayloadTooLarge { .. } => "payload_too_large",
            DecodeError::MalformedPayload(_) => "malformed_payload",
            DecodeError::TrailingBytes(_) => "trailing_bytes",
            DecodeError::NestedBatch => "nested_batch",
            DecodeError::CompressedInBatch => "compressed_in_batch",
        }
    }

    /// The close code a server sends when a client's frame fails this way.
    pub fn close_code(&self) -> CloseCode {
        match self {
            DecodeError::FrameTooLarge { .. } | DecodeError::PayloadTooLarge { .. } => {
                CloseCode::FrameTooLarge
            }
            _ => CloseCode::ProtocolViolation,
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame would exceed the configured maximum frame size.
    #[error("encoded frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The serializer failed (cannot happen for v1 payload types; kept so
    /// a future type cannot turn into a panic).
    #[error("serialize: {0}")]
    Serialize(String),
    /// A batch may only hold uncompressed, non-batch frames.
    #[error("invalid batch member: {0}")]
    InvalidBatchMember(&'static str),
}
