//! Access tokens as the reference server accepts them: compact JWTs
//! signed with HMAC-SHA256 (`alg: HS256`). Feature `token`.
//!
//! The gateway only verifies; an application's login service mints them
//! with the shared secret (`chatgate token`, the tests and the load
//! harness do the same for development). Claims: `sub` (user id), `name`
//! (display name, optional), `exp` (expiry, seconds since the epoch,
//! required).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Who a valid token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Display name; defaults to the user id.
    #[serde(default)]
    pub name: Option<String>,
    /// Avatar URL (the OpenID Connect claim name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Rooms the user may join beyond the application's grants: exact
    /// names, or prefixes ending in `*` (`*` alone: every room).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
}

/// Why a token was refused (all map to close code 4100).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts, or not JSON.
    #[error("malformed token")]
    Malformed,
    /// A header other than `{"alg":"HS256"...}`.
    #[error("unsupported token algorithm")]
    Algorithm,
    /// The signature does not match.
    #[error("bad token signature")]
    Signature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `sub` is empty or too long.
    #[error("token subject invalid")]
    Subject,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// Verifies tokens against one secret.
#[derive(Clone)]
pub struct Verifier {
    key: HmacSha256,
}

impl Verifier {
    /// A verifier for `secret`.
    pub fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of any length; this cannot fail.
        let key = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
        Verifier { key }
    }

    /// Checks signature, algorithm and expiry (`now` in Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header =
            serde_json::from_slice(&B64.decode(h).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if header.alg != "HS256" {
            return Err(TokenError::Algorithm);
        }
        let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.key.clone();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&sig).map_err(|_| TokenError::Signature)?;
        let claims: Claims =
            serde_json::from_slice(&B64.decode(p).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if claims.sub.is_empty() || claims.sub.len() > 128 {
            return Err(TokenError::Subject);
        }
        Ok(claims)
    }

    /// Signs `claims` (development tooling and tests).
    pub fn mint(&self, claims: &Claims) -> String {
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = self.key.clone();
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{header}.{payload}.{sig}")
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            name: Some("Alice".into()),
            picture: None,
            exp,
            rooms: Vec::new(),
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let v = Verifier::new(b"0123456789abcdef");
        let t = v.mint(&claims(2000));
        assert_eq!(v.verify(&t, 1000), Ok(claims(2000)));
        assert_eq!(v.verify(&t, 2000), Err(TokenError::Expired));
        let other = Verifier::new(b"another secret!!");
        assert_eq!(other.verify(&t, 1000), Err(TokenError::Signature));
        assert_eq!(v.verify("a.b", 0), Err(TokenError::Malformed));
        assert_eq!(v.verify("", 0), Err(TokenError::Malformed));
        let mut tampered = t.clone();
        tampered.insert(t.find('.').unwrap() + 2, 'x');
        assert!(v.verify(&tampered, 1000).is_err());
        // alg "none" is refused even with an empty signature.
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none"}"#),
            B64.encode(serde_json::to_vec(&claims(2000)).unwrap())
        );
        assert_eq!(v.verify(&none, 1000), Err(TokenError::Algorithm));
    }
}
