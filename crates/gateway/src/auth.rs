//! Access tokens as identity providers issue them: JWTs signed with
//! HS256 (shared secrets), RS256 or ES256 (public keys given as PEM, or
//! fetched as a JWKS from the provider's URL and kept fresh).
//!
//! Why next to `chatgate_protocol::token`: that verifier knows one HS256
//! secret, which suits development tooling and an application that mints
//! its own tokens. An identity provider (OpenID Connect and the like)
//! signs with a private key instead, rotates it, and publishes the public
//! keys at a URL. Checking those needs asymmetric crypto, an HTTP client
//! and a refresh task, which the protocol crate (no I/O, shared with
//! clients) should not carry; the gateway does it here with the
//! `jsonwebtoken` crate. The protocol crate's [`Verifier`] stays for
//! minting development tokens, which this module accepts as HS256.
//!
//! # Keys and algorithms
//! Every key is bound to one algorithm when it is loaded: a shared secret
//! to HS256, an RSA key to RS256, a P-256 key to ES256. A token is checked
//! only against keys bound to the algorithm its header names, so a public
//! key is never used as an HMAC secret (the "algorithm confusion"
//! forgery), and `alg: none`, or any other algorithm, has no key at all.
//! A JWKS key is taken for the `alg` it declares, or, when it declares
//! none, for the one its `kty`/`crv` implies; symmetric (`oct`) keys, keys
//! for encryption and RSA keys under 2048 bits are ignored.
//!
//! # Key selection and refresh
//! A token whose header has a `kid` is checked against the JWKS keys with
//! that `kid` (and the configured keys, which have none); without a `kid`,
//! against every key for its algorithm. The JWKS is fetched at start, then
//! every `jwks_refresh`, and again when a token names a `kid` it does not
//! hold (the provider rotated): such refetches are at most one per 10 s,
//! so a flood of made-up `kid`s cannot turn the gateway against the
//! provider. A failed fetch keeps the keys already held.
//!
//! # Claims
//! `exp` is required and `nbf` checked when present, both with `leeway`
//! for clock skew. `iss` and `aud` are checked when configured, and then
//! required of RS256/ES256 tokens; an HS256 token comes from the
//! gateway's own secret, and the dev tooling mints neither claim.
//! The identity claims are what other users are shown, so they are held
//! to the same rules as room names and more: `sub` 1 to 128 bytes, `name`
//! at most 64 characters, neither with control or invisible characters
//! ([`find_hidden_char`]), `picture` an `http(s)` URL.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Validation};
use parking_lot::RwLock;
use serde::{Deserialize, Deserializer};

use chatgate_protocol::limits::{
    MAX_DISPLAY_NAME_CHARS, MAX_TOKEN_BYTES, MAX_URL_BYTES, check_room, find_hidden_char,
};
pub use chatgate_protocol::token::{Claims, TokenError, Verifier, unix_now};

/// Default JWKS refresh interval: 5 minutes. Providers publish a new key
/// well before they sign with it, so a periodic fetch usually has it in
/// time; a token with an unknown `kid` fetches at once anyway.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Default allowance for clock skew on `exp` and `nbf`: 30 s, enough for
/// hosts kept in sync by NTP without making an expired token last.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Largest leeway accepted: 10 minutes; more would make expiry moot.
const MAX_LEEWAY: Duration = Duration::from_secs(600);
/// Refetches for unknown `kid`s: at most one per this interval.
const UNKNOWN_KID_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Largest JWKS answer read (real ones are a few KiB).
const JWKS_MAX_BYTES: usize = 1024 * 1024;
/// Time for one JWKS fetch, from connecting to the last byte.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys kept from one JWKS: a token without `kid` is tried on each.
const JWKS_MAX_KEYS: usize = 32;
/// After a failed fetch, the next try waits this long, doubling up to
/// [`RETRY_MAX`] (never longer than the refresh interval).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// `sub`, in bytes (the limit the HS256 verifier always had).
const MAX_SUBJECT_BYTES: usize = 128;
/// Entries of the `rooms` claim.
const MAX_TOKEN_ROOMS: usize = 1000;
/// Shortest HS256 secret: a key as long as the hash output (RFC 7518
/// §3.2), as for the gateway's `token_secret`.
pub const MIN_SECRET_BYTES: usize = 32;
/// Default longest token lifetime: a token whose `exp` is further ahead
/// is refused. A stolen token is worth its remaining lifetime, and a
/// token cannot be revoked before it expires, so a day bounds the harm
/// while letting a page keep one token for a working day.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// How access tokens are verified: resolved from flags, environment and
/// the `[auth]` table by [`AuthConfig::resolve`].
#[derive(Clone)]
pub struct AuthConfig {
    /// HS256 shared secrets, any of which may sign a token. The first is
    /// the gateway's `token_secret`; more allow rotating it without
    /// logging everyone out (add the new one, mint with it, drop the old).
    pub hs256_secrets: Vec<String>,
    /// Public keys, each PEM text or the path of a PEM file: RSA (RS256,
    /// at least 2048 bits) or EC P-256 (ES256). For a provider without a
    /// JWKS URL, or to pin a key.
    pub public_keys: Vec<String>,
    /// The identity provider's JWKS URL (`http://` or `https://`).
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again. Default 5 minutes.
    pub jwks_refresh: Duration,
    /// When set, tokens must carry this `iss`: keys shared by several
    /// issuers (or a provider serving several tenants) cannot lend each
    /// other's tokens.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`: a token the same provider
    /// issued to another application is refused. Strongly advised with a
    /// public provider.
    pub audience: Option<String>,
    /// Allowance for clock skew on `exp` and `nbf`. Default 30 s.
    pub leeway: Duration,
    /// Longest lifetime a token may have left: one whose `exp` is further
    /// ahead (beyond the leeway) is refused. Default 24 h.
    pub max_lifetime: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secrets: Vec::new(),
            public_keys: Vec::new(),
            jwks_url: None,
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            issuer: None,
            audience: None,
            leeway: DEFAULT_LEEWAY,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "hs256_secrets",
                &format_args!("[{} redacted]", self.hs256_secrets.len()),
            )
            .field("public_keys", &self.public_keys.len())
            .field("jwks_url", &self.jwks_url)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

/// Token settings from flags and `CHAT_*` variables (flags win), to be
/// flattened into the gateway's overrides. Unset ones fall back to the
/// `[auth]` table, then the defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthOverrides {
    /// Public key for RS256/ES256 tokens: PEM text or a PEM file path
    /// (repeatable; comma-separated in the variable).
    #[arg(
        long = "jwt-public-key",
        env = "CHAT_JWT_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_public_keys: Vec<String>,
    /// More HS256 secrets accepted besides the token secret, for rotation
    /// (repeatable; comma-separated in the variable).
    #[arg(
        long = "jwt-hs256-secret",
        env = "CHAT_JWT_HS256_SECRETS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub jwt_hs256_secrets: Vec<String>,
    /// JWKS URL of the identity provider (http or https).
    #[arg(long, env = "CHAT_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// JWKS refresh interval in seconds (default 300).
    #[arg(long, env = "CHAT_JWKS_REFRESH_SECS")]
    pub jwks_refresh_secs: Option<u64>,
    /// Required token issuer (`iss`).
    #[arg(long, env = "CHAT_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required token audience (`aud`).
    #[arg(long, env = "CHAT_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock-skew allowance for `exp`/`nbf` in seconds (default 30).
    #[arg(long, env = "CHAT_JWT_LEEWAY_SECS")]
    pub jwt_leeway_secs: Option<u64>,
    /// Longest token lifetime in seconds (default 86400): tokens whose
    /// `exp` is further ahead are refused.
    #[arg(long, env = "CHAT_JWT_MAX_LIFETIME_SECS")]
    pub jwt_max_lifetime_secs: Option<u64>,
}

