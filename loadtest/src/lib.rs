//! Load-test harness for chatgate. Every scenario speaks the real
//! protocol through `chatgate_client`, and reports HDR-histogram
//! percentiles (merged exactly, never averaged).
//!
//! # Layout
//! - [`report`]: latency histograms and the printed/JSON summary.
//! - [`latency`]: connect-to-Ready and message round-trip latency on an
//!   otherwise idle server.
//! - [`throughput`]: closed-loop stored-and-acked sends per second, and
//!   history page latency.
//! - [`joins`]: join latency in a `members` room, membership answer cold
//!   and warm, against an open room.
//! - [`capacity`]: what one Redis (or each Redis Cluster master) carries
//!   for the cluster, driven by the gateway's own fan-out engine.
//! - [`probes`]: what Postgres, Redis and the gateways' store spent per
//!   action (`--postgres-url`, `--redis-url`, `--metrics-url`).
//! - [`run`]: coordinator side of `idle`, `fanout`, `ramp`, `chat`:
//!   phases, gateway sampling (RSS, CPU), summary, JSON, picture, compare.
//! - [`worker`]: worker processes and exact merging of their histograms.
//! - [`scenario`]: what each worker does in those scenarios.
//! - [`conn`]: sessions from chosen source addresses (127.0.0.2, ...).
//! - [`svg`]: the picture.

pub mod capacity;
pub mod conn;
pub mod joins;
pub mod latency;
pub mod probes;
pub mod report;
pub mod run;
pub mod scenario;
pub mod svg;
pub mod throughput;
pub mod worker;

use chatgate_protocol::token::{Claims, Verifier, unix_now};

/// The gateway's development secret (loopback only); override with
/// `--token-secret` when the target runs with its own.
pub const DEV_SECRET: &str = "chatgate-dev-secret-not-for-production";

/// Mints a token for `user`, valid for a day, allowing every room
/// (`rooms: ["*"]`): the harness measures delivery, not grants, and its
/// rooms are in the gateway's default `members` namespace.
pub fn token(secret: &str, user: &str) -> String {
    Verifier::new(secret.as_bytes()).mint(&Claims {
        sub: user.to_owned(),
        name: Some(user.to_owned()),
        picture: None,
        exp: unix_now() + 86_400,
        rooms: vec!["*".to_owned()],
    })
}
