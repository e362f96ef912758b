//! Tokens as an identity provider issues them: RS256 and ES256 keys made
//! at test time, a JWKS served over HTTP on 127.0.0.1 by a small server
//! in the test that counts the requests it answers, and the gateway's
//! [`Authenticator`] fetching it: rotation through an unknown `kid`, the
//! refetch rate limit, periodic refresh, failed fetches.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{Value, json};

use chatgate_gateway::auth::{AuthConfig, AuthError, Authenticator, unix_now};

/// A signing key and its public half as a JWK and as PEM.
struct Signer {
    kid: String,
    alg: Algorithm,
    private: EncodingKey,
    jwk: Value,
    public_pem: String,
}

fn rsa_signer(kid: &str) -> Signer {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).unwrap();
    let public = key.to_public_key();
    Signer {
        kid: kid.into(),
        alg: Algorithm::RS256,
        private: EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes()),
        jwk: json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": B64.encode(public.n_bytes()), "e": B64.encode(public.e_bytes()),
        }),
        public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
    }
}

fn ec_signer(kid: &str) -> Signer {
    use p256::elliptic_curve::Generate;
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = p256::ecdsa::SigningKey::generate();
    let point = key.verifying_key().to_sec1_point(false);
    let (x, y) = point.as_ref()[1..].split_at(32);
    Signer {
        kid: kid.into(),
        alg: Algorithm::ES256,
        private: EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes()),
        // No `alg`: implied by kty and crv, as some providers publish.
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": B64.encode(x), "y": B64.encode(y)}),
        public_pem: key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    }
}

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "chatgate";

fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "name": format!("{sub} (idp)"),
        "picture": format!("https://avatars.test/{sub}.png"),
        "iat": unix_now(), "exp": unix_now() + 600, "rooms": ["team-*"],
    })
}

impl Signer {
    /// A token for `sub` with this key's `kid` in the header.
    fn token(&self, sub: &str) -> String {
        self.token_as(sub, Some(&self.kid))
    }

    /// A token for `sub` naming `kid` (or none).
    fn token_as(&self, sub: &str, kid: Option<&str>) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims(sub), &self.private).unwrap()
    }
}

fn jwks(keys: &[&Signer]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// What the provider's JWKS endpoint answers.
#[derive(Clone)]
enum Answer {
    Json(String),
    Status(StatusCode),
    /// No answer at all (for a minute).
    Stall,
    /// This JSON set with a padding member of this many bytes.
    Padded(String, usize),
}

/// A JWKS endpoint on 127.0.0.1 that counts the requests it answers.
struct Idp {
    url: String,
    answer: Arc<Mutex<Answer>>,
    hits: Arc<AtomicUsize>,
}

impl Idp {
    async fn start(answer: Answer) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let answer = Arc::new(Mutex::new(answer));
        let hits = Arc::new(AtomicUsize::new(0));
        let (a, h) = (answer.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (a, h) = (a.clone(), h.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let answer = a.lock().clone();
                        async move {
                            let response = match answer {
                                Answer::Json(body) => Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body))),
                                Answer::Status(status) => Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::new())),
                                Answer::Stall => {
                                    tokio::time::sleep(Duration::from_secs(60)).await;
                                    Response::builder().body(Full::new(Bytes::new()))
                                }
                                Answer::Padded(set, n) => {
                                    // A valid set, just too long.
                                    let body = format!(
                                        r#"{{"pad":"{}",{}"#,
                                        "x".repeat(n),
                                        set.trim_start_matches('{')
                                    );
                                    Response::builder().body(Full::new(Bytes::from(body)))
                                }
                            };
                            Ok::<_, std::convert::Infallible>(response.unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Idp { url, answer, hits }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn config(&self) -> AuthConfig {
        AuthConfig {
            hs256_secrets: vec!["the-shared-dev-secret-0123456789ab".into()],
            jwks_url: Some(self.url.clone()),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            ..Default::default()
        }
    }
}