/// The `[auth]` table of the configuration file: the keys of
/// [`AuthOverrides`] with underscores (`jwt_public_keys` and
/// `jwt_hs256_secrets` are lists).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// As `--jwt-public-key`.
    pub jwt_public_keys: Option<Vec<String>>,
    /// As `--jwt-hs256-secret`.
    pub jwt_hs256_secrets: Option<Vec<String>>,
    /// As `--jwks-url`.
    pub jwks_url: Option<String>,
    /// As `--jwks-refresh-secs`.
    pub jwks_refresh_secs: Option<u64>,
    /// As `--jwt-issuer`.
    pub jwt_issuer: Option<String>,
    /// As `--jwt-audience`.
    pub jwt_audience: Option<String>,
    /// As `--jwt-leeway-secs`.
    pub jwt_leeway_secs: Option<u64>,
    /// As `--jwt-max-lifetime-secs`.
    pub jwt_max_lifetime_secs: Option<u64>,
}

impl AuthConfig {
    /// Layers the defaults, the `[auth]` table and the overrides, then
    /// [validates](AuthConfig::validate). `token_secret` (the gateway's
    /// HS256 secret) is always the first HS256 secret, so tokens minted by
    /// `chatgate token` and the dev tooling keep working. Empty strings
    /// count as unset (an empty variable is how a shell unsets one).
    pub fn resolve(
        o: &AuthOverrides,
        file: Option<AuthFile>,
        token_secret: &str,
    ) -> anyhow::Result<AuthConfig> {
        let f = file.unwrap_or_default();
        let d = AuthConfig::default();
        let list = |flag: &[String], file: Option<Vec<String>>| -> Vec<String> {
            let all = if flag.is_empty() {
                file.unwrap_or_default()
            } else {
                flag.to_vec()
            };
            all.into_iter().filter(|s| !s.trim().is_empty()).collect()
        };
        let text = |flag: &Option<String>, file: Option<String>| {
            flag.clone().or(file).filter(|s| !s.trim().is_empty())
        };
        let mut hs256_secrets = vec![token_secret.to_owned()];
        for secret in list(&o.jwt_hs256_secrets, f.jwt_hs256_secrets) {
            if !hs256_secrets.contains(&secret) {
                hs256_secrets.push(secret);
            }
        }
        let c = AuthConfig {
            hs256_secrets,
            public_keys: list(&o.jwt_public_keys, f.jwt_public_keys),
            jwks_url: text(&o.jwks_url, f.jwks_url),
            jwks_refresh: o
                .jwks_refresh_secs
                .or(f.jwks_refresh_secs)
                .map(Duration::from_secs)
                .unwrap_or(d.jwks_refresh),
            issuer: text(&o.jwt_issuer, f.jwt_issuer),
            audience: text(&o.jwt_audience, f.jwt_audience),
            leeway: o
                .jwt_leeway_secs
                .or(f.jwt_leeway_secs)
                .map(Duration::from_secs)
                .unwrap_or(d.leeway),
            max_lifetime: o
                .jwt_max_lifetime_secs
                .or(f.jwt_max_lifetime_secs)
                .map(Duration::from_secs)
                .unwrap_or(d.max_lifetime),
        };
        c.validate()?;
        Ok(c)
    }

    /// Refuses settings that are unsafe or cannot work: short secrets, a
    /// JWKS URL that is not absolute `http(s)`, a zero refresh interval
    /// (a busy loop against the provider), a leeway over 10 minutes.
    /// Keys themselves are checked by [`Authenticator::new`].
    pub fn validate(&self) -> anyhow::Result<()> {
        for (i, secret) in self.hs256_secrets.iter().enumerate() {
            if secret.len() < MIN_SECRET_BYTES {
                bail!(
                    "HS256 secret #{} is shorter than {MIN_SECRET_BYTES} bytes",
                    i + 1
                );
            }
        }
        if let Some(url) = &self.jwks_url {
            jwks_uri(url)?;
        }
        if self.jwks_refresh < Duration::from_secs(1) {
            bail!("the JWKS refresh interval must be at least 1 s");
        }
        if self.leeway > MAX_LEEWAY {
            bail!(
                "a token leeway over {} s would keep expired tokens valid",
                MAX_LEEWAY.as_secs()
            );
        }
        if self.max_lifetime < Duration::from_secs(60) {
            bail!("the longest token lifetime must be at least 60 s");
        }
        Ok(())
    }

    /// The configured HS256 secrets that look guessable (see
    /// [`weak_secret`]), numbered from 1: refused at start outside
    /// loopback, where anyone who guesses one can mint any identity.
    pub fn weak_secrets(&self) -> Vec<usize> {
        (self.hs256_secrets.iter().enumerate())
            .filter(|(_, s)| weak_secret(s))
            .map(|(i, _)| i + 1)
            .collect()
    }
}

/// Whether an HS256 secret looks guessable: the development secret, a
/// placeholder of the kind examples and templates use, or too few
/// distinct bytes to be random (32 random bytes in hex use ~16 distinct
/// characters; `aaaa…` or `12121212…` use one or two). Length is checked
/// separately; this catches long secrets a person typed.
pub fn weak_secret(secret: &str) -> bool {
    const PLACEHOLDERS: [&str; 10] = [
        "changeme",
        "change-me",
        "change_me",
        "not-for-production",
        "your-secret",
        "your_secret",
        "secretkey",
        "secret-key",
        "password",
        "example",
    ];
    let lower = secret.to_ascii_lowercase();
    let mut distinct = [false; 256];
    for b in secret.bytes() {
        distinct[b as usize] = true;
    }
    secret == crate::config::DEV_SECRET
        || PLACEHOLDERS.iter().any(|p| lower.contains(p))
        || distinct.iter().filter(|&&d| d).count() < 10
}

fn jwks_uri(url: &str) -> anyhow::Result<Uri> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("JWKS URL {url:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        bail!("JWKS URL {url:?} must be an absolute http:// or https:// URL");
    }
    Ok(uri)
}

/// Why a token was refused. Every variant maps to close code 4100 at the
/// caller; the variants exist for logs and metrics, and name the claim
/// at fault where one is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a compact JWT, or its header or claims are not the JSON
    /// expected (a claim of the wrong type, an unknown critical header).
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than HS256, RS256 or ES256
    /// (`none` included).
    #[error("token algorithm not accepted")]
    Algorithm,
    /// No key is held for the token's algorithm and `kid`.
    #[error("no key for this token")]
    UnknownKey,
    /// No key for the token's algorithm and `kid` matches its signature.
    #[error("bad token signature")]
    Signature,
    /// `exp` is past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// `nbf` is ahead, beyond the leeway.
    #[error("token not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token issuer not accepted")]
    Issuer,
    /// `aud` does not include the configured audience.
    #[error("token audience not accepted")]
    Audience,
    /// A required claim is absent.
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    /// An identity claim breaks a rule.
    #[error("token claim `{claim}` refused: {problem}")]
    InvalidClaim {
        /// Which claim: `sub`, `name`, `picture` or `rooms`.
        claim: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// One verification key, bound to the one algorithm it may check.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies access tokens (see the module documentation). Cheap to
/// clone: clones share the keys and the JWKS refresher, which stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    /// HS256 secrets and PEM keys (no `kid`).
    static_keys: Vec<Key>,
    jwks: Option<Arc<Jwks>>,
    hs256: Validation,
    rs256: Validation,
    es256: Validation,
    /// Longest lifetime a token may have left, and the clock-skew leeway.
    max_lifetime: Duration,
    leeway: Duration,
    refresher: Option<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = &self.refresher {
            task.abort();
        }
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let static_of = |alg| {
            self.inner
                .static_keys
                .iter()
                .filter(|k| k.alg == alg)
                .count()
        };
        f.debug_struct("Authenticator")
            .field("hs256_secrets", &static_of(Algorithm::HS256))
            .field("rs256_keys", &static_of(Algorithm::RS256))
            .field("es256_keys", &static_of(Algorithm::ES256))
            .field(
                "jwks",
                &self
                    .inner
                    .jwks
                    .as_ref()
                    .map(|j| (j.url.to_string(), j.len())),
            )
            .finish()
    }
}

