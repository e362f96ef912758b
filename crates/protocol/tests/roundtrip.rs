//! Property tests: every frame round-trips through the codec (compressed
//! or not), and the fuzz target's property (whatever decodes re-encodes
//! to the same frame; nothing panics) holds on its seed corpus, on
//! arbitrary bytes and on mutated frames.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

/// The `decode` fuzz target's property, the same file the target runs.
#[path = "../../../fuzz/property.rs"]
mod property;

use bytes::Bytes;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, Codec, CodecConfig, ServerFrame};
use proptest::collection::vec;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "\\PC{0,12}", "[a-z]{200,400}"]
}

fn int() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(250),
        Just(251),
        Just(65_535),
        Just(65_536),
        Just(u32::MAX as u64),
        Just(u32::MAX as u64 + 1),
        Just(u64::MAX),
        any::<u64>()
    ]
}

fn position() -> impl Strategy<Value = RoomPosition> {
    (text(), int(), int()).prop_map(|(room, epoch, seq)| RoomPosition { room, epoch, seq })
}

fn attachment() -> impl Strategy<Value = Attachment> {
    (text(), text(), text(), int()).prop_map(|(url, name, mime, size)| Attachment {
        url,
        name,
        mime,
        size,
    })
}

fn cursor() -> impl Strategy<Value = Cursor> {
    (int(), int()).prop_map(|(created_at_ms, message_id)| Cursor {
        created_at_ms,
        message_id,
    })
}

fn message() -> impl Strategy<Value = Message> {
    (
        (int(), text(), int(), text(), text(), text(), text(), text()),
        vec(attachment(), 0..3),
        vec(
            (text(), any::<u32>()).prop_map(|(emoji, count)| ReactionCount { emoji, count }),
            0..3,
        ),
        int(),
    )
        .prop_map(
            |(
                (id, room, seq, sender_id, sender_name, sender_image, client_msg_id, body),
                attachments,
                reactions,
                created_at_ms,
            )| {
                Message {
                    id,
                    room,
                    seq,
                    sender_id,
                    sender_name,
                    sender_image,
                    client_msg_id,
                    body,
                    attachments,
                    reactions,
                    created_at_ms,
                }
            },
        )
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (
            text(),
            proptest::option::of((any::<[u8; 16]>(), vec(position(), 0..4)))
        )
            .prop_map(|(token, resume)| ClientFrame::Identify(Identify {
                token,
                resume: resume.map(|(session_id, positions)| Resume {
                    session_id,
                    positions
                }),
            })),
        Just(ClientFrame::Heartbeat),
        vec(text(), 0..5).prop_map(|rooms| ClientFrame::Join(Rooms { rooms })),
        vec(text(), 0..5).prop_map(|rooms| ClientFrame::Leave(Rooms { rooms })),
        (
            text(),
            text(),
            prop_oneof![text(), "[ -~]{1000,5000}"],
            vec(attachment(), 0..3)
        )
            .prop_map(
                |(room, client_msg_id, body, attachments)| ClientFrame::Send(Send {
                    room,
                    client_msg_id,
                    body,
                    attachments
                })
            ),
        text().prop_map(|room| ClientFrame::Typing(Typing { room })),
        (text(), int(), text(), any::<bool>()).prop_map(|(room, message_id, emoji, remove)| {
            ClientFrame::React(React {
                room,
                message_id,
                emoji,
                remove,
            })
        }),
        (text(), proptest::option::of(cursor()), any::<u32>()).prop_map(|(room, before, limit)| {
            ClientFrame::History(History {
                room,
                before,
                limit,
            })
        }),
    ]
}

