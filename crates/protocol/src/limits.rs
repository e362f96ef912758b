//! Field limits every server enforces on client requests (PROTOCOL.md §6).
//!
//! They live in the protocol crate so that clients can check a request
//! before sending it and the server and every client agree on one table.
//! A request that breaks one is answered with `Error` code
//! `InvalidRequest`; the connection stays open.

use crate::payload::Attachment;
use crate::{ClientFrame, Opcode};

/// Room names: 1..=128 bytes of UTF-8, no control characters and no
/// invisible direction or width controls (see [`check_room`]).
pub const MAX_ROOM_NAME_BYTES: usize = 128;
/// Rooms named in one `Join` or `Leave`.
pub const MAX_ROOMS_PER_REQUEST: usize = 100;
/// Message text, in bytes of UTF-8.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Idempotency key, in bytes (a UUID string is 36).
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;
/// Attachments per message.
pub const MAX_ATTACHMENTS: usize = 10;
/// Attachment URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Attachment display name, in bytes.
pub const MAX_ATTACHMENT_NAME_BYTES: usize = 255;
/// Attachment MIME type, in bytes.
pub const MAX_MIME_BYTES: usize = 127;
/// Reaction emoji, in bytes (a long ZWJ sequence fits).
pub const MAX_EMOJI_BYTES: usize = 64;
/// Access token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Room positions in one resume.
pub const MAX_RESUME_ROOMS: usize = 1000;
/// Display name carried in an access token (`name`), in characters
/// (not bytes: a name in a non-Latin script is as long as it looks).
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;
/// History page size when the request says 0.
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;
/// Largest history page.
pub const HISTORY_MAX_LIMIT: u32 = 100;

/// Bytes a varint of `n` takes (PROTOCOL.md §4.1).
const fn varint_len(n: usize) -> usize {
    if n < 251 {
        1
    } else if n <= u16::MAX as usize {
        3
    } else if n <= u32::MAX as usize {
        5
    } else {
        9
    }
}

/// Bytes a string of at most `n` bytes takes.
const fn text_len(n: usize) -> usize {
    varint_len(n) + n
}

/// A u64 field at its widest.
const U64_LEN: usize = 9;

/// The largest payload a request with this opcode can have while keeping
/// every limit above; `None` for server opcodes. The decoder stops
/// reading (and inflating) a client's payload there, so what a request
/// costs to decode is bounded by what a legal one costs.
pub const fn max_client_payload(op: Opcode) -> Option<usize> {
    let room = text_len(MAX_ROOM_NAME_BYTES);
    Some(match op {
        // token, Some(resume): session id, positions.
        Opcode::Identify => {
            text_len(MAX_TOKEN_BYTES)
                + 1
                + 16
                + varint_len(MAX_RESUME_ROOMS)
                + MAX_RESUME_ROOMS * (room + 2 * U64_LEN)
        }
        Opcode::Heartbeat => 0,
        Opcode::Join | Opcode::Leave => {
            varint_len(MAX_ROOMS_PER_REQUEST) + MAX_ROOMS_PER_REQUEST * room
        }
        Opcode::Send => {
            room + text_len(MAX_CLIENT_MSG_ID_BYTES)
                + text_len(MAX_BODY_BYTES)
                + varint_len(MAX_ATTACHMENTS)
                + MAX_ATTACHMENTS
                    * (text_len(MAX_URL_BYTES)
                        + text_len(MAX_ATTACHMENT_NAME_BYTES)
                        + text_len(MAX_MIME_BYTES)
                        + U64_LEN)
        }
        Opcode::Typing => room,
        // room, message id, emoji, remove.
        Opcode::React => room + U64_LEN + text_len(MAX_EMOJI_BYTES) + 1,
        // room, Some(cursor), limit.
        Opcode::History => room + 1 + 2 * U64_LEN + varint_len(HISTORY_MAX_LIMIT as usize),
        _ => return None,
    })
}

/// The largest frame any request can be (a resuming Identify): what a
/// server needs to read from a client at most, whatever its own frame
/// limit for what it sends.
pub const MAX_CLIENT_FRAME_BYTES: usize = match max_client_payload(Opcode::Identify) {
    Some(n) => n + crate::frame::HEADER_LEN,
    None => 0,
};