impl Authenticator {
    /// Loads the keys of `config` and, when a JWKS URL is configured,
    /// fetches it and starts the task that keeps it fresh. A key that
    /// cannot be read or used (bad PEM, a private key, an RSA key under
    /// 2048 bits, an EC key off P-256) is an error: better to refuse to
    /// start than to refuse every user. A JWKS that cannot be fetched is
    /// not: the error is logged and fetching goes on in the background,
    /// so an identity-provider outage does not keep the gateway down.
    /// Needs a Tokio runtime.
    pub async fn new(config: &AuthConfig) -> anyhow::Result<Authenticator> {
        config.validate()?;
        crypto_provider();
        let mut static_keys = Vec::new();
        for (i, secret) in config.hs256_secrets.iter().enumerate() {
            let key = DecodingKey::from_secret(secret.as_bytes())
                .map_err(|e| anyhow!("HS256 secret #{}: {e}", i + 1))?;
            static_keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key,
            });
        }
        for (i, text) in config.public_keys.iter().enumerate() {
            static_keys
                .push(load_public_key(text).with_context(|| format!("public key #{}", i + 1))?);
        }
        let jwks = match &config.jwks_url {
            Some(url) => Some(Arc::new(Jwks::new(jwks_uri(url)?)?)),
            None => None,
        };
        if static_keys.is_empty() && jwks.is_none() {
            bail!("no token keys configured: every token would be refused");
        }
        if config.audience.is_none() && (jwks.is_some() || !config.public_keys.is_empty()) {
            tracing::warn!(
                "no token audience configured: tokens the identity provider issued to any \
                 application are accepted; set CHAT_JWT_AUDIENCE"
            );
        }
        let refresher = match &jwks {
            Some(jwks) => {
                let loaded = match jwks.refresh().await {
                    Ok(n) => {
                        tracing::info!(url = %jwks.url, keys = n, "JWKS loaded");
                        true
                    }
                    Err(e) => {
                        tracing::error!(
                            url = %jwks.url,
                            error = %format!("{e:#}"),
                            "JWKS fetch failed; RS256/ES256 tokens from it are refused until \
                             it loads; retrying in the background"
                        );
                        false
                    }
                };
                let task = tokio::spawn(keep_fresh(jwks.clone(), config.jwks_refresh, loaded));
                Some(task.abort_handle())
            }
            None => None,
        };
        Ok(Authenticator {
            inner: Arc::new(Inner {
                static_keys,
                jwks,
                hs256: validation(Algorithm::HS256, config),
                rs256: validation(Algorithm::RS256, config),
                es256: validation(Algorithm::ES256, config),
                max_lifetime: config.max_lifetime,
                leeway: config.leeway,
                refresher,
            }),
        })
    }

    /// Verifies `token` and returns its claims. A token naming a `kid`
    /// missing from the JWKS first makes the JWKS be fetched again (at
    /// most once per 10 s across all callers; concurrent callers wait for
    /// that one fetch), since the provider may just have rotated.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = peek_header(token)?;
        let alg = match header.alg.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            _ => return Err(AuthError::Algorithm),
        };
        let kid = header.kid.as_deref();
        let mut outcome = self.inner.check(token, alg, kid);
        let no_key_fits = matches!(outcome, Err(AuthError::UnknownKey | AuthError::Signature));
        if no_key_fits
            && alg != Algorithm::HS256
            && let (Some(kid), Some(jwks)) = (kid, &self.inner.jwks)
            && !jwks.knows(kid)
            && jwks.refetch_for(kid).await
        {
            outcome = self.inner.check(token, alg, Some(kid));
        }
        let claims = identity(outcome?)?;
        let horizon = unix_now() + self.inner.max_lifetime.as_secs() + self.inner.leeway.as_secs();
        if claims.exp > horizon {
            return refuse("exp", "further ahead than the longest token lifetime");
        }
        Ok(claims)
    }
}

impl Inner {
    /// Tries the keys for `alg` (and `kid`): JWKS keys first, as a token
    /// naming a `kid` most likely comes from the provider.
    fn check(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<TokenClaims, AuthError> {
        let validation = match alg {
            Algorithm::RS256 => &self.rs256,
            Algorithm::ES256 => &self.es256,
            _ => &self.hs256,
        };
        let fetched = self.jwks.as_ref().map(|j| j.snapshot());
        let fits = |k: &&Key| {
            k.alg == alg && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
        };
        let candidates = fetched
            .iter()
            .flat_map(|keys| keys.iter())
            .filter(fits)
            .chain(self.static_keys.iter().filter(fits));
        let mut tried = false;
        for key in candidates {
            tried = true;
            match jsonwebtoken::decode::<TokenClaims>(token, &key.key, validation) {
                Ok(data) => return Ok(data.claims),
                // This key does not fit; another may.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(refusal(e.kind())),
            }
        }
        Err(if tried {
            AuthError::Signature
        } else {
            AuthError::UnknownKey
        })
    }
}

fn validation(alg: Algorithm, config: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = config.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    // `iss` and `aud` say which of a provider's tokens are meant for this
    // gateway, so a provider's token (RS256, ES256) must carry them. An
    // HS256 token was signed with a secret only the gateway's own minters
    // hold: they are checked when present, and not required, so that
    // `chatgate token`, the load harness and the tests (whose tokens have
    // neither) keep working where an issuer or audience is configured.
    let provider = alg != Algorithm::HS256;
    let mut required = vec!["exp"];
    if let Some(iss) = &config.issuer {
        v.set_issuer(&[iss]);
        if provider {
            required.push("iss");
        }
    }
    match &config.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            if provider {
                required.push("aud");
            }
        }
        // Checked only when configured: a provider's tokens usually carry
        // an `aud`, which would otherwise refuse them all.
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(match claim.as_str() {
            "iss" => "iss",
            "aud" => "aud",
            "nbf" => "nbf",
            "sub" => "sub",
            _ => "exp",
        }),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
        _ => AuthError::Malformed,
    }
}

/// The header fields needed to pick keys, read before any verification.
#[derive(Deserialize)]
struct PeekHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn peek_header(token: &str) -> Result<PeekHeader, AuthError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    let (header, _) = token.split_once('.').ok_or(AuthError::Malformed)?;
    let json = B64.decode(header).map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)
}

/// The claims as a provider may send them; [`identity`] turns them into
/// [`Claims`]. Missing `sub` and `exp` parse (and are refused by name).
#[derive(Deserialize)]
struct TokenClaims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    picture: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default)]
    rooms: Vec<String>,
}

