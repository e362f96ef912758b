//! Writes `proto-spec/vectors/*.json` from the cases below.
//!
//! Run only when a case is added on purpose:
//! `cargo run -p chatgate-protocol --example gen_vectors`. The vector
//! files are the contract; `tests/vectors.rs` checks the codec against
//! the committed files, never against this program, so an accidental
//! codec change shows up as a failing test, not as regenerated vectors.

use std::path::PathBuf;

use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, Codec, CodecConfig, ServerFrame};
use serde_json::{Value, json};

fn msg(id: u64, seq: u64, body: &str) -> Message {
    Message {
        id,
        room: "general".into(),
        seq,
        sender_id: "u-alice".into(),
        sender_name: "Alice".into(),
        sender_image: "https://i.example/a.png".into(),
        client_msg_id: format!("c-{id}"),
        body: body.into(),
        attachments: vec![],
        reactions: vec![],
        created_at_ms: 1_764_316_800_000 + id,
    }
}

fn pos(room: &str, epoch: u64, seq: u64) -> RoomPosition {
    RoomPosition {
        room: room.into(),
        epoch,
        seq,
    }
}

struct Out {
    dir: PathBuf,
    names: Vec<String>,
}

impl Out {
    fn write(&mut self, name: &str, value: Value) {
        let path = self.dir.join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(&value).expect("json") + "\n";
        std::fs::write(&path, text).expect("write vector");
        self.names.push(name.to_owned());
    }

    fn client(&mut self, name: &str, description: &str, request_id: u32, frame: ClientFrame) {
        let codec = Codec::default();
        let bytes = codec.encode_client(request_id, &frame).expect("encode");
        let canonical = bytes[1] & 1 == 0;
        self.write(
            name,
            json!({
                "name": name,
                "direction": "client_to_server",
                "description": description,
                "request_id": request_id,
                "frame": frame,
                "canonical": canonical,
                "hex": hex::encode(&bytes),
            }),
        );
    }

    fn server(&mut self, name: &str, description: &str, request_id: u32, frame: ServerFrame) {
        let codec = Codec::default();
        let bytes = codec.encode_server(request_id, &frame).expect("encode");
        let canonical = bytes[1] & 1 == 0;
        let mut v = json!({
            "name": name,
            "direction": "server_to_client",
            "description": description,
            "request_id": request_id,
            "frame": frame,
            "canonical": canonical,
            "hex": hex::encode(&bytes),
        });
        if let ServerFrame::Batch(_) = frame {
            let flat = codec.decode_server_all(&bytes).expect("decode batch");
            let flat: Vec<Value> = flat
                .into_iter()
                .map(|(rid, f)| json!({ "request_id": rid, "frame": f }))
                .collect();
            v["flattened"] = Value::Array(flat);
        }
        self.write(name, v);
    }

