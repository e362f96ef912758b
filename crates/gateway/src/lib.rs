//! The chatgate gateway: WebSocket and HTTP on one port, sessions, rooms,
//! limits and metrics.
//!
//! # Layout
//! - [`config`]: settings, their defaults and why; file + env + flags.
//! - [`server`]: listener, accept loop, graceful shutdown.
//! - [`starting`]: what the port answers while start-up waits for its
//!   backends (alive, not ready).
//! - [`admission`]: who gets a socket before Identify: one descriptor
//!   budget, a pending pool apart from sessions, per-address caps.
//! - [`http`]: `/ws` upgrade, `/health`, `/metrics`.
//! - [`page`]: the chat page at `/` (built into the binary) and its
//!   development sign-in.
//! - [`connection`]: the per-connection task (framing and dispatch only).
//! - [`session`]: request rules: identify, join, send, history... no I/O.
//! - [`outbox`]: the bounded per-connection queue (shed, then 4001).
//! - [`hub`]: room membership on this node; delivery to local members.
//! - [`users`]: per-user connection cap and rate limit.
//! - [`auth`]: access tokens: HS256, RS256/ES256 keys and JWKS, claims.
//! - [`metrics`]: Prometheus metrics.
//! - [`node`]: the shared state a connection needs.
//!
//! # Invariants
//! - A broadcast is encoded once; members get `Bytes` clones through
//!   their outboxes. Nothing on the send path takes a global lock.
//! - Every queue is bounded; a full outbox closes its connection (4001),
//!   it never grows or blocks the sender.
//! - A message is acknowledged only after the store returned it durable.
//! - Per room, a connection sees sequence numbers in increasing order.

pub mod access;
pub mod admin;
pub mod admission;
pub mod auth;
pub mod config;
pub mod connection;
pub mod control;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod page;
pub mod policy;
pub mod server;
pub mod session;
pub mod starting;
pub mod users;

pub use config::Config;
pub use node::Node;
pub use server::{Server, ShutdownHandle};
