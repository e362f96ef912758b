//! TLS everywhere it is asked for: clients over `wss://` (through a TLS
//! terminator, as behind nginx), Postgres with `sslmode=require`, Redis
//! with `rediss://`. Certificates come from a throwaway CA; a peer the
//! configured roots do not vouch for is refused, and a URL that asks for
//! TLS never falls back to plaintext.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::time::{Duration, Instant};

use chatgate_client::{Client, ClientConfig, Event, RawConnection};
use chatgate_protocol::payload::Identify;
use chatgate_protocol::{ClientFrame, Codec, SUBPROTOCOL, ServerFrame};
use common::tls::TestCa;
use common::*;

/// Waits until `/readyz` answers `want` (or fails the test after 20 s).
async fn readyz_becomes(gw: &Gateway, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = gw.get("/readyz");
        if status == want {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn clients_connect_over_wss_and_verify_the_server() {
    let ca = TestCa::new();
    let gw = Gateway::start(&[]);
    let front = ca.terminate_in_front_of(gw.addr).await;
    let url = format!("wss://127.0.0.1:{}/ws", front.port());

    // Trusting the test CA: a session over TLS.
    let mut raw = RawConnection::connect_tls(
        &url,
        Codec::default(),
        Some(SUBPROTOCOL),
        Some(ca.client_config()),
    )
    .await
    .unwrap();
    raw.send(
        1,
        &ClientFrame::Identify(Identify {
            token: token("alice"),
            resume: None,
        }),
    )
    .await
    .unwrap();
    assert!(matches!(
        next_frame(&mut raw).await,
        (1, ServerFrame::Ready(_))
    ));

    // The library's client the same way, and messages flow.
    let mut config = ClientConfig::new(&url, token("bob"));
    config.tls = Some(ca.client_config());
    let (bob, mut events) = Client::connect(config).await.unwrap();
    bob.join(&["tls"]).await.unwrap();
    let mut config = ClientConfig::new(&url, token("carol"));
    config.tls = Some(ca.client_config());
    let (carol, _carol_events) = Client::connect(config).await.unwrap();
    carol.join(&["tls"]).await.unwrap();
    carol.send("tls", "over TLS").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Event::Message(m)) = events.recv().await {
                return m.message.body;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, "over TLS");

    // Neither Mozilla's nor the system's roots vouch for the test CA: refused.
    let refused = RawConnection::connect_tls(&url, Codec::default(), Some(SUBPROTOCOL), None).await;
    let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        why.contains("certificate"),
        "connected without trusting the CA: {why}"
    );
}

#[tokio::test]
async fn redis_over_tls_is_verified_and_never_plaintext() {
    let ca = TestCa::new();
    let redis = PrivateRedis::start_tls(&ca);
    let url = format!("rediss://127.0.0.1:{}/0", redis.tls_port.unwrap());
    let ca_file = ca.ca.display().to_string();
    let cluster = ["--cluster", "--node-id"];

    let a = Gateway::start(
        &[
            &cluster[..],
            &["a", "--redis-url", &url, "--tls-ca-file", &ca_file],
        ]
        .concat(),
    );
    let b = Gateway::start(
        &[
            &cluster[..],
            &["b", "--redis-url", &url, "--tls-ca-file", &ca_file],
        ]
        .concat(),
    );
    readyz_becomes(&a, 200).await;
    readyz_becomes(&b, 200).await;
    let mut alice = user(&a, "alice").await;
    let mut bob = user(&b, "bob").await;
    join(&mut alice, &["secure"]).await;
    join(&mut bob, &["secure"]).await;
    assert!(matches!(
        alice
            .request(3, send_frame("secure", "m1", "through rediss"))
            .await,
        ServerFrame::MessageSent(_)
    ));
    match bob.expect().await.1 {
        ServerFrame::NewMessage(m) => assert_eq!(m.message.body, "through rediss"),
        other => panic!("{other:?}"),
    }

    // Without the CA the server is not trusted: the node never reaches
    // Redis (it does not fall back to plaintext either: the port speaks
    // only TLS).
    let untrusted = Gateway::start(&[&cluster[..], &["c", "--redis-url", &url]].concat());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(untrusted.get("/readyz").0, 503);
    assert_eq!(
        untrusted.health()["backends"]["fanout"]["status"],
        "degraded"
    );
}

#[tokio::test]
async fn postgres_over_tls_is_required_and_verified() {
    let ca = TestCa::new();
    let pg = PrivatePostgres::start_tls(&ca);
    let ca_file = ca.ca.display().to_string();
    let gw = Gateway::start(&["--database-url", &pg.tls_url(), "--tls-ca-file", &ca_file]);
    assert_eq!(gw.health()["backends"]["store"]["engine"], "postgres");
    let mut alice = user(&gw, "alice").await;
    join(&mut alice, &["pg-tls"]).await;
    assert!(matches!(
        alice
            .request(3, send_frame("pg-tls", "m1", "stored over TLS"))
            .await,
        ServerFrame::MessageSent(_)
    ));
    // The server saw a TLS connection from the gateway.
    let ssl_in_use = std::process::Command::new("psql")
        .args([
            &format!(
                "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
                pg.port
            ),
            "-tAc",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name <> 'psql'",
        ])
        .output()
        .unwrap();
    let n: u32 = String::from_utf8_lossy(&ssl_in_use.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(n >= 1, "no TLS connection from the gateway: {ssl_in_use:?}");

    // Without the CA: waiting (alive, not ready), never plaintext.
    let untrusted = Gateway::start_waiting(&["--database-url", &pg.tls_url()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = untrusted.get("/health");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        if health["failed_attempts"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(health["waiting_for"], "connecting to the database");
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(untrusted.get("/readyz").0, 503);
}

/// A URL that may fall back to plaintext is refused at start, and so is a
/// CA file that is not one.
#[test]
fn settings_that_could_downgrade_tls_are_refused_at_start() {
    let ca = TestCa::new();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("CHAT_LOG", "error")
            .output()
            .unwrap()
    };
    let out = run(&[
        "--database-url",
        "postgres://postgres@127.0.0.1:1/x?sslmode=prefer",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sslmode=prefer"));
    let out = run(&["--tls-ca-file", &ca.key.display().to_string()]);
    assert!(!out.status.success(), "a key accepted as a CA");
    let out = run(&["--tls-ca-file", "/nonexistent/ca.pem"]);
    assert!(!out.status.success());
}