fn event_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (int(), message())
            .prop_map(|(epoch, message)| ServerFrame::NewMessage(NewMessage { epoch, message })),
        (text(), text())
            .prop_map(|(room, user_id)| ServerFrame::UserTyping(UserTyping { room, user_id })),
        (text(), int(), int(), int(), text(), text(), any::<bool>()).prop_map(
            |(room, epoch, seq, message_id, user_id, emoji, removed)| {
                ServerFrame::Reaction(Reaction {
                    room,
                    epoch,
                    seq,
                    message_id,
                    user_id,
                    emoji,
                    removed,
                })
            }
        ),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (
            any::<[u8; 16]>(),
            text(),
            text(),
            vec(position(), 0..4),
            any::<(u32, u32, u32, bool)>()
        )
            .prop_map(
                |(session_id, user_id, user_name, rooms, (hi, ht, mf, resuming))| {
                    ServerFrame::Ready(Ready {
                        session_id,
                        user_id,
                        user_name,
                        rooms,
                        heartbeat_interval_ms: hi,
                        heartbeat_timeout_ms: ht,
                        max_frame_bytes: mf,
                        resuming,
                    })
                }
            ),
        int().prop_map(|server_time_ms| ServerFrame::HeartbeatAck(HeartbeatAck { server_time_ms })),
        vec(position(), 0..4).prop_map(|rooms| ServerFrame::Joined(Joined { rooms })),
        vec(text(), 0..4).prop_map(|rooms| ServerFrame::Left(Rooms { rooms })),
        (text(), int(), int(), int(), int(), any::<bool>()).prop_map(
            |(room, message_id, epoch, seq, created_at_ms, duplicate)| {
                ServerFrame::MessageSent(MessageSent {
                    room,
                    message_id,
                    epoch,
                    seq,
                    created_at_ms,
                    duplicate,
                })
            }
        ),
        (text(), int(), int(), int()).prop_map(|(room, message_id, epoch, seq)| {
            ServerFrame::Reacted(Reacted {
                room,
                message_id,
                epoch,
                seq,
            })
        }),
        Just(ServerFrame::Ok),
        (text(), vec(message(), 0..4), proptest::option::of(cursor())).prop_map(
            |(room, messages, next)| ServerFrame::HistoryPage(HistoryPage {
                room,
                messages,
                next
            })
        ),
        vec(
            (text(), any::<bool>(), any::<u32>(), int(), int()).prop_map(
                |(room, recovered, replayed, epoch, seq)| {
                    RoomResume {
                        room,
                        recovered,
                        replayed,
                        epoch,
                        seq,
                    }
                }
            ),
            0..4
        )
        .prop_map(|rooms| ServerFrame::Resumed(Resumed { rooms })),
        (any::<u16>(), any::<u32>(), text()).prop_map(|(code, retry_after_ms, message)| {
            ServerFrame::Error(ErrorBody {
                code,
                retry_after_ms,
                message,
            })
        }),
        event_frame(),
    ]
}

