//! Store errors, classified by who is at fault so the gateway can map
//! each to one protocol error code.

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The referenced record does not exist (caller's fault).
    #[error("not found")]
    NotFound,
    /// The backend is unreachable or overloaded; nothing was written.
    /// Retrying later may succeed.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected backend answer; nothing was written.
    #[error("internal store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// True when the same call may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}
