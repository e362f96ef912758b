//! Feeds arbitrary bytes to both decoders, with default limits and with
//! tiny ones (so the cap paths are reached quickly), and checks that
//! whatever decodes re-encodes to something that decodes to the same
//! frame. The property lives in `property.rs`, which the protocol crate's
//! tests also run (over the seed corpus and generated inputs).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../property.rs"]
mod property;

fuzz_target!(|data: &[u8]| {
    property::check(data);
});
