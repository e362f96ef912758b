//! Field limits every server enforces on client requests (PROTOCOL.md §6).
//!
//! They live in the protocol crate so that clients can check a request
//! before sending it and the server and every client agree on one table.
//! A request that breaks one is answered with `Error` code
//! `InvalidRequest`; the connection stays open.

use crate::ClientFrame;
use crate::payload::Attachment;

/// Room names: 1..=128 bytes of UTF-8, no control characters.
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
/// History page size when the request says 0.
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;
/// Largest history page.
pub const HISTORY_MAX_LIMIT: u32 = 100;

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
    Ok(())
}

fn check_len(
    field: &'static str,
    s: &str,
    max: usize,
    problem: &'static str,
) -> Result<(), Invalid> {
    if s.len() > max {
        invalid(field, problem)
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
