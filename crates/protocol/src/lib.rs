//! chatgate wire protocol, version 1 (subprotocol `chat.v1`).
//!
//! `proto-spec/PROTOCOL.md` is the authority; this crate is its reference
//! implementation and does no I/O. A frame is one binary WebSocket
//! message: a fixed 6-byte [`Header`] followed by a payload whose layout
//! the opcode decides.
//!
//! # Layout
//! - [`opcode`]: the opcode table and what each range means.
//! - [`payload`]: one struct per opcode, in wire field order.
//! - [`frame`]: [`ClientFrame`] / [`ServerFrame`] and the header.
//! - [`codec`]: [`Codec`], the only code that turns bytes into frames and
//!   back, with size caps and compression.
//! - [`limits`]: per-field request limits, shared by server and clients.
//! - [`close`]: WebSocket close codes and the client action for each.
//! - [`template`]: event frames split around epoch and sequence, for the
//!   cluster script that assigns them.
//! - [`error_code`]: codes carried in `Error` frames.
//! - `token` (feature `token`): HS256 access tokens.
//! - `tls` (feature `tls`): the TLS client settings every component uses
//!   (rustls on ring, Mozilla's and the system's roots plus an operator's CA).
//! - `compress`, `wire` (private): capped raw DEFLATE, and serde helpers
//!   that keep decoding from allocating on a peer's say-so.
//!
//! # Invariants
//! - Decoding never panics and never allocates more than the configured
//!   payload cap, whatever the input.
//! - Encoding is deterministic for uncompressed frames, so broadcast
//!   frames can be encoded once and shared as [`bytes::Bytes`].

pub mod close;
pub mod codec;
mod compress;
pub mod config;
pub mod error;
pub mod error_code;
pub mod frame;
pub mod limits;
pub mod opcode;
pub mod payload;
pub mod template;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "token")]
pub mod token;
mod wire;

pub use close::{ClientAction, CloseCode};
pub use codec::Codec;
pub use config::CodecConfig;
pub use error::{DecodeError, EncodeError};
pub use error_code::ErrorCode;
pub use frame::{ClientFrame, HEADER_LEN, Header, ServerFrame};
pub use opcode::Opcode;
pub use template::EventTemplate;

/// The WebSocket subprotocol a client must offer (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "chat.v1";