/// Waits until `cond` holds, for at most `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn rs256_and_es256_tokens_from_the_jwks_verify() {
    let rsa = rsa_signer("rsa-1");
    let ec = ec_signer("ec-1");
    let idp = Idp::start(Answer::Json(jwks(&[&rsa, &ec]))).await;
    let auth = Authenticator::new(&idp.config()).await.unwrap();
    assert_eq!(idp.hits(), 1, "fetched once at start");

    let c = auth.verify(&rsa.token("alice")).await.unwrap();
    assert_eq!(c.sub, "alice");
    assert_eq!(c.name.as_deref(), Some("alice (idp)"));
    assert_eq!(c.picture.as_deref(), Some("https://avatars.test/alice.png"));
    assert_eq!(c.rooms, ["team-*"]);
    assert_eq!(auth.verify(&ec.token("bob")).await.unwrap().sub, "bob");
    // No `kid`: every key for the algorithm is tried.
    assert_eq!(
        auth.verify(&rsa.token_as("carol", None)).await.unwrap().sub,
        "carol"
    );
    assert_eq!(
        auth.verify(&ec.token_as("dave", None)).await.unwrap().sub,
        "dave"
    );

    // A key the provider does not publish, under a `kid` it does.
    let outsider = ec_signer("ec-1");
    assert_eq!(
        auth.verify(&outsider.token("mallory")).await,
        Err(AuthError::Signature)
    );
    assert_eq!(
        auth.verify(&outsider.token_as("mallory", None)).await,
        Err(AuthError::Signature)
    );
    // An RS256 token naming the EC key's `kid`: that key is ES256 only.
    assert_eq!(
        auth.verify(&rsa.token_as("mallory", Some("ec-1"))).await,
        Err(AuthError::UnknownKey)
    );
    // The provider's token for another application.
    let mut other_app = claims("alice");
    other_app["aud"] = json!("another-app");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&header, &other_app, &rsa.private).unwrap();
    assert_eq!(auth.verify(&token).await, Err(AuthError::Audience));
    assert_eq!(idp.hits(), 1, "known kids never refetch");

    // The same keys as PEM, without a JWKS.
    let pem = Authenticator::new(&AuthConfig {
        public_keys: vec![rsa.public_pem.clone(), ec.public_pem.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(pem.verify(&rsa.token("alice")).await.unwrap().sub, "alice");
    assert_eq!(pem.verify(&ec.token("bob")).await.unwrap().sub, "bob");
    assert_eq!(
        pem.verify(&outsider.token("mallory")).await,
        Err(AuthError::Signature)
    );
}

#[tokio::test]
async fn an_unknown_kid_refetches_at_most_once_per_ten_seconds() {
    let old = rsa_signer("2024-01");
    let new = rsa_signer("2024-02");
    let idp = Idp::start(Answer::Json(jwks(&[&old]))).await;
    let auth = Authenticator::new(&idp.config()).await.unwrap();
    assert_eq!(idp.hits(), 1);
    assert!(auth.verify(&old.token("alice")).await.is_ok());

    // The provider rotates: the first token with the new kid refetches.
    idp.set(Answer::Json(jwks(&[&new])));
    assert_eq!(auth.verify(&new.token("alice")).await.unwrap().sub, "alice");
    assert_eq!(idp.hits(), 2, "one refetch for the new kid");
    // Tokens signed by the dropped key are now refused.
    assert_eq!(
        auth.verify(&old.token("alice")).await,
        Err(AuthError::UnknownKey)
    );

    // A flood of made-up kids (some at once, some after): no more fetches
    // within 10 s of the last one.
    let forger = ec_signer("x");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (auth, token) = (
                auth.clone(),
                forger.token_as("mallory", Some(&format!("bogus-{i}"))),
            );
            tokio::spawn(async move { auth.verify(&token).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Err(AuthError::UnknownKey));
    }
    for i in 0..50 {
        let token = new.token_as("mallory", Some(&format!("bogus-late-{i}")));
        assert_eq!(auth.verify(&token).await, Err(AuthError::UnknownKey));
    }
    assert_eq!(idp.hits(), 2, "rate limit held under the flood");

    // Even a real rotation waits out the window...
    let newer = ec_signer("2024-03");
    idp.set(Answer::Json(jwks(&[&new, &newer])));
    assert_eq!(
        auth.verify(&newer.token("alice")).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(idp.hits(), 2);
    // ...while the keys already held keep working.
    assert!(auth.verify(&new.token("alice")).await.is_ok());
}

/// One unknown-kid refetch serves every caller waiting on it.
#[tokio::test]
async fn concurrent_tokens_with_a_new_kid_share_one_refetch() {
    let old = ec_signer("a");
    let new = ec_signer("b");
    let idp = Idp::start(Answer::Json(jwks(&[&old]))).await;
    let auth = Authenticator::new(&idp.config()).await.unwrap();
    idp.set(Answer::Json(jwks(&[&old, &new])));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (auth, token) = (auth.clone(), new.token(&format!("user{i}")));
            tokio::spawn(async move { auth.verify(&token).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().is_ok());
    }
    assert_eq!(idp.hits(), 2);
}

#[tokio::test]
async fn the_jwks_is_refreshed_periodically_and_a_failed_refresh_keeps_the_keys() {
    let first = ec_signer("first");
    let second = ec_signer("second");
    let idp = Idp::start(Answer::Json(jwks(&[&first]))).await;
    let auth = Authenticator::new(&AuthConfig {
        jwks_refresh: Duration::from_secs(1),
        ..idp.config()
    })
    .await
    .unwrap();
    // Failing refreshes (an error status, then an endless body, then an
    // answer with no usable key) leave the keys as they were.
    idp.set(Answer::Status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(eventually(Duration::from_secs(5), || idp.hits() >= 2).await);
    idp.set(Answer::Json(
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into(),
    ));
    assert!(eventually(Duration::from_secs(5), || idp.hits() >= 3).await);
    assert!(auth.verify(&first.token("alice")).await.is_ok());

    // Without any token asking, the next refresh picks up a rotation.
    idp.set(Answer::Json(jwks(&[&second])));
    let before = idp.hits();
    assert!(eventually(Duration::from_secs(5), || idp.hits() > before).await);
    // (Let the refresh that answered store its keys.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Tokens without a `kid` never refetch: only the refresh can have
    // brought this key.
    assert!(auth.verify(&second.token_as("alice", None)).await.is_ok());
    assert!(auth.verify(&second.token("alice")).await.is_ok());
    assert_eq!(
        auth.verify(&first.token_as("alice", None)).await,
        Err(AuthError::Signature)
    );
    drop(auth);
    // The refresher stops with the authenticator.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = idp.hits();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        idp.hits(),
        after,
        "no fetches after the authenticator is gone"
    );
}

#[tokio::test]
async fn start_up_survives_a_provider_outage_and_retries_in_the_background() {
    let key = rsa_signer("k");
    let idp = Idp::start(Answer::Status(StatusCode::BAD_GATEWAY)).await;
    let auth = Authenticator::new(&idp.config()).await.unwrap();
    assert_eq!(idp.hits(), 1);
    // HS256 works meanwhile.
    let hs = chatgate_gateway::auth::Verifier::new(b"the-shared-dev-secret-0123456789ab").mint(
        &chatgate_gateway::auth::Claims {
            sub: "dev".into(),
            name: None,
            picture: None,
            exp: unix_now() + 60,
            rooms: Vec::new(),
        },
    );
    assert!(auth.verify(&hs).await.is_ok());
    // The provider comes back; the background retry (1 s after the failed
    // start, no token asking) loads the keys.
    idp.set(Answer::Json(jwks(&[&key])));
    assert!(eventually(Duration::from_secs(5), || idp.hits() >= 2).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Without a `kid` the token cannot have caused a fetch.
    assert!(auth.verify(&key.token_as("alice", None)).await.is_ok());
    assert!(auth.verify(&key.token("alice")).await.is_ok());
    // A provider token without `iss` (configured, so required) is refused
    // even with a good signature; HS256 ones need not carry it.
    let mut bare = claims("alice");
    bare.as_object_mut().unwrap().remove("iss");
    let bare = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &bare, &key.private).unwrap();
    assert_eq!(
        auth.verify(&bare).await,
        Err(AuthError::MissingClaim("iss"))
    );
    assert!(auth.verify(&hs).await.is_ok());
}

/// A server that reads a request, sends headers and the start of a body,
/// then keeps the connection open without sending the rest.
async fn stalling_body_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n{\"keys\":[";
                let _ = stream.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn oversized_and_stalled_answers_are_cut_off() {
    let key = ec_signer("k");
    // The key's set padded to 2 MiB, over the 1 MiB bound: not taken.
    let idp = Idp::start(Answer::Padded(jwks(&[&key]), 2 << 20)).await;
    let auth = Authenticator::new(&idp.config()).await.unwrap();
    assert_eq!(idp.hits(), 1);
    assert_eq!(
        auth.verify(&key.token_as("a", None)).await,
        Err(AuthError::UnknownKey)
    );
    // (The same set under the bound is.)
    idp.set(Answer::Padded(jwks(&[&key]), 512 << 10));
    let auth = Authenticator::new(&idp.config()).await.unwrap();
    assert!(auth.verify(&key.token_as("a", None)).await.is_ok());

    // No answer, or a body that never ends: start-up waits the 5 s bound,
    // no more, and goes on without the keys.
    idp.set(Answer::Stall);
    let body_stall = AuthConfig {
        jwks_url: Some(stalling_body_server().await),
        ..idp.config()
    };
    let timed = |config: AuthConfig| async move {
        let start = Instant::now();
        let auth = Authenticator::new(&config).await.unwrap();
        (auth, start.elapsed())
    };
    let ((no_answer, waited), (no_body, waited_body)) =
        tokio::join!(timed(idp.config()), timed(body_stall));
    for waited in [waited, waited_body] {
        assert!(
            waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
            "{waited:?}"
        );
    }
    for auth in [no_answer, no_body] {
        assert_eq!(
            auth.verify(&key.token_as("a", None)).await,
            Err(AuthError::UnknownKey)
        );
    }

    // https:// goes through rustls: against this plain-HTTP port the
    // handshake fails, and start-up still goes on.
    let https = AuthConfig {
        jwks_url: Some(idp.url.replace("http://", "https://")),
        ..idp.config()
    };
    let start = Instant::now();
    let auth = Authenticator::new(&https).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(8));
    assert_eq!(
        auth.verify(&key.token_as("a", None)).await,
        Err(AuthError::UnknownKey)
    );
}

/// Promise, end to end: a gateway process started with `--jwks-url`,
/// `--jwt-issuer` and `--jwt-audience` opens sessions for the provider's
/// RS256 and ES256 tokens, with the token's `rooms` claim admitting
/// members rooms, and refuses (4100) a token of a key it does not publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_takes_identity_provider_tokens() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use chatgate_client::{Incoming, RawConnection};
    use chatgate_protocol::payload::{Identify, Rooms};
    use chatgate_protocol::{ClientFrame, ServerFrame};

    let rsa = rsa_signer("rsa-e2e");
    let ec = ec_signer("ec-e2e");
    let idp = Idp::start(Answer::Json(jwks(&[&rsa, &ec]))).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .args(["--listen", "127.0.0.1:0", "--jwks-url", &idp.url])
        .args(["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE])
        .env("CHAT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("chatgate listening") {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "no listening line");
    }
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    let url = format!("ws://{addr}/ws");

    async fn identify(url: &str, token: String) -> (RawConnection, Option<ServerFrame>) {
        let mut c = RawConnection::connect(url).await.unwrap();
        c.send(
            1,
            &ClientFrame::Identify(Identify {
                token,
                resume: None,
            }),
        )
        .await
        .unwrap();
        let first = match c.recv_timeout(Duration::from_secs(10)).await.unwrap() {
            Some(Incoming::Frames(mut f)) => Some(f.remove(0).1),
            Some(Incoming::Closed(c)) => {
                assert_eq!(c.map(|(code, _)| code), Some(4100));
                None
            }
            None => panic!("no answer to Identify"),
        };
        (c, first)
    }

    for (signer, user) in [(&rsa, "alice"), (&ec, "bob")] {
        let (mut c, first) = identify(&url, signer.token(user)).await;
        match first {
            Some(ServerFrame::Ready(r)) => assert_eq!(r.user_id, user),
            other => panic!("{user}: {other:?}"),
        }
        // The claim `rooms: ["team-*"]` admits a members room.
        c.send(
            2,
            &ClientFrame::Join(Rooms {
                rooms: vec!["team-1".into()],
            }),
        )
        .await
        .unwrap();
        match c.recv_timeout(Duration::from_secs(10)).await.unwrap() {
            Some(Incoming::Frames(f)) => {
                assert!(matches!(f[0], (2, ServerFrame::Joined(_))), "{f:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    let outsider = rsa_signer("rsa-e2e");
    let (_, first) = identify(&url, outsider.token("mallory")).await;
    assert!(
        first.is_none(),
        "a key the provider does not publish: {first:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