/// A NumericDate may have a fraction (RFC 7519 §2); a few providers send
/// one.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        })
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom("not a NumericDate"))
}

fn refuse<T>(claim: &'static str, problem: &'static str) -> Result<T, AuthError> {
    Err(AuthError::InvalidClaim { claim, problem })
}

/// Checks the identity claims and builds [`Claims`]. An empty or blank
/// `name` becomes none (the session shows `sub` instead); an empty
/// `picture` becomes none.
fn identity(c: TokenClaims) -> Result<Claims, AuthError> {
    if c.sub.is_empty() {
        return refuse("sub", "empty");
    }
    if c.sub.len() > MAX_SUBJECT_BYTES {
        return refuse("sub", "longer than 128 bytes");
    }
    if find_hidden_char(&c.sub).is_some() {
        return refuse("sub", "control or invisible character");
    }
    let exp = c.exp.ok_or(AuthError::MissingClaim("exp"))?;
    let name = match c.name {
        Some(name) if name.trim().is_empty() => None,
        Some(name) => {
            if find_hidden_char(&name).is_some() {
                return refuse("name", "control or invisible character");
            }
            if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
                return refuse("name", "longer than 64 characters");
            }
            Some(name)
        }
        None => None,
    };
    let picture = match c.picture {
        Some(url) if url.is_empty() => None,
        Some(url) => {
            check_picture(&url)?;
            Some(url)
        }
        None => None,
    };
    check_rooms(&c.rooms)?;
    Ok(Claims {
        sub: c.sub,
        name,
        picture,
        exp,
        rooms: c.rooms,
    })
}

/// An avatar URL clients will load: `http(s)` only, so no `javascript:`
/// or `data:` URL reaches them through the gateway.
fn check_picture(url: &str) -> Result<(), AuthError> {
    if url.len() > MAX_URL_BYTES {
        return refuse("picture", "longer than 2048 bytes");
    }
    if find_hidden_char(url).is_some() {
        return refuse("picture", "control or invisible character");
    }
    match url.parse::<Uri>() {
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty()) =>
        {
            Ok(())
        }
        _ => refuse("picture", "not an http:// or https:// URL"),
    }
}

/// Each entry is `*`, a room name, or a room-name prefix ending in `*`.
fn check_rooms(rooms: &[String]) -> Result<(), AuthError> {
    if rooms.len() > MAX_TOKEN_ROOMS {
        return refuse("rooms", "more than 1000 entries");
    }
    for pattern in rooms {
        let name = match pattern.strip_suffix('*') {
            Some("") => continue,
            Some(prefix) => prefix,
            None => pattern,
        };
        if check_room("rooms", name).is_err() {
            return refuse("rooms", "not a room name or pattern");
        }
    }
    Ok(())
}

/// The `jsonwebtoken` crypto backend. Exactly one backend feature makes
/// it the process default; should another crate in the build enable the
/// other one too, the pure-Rust one is installed explicitly instead of
/// `jsonwebtoken` panicking on the first token.
fn crypto_provider() -> &'static CryptoProvider {
    if let Some(provider) = CryptoProvider::try_get_default() {
        return provider;
    }
    let ours = &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER;
    // Err: another thread installed one first, which is as good.
    let _ = ours.install_default();
    CryptoProvider::try_get_default().unwrap_or(ours)
}

/// Checks that `key` can verify `alg` signatures, and for RSA that it is
/// at least 2048 bits.
fn check_key(alg: Algorithm, key: &DecodingKey) -> Result<(), &'static str> {
    let provider = crypto_provider();
    if (provider.verifier_factory)(&alg, key).is_err() {
        return Err(match alg {
            Algorithm::ES256 => "not a usable EC P-256 public key",
            _ => "not a usable RSA public key",
        });
    }
    if alg == Algorithm::RS256 {
        let modulus = match key.kind() {
            DecodingKeyKind::RsaModulusExponent { n, .. } => n.clone(),
            DecodingKeyKind::SecretOrDer(der) => {
                (provider.key_utils.rsa_pub_components_from_public_key)(der)
                    .map_err(|_| "not a usable RSA public key")?
                    .0
            }
        };
        if bit_length(&modulus) < MIN_RSA_BITS {
            return Err("RSA key shorter than 2048 bits");
        }
    }
    Ok(())
}

fn bit_length(big_endian: &[u8]) -> usize {
    match big_endian.iter().position(|&b| b != 0) {
        Some(i) => (big_endian.len() - i) * 8 - big_endian[i].leading_zeros() as usize,
        None => 0,
    }
}