/// A request field that broke a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// Which field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

fn invalid(field: &'static str, problem: &'static str) -> Result<(), Invalid> {
    Err(Invalid { field, problem })
}

/// Checks a room name.
pub fn check_room(field: &'static str, room: &str) -> Result<(), Invalid> {
    if room.is_empty() {
        return invalid(field, "empty room name");
    }
    if room.len() > MAX_ROOM_NAME_BYTES {
        return invalid(field, "room name longer than 128 bytes");
    }
    if room.chars().any(char::is_control) {
        return invalid(field, "control character in room name");
    }
    if room.chars().any(is_invisible_control) {
        return invalid(field, "invisible direction or width control in room name");
    }
    Ok(())
}

/// Characters that change how a name displays without showing: bidi
/// marks, embeddings, overrides and isolates (a room name that reads
/// differently than it is spelled), zero-width space, word joiner and
/// byte-order mark. The joiners U+200C/U+200D stay allowed: some scripts
/// and emoji sequences need them.
pub fn is_invisible_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// The first character of `text` that must not appear in text shown as
/// someone's identity (a display name, an avatar URL): control
/// characters (C0, DEL and C1) and the invisible direction and width
/// controls refused in room names, with which a name can reorder the text
/// shown after it or hide what it is. The joiners U+200C/U+200D stay
/// allowed, as in room names: Persian and Indic names and emoji sequences
/// need them.
pub fn find_hidden_char(text: &str) -> Option<char> {
    text.chars()
        .find(|&c| c.is_control() || is_invisible_control(c))
}

