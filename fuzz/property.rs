//! The decoder's property, in one place for both of its runners: the
//! `decode` fuzz target (libFuzzer's inputs) and the protocol crate's
//! tests (the seed corpus and generated inputs, on every `cargo test`).
//! Whatever decodes must re-encode to something that decodes to the same
//! frame, with default limits and with tiny ones (so the cap paths are
//! reached quickly); a panic anywhere is a failure too.

use chatgate_protocol::{Codec, CodecConfig};

/// Default limits, and limits small enough that short inputs hit them.
pub(crate) fn codecs() -> [Codec; 2] {
    let tiny = Codec::new(CodecConfig {
        max_frame_bytes: 512,
        max_payload_bytes: 1024,
        compress_threshold: 16,
        compression_level: 1,
    });
    [Codec::default(), tiny]
}

/// Checks the property on `data`; returns how many frames decoded and
/// round-tripped, so a caller can tell a run that checked something from
/// one where nothing decoded.
pub(crate) fn check(data: &[u8]) -> usize {
    let mut round_tripped = 0;
    for codec in codecs() {
        if let Ok((rid, frame)) = codec.decode_client(data) {
            let again = codec.encode_client(rid, &frame).expect("re-encode");
            assert_eq!(
                codec.decode_client(&again).expect("re-decode"),
                (rid, frame)
            );
            round_tripped += 1;
        }
        if let Ok(frames) = codec.decode_server_all(data) {
            for (rid, frame) in frames {
                // Re-encoding can come out larger than what was decoded
                // (its sender compressed better than this codec does),
                // and these limits may refuse that: no round trip then.
                if let Ok(again) = codec.encode_server(rid, &frame) {
                    assert_eq!(
                        codec.decode_server(&again).expect("re-decode"),
                        (rid, frame)
                    );
                    round_tripped += 1;
                }
            }
        }
    }
    round_tripped
}
