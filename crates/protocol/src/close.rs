//! WebSocket close codes: the one table of why a connection ends and what
//! the client should do next (PROTOCOL.md §8 mirrors it).
//!
//! Two ranges, so a client that meets a code it does not know still does
//! the right thing: `4000..=4099` means "reconnect with backoff and
//! resume", `4100..=4199` means "do not reconnect until something changes"
//! (a new token, a fixed client, fewer open tabs).

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAction {
    /// Reconnect (to any node) with exponential backoff, then resume.
    ReconnectAndResume,
    /// Do not reconnect automatically; surface the reason.
    DoNotReconnect,
}

/// Close codes the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The node is shutting down or draining; reconnect elsewhere now
    /// (no backoff needed beyond jitter).
    ShuttingDown = 4000,
    /// The client did not read fast enough and its bounded outbound
    /// queue filled up. Resume replays what it missed.
    SlowConsumer = 4001,
    /// No frame arrived within heartbeat interval + timeout.
    HeartbeatTimeout = 4002,
    /// Unexpected server-side failure.
    ServerError = 4003,
    /// The node is at its connection capacity; try again (another node).
    /// Also sent to the oldest socket that has not identified yet when
    /// the node needs its slot for a newer one.
    Overloaded = 4004,
    /// The node's room streams were lost (Redis restarted without its
    /// data). Reconnect and resume at once: rooms whose events cannot be
    /// replayed answer `recovered = false`, and the client reloads them.
    StreamsLost = 4005,
    /// The application asked this user's connections to reconnect (its
    /// rooms or permissions changed). Reconnect and resume; rooms the user
    /// may no longer enter are refused then.
    Reconnect = 4006,

    /// The token was missing, malformed, expired or wrongly signed.
    /// Obtain a new token before reconnecting.
    InvalidToken = 4100,
    /// A malformed frame, an unknown or wrong-direction opcode, reserved
    /// flag bits, bad compression, or a request before `Identify`.
    ProtocolViolation = 4101,
    /// A text WebSocket message; v1 is binary only.
    TextFrame = 4102,
    /// A frame (or its decompressed payload) exceeded the size limit.
    FrameTooLarge = 4103,
    /// No `Identify` within the connect timeout (10 s by default).
    IdentifyTimeout = 4104,
    /// The user already holds the maximum number of connections.
    ConnectionLimit = 4105,
    /// A second `Identify` on an identified connection.
    AlreadyIdentified = 4106,
    /// The application ended this user's sessions (a ban, a password
    /// change). Do not reconnect with the same token.
    Disconnected = 4107,
}

/// Every close code, in table order.
pub const ALL_CLOSE_CODES: [CloseCode; 15] = [
    CloseCode::ShuttingDown,
    CloseCode::SlowConsumer,
    CloseCode::HeartbeatTimeout,
    CloseCode::ServerError,
    CloseCode::Overloaded,
    CloseCode::StreamsLost,
    CloseCode::Reconnect,
    CloseCode::InvalidToken,
    CloseCode::ProtocolViolation,
    CloseCode::TextFrame,
    CloseCode::FrameTooLarge,
    CloseCode::IdentifyTimeout,
    CloseCode::ConnectionLimit,
    CloseCode::AlreadyIdentified,
    CloseCode::Disconnected,
];

impl CloseCode {
    /// The numeric code sent in the WebSocket close frame.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Looks a received code up; `None` for codes this version does not
    /// define (use [`action_for`] to act on those).
    pub fn from_u16(code: u16) -> Option<Self> {
        ALL_CLOSE_CODES.into_iter().find(|c| c.code() == code)
    }

    /// What the client should do.
    pub fn action(self) -> ClientAction {
        action_for(self.code())
    }

    /// Short reason sent as the close frame's text (at most 123 bytes).
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::ShuttingDown => "server shutting down",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::ServerError => "server error",
            CloseCode::Overloaded => "server overloaded",
            CloseCode::StreamsLost => "room streams lost; resume",
            CloseCode::Reconnect => "reconnect requested",
            CloseCode::InvalidToken => "invalid token",
            CloseCode::ProtocolViolation => "protocol violation",
            CloseCode::TextFrame => "text frames are not supported",
            CloseCode::FrameTooLarge => "frame too large",
            CloseCode::IdentifyTimeout => "identify timeout",
            CloseCode::ConnectionLimit => "connection limit reached",
            CloseCode::AlreadyIdentified => "already identified",
            CloseCode::Disconnected => "disconnected by the application",
        }
    }

    /// Stable snake_case name for metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            CloseCode::ShuttingDown => "shutting_down",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::HeartbeatTimeout => "heartbeat_timeout",
            CloseCode::ServerError => "server_error",
            CloseCode::Overloaded => "overloaded",
            CloseCode::StreamsLost => "streams_lost",
            CloseCode::Reconnect => "reconnect",
            CloseCode::InvalidToken => "invalid_token",
            CloseCode::ProtocolViolation => "protocol_violation",
            CloseCode::TextFrame => "text_frame",
            CloseCode::FrameTooLarge => "frame_too_large",
            CloseCode::IdentifyTimeout => "identify_timeout",
            CloseCode::ConnectionLimit => "connection_limit",
            CloseCode::AlreadyIdentified => "already_identified",
            CloseCode::Disconnected => "disconnected",
        }
    }
}

/// The action for any close code, including ones a newer server may add:
/// the range decides. Standard WebSocket codes (1000..=1015, e.g. an
/// abnormal 1006 when the TCP connection dropped) mean reconnect.
pub fn action_for(code: u16) -> ClientAction {
    match code {
        4100..=4199 => ClientAction::DoNotReconnect,
        _ => ClientAction::ReconnectAndResume,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_decide_the_action() {
        for c in ALL_CLOSE_CODES {
            assert_eq!(CloseCode::from_u16(c.code()), Some(c));
            assert!(c.reason().len() <= 123);
            let expected = if c.code() < 4100 {
                ClientAction::ReconnectAndResume
            } else {
                ClientAction::DoNotReconnect
            };
            assert_eq!(c.action(), expected, "{c:?}");
        }
        assert_eq!(action_for(4150), ClientAction::DoNotReconnect);
        assert_eq!(action_for(4050), ClientAction::ReconnectAndResume);
        assert_eq!(action_for(1006), ClientAction::ReconnectAndResume);
    }
}
