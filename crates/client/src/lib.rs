//! Native Rust client for chatgate (`chat.v1`).
//!
//! # Layout
//! - [`raw`]: [`RawConnection`], one WebSocket speaking frames, no policy.
//!   Tests and the load harness use it to do exactly what they mean,
//!   including what a well-behaved client never does.
//! - [`client`]: [`Client`], the application-facing handle: requests that
//!   resolve to their reply, an event stream, heartbeats, and automatic
//!   reconnect with exponential backoff and jitter, resuming every room
//!   from its last position and re-sending unanswered requests (all
//!   requests are idempotent; sends keep their client message id).
//! - `bin/chat.rs`: the `chat` command-line tool.

pub mod client;
pub mod raw;

pub use client::{Client, ClientConfig, ClientError, Event};
pub use raw::{Incoming, RawConnection};