/// Payload bytes of a request, uncompressed.
fn plain_len(frame: &ClientFrame) -> usize {
    let plain = Codec::new(CodecConfig {
        compress_threshold: usize::MAX,
        ..CodecConfig::default()
    });
    plain.encode_client(0, frame).unwrap().len() - 6
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn client_frames_round_trip(frame in client_frame(), rid in any::<u32>(), threshold in prop_oneof![Just(1024usize), Just(0), Just(usize::MAX)]) {
        let codec = Codec::new(CodecConfig { compress_threshold: threshold, ..CodecConfig::default() });
        let bytes = codec.encode_client(rid, &frame).unwrap();
        // Past the largest payload its opcode can legally have, a
        // compressed request is refused by size (inflating stops there).
        let legal = chatgate_protocol::limits::max_client_payload(frame.opcode()).unwrap();
        let compressed = bytes[1] & 1 != 0;
        if !compressed || plain_len(&frame) <= legal {
            prop_assert_eq!(codec.decode_client(&bytes).unwrap(), (rid, frame));
        } else {
            prop_assert_eq!(
                codec.decode_client(&bytes).unwrap_err(),
                chatgate_protocol::DecodeError::PayloadTooLarge { max: legal }
            );
        }
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame(), rid in any::<u32>(), threshold in prop_oneof![Just(1024usize), Just(0), Just(usize::MAX)]) {
        let codec = Codec::new(CodecConfig { compress_threshold: threshold, ..CodecConfig::default() });
        let bytes = codec.encode_server(rid, &frame).unwrap();
        prop_assert_eq!(codec.decode_server(&bytes).unwrap(), (rid, frame));
    }

    #[test]
    fn batches_flatten_in_order(events in vec(event_frame(), 0..8)) {
        let codec = Codec::default();
        let inner: Vec<Bytes> = events.iter().map(|e| {
            Codec::new(CodecConfig { compress_threshold: usize::MAX, ..CodecConfig::default() })
                .encode_server(0, e).unwrap()
        }).collect();
        let batch = codec.encode_batch(&inner).unwrap();
        let flat: Vec<ServerFrame> = codec.decode_server_all(&batch).unwrap().into_iter().map(|(_, f)| f).collect();
        prop_assert_eq!(flat, events);
    }

    #[test]
    fn arbitrary_bytes_hold_the_fuzz_property(bytes in vec(any::<u8>(), 0..512), op in any::<u8>(), flags in 0u8..4) {
        let mut b = bytes;
        if b.len() >= 2 { b[0] = op; b[1] = flags; }
        property::check(&b);
    }

    #[test]
    fn mutated_frames_hold_the_fuzz_property(frame in prop_oneof![
        server_frame().prop_map(|f| Codec::default().encode_server(7, &f).unwrap()),
        client_frame()
            .prop_filter("within its opcode's legal size", |f| {
                plain_len(f) <= chatgate_protocol::limits::max_client_payload(f.opcode()).unwrap()
            })
            .prop_map(|f| Codec::default().encode_client(7, &f).unwrap()),
    ], flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..6)) {
        let mut b = frame.to_vec();
        let unchanged = flips.iter().all(|(_, x)| *x == 0);
        for (i, x) in flips { let i = i.index(b.len()); b[i] ^= x; }
        let checked = property::check(&b);
        // An encoded frame decodes at least with the default limits: the
        // property was really exercised, not skipped.
        prop_assert!(!unchanged || checked >= 1, "a valid frame did not round-trip");
    }

    #[test]
    fn mutated_seeds_hold_the_fuzz_property(pick in any::<prop::sample::Index>(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>()) {
        let seeds: Vec<&Vec<u8>> = SEEDS.iter().map(|(_, b)| b).filter(|b| !b.is_empty()).collect();
        let mut b = seeds[pick.index(seeds.len())].clone();
        for (i, x) in flips { let i = i.index(b.len()); b[i] ^= x; }
        b.truncate(cut.index(b.len() + 1));
        property::check(&b);
    }
}

fn repo_dir(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// The fuzz target's seed corpus: (file name, bytes), by name.
static SEEDS: std::sync::LazyLock<Vec<(String, Vec<u8>)>> = std::sync::LazyLock::new(|| {
    let dir = repo_dir("fuzz/corpus/decode");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus in {}", dir.display());
    out
});

/// Every frame in `proto-spec/vectors/`: (name, bytes, valid).
fn vectors() -> Vec<(String, Vec<u8>, bool)> {
    let dir = repo_dir("proto-spec/vectors");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_none_or(|e| e != "json") || name == "index" {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let bytes = hex::decode(v["hex"].as_str().expect("hex field")).unwrap();
        out.push((name, bytes, v.get("error").is_none()));
    }
    out.sort();
    out
}

#[test]
fn the_vectors_and_seeds_hold_the_fuzz_property() {
    let mut not_round_tripped = Vec::new();
    for (name, bytes, valid) in vectors() {
        if property::check(&bytes) == 0 && valid {
            not_round_tripped.push(name);
        }
    }
    // A valid frame that decodes with neither codec means the property
    // was skipped, not that it held.
    assert!(
        not_round_tripped.is_empty(),
        "valid vectors that did not round-trip: {not_round_tripped:?}"
    );
    for (_, bytes) in SEEDS.iter() {
        property::check(bytes);
    }
}

/// The fuzzer starts from the seeds; stale ones (a vector changed since)
/// fail early in the decoder and leave the paths behind them unexplored.
#[test]
fn the_seed_corpus_is_the_vectors() {
    let want: Vec<(String, Vec<u8>)> = vectors().into_iter().map(|(n, b, _)| (n, b)).collect();
    let stale: Vec<&str> = want
        .iter()
        .filter(|v| !SEEDS.contains(v))
        .map(|(n, _)| n.as_str())
        .collect();
    let extra: Vec<&str> = SEEDS
        .iter()
        .filter(|s| !want.iter().any(|(n, _)| *n == s.0))
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        stale.is_empty() && extra.is_empty(),
        "fuzz/corpus/decode differs from proto-spec/vectors (refresh it as fuzz/README.md says): \
         missing or stale {stale:?}, no such vector {extra:?}"
    );
}
