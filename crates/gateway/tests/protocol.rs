//! Wire-level rules of PROTOCOL.md §1 checked against a real gateway.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use chatgate_client::RawConnection;
use chatgate_protocol::Codec;
use common::*;

/// RFC 6455 §4.1: subprotocol tokens are compared case-sensitively, so
/// only `chat.v1` selects the protocol; `chat.V1` is refused with 400.
#[tokio::test]
async fn the_subprotocol_is_matched_case_sensitively() {
    let gw = Gateway::start(&[]);
    let refused = RawConnection::connect_with(&gw.url(), Codec::default(), Some("chat.V1")).await;
    let Err(e) = refused else {
        panic!("chat.V1 must not be accepted");
    };
    assert!(e.to_string().contains("400"), "refused with 400: {e}");
    let accepted =
        RawConnection::connect_with(&gw.url(), Codec::default(), Some("x, chat.v1")).await;
    assert!(accepted.is_ok(), "chat.v1 among others is accepted");
}
