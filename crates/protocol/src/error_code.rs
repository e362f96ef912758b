//! Error codes carried by `Error` frames (PROTOCOL.md §7 mirrors this).
//!
//! An `Error` frame answers one request and leaves the connection open;
//! conditions that end the connection are close codes instead
//! ([`crate::CloseCode`]).

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A field broke a documented limit (empty body, room name too long,
    /// too many rooms in one Join, history limit above 100...). Fix the
    /// request; retrying it unchanged fails again.
    InvalidRequest = 1,
    /// The per-user message rate limit was hit; `retry_after_ms` says
    /// when a token is available again.
    RateLimited = 2,
    /// The request names a room the session has not joined.
    NotInRoom = 3,
    /// The referenced message does not exist in that room.
    NotFound = 4,
    /// The session is in the maximum number of rooms.
    TooManyRooms = 5,
    /// A backend (database, stream) is unavailable. For a Send: the
    /// message is not acknowledged; retry with the same client message id
    /// after `retry_after_ms` (it may already be stored, and the retry
    /// stores and delivers it at most once).
    Unavailable = 6,
    /// Unexpected server failure. Retry later (a Send with the same
    /// client message id).
    Internal = 7,
    /// The message was stored (history shows it) but not yet delivered to
    /// the room: retry with the same client message id to deliver it; the
    /// retry is acknowledged with `duplicate = true`, and nobody receives
    /// the message twice.
    NotDelivered = 8,
    /// The room's policy does not let this user do this: join, read,
    /// post or resume into a room it is not a member of (or post where
    /// only some roles may). Nothing was changed. Retrying is pointless
    /// until the application grants the membership or role.
    Forbidden = 9,
}

/// Every error code, in table order.
pub const ALL_ERROR_CODES: [ErrorCode; 9] = [
    ErrorCode::InvalidRequest,
    ErrorCode::RateLimited,
    ErrorCode::NotInRoom,
    ErrorCode::NotFound,
    ErrorCode::TooManyRooms,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
    ErrorCode::NotDelivered,
    ErrorCode::Forbidden,
];

impl ErrorCode {
    /// Numeric value on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Looks a received code up.
    pub fn from_u16(code: u16) -> Option<Self> {
        ALL_ERROR_CODES.into_iter().find(|c| c.code() == code)
    }

    /// True when the same request may succeed later unchanged.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::NotDelivered
        )
    }

    /// Stable snake_case name for metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::NotDelivered => "not_delivered",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}
