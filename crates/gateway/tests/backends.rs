//! The gateway on Postgres and Redis: outages of either are survived,
//! nothing unstored is acknowledged, and service resumes by itself.
//! These tests run private server instances; the shared ones are never
//! stopped.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::time::Duration;

use chatgate_protocol::payload::History;
use chatgate_protocol::{ClientFrame, ErrorCode, ServerFrame};
use common::*;

#[tokio::test]
async fn a_postgres_outage_refuses_sends_acks_nothing_unstored_and_recovers() {
    let pg = PrivatePostgres::start();
    let gw = Gateway::start(&["--database-url", &pg.url()]);
    assert_eq!(gw.health()["backends"]["store"]["engine"], "postgres");
    let mut alice = user(&gw, "alice").await;
    let mut bob = user(&gw, "bob").await;
    join(&mut alice, &["ops"]).await;
    join(&mut bob, &["ops"]).await;
    assert!(matches!(
        alice.request(3, send_frame("ops", "m1", "before")).await,
        ServerFrame::MessageSent(_)
    ));
    assert!(matches!(bob.expect().await.1, ServerFrame::NewMessage(_)));

    pg.stop();
    match alice.request(4, send_frame("ops", "m2", "during")).await {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable.code(), "{e:?}");
            assert!(e.retry_after_ms > 0);
        }
        other => panic!("a send during the outage must fail, got {other:?}"),
    }
    bob.assert_quiet(
        Duration::from_millis(300),
        "an unstored message was delivered",
    )
    .await;
    gw.wait_health("store degraded", |h| {
        h["backends"]["store"]["status"] == "degraded"
    });
    assert_eq!(gw.health()["status"], "degraded");
    assert_eq!(
        gw.get("/health").0,
        200,
        "a degraded node still answers its probes (restarting it would not help)"
    );
    assert!(alice.alive().await, "connections stay up during the outage");
    assert!(gw.metric("chat_errors_total{code=\"unavailable\"}") >= 1.0);

    pg.resume();
    gw.wait_health("store back", |h| h["backends"]["store"]["status"] == "ok");
    // The client retries with the same id: stored once, now acknowledged.
    let retry = alice.request(5, send_frame("ops", "m2", "during")).await;
    let ServerFrame::MessageSent(ack) = retry else {
        panic!("{retry:?}")
    };
    assert!(!ack.duplicate, "it was never stored before");
    assert!(
        matches!(bob.expect().await.1, ServerFrame::NewMessage(m) if m.message.body == "during")
    );
    let page = alice
        .request(
            6,
            ClientFrame::History(History {
                room: "ops".into(),
                before: None,
                limit: 10,
            }),
        )
        .await;
    let ServerFrame::HistoryPage(page) = page else {
        panic!()
    };
    let bodies: Vec<&str> = page.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, vec!["during", "before"]);
    assert_eq!(
        page.messages[0].seq, ack.seq,
        "history records the room sequence"
    );
}

#[tokio::test]
async fn memberships_survive_restarts_in_postgres_and_redis_outages_are_invisible() {
    let pg = PrivatePostgres::start();
    let mut redis = PrivateRedis::start();
    let args = ["--database-url", &pg.url(), "--redis-url", &redis.url()];
    let gw = Gateway::start(&args);
    let mut erin = user(&gw, "erin").await;
    join(&mut erin, &["a", "b"]).await;
    drop(erin);
    drop(gw);
    // A new process on the same database: memberships come back at Identify.
    let gw = Gateway::start(&args);
    let (_c, ready) = identified(&gw, "erin").await;
    assert_eq!(
        ready
            .rooms
            .iter()
            .map(|r| r.room.as_str())
            .collect::<Vec<_>>(),
        vec!["a", "b"]
    );
    assert_eq!(gw.health()["backends"]["cache"]["status"], "ok");

    redis.kill();
    let (mut c, ready) = identified(&gw, "erin").await;
    assert_eq!(
        ready.rooms.len(),
        2,
        "memberships read from Postgres while Redis is down"
    );
    let mut c2 = Conn::new(c);
    join(&mut c2, &["c"]).await;
    c = c2.raw;
    drop(c);
    let (_c, ready) = identified(&gw, "erin").await;
    assert_eq!(ready.rooms.len(), 3, "a join during the outage is not lost");
    gw.wait_health("cache degraded", |h| {
        h["backends"]["cache"]["status"] == "degraded"
    });
}