/// Whether `url` is an `http://` or `https://` URL (scheme matched
/// without regard to case, as RFC 3986 says). Links a client renders must
/// not be `javascript:`, `data:` or `file:` ones.
pub fn is_web_url(url: &str) -> bool {
    let lower = |n: usize| url.get(..n).map(str::to_ascii_lowercase);
    (lower(7).as_deref() == Some("http://") || lower(8).as_deref() == Some("https://"))
        && !url.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Checks a text field's length, and that it holds no NUL: stores such as
/// PostgreSQL cannot keep one in text, and a request refused here costs
/// nothing, where one refused by the store would fail late (and, stored
/// in a batch, could fail other users' writes with it).
fn check_len(
    field: &'static str,
    s: &str,
    max: usize,
    problem: &'static str,
) -> Result<(), Invalid> {
    if s.len() > max {
        invalid(field, problem)
    } else if s.contains('\0') {
        invalid(field, "NUL character")
    } else {
        Ok(())
    }
}

fn check_attachments(list: &[Attachment]) -> Result<(), Invalid> {
    if list.len() > MAX_ATTACHMENTS {
        return invalid("attachments", "more than 10 attachments");
    }
    for a in list {
        if a.url.is_empty() {
            return invalid("attachments.url", "empty url");
        }
        if !is_web_url(&a.url) {
            return invalid("attachments.url", "url is not http:// or https://");
        }
        check_len(
            "attachments.url",
            &a.url,
            MAX_URL_BYTES,
            "url longer than 2048 bytes",
        )?;
        check_len(
            "attachments.name",
            &a.name,
            MAX_ATTACHMENT_NAME_BYTES,
            "name longer than 255 bytes",
        )?;
        check_len(
            "attachments.mime",
            &a.mime,
            MAX_MIME_BYTES,
            "mime longer than 127 bytes",
        )?;
    }
    Ok(())
}

impl ClientFrame {
    /// Checks every field limit of PROTOCOL.md §6.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            ClientFrame::Identify(id) => {
                if id.token.is_empty() {
                    return invalid("token", "empty token");
                }
                check_len(
                    "token",
                    &id.token,
                    MAX_TOKEN_BYTES,
                    "token longer than 4096 bytes",
                )?;
                if let Some(r) = &id.resume {
                    if r.positions.len() > MAX_RESUME_ROOMS {
                        return invalid("resume.positions", "more than 1000 rooms");
                    }
                    for p in &r.positions {
                        check_room("resume.positions.room", &p.room)?;
                    }
                }
                Ok(())
            }
            ClientFrame::Heartbeat => Ok(()),
            ClientFrame::Join(r) | ClientFrame::Leave(r) => {
                if r.rooms.is_empty() {
                    return invalid("rooms", "no rooms named");
                }
                if r.rooms.len() > MAX_ROOMS_PER_REQUEST {
                    return invalid("rooms", "more than 100 rooms in one request");
                }
                r.rooms
                    .iter()
                    .try_for_each(|room| check_room("rooms", room))
            }
            ClientFrame::Send(s) => {
                check_room("room", &s.room)?;
                if s.client_msg_id.is_empty() {
                    return invalid("client_msg_id", "empty client message id");
                }
                check_len(
                    "client_msg_id",
                    &s.client_msg_id,
                    MAX_CLIENT_MSG_ID_BYTES,
                    "client message id longer than 64 bytes",
                )?;
                if s.body.trim().is_empty() && s.attachments.is_empty() {
                    return invalid("body", "empty message");
                }
                check_len(
                    "body",
                    &s.body,
                    MAX_BODY_BYTES,
                    "body longer than 16384 bytes",
                )?;
                check_attachments(&s.attachments)
            }
            ClientFrame::Typing(t) => check_room("room", &t.room),
            ClientFrame::React(r) => {
                check_room("room", &r.room)?;
                if r.emoji.is_empty() {
                    return invalid("emoji", "empty emoji");
                }
                check_len(
                    "emoji",
                    &r.emoji,
                    MAX_EMOJI_BYTES,
                    "emoji longer than 64 bytes",
                )
            }
            ClientFrame::History(h) => {
                check_room("room", &h.room)?;
                if h.limit > HISTORY_MAX_LIMIT {
                    return invalid("limit", "history limit above 100");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::*;

    fn send(room: &str, cid: &str, body: &str, attachments: Vec<Attachment>) -> ClientFrame {
        ClientFrame::Send(Send {
            room: room.into(),
            client_msg_id: cid.into(),
            body: body.into(),
            attachments,
        })
    }

    /// An attachment whose url is `url` bytes long (an https URL from
    /// 9 bytes on; shorter ones are too short to be one).
    fn file(url: usize, name: usize, mime: usize) -> Attachment {
        let prefix = "https://";
        Attachment {
            url: if url > prefix.len() {
                format!("{prefix}{}", "u".repeat(url - prefix.len()))
            } else {
                "u".repeat(url)
            },
            name: "n".repeat(name),
            mime: "m".repeat(mime),
            size: 1,
        }
    }

    /// Each §6 limit accepts n and refuses n + 1, naming the field.
    #[test]
    fn every_limit_holds_at_n_and_fails_at_n_plus_one() {
        let ok = |f: ClientFrame| assert_eq!(f.validate(), Ok(()), "{f:?}");
        let bad = |f: ClientFrame, field: &str| match f.validate() {
            Err(e) => assert_eq!(e.field, field, "{f:?}"),
            Ok(()) => panic!("accepted {f:?}"),
        };
        let room = |n: usize| "r".repeat(n);
        ok(send(&room(128), "c", "x", vec![]));
        bad(send(&room(129), "c", "x", vec![]), "room");
        bad(send("", "c", "x", vec![]), "room");
        ok(send("r", &"c".repeat(64), "x", vec![]));
        bad(send("r", &"c".repeat(65), "x", vec![]), "client_msg_id");
        bad(send("r", "", "x", vec![]), "client_msg_id");
        ok(send("r", "c", &"b".repeat(16_384), vec![]));
        bad(send("r", "c", &"b".repeat(16_385), vec![]), "body");
        ok(send("r", "c", "", vec![file(9, 0, 0)]));
        // Only web links: a client renders these as links.
        bad(send("r", "c", "x", vec![file(1, 0, 0)]), "attachments.url");
        for url in [
            "javascript:alert(1)",
            "data:text/html,x",
            "file:///etc/passwd",
            "https://a b",
        ] {
            let mut a = file(9, 0, 0);
            a.url = url.into();
            bad(send("r", "c", "x", vec![a]), "attachments.url");
        }
        for url in ["http://x.test/a", "HTTPS://x.test/a"] {
            let mut a = file(9, 0, 0);
            a.url = url.into();
            ok(send("r", "c", "x", vec![a]));
        }
        bad(send("r", "c", " \u{3000}\u{a0}", vec![]), "body");
        ok(send("r", "c", "\u{200b}", vec![]));
        ok(send("r", "c", "x", vec![file(2048, 255, 127); 10]));
        bad(send("r", "c", "x", vec![file(1, 0, 0); 11]), "attachments");
        bad(
            send("r", "c", "x", vec![file(2049, 0, 0)]),
            "attachments.url",
        );
        bad(send("r", "c", "x", vec![file(0, 0, 0)]), "attachments.url");
        bad(
            send("r", "c", "x", vec![file(9, 256, 0)]),
            "attachments.name",
        );
        bad(
            send("r", "c", "x", vec![file(9, 0, 128)]),
            "attachments.mime",
        );
        let rooms = |n: usize| Rooms {
            rooms: (0..n).map(|i| format!("r{i}")).collect(),
        };
        ok(ClientFrame::Join(rooms(100)));
        bad(ClientFrame::Join(rooms(101)), "rooms");
        bad(ClientFrame::Leave(rooms(0)), "rooms");
        let react = |emoji: &str| {
            ClientFrame::React(React {
                room: "r".into(),
                message_id: 1,
                emoji: emoji.into(),
                remove: false,
            })
        };
        ok(react(&"e".repeat(64)));
        bad(react(&"e".repeat(65)), "emoji");
        bad(react(""), "emoji");
        let identify = |token: usize, rooms: usize| {
            ClientFrame::Identify(Identify {
                token: "t".repeat(token),
                resume: Some(Resume {
                    session_id: [0; 16],
                    positions: (0..rooms)
                        .map(|i| RoomPosition {
                            room: format!("r{i}"),
                            epoch: 1,
                            seq: 0,
                        })
                        .collect(),
                }),
            })
        };
        ok(identify(4096, 1000));
        bad(identify(4097, 0), "token");
        bad(identify(0, 0), "token");
        bad(identify(1, 1001), "resume.positions");
        let history = |limit: u32| {
            ClientFrame::History(History {
                room: "r".into(),
                before: None,
                limit,
            })
        };
        ok(history(100));
        ok(history(0));
        bad(history(101), "limit");
        // No text field may hold a NUL (room names refuse every control).
        bad(send("r", "c", "a\0b", vec![]), "body");
        bad(send("r", "c\0", "x", vec![]), "client_msg_id");
        let mut a = file(9, 1, 1);
        a.name = "n\0".into();
        bad(send("r", "c", "x", vec![a]), "attachments.name");
        let mut a = file(9, 1, 1);
        a.mime = "text/\0".into();
        bad(send("r", "c", "x", vec![a]), "attachments.mime");
        bad(react("\0"), "emoji");
        ok(send("r", "c", "tab\tand\nnewline", vec![]));
    }

    /// The legal maximum of each request is exact: the largest request the
    /// limits allow encodes to it, byte for byte.
    #[test]
    fn the_largest_legal_requests_fit_their_opcode_caps() {
        let codec = crate::Codec::default();
        let room = "r".repeat(MAX_ROOM_NAME_BYTES);
        let largest = [
            ClientFrame::Identify(Identify {
                token: "t".repeat(MAX_TOKEN_BYTES),
                resume: Some(Resume {
                    session_id: [0; 16],
                    positions: (0..MAX_RESUME_ROOMS)
                        .map(|_| RoomPosition {
                            room: room.clone(),
                            epoch: u64::MAX,
                            seq: u64::MAX,
                        })
                        .collect(),
                }),
            }),
            ClientFrame::Heartbeat,
            ClientFrame::Join(Rooms {
                rooms: vec![room.clone(); MAX_ROOMS_PER_REQUEST],
            }),
            send(
                &room,
                &"c".repeat(MAX_CLIENT_MSG_ID_BYTES),
                &"b".repeat(MAX_BODY_BYTES),
                vec![
                    Attachment {
                        size: u64::MAX,
                        ..file(MAX_URL_BYTES, MAX_ATTACHMENT_NAME_BYTES, MAX_MIME_BYTES)
                    };
                    MAX_ATTACHMENTS
                ],
            ),
            ClientFrame::Typing(Typing { room: room.clone() }),
            ClientFrame::React(React {
                room: room.clone(),
                message_id: u64::MAX,
                emoji: "e".repeat(MAX_EMOJI_BYTES),
                remove: true,
            }),
            ClientFrame::History(History {
                room: room.clone(),
                before: Some(Cursor {
                    created_at_ms: u64::MAX,
                    message_id: u64::MAX,
                }),
                limit: HISTORY_MAX_LIMIT,
            }),
        ];
        for frame in largest {
            assert_eq!(frame.validate(), Ok(()), "{:?}", frame.opcode());
            let config = crate::CodecConfig {
                compress_threshold: usize::MAX,
                ..Default::default()
            };
            let bytes = crate::Codec::new(config).encode_client(1, &frame).unwrap();
            let cap = max_client_payload(frame.opcode()).unwrap();
            assert_eq!(
                bytes.len() - crate::frame::HEADER_LEN,
                cap,
                "{:?}",
                frame.opcode()
            );
            assert!(bytes.len() <= MAX_CLIENT_FRAME_BYTES);
            assert!(codec.decode_client(&bytes).is_ok());
        }
        assert_eq!(max_client_payload(Opcode::NewMessage), None);
    }

    /// A compressed request that inflates past its opcode's legal maximum
    /// stops there, far below the 1 MiB frame limit.
    #[test]
    fn inflating_a_request_stops_at_its_legal_maximum() {
        let codec = crate::Codec::default();
        let bomb = send("r", "c", &"b".repeat(200_000), vec![]);
        let config = crate::CodecConfig {
            compress_threshold: 0,
            ..Default::default()
        };
        let bytes = crate::Codec::new(config).encode_client(1, &bomb).unwrap();
        assert!(bytes.len() < 2048, "{} bytes compressed", bytes.len());
        let cap = max_client_payload(Opcode::Send).unwrap();
        assert_eq!(
            codec.decode_client(&bytes).unwrap_err(),
            crate::DecodeError::PayloadTooLarge { max: cap }
        );
        let heartbeat = crate::Codec::new(config)
            .encode_client(
                1,
                &ClientFrame::Typing(Typing {
                    room: "r".repeat(2000),
                }),
            )
            .unwrap();
        let mut heartbeat = heartbeat.to_vec();
        heartbeat[0] = Opcode::Heartbeat as u8;
        assert_eq!(
            codec.decode_client(&heartbeat).unwrap_err(),
            crate::DecodeError::PayloadTooLarge { max: 0 }
        );
    }

    /// Identity text refuses what room names refuse.
    #[test]
    fn hidden_characters_in_identity_text() {
        for c in [
            '\0', '\u{1b}', '\u{7f}', '\u{80}', '\u{9f}', '\u{200b}', '\u{200e}', '\u{200f}',
            '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{feff}',
        ] {
            let text = format!("ab{c}cd");
            assert_eq!(find_hidden_char(&text), Some(c), "{c:?} not found");
        }
        for text in [
            "Zoë Brontë",
            "日本語",
            "a b",
            "",
            "👩\u{200d}💻",
            "\u{645}\u{200c}\u{627}",
            "\u{3000}x",
            "\u{2010}",
        ] {
            assert_eq!(find_hidden_char(text), None, "{text:?} refused");
        }
    }

    /// What "control character" means for room names (PROTOCOL.md §6).
    #[test]
    fn room_names_refuse_control_and_invisible_characters() {
        for c in [
            '\0', '\n', '\u{7f}', '\u{85}', '\u{9f}', '\u{200b}', '\u{202e}', '\u{2066}',
            '\u{feff}',
        ] {
            let name = format!("a{c}b");
            assert!(check_room("room", &name).is_err(), "{c:?} accepted");
        }
        for name in [
            "général",
            "日本語",
            "a b",
            "👩\u{200d}💻",
            "ab\u{200c}c",
            "\u{3000}x",
        ] {
            assert_eq!(check_room("room", name), Ok(()), "{name:?} refused");
        }
    }
}