/// A configured public key: PEM text, or the path of a PEM file.
fn load_public_key(text: &str) -> anyhow::Result<Key> {
    let pem = if text.contains("-----BEGIN") {
        text.to_owned()
    } else {
        let path = text.trim();
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    };
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        check_key(Algorithm::RS256, &key).map_err(|why| anyhow!("{why}"))?;
        return Ok(Key {
            kid: None,
            alg: Algorithm::RS256,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        check_key(Algorithm::ES256, &key).map_err(|why| anyhow!("{why}"))?;
        return Ok(Key {
            kid: None,
            alg: Algorithm::ES256,
            key,
        });
    }
    bail!("not an RSA or EC P-256 public key in PEM (-----BEGIN PUBLIC KEY-----)")
}

/// The provider's key set: the keys last fetched and how to fetch again.
struct Jwks {
    url: Uri,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    keys: RwLock<Arc<[Key]>>,
    /// One fetch at a time, so an older answer never replaces a newer.
    fetching: tokio::sync::Mutex<()>,
    /// Refetches for unknown `kid`s; held across the fetch so concurrent
    /// callers wait for it and then see its keys.
    unknown_kid: tokio::sync::Mutex<RefetchGate>,
}

impl Jwks {
    fn new(url: Uri) -> anyhow::Result<Jwks> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(JWKS_FETCH_TIMEOUT));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(tls_provider())
            .context("setting up TLS for the JWKS fetch")?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Jwks {
            url,
            client: Client::builder(TokioExecutor::new()).build(tls),
            keys: RwLock::new(Arc::from(Vec::new())),
            fetching: tokio::sync::Mutex::new(()),
            unknown_kid: tokio::sync::Mutex::new(RefetchGate::default()),
        })
    }

    fn snapshot(&self) -> Arc<[Key]> {
        self.keys.read().clone()
    }

    fn len(&self) -> usize {
        self.keys.read().len()
    }

    fn knows(&self, kid: &str) -> bool {
        self.keys
            .read()
            .iter()
            .any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Fetches the set and, if it holds a usable key, replaces the keys.
    async fn refresh(&self) -> anyhow::Result<usize> {
        let _one_at_a_time = self.fetching.lock().await;
        let keys = self.fetch().await?;
        let n = keys.len();
        *self.keys.write() = Arc::from(keys);
        Ok(n)
    }

    async fn fetch(&self) -> anyhow::Result<Vec<Key>> {
        let request = hyper::Request::get(self.url.clone())
            .header(
                hyper::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .header(
                hyper::header::USER_AGENT,
                concat!("chatgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())?;
        let body = tokio::time::timeout(JWKS_FETCH_TIMEOUT, async {
            let response = self.client.request(request).await?;
            let status = response.status();
            if !status.is_success() {
                bail!("answered {status}");
            }
            let body = Limited::new(response.into_body(), JWKS_MAX_BYTES)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the answer: {e}"))?;
            Ok(body.to_bytes())
        })
        .await
        .map_err(|_| {
            anyhow!(
                "no complete answer within {} s",
                JWKS_FETCH_TIMEOUT.as_secs()
            )
        })??;
        parse_jwks(&body)
    }

    /// For a token naming `kid`, which this set lacks: fetches again
    /// unless that was done for an unknown `kid` in the last 10 s. True
    /// when the set now has `kid`.
    async fn refetch_for(&self, kid: &str) -> bool {
        let mut gate = self.unknown_kid.lock().await;
        if self.knows(kid) {
            // Fetched while this caller waited.
            return true;
        }
        if !gate.try_pass(Instant::now(), UNKNOWN_KID_REFETCH_INTERVAL) {
            return false;
        }
        match self.refresh().await {
            Ok(n) => {
                tracing::info!(url = %self.url, keys = n, "JWKS fetched again for an unknown key id");
                self.knows(kid)
            }
            Err(e) => {
                tracing::warn!(
                    url = %self.url,
                    error = %format!("{e:#}"),
                    "JWKS refetch failed; keeping the previous keys"
                );
                false
            }
        }
    }
}

/// The workspace's TLS provider (see [`chatgate_protocol::tls::provider`]):
/// a JWKS is public keys only, and its authenticity rests on the server
/// certificate's signature either way.
fn tls_provider() -> rustls::crypto::CryptoProvider {
    chatgate_protocol::tls::provider()
}

/// Lets one refetch through per interval.
#[derive(Default)]
struct RefetchGate {
    last: Option<Instant>,
}

impl RefetchGate {
    fn try_pass(&mut self, now: Instant, interval: Duration) -> bool {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < interval => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// Fetches the set every `period`; after a failure, sooner (from 1 s,
/// doubling to 60 s), keeping the previous keys meanwhile.
async fn keep_fresh(jwks: Arc<Jwks>, period: Duration, mut loaded: bool) {
    let mut retry = RETRY_MIN;
    loop {
        tokio::time::sleep(if loaded { period } else { retry.min(period) }).await;
        match jwks.refresh().await {
            Ok(n) => {
                if loaded {
                    tracing::debug!(url = %jwks.url, keys = n, "JWKS refreshed");
                } else {
                    tracing::info!(url = %jwks.url, keys = n, "JWKS loaded");
                }
                loaded = true;
                retry = RETRY_MIN;
            }
            Err(e) => {
                let error = format!("{e:#}");
                if jwks.len() == 0 {
                    tracing::error!(url = %jwks.url, error, "JWKS fetch failed again; retrying");
                } else {
                    tracing::warn!(
                        url = %jwks.url,
                        error,
                        "JWKS refresh failed; keeping the previous keys"
                    );
                }
                loaded = false;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// The usable keys of a JWK set; an error when there are none (a set
/// with nothing usable is more likely a mistake than a rotation, and
/// taking it would lock every user out).
fn parse_jwks(body: &[u8]) -> anyhow::Result<Vec<Key>> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body).context("the answer is not a JWK set")?;
    let total = set.keys.len();
    let mut keys = Vec::new();
    for value in set.keys {
        match jwk_key(value) {
            Ok(key) if keys.len() < JWKS_MAX_KEYS => keys.push(key),
            Ok(_) => {
                tracing::warn!("JWKS has more than {JWKS_MAX_KEYS} usable keys; ignoring the rest");
                break;
            }
            Err(why) => tracing::debug!(why, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        bail!("none of its {total} keys is an RS256 or ES256 signing key");
    }
    Ok(keys)
}

/// One JWK as a [`Key`], bound to the algorithm it declares or implies.
fn jwk_key(value: serde_json::Value) -> Result<Key, &'static str> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|_| "not a JWK")?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Err("not a signature key");
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return Err("not for verifying");
    }
    let declared = jwk.common.key_algorithm;
    let (alg, key) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            if !matches!(declared, None | Some(KeyAlgorithm::RS256)) {
                return Err("RSA key for an algorithm other than RS256");
            }
            let key =
                DecodingKey::from_rsa_components(&p.n, &p.e).map_err(|_| "bad RSA components")?;
            (Algorithm::RS256, key)
        }
        AlgorithmParameters::EllipticCurve(p) => {
            if p.curve != EllipticCurve::P256 {
                return Err("EC key on a curve other than P-256");
            }
            if !matches!(declared, None | Some(KeyAlgorithm::ES256)) {
                return Err("EC key for an algorithm other than ES256");
            }
            let key =
                DecodingKey::from_ec_components(&p.x, &p.y).map_err(|_| "bad EC coordinates")?;
            (Algorithm::ES256, key)
        }
        _ => return Err("key type other than RSA and EC"),
    };
    check_key(alg, &key)?;
    Ok(Key {
        kid: jwk.common.key_id,
        alg,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::{Value, json};
    use std::sync::OnceLock;

    const SECRET: &str = "unit-test-secret-0123456789abcdefgh";
    const OTHER: &str = "another-secret-0123456789abcdefghij";

    fn hs_config() -> AuthConfig {
        AuthConfig {
            hs256_secrets: vec![SECRET.into()],
            ..Default::default()
        }
    }

    async fn authenticator(config: AuthConfig) -> Authenticator {
        Authenticator::new(&config).await.unwrap()
    }

    /// `{"sub": "alice", "exp": in ten minutes}` with `extra` merged in
    /// (a null removes the claim).
    fn claims(extra: Value) -> Value {
        let mut c = json!({"sub": "alice", "exp": unix_now() + 600});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn hs256(secret: &str, claims: &Value) -> String {
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    /// A token with any header and signature, signed by nothing.
    fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string()),
            B64.encode(signature)
        )
    }

    struct RsaPair {
        public_pem: String,
        private_der: Vec<u8>,
    }

    fn rsa_pair(bits: usize) -> RsaPair {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits).unwrap();
        RsaPair {
            public_pem: key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
            private_der: key.to_pkcs1_der().unwrap().as_bytes().to_vec(),
        }
    }

    /// One 2048-bit key for all tests: generating one is slow unoptimised.
    fn rsa2048() -> &'static RsaPair {
        static KEY: OnceLock<RsaPair> = OnceLock::new();
        KEY.get_or_init(|| rsa_pair(2048))
    }

    fn ec_public_pem() -> (String, p256::ecdsa::SigningKey) {
        use p256::elliptic_curve::Generate;
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        let key = p256::ecdsa::SigningKey::generate();
        let pem = key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        (pem, key)
    }

    fn invalid(claim: &'static str) -> impl Fn(&AuthError) -> bool {
        move |e| matches!(e, AuthError::InvalidClaim { claim: c, .. } if *c == claim)
    }

    #[tokio::test]
    async fn hs256_tokens_minted_by_the_dev_tooling_verify() {
        let auth = authenticator(hs_config()).await;
        let minted = Claims {
            sub: "alice".into(),
            name: Some("Alice Émile".into()),
            picture: Some("https://i.example/alice.png".into()),
            exp: unix_now() + 60,
            rooms: vec!["team-*".into(), "general".into()],
        };
        let token = Verifier::new(SECRET.as_bytes()).mint(&minted);
        assert_eq!(auth.verify(&token).await, Ok(minted.clone()));
        // A second secret (rotation): tokens from either verify.
        let both = authenticator(AuthConfig {
            hs256_secrets: vec![SECRET.into(), OTHER.into()],
            ..Default::default()
        })
        .await;
        let other = Verifier::new(OTHER.as_bytes()).mint(&minted);
        assert_eq!(both.verify(&other).await, Ok(minted.clone()));
        assert_eq!(both.verify(&token).await, Ok(minted));
    }

    #[tokio::test]
    async fn a_bad_signature_is_refused() {
        let auth = authenticator(hs_config()).await;
        let token = hs256(OTHER, &claims(json!({})));
        assert_eq!(auth.verify(&token).await, Err(AuthError::Signature));
        // The payload changed after signing.
        let good = hs256(SECRET, &claims(json!({})));
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(claims(json!({"sub": "mallory"})).to_string()),
            parts[2]
        );
        assert_eq!(auth.verify(&forged).await, Err(AuthError::Signature));
        assert!(auth.verify(&good).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_living_longer_than_allowed_is_refused() {
        let auth = authenticator(hs_config()).await;
        let now = unix_now();
        let until = |secs: u64| hs256(SECRET, &claims(json!({"exp": now + secs})));
        assert!(
            auth.verify(&until(86_400)).await.is_ok(),
            "a day is allowed"
        );
        let too_long = Err(AuthError::InvalidClaim {
            claim: "exp",
            problem: "further ahead than the longest token lifetime",
        });
        assert_eq!(auth.verify(&until(86_400 + 3_600)).await, too_long);
        assert_eq!(auth.verify(&until(u64::MAX / 2)).await, too_long);
        let short = authenticator(AuthConfig {
            max_lifetime: Duration::from_secs(600),
            ..hs_config()
        })
        .await;
        assert!(short.verify(&until(500)).await.is_ok());
        assert_eq!(short.verify(&until(3_600)).await, too_long);
    }

    #[test]
    fn guessable_secrets_are_named() {
        for weak in [
            crate::config::DEV_SECRET.to_owned(),
            "x".repeat(64),
            "ab".repeat(32),
            "0123456701234567012345670123456701234567".to_owned(),
            "please-CHANGEME-before-going-live-0123".to_owned(),
            "my-super-secret-password-for-prod-2026".to_owned(),
        ] {
            assert!(weak_secret(&weak), "{weak:?} not found weak");
        }
        for strong in [
            "3f9a0c1e5b7d2468ace13579bdf02468",
            "q7Zx2Lw9Vb4Np8Rk1Ts6Ym3Hc5Jd0Gf",
        ] {
            assert!(!weak_secret(strong), "{strong:?} found weak");
        }
        let config = AuthConfig {
            hs256_secrets: vec![SECRET.into(), "z".repeat(40)],
            ..AuthConfig::default()
        };
        assert_eq!(config.weak_secrets(), [2]);
    }

    #[tokio::test]
    async fn expiry_is_checked_with_the_leeway() {
        let auth = authenticator(hs_config()).await;
        let now = unix_now();
        let past = |secs: u64| hs256(SECRET, &claims(json!({"exp": now - secs})));
        // Within the default 30 s leeway.
        assert!(auth.verify(&past(10)).await.is_ok());
        assert_eq!(auth.verify(&past(120)).await, Err(AuthError::Expired));
        let strict = authenticator(AuthConfig {
            leeway: Duration::ZERO,
            ..hs_config()
        })
        .await;
        assert_eq!(strict.verify(&past(10)).await, Err(AuthError::Expired));
        let wide = authenticator(AuthConfig {
            leeway: Duration::from_secs(300),
            ..hs_config()
        })
        .await;
        assert!(wide.verify(&past(120)).await.is_ok());
        // `exp` is required, and may be fractional.
        let no_exp = hs256(SECRET, &claims(json!({"exp": null})));
        assert_eq!(
            auth.verify(&no_exp).await,
            Err(AuthError::MissingClaim("exp"))
        );
        let fraction = hs256(SECRET, &claims(json!({"exp": (now + 60) as f64 + 0.5})));
        assert_eq!(auth.verify(&fraction).await.unwrap().exp, now + 60);
    }

    #[tokio::test]
    async fn not_before_in_the_future_is_refused() {
        let auth = authenticator(hs_config()).await;
        let now = unix_now();
        let nbf = |t: u64| hs256(SECRET, &claims(json!({ "nbf": t })));
        assert_eq!(
            auth.verify(&nbf(now + 300)).await,
            Err(AuthError::NotYetValid)
        );
        assert!(auth.verify(&nbf(now + 10)).await.is_ok(), "within leeway");
        assert!(auth.verify(&nbf(now - 10)).await.is_ok());
    }

    #[tokio::test]
    async fn issuer_and_audience_are_required_when_configured() {
        let auth = authenticator(AuthConfig {
            issuer: Some("https://idp.example/".into()),
            audience: Some("chatgate".into()),
            ..hs_config()
        })
        .await;
        let token = |extra: Value| hs256(SECRET, &claims(extra));
        let iss = "https://idp.example/";
        assert!(
            auth.verify(&token(json!({"iss": iss, "aud": "chatgate"})))
                .await
                .is_ok()
        );
        assert!(
            auth.verify(&token(json!({"iss": iss, "aud": ["other", "chatgate"]})))
                .await
                .is_ok()
        );
        assert_eq!(
            auth.verify(&token(
                json!({"iss": "https://evil.example/", "aud": "chatgate"})
            ))
            .await,
            Err(AuthError::Issuer)
        );
        assert_eq!(
            auth.verify(&token(json!({"iss": iss, "aud": "other-app"})))
                .await,
            Err(AuthError::Audience)
        );
        // HS256 (the gateway's own secret): checked when present only, so
        // dev tokens, which have neither, still verify.
        let dev = Verifier::new(SECRET.as_bytes()).mint(&Claims {
            sub: "dev".into(),
            name: None,
            picture: None,
            exp: unix_now() + 60,
            rooms: Vec::new(),
        });
        assert!(auth.verify(&dev).await.is_ok());
        // A provider's token (RS256 here) must carry both.
        let rsa = rsa2048();
        let auth = authenticator(AuthConfig {
            public_keys: vec![rsa.public_pem.clone()],
            issuer: Some(iss.into()),
            audience: Some("chatgate".into()),
            ..Default::default()
        })
        .await;
        let rs256 = |extra: Value| {
            encode(
                &Header::new(Algorithm::RS256),
                &claims(extra),
                &EncodingKey::from_rsa_der(&rsa.private_der),
            )
            .unwrap()
        };
        assert!(
            auth.verify(&rs256(json!({"iss": iss, "aud": "chatgate"})))
                .await
                .is_ok()
        );
        assert_eq!(
            auth.verify(&rs256(json!({"aud": "chatgate"}))).await,
            Err(AuthError::MissingClaim("iss"))
        );
        assert_eq!(
            auth.verify(&rs256(json!({ "iss": iss }))).await,
            Err(AuthError::MissingClaim("aud"))
        );
        assert_eq!(
            auth.verify(&rs256(json!({"iss": iss, "aud": "other-app"})))
                .await,
            Err(AuthError::Audience)
        );
        // Not configured: not checked.
        let open = authenticator(hs_config()).await;
        assert!(
            open.verify(&token(json!({"iss": "anyone", "aud": "anything"})))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn alg_none_and_other_algorithms_are_refused() {
        let auth = authenticator(hs_config()).await;
        let c = claims(json!({}));
        for alg in [
            "none", "None", "NONE", "hs256", "HS512", "RS512", "PS256", "EdDSA",
        ] {
            let token = raw_token(&json!({ "alg": alg }), &c, b"");
            assert_eq!(
                auth.verify(&token).await,
                Err(AuthError::Algorithm),
                "{alg}"
            );
        }
        // An HS256 signature under an `HS384` header is not rescued.
        let hs = hs256(SECRET, &c);
        let sig = hs.rsplit('.').next().unwrap();
        let relabeled = format!(
            "{}.{}.{sig}",
            B64.encode(json!({"alg": "HS384"}).to_string()),
            B64.encode(c.to_string())
        );
        assert_eq!(auth.verify(&relabeled).await, Err(AuthError::Algorithm));
    }

    /// The classic forgery: sign HS256 with the server's public key (which
    /// is public) as the HMAC secret.
    #[tokio::test]
    async fn a_public_key_is_never_an_hmac_secret() {
        let rsa = rsa2048();
        let (ec_pem, _) = ec_public_pem();
        let keys_only = AuthConfig {
            public_keys: vec![rsa.public_pem.clone(), ec_pem.clone()],
            ..Default::default()
        };
        let with_secret = AuthConfig {
            hs256_secrets: vec![SECRET.into()],
            ..keys_only.clone()
        };
        let c = claims(json!({}));
        for pem in [&rsa.public_pem, &ec_pem] {
            let forged = hs256(pem, &c);
            let auth = authenticator(keys_only.clone()).await;
            assert_eq!(auth.verify(&forged).await, Err(AuthError::UnknownKey));
            let auth = authenticator(with_secret.clone()).await;
            assert_eq!(auth.verify(&forged).await, Err(AuthError::Signature));
        }
        // And the keys do work for their own algorithm.
        let auth = authenticator(keys_only).await;
        let rs = encode(
            &Header::new(Algorithm::RS256),
            &c,
            &EncodingKey::from_rsa_der(&rsa.private_der),
        )
        .unwrap();
        assert!(auth.verify(&rs).await.is_ok());
        // An RS256 signature relabelled ES256 finds no key that fits.
        let parts: Vec<&str> = rs.split('.').collect();
        let relabeled = format!(
            "{}.{}.{}",
            B64.encode(json!({"alg": "ES256"}).to_string()),
            parts[1],
            parts[2]
        );
        assert_eq!(auth.verify(&relabeled).await, Err(AuthError::Signature));
    }

    #[tokio::test]
    async fn identity_claims_are_checked() {
        let auth = authenticator(hs_config()).await;
        let check = |extra: Value| {
            let auth = auth.clone();
            async move { auth.verify(&hs256(SECRET, &claims(extra))).await }
        };
        let refused = [
            (json!({"name": "Alice\u{202E}gnp.exe"}), "name"),
            (json!({"name": "bidi \u{2067}isolate"}), "name"),
            (json!({"name": "zero\u{200B}width"}), "name"),
            (json!({"name": "bom\u{FEFF}"}), "name"),
            (json!({"name": "line\nbreak"}), "name"),
            (json!({"name": "c1\u{85}"}), "name"),
            (json!({"name": "x".repeat(65)}), "name"),
            (json!({"picture": "javascript:alert(1)"}), "picture"),
            (json!({"picture": "data:image/png;base64,AAAA"}), "picture"),
            (json!({"picture": "ftp://i.example/a.png"}), "picture"),
            (json!({"picture": "//i.example/a.png"}), "picture"),
            (json!({"picture": "https://"}), "picture"),
            (json!({"picture": "https://i.example/a b.png"}), "picture"),
            (
                json!({"picture": format!("https://i.example/{}", "a".repeat(2048))}),
                "picture",
            ),
            (json!({"sub": ""}), "sub"),
            (json!({"sub": null}), "sub"),
            (json!({"sub": "a".repeat(129)}), "sub"),
            (json!({"sub": "admin\u{202E}"}), "sub"),
            (json!({"rooms": ["ok", "bad\nroom"]}), "rooms"),
            (json!({"rooms": ["x".repeat(129)]}), "rooms"),
            (json!({"rooms": [""]}), "rooms"),
        ];
        for (extra, claim) in refused {
            let outcome = check(extra.clone()).await;
            assert!(
                outcome.as_ref().is_err_and(invalid(claim)),
                "{extra:.80} gave {outcome:?}"
            );
        }
        // More entries than that do not fit in a token of MAX_TOKEN_BYTES;
        // the limit holds should that grow.
        let many: Vec<String> = (0..1001).map(|i| format!("r{i}")).collect();
        assert!(check_rooms(&many[..1000]).is_ok());
        assert!(check_rooms(&many).is_err_and(|e| invalid("rooms")(&e)));
        let c = check(json!({
            "name": "é".repeat(64),
            "picture": "https://i.example/a.png?size=64",
            "sub": "a".repeat(128),
            "rooms": ["*", "team-*", "general", "日本語"],
        }))
        .await
        .unwrap();
        assert_eq!(c.name.as_deref(), Some("é".repeat(64).as_str()));
        assert_eq!(c.rooms.len(), 4);
        assert!(
            check(json!({"picture": "http://i.example/a.png"}))
                .await
                .is_ok()
        );
        assert!(check(json!({"name": "Zoë 日本"})).await.is_ok());
        // Blank name and empty picture become none.
        let c = check(json!({"name": " \u{3000}", "picture": ""}))
            .await
            .unwrap();
        assert_eq!((c.name, c.picture), (None, None));
        // Claims of the wrong type.
        assert_eq!(check(json!({"sub": 42})).await, Err(AuthError::Malformed));
        assert_eq!(
            check(json!({"rooms": "general"})).await,
            Err(AuthError::Malformed)
        );
    }

    #[tokio::test]
    async fn malformed_tokens_are_refused() {
        let auth = authenticator(hs_config()).await;
        let good = hs256(SECRET, &claims(json!({})));
        let huge = hs256(SECRET, &claims(json!({"pad": "x".repeat(4096)})));
        for token in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.e30.x",
            &format!("{}.e30.x", B64.encode("not json")),
            &format!("{}.e30.x", B64.encode(r#"{"kid":"k"}"#)),
            &format!("{good}x!"),
            &huge,
        ] {
            let outcome = auth.verify(token).await;
            assert!(
                matches!(outcome, Err(AuthError::Malformed | AuthError::Signature)),
                "{token:.40}: {outcome:?}"
            );
        }
        assert_eq!(auth.verify("a.b").await, Err(AuthError::Malformed));
        assert_eq!(auth.verify(&huge).await, Err(AuthError::Malformed));
    }

    #[test]
    fn the_refetch_gate_lets_one_through_per_interval() {
        let mut gate = RefetchGate::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        assert!(gate.try_pass(t0, every));
        for s in [0, 1, 5, 9] {
            assert!(!gate.try_pass(t0 + Duration::from_secs(s), every), "{s}");
        }
        assert!(gate.try_pass(t0 + Duration::from_secs(10), every));
        assert!(!gate.try_pass(t0 + Duration::from_secs(19), every));
        assert!(gate.try_pass(t0 + Duration::from_secs(25), every));
    }

    /// JWKS keys are bound to the algorithm they declare, or that their
    /// type implies, and nothing else.
    #[test]
    fn jwks_keys_are_bound_to_their_algorithm() {
        use rsa::traits::PublicKeyParts;
        let rsa = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).unwrap();
        let n = B64.encode(rsa.n_bytes());
        let e = B64.encode(rsa.e_bytes());
        let small = rsa::PrivateKey::new(&mut getrandom::SysRng, 1024).unwrap();
        let (_, ec) = ec_public_pem();
        let point = ec.verifying_key().to_sec1_point(false);
        let (x, y) = (
            B64.encode(&point.as_ref()[1..33]),
            B64.encode(&point.as_ref()[33..]),
        );
        let set = json!({"keys": [
            {"kty": "oct", "kid": "oct", "alg": "HS256", "k": B64.encode(SECRET)},
            {"kty": "RSA", "kid": "rsa-as-hs", "alg": "HS256", "n": n, "e": e},
            {"kty": "RSA", "kid": "rsa-384", "alg": "RS384", "n": n, "e": e},
            {"kty": "RSA", "kid": "rsa-pss", "alg": "PS256", "n": n, "e": e},
            {"kty": "RSA", "kid": "rsa-enc", "use": "enc", "n": n, "e": e},
            {"kty": "RSA", "kid": "rsa-sign-only", "key_ops": ["sign"], "n": n, "e": e},
            {"kty": "RSA", "kid": "rsa-1024", "alg": "RS256",
             "n": B64.encode(small.n_bytes()), "e": B64.encode(small.e_bytes())},
            {"kty": "RSA", "kid": "rsa-junk", "n": "AAAA", "e": "AQAB"},
            {"kty": "EC", "kid": "ec-384", "crv": "P-384", "x": x, "y": y},
            {"kty": "EC", "kid": "ec-as-rs", "crv": "P-256", "alg": "RS256", "x": x, "y": y},
            {"kty": "EC", "kid": "ec-off-curve", "crv": "P-256", "x": x, "y": x},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": x},
            {"kty": "weird", "kid": "weird"},
            "not even an object",
            {"kty": "RSA", "kid": "rsa", "n": n, "e": e},
            {"kty": "RSA", "kid": "rsa-declared", "alg": "RS256", "use": "sig", "n": n, "e": e},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "alg": "ES256", "x": x, "y": y},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y},
        ]});
        let keys = parse_jwks(set.to_string().as_bytes()).unwrap();
        let got: Vec<(Option<&str>, Algorithm)> =
            keys.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        assert_eq!(
            got,
            [
                (Some("rsa"), Algorithm::RS256),
                (Some("rsa-declared"), Algorithm::RS256),
                (Some("ec"), Algorithm::ES256),
                (None, Algorithm::ES256),
            ]
        );
        // Nothing usable, or not a set: an error (the caller keeps its keys).
        let unusable = json!({"keys": [{"kty": "oct", "k": B64.encode(SECRET)}]});
        assert!(parse_jwks(unusable.to_string().as_bytes()).is_err());
        assert!(parse_jwks(b"{\"keys\": []}").is_err());
        assert!(parse_jwks(b"<html>").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        auth: AuthOverrides,
    }

    #[test]
    fn resolve_layers_flags_over_the_file_over_defaults() {
        use clap::Parser;
        let d = AuthConfig::resolve(&AuthOverrides::default(), None, SECRET).unwrap();
        assert_eq!(d.hs256_secrets, [SECRET]);
        assert_eq!(d.jwks_refresh, Duration::from_secs(300));
        assert_eq!(d.leeway, Duration::from_secs(30));
        assert_eq!((d.jwks_url, d.issuer, d.audience), (None, None, None));

        let file: AuthFile = toml::from_str(
            r#"
            jwt_public_keys = ["/etc/chatgate/idp.pem"]
            jwt_hs256_secrets = ["file-secret-0123456789abcdefghijkl", ""]
            jwks_url = "https://idp.example/.well-known/jwks.json"
            jwks_refresh_secs = 60
            jwt_issuer = "https://idp.example/"
            jwt_audience = "chatgate"
            jwt_leeway_secs = 5
            "#,
        )
        .unwrap();
        let c = AuthConfig::resolve(&AuthOverrides::default(), Some(file), SECRET).unwrap();
        assert_eq!(
            c.hs256_secrets,
            [SECRET, "file-secret-0123456789abcdefghijkl"]
        );
        assert_eq!(c.public_keys, ["/etc/chatgate/idp.pem"]);
        assert_eq!(c.jwks_refresh, Duration::from_secs(60));
        assert_eq!(c.issuer.as_deref(), Some("https://idp.example/"));
        assert_eq!(c.leeway, Duration::from_secs(5));

        let flags = Cli::try_parse_from([
            "chatgate",
            "--jwt-public-key",
            "/a.pem",
            "--jwt-public-key",
            "/b.pem,/c.pem",
            "--jwks-url",
            "http://127.0.0.1:9/jwks",
            "--jwt-audience",
            "other",
            "--jwt-leeway-secs",
            "0",
        ])
        .unwrap()
        .auth;
        let file: AuthFile =
            toml::from_str("jwt_audience = \"chatgate\"\njwt_issuer = \"i\"").unwrap();
        let c = AuthConfig::resolve(&flags, Some(file), SECRET).unwrap();
        assert_eq!(c.public_keys, ["/a.pem", "/b.pem", "/c.pem"]);
        assert_eq!(c.jwks_url.as_deref(), Some("http://127.0.0.1:9/jwks"));
        assert_eq!(c.audience.as_deref(), Some("other"));
        assert_eq!(c.issuer.as_deref(), Some("i"));
        assert_eq!(c.leeway, Duration::ZERO);
        assert!(
            !format!("{c:?}").contains(SECRET),
            "secrets stay out of logs"
        );

        assert!(toml::from_str::<AuthFile>("jwt_isuer = \"typo\"").is_err());
        let bad = |o: AuthOverrides| AuthConfig::resolve(&o, None, SECRET).is_err();
        let url = |u: &str| AuthOverrides {
            jwks_url: Some(u.into()),
            ..Default::default()
        };
        assert!(bad(url("ftp://idp.example/jwks")));
        assert!(bad(url("/jwks.json")));
        assert!(bad(url("not a url")));
        assert!(!bad(url("https://idp.example/jwks")));
        assert!(bad(AuthOverrides {
            jwks_refresh_secs: Some(0),
            ..Default::default()
        }));
        assert!(bad(AuthOverrides {
            jwt_leeway_secs: Some(601),
            ..Default::default()
        }));
        assert!(bad(AuthOverrides {
            jwt_hs256_secrets: vec!["short".into()],
            ..Default::default()
        }));
    }

    #[tokio::test]
    async fn unusable_keys_fail_start_up() {
        let keys = |k: &str| AuthConfig {
            public_keys: vec![k.into()],
            ..Default::default()
        };
        let rsa = rsa2048();
        let private_pem = {
            use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
            use rsa::pkcs8::LineEnding;
            rsa::PrivateKey::from_pkcs1_der(&rsa.private_der)
                .unwrap()
                .to_pkcs1_pem(LineEnding::LF)
                .unwrap()
                .to_string()
        };
        let small = rsa_pair(1024).public_pem;
        for bad in [
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            &private_pem,
            &small,
            "/nonexistent/key.pem",
        ] {
            assert!(Authenticator::new(&keys(bad)).await.is_err(), "{bad:.60}");
        }
        assert!(
            Authenticator::new(&AuthConfig::default()).await.is_err(),
            "no keys"
        );
        // A path to a PEM file works like the PEM text.
        let path = std::env::temp_dir().join(format!("chatgate-auth-{}.pem", std::process::id()));
        std::fs::write(&path, &rsa.public_pem).unwrap();
        let auth = Authenticator::new(&keys(path.to_str().unwrap())).await;
        std::fs::remove_file(&path).unwrap();
        let token = encode(
            &Header::new(Algorithm::RS256),
            &claims(json!({})),
            &EncodingKey::from_rsa_der(&rsa.private_der),
        )
        .unwrap();
        assert!(auth.unwrap().verify(&token).await.is_ok());
    }
}
