//! Feeds arbitrary bytes to both decoders, with default limits and with
//! tiny ones (so the cap paths are reached quickly), and checks that
//! whatever decodes re-encodes to something that decodes to the same
//! frame.
#![no_main]

use chatgate_protocol::{Codec, CodecConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tiny = Codec::new(CodecConfig {
        max_frame_bytes: 512,
        max_payload_bytes: 1024,
        compress_threshold: 16,
        compression_level: 1,
    });
    for codec in [Codec::default(), tiny] {
        if let Ok((rid, frame)) = codec.decode_client(data) {
            let again = codec.encode_client(rid, &frame).expect("re-encode");
            assert_eq!(codec.decode_client(&again).expect("re-decode"), (rid, frame));
        }
        if let Ok(frames) = codec.decode_server_all(data) {
            for (rid, frame) in frames {
                if let Ok(again) = codec.encode_server(rid, &frame) {
                    assert_eq!(codec.decode_server(&again).expect("re-decode"), (rid, frame));
                }
            }
        }
    }
});