/// A send abandoned while it waits on the database (its connection
/// closed) must not leave the message claimed on this node: the client's
/// retry after reconnecting is acknowledged and delivered exactly once.
#[tokio::test]
async fn a_send_abandoned_while_storing_can_be_retried() {
    let url = fresh_database_url().await;
    let gw = Gateway::start(&["--database-url", &url]);
    let mut alice = user(&gw, "alice").await;
    let mut bob = user(&gw, "bob").await;
    join(&mut alice, &["ops"]).await;
    join(&mut bob, &["ops"]).await;

    // Hold the messages table so the send blocks inside the database.
    let (mut db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = db.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let Conn {
        raw: mut alice_raw, ..
    } = alice;
    alice_raw
        .send(3, &send_frame("ops", "m1", "abandoned"))
        .await
        .unwrap();
    let (watch, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let waiting = || async {
        watch
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO messages%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while waiting().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the send never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client goes away mid-send; the gateway drops the request.
    drop(alice_raw);
    gw.wait_health("alice gone", |h| h["connections"] == 1);
    lock.commit().await.unwrap();

    let mut alice = user(&gw, "alice").await;
    join(&mut alice, &["ops"]).await;
    let retry = alice.request(4, send_frame("ops", "m1", "abandoned")).await;
    let ServerFrame::MessageSent(ack) = retry else {
        panic!("the retry must be acknowledged, got {retry:?}")
    };
    // The abandoned send finished on its own once the lock was gone: the
    // retry finds it stored and is answered as a duplicate of it.
    assert!(ack.duplicate, "the retry is a duplicate: {ack:?}");
    let (_, first) = bob.expect().await;
    assert!(
        matches!(&first, ServerFrame::NewMessage(m) if m.message.id == ack.message_id),
        "{first:?}"
    );
    bob.assert_quiet(Duration::from_millis(300), "delivered once")
        .await;
}

/// A gateway started before its database listens at once, answers that
/// it is alive but not ready (and what it waits for), and serves as soon
/// as the database comes up, without a restart. It used to retry for
/// 30 s without a listener and then exit.
#[tokio::test]
async fn a_gateway_started_before_its_database_waits_for_it_and_says_so() {
    let pg = PrivatePostgres::start();
    pg.stop();
    let starting = Gateway::start_waiting(&["--database-url", &pg.url()]);
    assert_eq!(starting.get("/livez").0, 200, "alive while waiting");
    let (status, _) = starting.get("/readyz");
    assert_eq!(status, 503, "not ready without its database");
    // Until the first attempt failed the step is not known yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = starting.get("/health");
        assert_eq!(status, 503);
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(health["status"], "starting");
        if health["waiting_for"] == "connecting to the database" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(starting.get("/ws").0, 503);

    pg.resume();
    let gw = starting.ready();
    assert_eq!(gw.get("/readyz").0, 200);
    assert_eq!(gw.health()["backends"]["store"]["engine"], "postgres");
    let mut alice = user(&gw, "alice").await;
    join(&mut alice, &["late"]).await;
    assert!(matches!(
        alice.request(3, send_frame("late", "m1", "hello")).await,
        ServerFrame::MessageSent(_)
    ));
    // A store outage after start-up: alive, not ready, then ready again.
    pg.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while gw.get("/readyz").0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "still ready without its database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.get("/livez").0, 200);
    pg.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while gw.get("/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM while waiting for a backend ends the process at once (an
/// orchestrator giving up on a start must not wait out a retry loop).
#[tokio::test]
async fn a_gateway_waiting_for_its_backends_stops_on_sigterm() {
    let pg = PrivatePostgres::start();
    pg.stop();
    let mut starting = Gateway::start_waiting(&["--database-url", &pg.url()]);
    assert_eq!(starting.get("/livez").0, 200);
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &starting.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = starting.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}");
}

/// A cluster node started while Redis is down serves at once (alive, not
/// ready) and joins the cluster when Redis comes up; it used to sit
/// without a listener and without a log line.
#[tokio::test]
async fn a_cluster_node_started_before_redis_becomes_ready_when_it_comes() {
    let mut redis = PrivateRedis::start();
    redis.kill();
    let url = redis.url();
    let starting =
        Gateway::start_waiting(&["--cluster", "--node-id", "early", "--redis-url", &url]);
    assert_eq!(starting.get("/livez").0, 200);
    let gw = starting.ready();
    assert_eq!(gw.get("/readyz").0, 503, "ready without Redis");
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while gw.get("/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "{}", gw.health());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let other = Gateway::start(&["--cluster", "--node-id", "late", "--redis-url", &url]);
    let mut alice = user(&gw, "alice").await;
    let mut bob = user(&other, "bob").await;
    join(&mut alice, &["early"]).await;
    join(&mut bob, &["early"]).await;
    assert!(matches!(
        alice.request(3, send_frame("early", "m1", "hello")).await,
        ServerFrame::MessageSent(_)
    ));
    assert!(matches!(bob.expect().await.1, ServerFrame::NewMessage(_)));
}