    fn invalid(
        &mut self,
        name: &str,
        description: &str,
        direction: &str,
        bytes: &[u8],
        config: Option<Value>,
    ) {
        let mut cfg = CodecConfig::default();
        if let Some(c) = &config {
            if let Some(m) = c.get("max_frame_bytes").and_then(Value::as_u64) {
                cfg.max_frame_bytes = m as usize;
            }
            if let Some(m) = c.get("max_payload_bytes").and_then(Value::as_u64) {
                cfg.max_payload_bytes = m as usize;
            }
        }
        let codec = Codec::new(cfg);
        let err = if direction == "client_to_server" {
            codec.decode_client(bytes).err()
        } else {
            codec.decode_server_all(bytes).err()
        }
        .expect("invalid vector must fail to decode");
        let mut v = json!({
            "name": name,
            "direction": direction,
            "description": description,
            "error": err.kind(),
            "hex": hex::encode(bytes),
        });
        if let Some(c) = config {
            v["config"] = c;
        }
        self.write(name, v);
    }
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto-spec/vectors");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for entry in std::fs::read_dir(&dir).expect("read dir") {
        let p = entry.expect("entry").path();
        if p.extension().is_some_and(|e| e == "json") {
            std::fs::remove_file(p).expect("remove old vector");
        }
    }
    let mut out = Out {
        dir: dir.clone(),
        names: vec![],
    };
    let codec = Codec::default();

    // ------------------------------------------------------------ client
    out.client(
        "identify_fresh",
        "Identify with a token and no resume state (the usual first frame).",
        1,
        ClientFrame::Identify(Identify {
            token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
            resume: None,
        }),
    );
    out.client(
        "identify_resume",
        "Identify resuming a session: 16-byte session id and a position per room.",
        1,
        ClientFrame::Identify(Identify {
            token: "tok".into(),
            resume: Some(Resume {
                session_id: [
                    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc,
                    0xdd, 0xee, 0xff,
                ],
                positions: vec![pos("general", 1, 250), pos("random", 7, 251)],
            }),
        }),
    );
    out.client(
        "heartbeat",
        "Heartbeat: empty payload.",
        9,
        ClientFrame::Heartbeat,
    );
    out.client(
        "heartbeat_max_request_id",
        "Request id 0xFFFFFFFF is little-endian in the header.",
        u32::MAX,
        ClientFrame::Heartbeat,
    );
    out.client(
        "join_many",
        "Join several rooms at once, including a unicode name.",
        2,
        ClientFrame::Join(Rooms {
            rooms: vec!["general".into(), "random".into(), "日本語".into()],
        }),
    );
    out.client(
        "join_room_name_128_bytes",
        "Join with a room name of exactly 128 bytes (the maximum).",
        3,
        ClientFrame::Join(Rooms {
            rooms: vec!["r".repeat(128)],
        }),
    );
    out.client(
        "leave_one",
        "Leave one room.",
        4,
        ClientFrame::Leave(Rooms {
            rooms: vec!["random".into()],
        }),
    );
    out.client(
        "send_basic",
        "Send a short message with no attachments.",
        5,
        ClientFrame::Send(Send {
            room: "general".into(),
            client_msg_id: "c-1".into(),
            body: "hello".into(),
            attachments: vec![],
        }),
    );
    out.client(
        "send_unicode_and_attachment",
        "Send with emoji, RTL and combining text, one attachment, a 64-byte client id and a size needing the 0xFC (u32) varint form.",
        6,
        ClientFrame::Send(Send {
            room: "général".into(),
            client_msg_id: "x".repeat(64),
            body: "👋🏽 שלום e\u{301} — ok".into(),
            attachments: vec![Attachment {
                url: "https://cdn.example/f/1.png".into(),
                name: "".into(),
                mime: "image/png".into(),
                size: 1_048_576,
            }],
        }),
    );
    out.client(
        "send_body_300_bytes",
        "Send whose body length (300) needs the 0xFB (u16) varint form.",
        7,
        ClientFrame::Send(Send {
            room: "general".into(),
            client_msg_id: "c-300".into(),
            body: "a".repeat(300),
            attachments: vec![],
        }),
    );
    out.client(
        "send_compressed",
        "Send with a 4 KiB body: payload above the 1 KiB threshold, so it is raw-DEFLATE compressed (flags bit 0). Compressed bytes are not canonical: decode and compare the frame.",
        8,
        ClientFrame::Send(Send {
            room: "general".into(),
            client_msg_id: "c-big".into(),
            body: "The quick brown fox jumps over the lazy dog. ".repeat(92),
            attachments: vec![],
        }),
    );
    out.client(
        "typing",
        "Typing indicator; request id 0 asks for no reply.",
        0,
        ClientFrame::Typing(Typing {
            room: "general".into(),
        }),
    );
    out.client(
        "react_add",
        "React with a ZWJ emoji sequence to message id 2^32 (u64 varint form 0xFD).",
        10,
        ClientFrame::React(React {
            room: "general".into(),
            message_id: 1 << 32,
            emoji: "👩‍👩‍👧".into(),
            remove: false,
        }),
    );
    out.client(
        "react_remove",
        "Remove a reaction.",
        11,
        ClientFrame::React(React {
            room: "general".into(),
            message_id: 42,
            emoji: "👍".into(),
            remove: true,
        }),
    );
    out.client(
        "history_newest",
        "History, newest page, server default size (limit 0).",
        12,
        ClientFrame::History(History {
            room: "general".into(),
            before: None,
            limit: 0,
        }),
    );
    out.client(
        "history_before_cursor",
        "History before a cursor, 100 per page.",
        13,
        ClientFrame::History(History {
            room: "general".into(),
            before: Some(Cursor {
                created_at_ms: 1_764_316_800_123,
                message_id: u64::MAX,
            }),
            limit: 100,
        }),
    );

    // ------------------------------------------------------------ server
    out.server(
        "ready",
        "Ready after Identify: session id, user, rooms with positions, heartbeat settings.",
        1,
        ServerFrame::Ready(Ready {
            session_id: [7; 16],
            user_id: "u-alice".into(),
            user_name: "Alice".into(),
            rooms: vec![pos("general", 1, 0), pos("random", 1, 65_535)],
            heartbeat_interval_ms: 25_000,
            heartbeat_timeout_ms: 20_000,
            max_frame_bytes: 1_048_576,
            resuming: false,
        }),
    );
    out.server(
        "ready_resuming",
        "Ready answering identify_resume: `general` is replayed, so it carries the \
         client's own position (1, 250) and events 251.. follow; `random` cannot be \
         replayed (its epoch changed), so it carries the room's current position.",
        1,
        ServerFrame::Ready(Ready {
            session_id: [9; 16],
            user_id: "u-alice".into(),
            user_name: "Alice".into(),
            rooms: vec![pos("general", 1, 250), pos("random", 8, 0)],
            heartbeat_interval_ms: 25_000,
            heartbeat_timeout_ms: 20_000,
            max_frame_bytes: 1_048_576,
            resuming: true,
        }),
    );
    out.server(
        "heartbeat_ack",
        "Reply to Heartbeat with the server clock.",
        9,
        ServerFrame::HeartbeatAck(HeartbeatAck {
            server_time_ms: 1_764_316_800_000,
        }),
    );
    out.server(
        "joined",
        "Reply to Join: the rooms now joined, with position (epoch 2^32 - 1).",
        2,
        ServerFrame::Joined(Joined {
            rooms: vec![pos("general", u32::MAX as u64, 65_536), pos("日本語", 1, 0)],
        }),
    );
    out.server(
        "left",
        "Reply to Leave.",
        4,
        ServerFrame::Left(Rooms {
            rooms: vec!["random".into()],
        }),
    );
    out.server(
        "left_removed",
        "Unsolicited Left (request id 0): the server took the connection out of a room (membership ended or room deleted); rejoining is refused with forbidden.",
        0,
        ServerFrame::Left(Rooms {
            rooms: vec!["team:1".into()],
        }),
    );
    out.server(
        "left_empty",
        "Reply to Leave naming no room (edge case: empty sequence).",
        4,
        ServerFrame::Left(Rooms { rooms: vec![] }),
    );
    out.server(
        "message_sent",
        "Ack of Send: stored id, epoch, room sequence, time.",
        5,
        ServerFrame::MessageSent(MessageSent {
            room: "general".into(),
            message_id: 1001,
            epoch: 1,
            seq: 251,
            created_at_ms: 1_764_316_800_000,
            duplicate: false,
        }),
    );
    out.server(
        "message_sent_duplicate",
        "Ack of a retried Send (same client id): the original message, duplicate = true.",
        6,
        ServerFrame::MessageSent(MessageSent {
            room: "general".into(),
            message_id: u64::MAX,
            epoch: u64::MAX,
            seq: u64::MAX,
            created_at_ms: 0,
            duplicate: true,
        }),
    );
    out.server(
        "reacted",
        "Ack of React.",
        10,
        ServerFrame::Reacted(Reacted {
            room: "general".into(),
            message_id: 42,
            epoch: 1,
            seq: 252,
        }),
    );
    out.server(
        "ok",
        "Empty success reply (to Typing with a request id).",
        14,
        ServerFrame::Ok,
    );
    out.server(
        "history_page",
        "A history page: two messages, one with reactions and an attachment, and a cursor.",
        12,
        ServerFrame::HistoryPage(HistoryPage {
            room: "general".into(),
            messages: vec![
                Message {
                    reactions: vec![
                        ReactionCount {
                            emoji: "👍".into(),
                            count: 3,
                        },
                        ReactionCount {
                            emoji: "🎉".into(),
                            count: 1,
                        },
                    ],
                    attachments: vec![Attachment {
                        url: "https://cdn.example/a.pdf".into(),
                        name: "a.pdf".into(),
                        mime: "application/pdf".into(),
                        size: 0,
                    }],
                    ..msg(2, 2, "second")
                },
                msg(1, 1, "first"),
            ],
            next: Some(Cursor {
                created_at_ms: 1_764_316_800_001,
                message_id: 1,
            }),
        }),
    );
    out.server(
        "history_page_empty",
        "The end of history: no messages, no cursor.",
        13,
        ServerFrame::HistoryPage(HistoryPage {
            room: "general".into(),
            messages: vec![],
            next: None,
        }),
    );
    out.server(
        "resumed",
        "End of a resume replay: one room recovered, one not (reload its history).",
        0,
        ServerFrame::Resumed(Resumed {
            rooms: vec![
                RoomResume {
                    room: "general".into(),
                    recovered: true,
                    replayed: 3,
                    epoch: 1,
                    seq: 253,
                },
                RoomResume {
                    room: "random".into(),
                    recovered: false,
                    replayed: 0,
                    epoch: 8,
                    seq: 0,
                },
            ],
        }),
    );
    out.server(
        "error_rate_limited",
        "Error answering request 5: rate limited, retry after 1500 ms.",
        5,
        ServerFrame::Error(ErrorBody {
            code: 2,
            retry_after_ms: 1500,
            message: "rate limit: 60 messages per minute".into(),
        }),
    );
    out.server(
        "error_forbidden",
        "Error answering request 7: forbidden (code 9), the room's policy refused the join.",
        7,
        ServerFrame::Error(ErrorBody {
            code: 9,
            retry_after_ms: 0,
            message: "not a member of team:1".into(),
        }),
    );
    out.server(
        "error_empty_message",
        "Error with an empty message text.",
        0,
        ServerFrame::Error(ErrorBody {
            code: 1,
            retry_after_ms: 0,
            message: String::new(),
        }),
    );
    out.server(
        "new_message",
        "A message event (request id 0): what Bob receives for Alice's Send in \
         PROTOCOL.md §10 (same id, sequence, client id and time as its MessageSent).",
        0,
        ServerFrame::NewMessage(NewMessage {
            epoch: 1,
            message: Message {
                client_msg_id: "c-1".into(),
                created_at_ms: 1_764_316_800_000,
                ..msg(1001, 251, "hello")
            },
        }),
    );
    out.server(
        "new_message_compressed",
        "A message event with a 2 KiB body, compressed. Not canonical.",
        0,
        ServerFrame::NewMessage(NewMessage {
            epoch: 1,
            message: msg(1002, 252, &"lorem ipsum dolor sit amet ".repeat(80)),
        }),
    );
    out.server(
        "user_typing",
        "Typing event.",
        0,
        ServerFrame::UserTyping(UserTyping {
            room: "general".into(),
            user_id: "u-bob".into(),
        }),
    );
    out.server(
        "reaction",
        "Reaction event.",
        0,
        ServerFrame::Reaction(Reaction {
            room: "general".into(),
            epoch: 1,
            seq: 253,
            message_id: 1001,
            user_id: "u-bob".into(),
            emoji: "👍".into(),
            removed: false,
        }),
    );
    let inner = [
        codec
            .encode_server(
                0,
                &ServerFrame::NewMessage(NewMessage {
                    epoch: 1,
                    message: msg(1003, 254, "hi"),
                }),
            )
            .expect("encode"),
        codec
            .encode_server(
                0,
                &ServerFrame::UserTyping(UserTyping {
                    room: "general".into(),
                    user_id: "u-carol".into(),
                }),
            )
            .expect("encode"),
        codec
            .encode_server(
                0,
                &ServerFrame::Reaction(Reaction {
                    room: "general".into(),
                    epoch: 1,
                    seq: 255,
                    message_id: 1003,
                    user_id: "u-bob".into(),
                    emoji: "🎉".into(),
                    removed: false,
                }),
            )
            .expect("encode"),
    ];
    out.server(
        "batch",
        "A batch of three events; 'flattened' lists them in delivery order.",
        0,
        ServerFrame::Batch(Batch {
            frames: inner.to_vec(),
        }),
    );

    // ------------------------------------------------------------ invalid
    let c2s = "client_to_server";
    let s2c = "server_to_client";
    out.invalid("invalid_empty", "Zero bytes.", c2s, &[], None);
    out.invalid(
        "invalid_short_header",
        "Five bytes: shorter than the header.",
        c2s,
        &[2, 0, 1, 0, 0],
        None,
    );
    out.invalid(
        "invalid_unknown_opcode",
        "Opcode 0x09 is not defined.",
        c2s,
        &[9, 0, 1, 0, 0, 0],
        None,
    );
    out.invalid(
        "invalid_wrong_direction",
        "A server opcode (Ready, 0x40) sent by a client.",
        c2s,
        &[0x40, 0, 1, 0, 0, 0],
        None,
    );
    out.invalid(
        "invalid_client_opcode_from_server",
        "A client opcode (Join, 0x03) received from a server.",
        s2c,
        &[0x03, 0, 0, 0, 0, 0, 0],
        None,
    );
    out.invalid(
        "invalid_reserved_flag",
        "Flags bit 1 set.",
        c2s,
        &[2, 0b10, 1, 0, 0, 0],
        None,
    );
    out.invalid(
        "invalid_heartbeat_trailing",
        "Heartbeat with one payload byte.",
        c2s,
        &[2, 0, 1, 0, 0, 0, 0],
        None,
    );
    let good_send = codec
        .encode_client(
            5,
            &ClientFrame::Send(Send {
                room: "general".into(),
                client_msg_id: "c-1".into(),
                body: "hello".into(),
                attachments: vec![],
            }),
        )
        .expect("encode");
    out.invalid(
        "invalid_send_truncated",
        "send_basic with its last byte cut: the attachments count is missing.",
        c2s,
        &good_send[..good_send.len() - 1],
        None,
    );
    let cut_string = &good_send[..good_send.len() - 4];
    out.invalid(
        "invalid_send_string_cut",
        "send_basic cut in the middle of the body string.",
        c2s,
        cut_string,
        None,
    );
    out.invalid(
        "invalid_lying_length",
        "Join whose room-count says 1 and whose string length claims 2^64-1 bytes (0xFD + u64). Must fail without allocating.",
        c2s,
        &[3, 0, 1, 0, 0, 0, 1, 0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, b'a'],
        None,
    );
    out.invalid(
        "invalid_lying_count",
        "Join claiming 2^32-1 rooms with one present.",
        c2s,
        &[3, 0, 1, 0, 0, 0, 0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 1, b'a'],
        None,
    );
    out.invalid(
        "invalid_utf8",
        "Typing whose room name is not UTF-8 (0xC3 0x28).",
        c2s,
        &[6, 0, 0, 0, 0, 0, 2, 0xC3, 0x28],
        None,
    );
    out.invalid(
        "invalid_bool",
        "React whose `remove` bool is 2.",
        c2s,
        &[7, 0, 1, 0, 0, 0, 1, b'g', 42, 1, b'x', 2],
        None,
    );
    out.invalid(
        "invalid_option_tag",
        "History whose `before` option tag is 2.",
        c2s,
        &[8, 0, 1, 0, 0, 0, 1, b'g', 2, 0],
        None,
    );
    out.invalid(
        "invalid_varint_marker",
        "History whose u32 `limit` uses the 0xFD (u64) varint marker, invalid for a u32 field.",
        c2s,
        &[8, 0, 1, 0, 0, 0, 1, b'g', 0, 0xFD, 1, 0, 0, 0, 0, 0, 0, 0],
        None,
    );
    out.invalid(
        "invalid_bad_deflate",
        "Compressed flag set on bytes that are not raw DEFLATE.",
        c2s,
        &[2, 1, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF],
        None,
    );
    let mut bomb = vec![5, 1, 1, 0, 0, 0];
    {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![0u8; 2 * 1024 * 1024]).expect("deflate");
        bomb.extend(e.finish().expect("deflate"));
    }
    out.invalid(
        "invalid_deflate_bomb",
        "About 2 KiB of DEFLATE expanding to 2 MiB of zeros: past the default 1 MiB payload cap.",
        c2s,
        &bomb,
        None,
    );
    out.invalid(
        "invalid_frame_too_large",
        "A 65-byte Join against a 64-byte frame limit (config override).",
        c2s,
        &{
            let mut f = vec![3, 0, 1, 0, 0, 0, 1, 58];
            f.extend(std::iter::repeat_n(b'r', 57));
            f
        },
        Some(json!({ "max_frame_bytes": 64 })),
    );
    let typing = codec
        .encode_server(
            0,
            &ServerFrame::UserTyping(UserTyping {
                room: "g".into(),
                user_id: "u".into(),
            }),
        )
        .expect("encode");
    let batch = codec
        .encode_batch(std::slice::from_ref(&typing))
        .expect("encode");
    out.invalid(
        "invalid_nested_batch",
        "A batch containing a batch.",
        s2c,
        &{
            let mut f = vec![0x7F, 0, 0, 0, 0, 0, 1, batch.len() as u8];
            f.extend_from_slice(&batch);
            f
        },
        None,
    );
    out.invalid(
        "invalid_compressed_in_batch",
        "A batch whose inner frame has the compressed flag set.",
        s2c,
        &{
            let mut inner = typing.to_vec();
            inner[1] = 1;
            let mut f = vec![0x7F, 0, 0, 0, 0, 0, 1, inner.len() as u8];
            f.extend_from_slice(&inner);
            f
        },
        None,
    );
    out.invalid(
        "invalid_batch_inner_truncated",
        "A batch whose inner frame is cut short.",
        s2c,
        &{
            let cut = &typing[..typing.len() - 1];
            let mut f = vec![0x7F, 0, 0, 0, 0, 0, 1, cut.len() as u8];
            f.extend_from_slice(cut);
            f
        },
        None,
    );

    out.names.sort();
    let index = json!({ "version": "chat.v1", "vectors": out.names });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_string_pretty(&index).expect("json") + "\n",
    )
    .expect("write index");
    println!("wrote {} vectors to {}", out.names.len(), dir.display());
}
