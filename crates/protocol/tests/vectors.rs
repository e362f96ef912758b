//! Checks the codec against every file in `proto-spec/vectors/`, in both
//! directions. The files are the cross-language contract (the web client
//! reads the same ones), so a change here is a protocol change.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chatgate_protocol::{ClientFrame, Codec, CodecConfig, Opcode, ServerFrame};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto-spec/vectors")
}

fn load_all() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(vectors_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.extension().is_none_or(|e| e != "json") || name == "index" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v["name"], name.as_str(), "file name and \"name\" differ");
        out.push((name, v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn codec_for(v: &Value) -> Codec {
    let mut cfg = CodecConfig::default();
    if let Some(c) = v.get("config") {
        if let Some(m) = c.get("max_frame_bytes").and_then(Value::as_u64) {
            cfg.max_frame_bytes = m as usize;
        }
        if let Some(m) = c.get("max_payload_bytes").and_then(Value::as_u64) {
            cfg.max_payload_bytes = m as usize;
        }
    }
    Codec::new(cfg)
}

fn bytes_of(v: &Value) -> Vec<u8> {
    hex::decode(v["hex"].as_str().expect("hex field")).expect("valid hex")
}

#[test]
fn index_lists_exactly_the_vector_files() {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(vectors_dir().join("index.json")).unwrap())
            .unwrap();
    let listed: BTreeSet<String> = index["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = load_all().into_iter().map(|(n, _)| n).collect();
    assert_eq!(listed, present, "index.json and the vector files disagree");
}

#[test]
fn valid_vectors_decode_and_encode() {
    let mut checked = 0;
    for (name, v) in load_all() {
        if v.get("error").is_some() {
            continue;
        }
        let codec = codec_for(&v);
        let bytes = bytes_of(&v);
        let request_id = v["request_id"].as_u64().unwrap() as u32;
        let canonical = v["canonical"].as_bool().unwrap();
        assert_eq!(
            bytes[1] & 1 == 0,
            canonical,
            "{name}: canonical flag vs compressed bit"
        );
        match v["direction"].as_str().unwrap() {
            "client_to_server" => {
                let expected: ClientFrame = serde_json::from_value(v["frame"].clone()).unwrap();
                let (rid, got) = codec
                    .decode_client(&bytes)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!((rid, &got), (request_id, &expected), "{name}: decode");
                let encoded = codec.encode_client(request_id, &expected).unwrap();
                if canonical {
                    assert_eq!(hex::encode(&encoded), hex::encode(&bytes), "{name}: encode");
                } else {
                    assert_eq!(
                        codec.decode_client(&encoded).unwrap(),
                        (rid, expected),
                        "{name}"
                    );
                }
            }
            "server_to_client" => {
                let expected: ServerFrame = serde_json::from_value(v["frame"].clone()).unwrap();
                let (rid, got) = codec
                    .decode_server(&bytes)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!((rid, &got), (request_id, &expected), "{name}: decode");
                let encoded = codec.encode_server(request_id, &expected).unwrap();
                if canonical {
                    assert_eq!(hex::encode(&encoded), hex::encode(&bytes), "{name}: encode");
                } else {
                    assert_eq!(
                        codec.decode_server(&encoded).unwrap(),
                        (rid, expected),
                        "{name}"
                    );
                }
                if let Some(flat) = v.get("flattened") {
                    let want: Vec<(u32, ServerFrame)> = flat
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| {
                            (
                                f["request_id"].as_u64().unwrap() as u32,
                                serde_json::from_value(f["frame"].clone()).unwrap(),
                            )
                        })
                        .collect();
                    assert_eq!(
                        codec.decode_server_all(&bytes).unwrap(),
                        want,
                        "{name}: flattened"
                    );
                }
            }
            other => panic!("{name}: unknown direction {other}"),
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} valid vectors");
}

#[test]
fn invalid_vectors_fail_with_their_error() {
    let mut checked = 0;
    for (name, v) in load_all() {
        let Some(kind) = v.get("error").and_then(Value::as_str) else {
            continue;
        };
        let codec = codec_for(&v);
        let bytes = bytes_of(&v);
        let err = match v["direction"].as_str().unwrap() {
            "client_to_server" => codec.decode_client(&bytes).err(),
            _ => codec.decode_server_all(&bytes).err(),
        };
        let err = err.unwrap_or_else(|| panic!("{name}: decoded, expected {kind}"));
        assert_eq!(err.kind(), kind, "{name}: {err}");
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} invalid vectors");
}

#[test]
fn every_opcode_has_a_vector() {
    let mut seen = BTreeSet::new();
    for (_, v) in load_all() {
        if v.get("error").is_some() {
            continue;
        }
        seen.insert(bytes_of(&v)[0]);
    }
    for byte in 0..=u8::MAX {
        if Opcode::from_u8(byte).is_some() {
            assert!(seen.contains(&byte), "no vector for opcode 0x{byte:02x}");
        }
    }
    // Compressed frames and edge cases are present too.
    let all = load_all();
    assert!(
        all.iter().any(|(_, v)| v["canonical"] == false),
        "no compressed vector"
    );
    assert!(
        all.iter().any(|(_, v)| v.get("flattened").is_some()),
        "no batch vector"
    );
}

/// Corrupting any single byte of a valid vector must change what it
/// decodes to (or make it fail): the vectors pin every byte.
#[test]
fn every_byte_of_every_canonical_vector_matters() {
    for (name, v) in load_all() {
        if v.get("error").is_some() || v["canonical"] == false {
            continue;
        }
        let codec = codec_for(&v);
        let bytes = bytes_of(&v);
        let client = v["direction"] == "client_to_server";
        let original = if client {
            format!("{:?}", codec.decode_client(&bytes))
        } else {
            format!("{:?}", codec.decode_server(&bytes))
        };
        for i in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[i] ^= 0x01;
            let after = if client {
                format!("{:?}", codec.decode_client(&corrupt))
            } else {
                format!("{:?}", codec.decode_server(&corrupt))
            };
            assert_ne!(original, after, "{name}: flipping byte {i} changed nothing");
            // And one byte fewer is never the same frame.
            let shorter = &bytes[..i];
            let cut = if client {
                format!("{:?}", codec.decode_client(shorter))
            } else {
                format!("{:?}", codec.decode_server(shorter))
            };
            assert_ne!(original, cut, "{name}: truncating at {i} changed nothing");
        }
    }
}

/// Decoders accept non-minimal varints (bincode does); encoders never
/// write them. PROTOCOL.md §4.1 documents both halves.
#[test]
fn non_minimal_varints_are_accepted_but_never_written() {
    let codec = Codec::default();
    // History { room: "g", before: None, limit: 5 } with limit as 0xFB 05 00.
    let long = [8, 0, 1, 0, 0, 0, 1, b'g', 0, 0xFB, 5, 0];
    let (_, frame) = codec.decode_client(&long).unwrap();
    let short = codec.encode_client(1, &frame).unwrap();
    assert_eq!(&short[..], &[8, 0, 1, 0, 0, 0, 1, b'g', 0, 5]);
}
