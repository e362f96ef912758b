//! The shared Store suite against real PostgreSQL (and Redis), plus the
//! Postgres engine's own promises: one statement per history page,
//! concurrent-safe migrations, cache invalidation, Redis fallback.
//!
//! Uses `CHAT_TEST_DATABASE_URL` (default the local `test` database) and
//! `CHAT_TEST_REDIS_URL` (default local Redis); each test works in its own
//! fresh schema, so tests run in parallel.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::sync::Arc;

use chatgate_storage::model::Attachment;
use chatgate_storage::{
    CacheConfig, CachedStore, NewMessage, PgConfig, PgStore, ReactionChange, Store, User, suite,
};
use rand::Rng;

fn redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn pg() -> Arc<PgStore> {
    let (url, _) = suite::fresh_schema().await;
    Arc::new(PgStore::connect(PgConfig::new(url)).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_store_passes_the_suite() {
    suite::run_all(pg().await, "pg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_pg_store_passes_the_suite() {
    let tag = format!("c{:x}", rand::rng().random::<u32>());
    let cached = CachedStore::connect(pg().await, CacheConfig::new(redis_url()))
        .await
        .unwrap();
    let stats = cached.stats();
    suite::run_all(Arc::new(cached), &tag).await;
    // Without Redis the cache falls back to Postgres and the suite passes
    // all the same; only the counters tell that Redis was really used.
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        stats.errors.load(Relaxed),
        0,
        "the cache met Redis errors (is Redis at {} running?)",
        redis_url()
    );
    assert!(
        stats.hits.load(Relaxed) >= 1,
        "no read was answered from Redis ({} misses)",
        stats.misses.load(Relaxed)
    );
}

#[tokio::test]
async fn a_page_of_50_with_reactions_and_attachments_is_one_statement() {
    let store = pg().await;
    store
        .upsert_user(&User {
            id: "sam".into(),
            name: "Sam".into(),
            image: "s.png".into(),
        })
        .await
        .unwrap();
    for i in 0..60 {
        let m = store
            .insert_message(NewMessage {
                room: "n1".into(),
                sender_id: "sam".into(),
                sender_name: "Sam then".into(),
                sender_image: String::new(),
                client_msg_id: format!("k{i}"),
                body: format!("message {i}"),
                attachments: (0..2)
                    .map(|j| Attachment {
                        url: format!("https://f/{i}/{j}"),
                        name: format!("f{j}"),
                        mime: "image/png".into(),
                        size: j,
                    })
                    .collect(),
            })
            .await
            .unwrap();
        for (user, emoji) in [("a", "👍"), ("b", "👍"), ("a", "🎉")] {
            let change = ReactionChange {
                room: "n1".into(),
                message_id: m.message.id,
                user_id: user.into(),
                emoji: emoji.into(),
                remove: false,
            };
            store.react(&change).await.unwrap();
        }
    }
    let before = store.statements();
    let page = store.history("n1", None, 50, 0).await.unwrap();
    assert_eq!(
        store.statements() - before,
        1,
        "a history page must be one statement"
    );
    assert_eq!(page.messages.len(), 50);
    for m in &page.messages {
        assert_eq!(m.attachments.len(), 2);
        assert_eq!(
            m.attachments[1].url,
            format!("https://f/{}/1", &m.body[8..])
        );
        assert_eq!(m.reactions.len(), 2);
        assert_eq!(m.sender_name, "Sam", "history shows the current profile");
        assert_eq!(m.sender_image, "s.png");
    }
    let before = store.statements();
    let older = store.history("n1", page.next, 50, 0).await.unwrap();
    assert_eq!(store.statements() - before, 1);
    assert_eq!(older.messages.len(), 10);
    assert!(older.next.is_none());
}

#[tokio::test]
async fn nodes_starting_together_apply_migrations_once() {
    let (url, schema) = suite::fresh_schema().await;
    let mut starts = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        starts.push(tokio::spawn(async move {
            PgStore::connect(PgConfig::new(url)).await.map(|_| ())
        }));
    }
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let (client, conn) =
        tokio_postgres::connect(&suite::test_database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            &format!("SELECT version FROM {schema}.schema_migrations"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), chatgate_storage::migrate::MIGRATIONS.len());
}

#[tokio::test]
async fn membership_changes_are_visible_through_the_cache_at_once() {
    let user = format!("cache-{:x}", rand::rng().random::<u64>());
    let cached = CachedStore::connect(pg().await, CacheConfig::new(redis_url()))
        .await
        .unwrap();
    cached
        .upsert_user(&User {
            id: user.clone(),
            name: "C".into(),
            image: String::new(),
        })
        .await
        .unwrap();
    let rooms = |list: Vec<chatgate_storage::Membership>| -> Vec<String> {
        list.into_iter().map(|m| m.room).collect()
    };
    cached.join(&user, &["one".into()]).await.unwrap();
    assert_eq!(rooms(cached.memberships(&user).await.unwrap()), vec!["one"]);
    assert_eq!(rooms(cached.memberships(&user).await.unwrap()), vec!["one"]);
    let stats = cached.stats();
    assert!(
        stats.hits.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "second read is a hit"
    );
    cached.join(&user, &["two".into()]).await.unwrap();
    assert_eq!(
        rooms(cached.memberships(&user).await.unwrap()),
        vec!["one", "two"]
    );
    cached.leave(&user, &["one".into()]).await.unwrap();
    assert_eq!(rooms(cached.memberships(&user).await.unwrap()), vec!["two"]);
    // The entry really is in Redis, with a TTL.
    let redis =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&redis_url()).unwrap())
            .build()
            .unwrap();
    use fred::prelude::{ClientLike, KeysInterface};
    redis.init().await.unwrap();
    let key = format!("chat:{{u:{user}}}:rooms");
    let value: Option<String> = redis.get(&key).await.unwrap();
    assert_eq!(value.as_deref(), Some(r#"[["two",null]]"#));
    let ttl: i64 = redis.ttl(&key).await.unwrap();
    assert!(ttl > 0 && ttl <= 300, "ttl {ttl}");
}

#[tokio::test]
async fn an_unreachable_redis_falls_back_to_the_database() {
    let store = pg().await;
    // Nothing listens on port 1.
    let cached = CachedStore::connect(store, CacheConfig::new("redis://127.0.0.1:1/0"))
        .await
        .unwrap();
    cached
        .upsert_user(&User {
            id: "r".into(),
            name: "R".into(),
            image: String::new(),
        })
        .await
        .unwrap();
    cached.join("r", &["x".into()]).await.unwrap();
    let list = cached.memberships("r").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].room, "x");
    assert!(cached.degraded(), "the cache reports itself degraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_group_commit_and_stay_idempotent() {
    let store = pg().await;
    let send = |i: u32| NewMessage {
        room: "gc".into(),
        sender_id: format!("u{}", (i % 150) % 7),
        sender_name: "U".into(),
        sender_image: String::new(),
        // 200 sends over 150 keys: 50 keys are sent twice at the same time.
        client_msg_id: format!("k{}", i % 150),
        body: format!("body {}", i % 150),
        attachments: vec![],
    };
    let before = store.statements();
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let store = store.clone();
            let msg = send(i);
            tokio::spawn(async move { store.insert_message(msg).await.unwrap() })
        })
        .collect();
    let mut by_key: std::collections::HashMap<(String, String), Vec<(u64, bool)>> =
        Default::default();
    for t in tasks {
        let ins = t.await.unwrap();
        let m = ins.message;
        by_key
            .entry((m.sender_id.clone(), m.client_msg_id.clone()))
            .or_default()
            .push((m.id, ins.duplicate));
    }
    let insert_statements = store.statements() - before;
    assert_eq!(by_key.len(), 150, "one message per key");
    for (key, seen) in &by_key {
        assert!(
            seen.iter().all(|(id, _)| *id == seen[0].0),
            "every send of {key:?} returns the same message: {seen:?}"
        );
        assert_eq!(
            seen.iter().filter(|(_, dup)| !dup).count(),
            1,
            "exactly one send of {key:?} stored it: {seen:?}"
        );
    }
    assert!(
        insert_statements < 200,
        "concurrent sends share statements ({insert_statements} for 200 sends)"
    );
    // Sequence numbers set concurrently land on the right rows.
    let ids: Vec<u64> = by_key.values().map(|v| v[0].0).collect();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let store = store.clone();
            let id = *id;
            tokio::spawn(async move { store.set_seq(id, 42, id * 10).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // A position for a message that does not exist updates nothing and
    // fails nobody's insert that carries it.
    store.set_seq(u64::MAX / 4, 42, 1).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.positions_pending(), 0);
    let page = store.history("gc", None, 100, 0).await.unwrap();
    let mut total = page.messages.len();
    for m in &page.messages {
        assert_eq!(m.seq, m.id * 10, "seq of message {} was set", m.id);
    }
    let mut next = page.next;
    while let Some(cursor) = next {
        let p = store.history("gc", Some(cursor), 100, 0).await.unwrap();
        total += p.messages.len();
        for m in &p.messages {
            assert_eq!(m.seq, m.id * 10, "seq of message {} was set", m.id);
        }
        next = p.next;
    }
    assert_eq!(total, 150);
}

/// Many concurrent batches carrying the same keys in different orders
/// (clients retrying all at once): no batch may deadlock another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_of_the_same_keys_do_not_deadlock() {
    use rand::seq::SliceRandom;
    let store = pg().await;
    let mut order: Vec<u32> = (0..2000).map(|i| i % 1000).collect();
    order.shuffle(&mut rand::rng());
    let tasks: Vec<_> = order
        .into_iter()
        .map(|k| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .insert_message(NewMessage {
                        room: "dl".into(),
                        sender_id: format!("u{}", k % 3),
                        sender_name: "U".into(),
                        sender_image: String::new(),
                        client_msg_id: format!("k{k}"),
                        body: "retry".into(),
                        attachments: vec![],
                    })
                    .await
            })
        })
        .collect();
    let mut ids = std::collections::HashMap::new();
    for t in tasks {
        let m = t.await.unwrap().expect("no send fails").message;
        let first = *ids.entry(m.client_msg_id.clone()).or_insert(m.id);
        assert_eq!(first, m.id, "every retry returns the one stored message");
    }
    assert_eq!(ids.len(), 1000);
}

/// A row Postgres cannot hold (a NUL in text) fails only its own send,
/// never the others that shared its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_row_fails_only_its_own_send() {
    let store = pg().await;
    let send = |i: u32| NewMessage {
        room: "nul".into(),
        sender_id: format!("u{i}"),
        sender_name: "U".into(),
        sender_image: String::new(),
        client_msg_id: format!("k{i}"),
        body: if i % 10 == 3 {
            "bad\0body".into()
        } else {
            format!("body {i}")
        },
        attachments: vec![],
    };
    let before = store.statements();
    let tasks: Vec<_> = (0..100u32)
        .map(|i| {
            let store = store.clone();
            let msg = send(i);
            tokio::spawn(async move { (i, store.insert_message(msg).await) })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        let (i, result) = t.await.unwrap();
        if i % 10 == 3 {
            assert!(result.is_err(), "send {i} with a NUL was stored");
        } else {
            assert!(result.is_ok(), "send {i} failed: {result:?}");
            stored += 1;
        }
    }
    assert_eq!(stored, 90);
    assert!(
        store.statements() - before < 200,
        "the sends were batched (else this test proves nothing)"
    );
}

/// Joining and leaving rooms (made-up names included) leaves no row
/// behind: a room a client only joins is its list entries, gone once
/// left; rooms the application creates keep theirs.
#[tokio::test]
async fn join_and_leave_churn_leaves_no_rows() {
    let (url, _) = suite::fresh_schema().await;
    let store = PgStore::connect(PgConfig::new(url.clone())).await.unwrap();
    store
        .upsert_user(&User {
            id: "churner".into(),
            name: "C".into(),
            image: String::new(),
        })
        .await
        .unwrap();
    store.create_room("kept").await.unwrap();
    for batch in 0..10 {
        let rooms: Vec<String> = (0..100).map(|i| format!("made-up-{batch}-{i}")).collect();
        store.join("churner", &rooms).await.unwrap();
        store.leave("churner", &rooms).await.unwrap();
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let count = |table: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };
    assert_eq!(count("channel_members").await, 0);
    assert_eq!(count("channels").await, 1, "only the created room");
}

/// A raw connection on a test schema.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// The transaction that wrote a row's current version and the one that
/// last locked or deleted it: a statement that neither writes nor locks
/// the row leaves both alone (the server's transaction counter cannot
/// tell, other tests share it).
async fn row_versions(client: &tokio_postgres::Client, table: &str, filter: &str) -> Vec<String> {
    client
        .query(
            &format!(
                "SELECT xmin::text || '/' || xmax::text FROM {table} WHERE {filter} ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn writer_of(client: &tokio_postgres::Client, id: u64) -> String {
    client
        .query_one(
            "SELECT xmin::text FROM messages WHERE id = $1",
            &[&(id as i64)],
        )
        .await
        .unwrap()
        .get(0)
}

/// The position a message has in the table itself (not a store's view).
async fn stored_position(client: &tokio_postgres::Client, id: u64) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT epoch, seq FROM messages WHERE id = $1",
            &[&(id as i64)],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

fn message(key: &str) -> NewMessage {
    NewMessage {
        room: "one-commit".into(),
        sender_id: "sam".into(),
        sender_name: "Sam".into(),
        sender_image: String::new(),
        client_msg_id: key.into(),
        body: format!("body {key}"),
        attachments: vec![],
    }
}

#[tokio::test]
async fn a_send_commits_once_its_position_riding_with_the_next_insert() {
    let (url, _) = suite::fresh_schema().await;
    let store = PgStore::connect(PgConfig::new(url.clone())).await.unwrap();
    let client = raw(&url).await;
    let first = store.insert_message(message("a")).await.unwrap().message;
    let statements = store.statements();
    // The send path: record the first message's position, store the next.
    store.set_seq(first.id, 77, 1).await.unwrap();
    let second = store.insert_message(message("b")).await.unwrap().message;
    assert_eq!(store.statements() - statements, 1, "one statement");
    assert_eq!(
        writer_of(&client, first.id).await,
        writer_of(&client, second.id).await,
        "one transaction wrote the position and the next message"
    );
    assert_eq!(
        stored_position(&client, first.id).await,
        (77, 1),
        "the position is in the table, written with the second insert"
    );
    assert_eq!(store.positions_pending(), 0);
    // Its own position waits for the next insert, yet reads see it.
    store.set_seq(second.id, 77, 2).await.unwrap();
    assert_eq!(stored_position(&client, second.id).await, (0, 0));
    let page = store.history("one-commit", None, 10, 0).await.unwrap();
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![2, 1]);
    let retry = store.insert_message(message("b")).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!((retry.epoch, retry.message.seq), (77, 2));
    // With attachments a message is inserted alone, and carries them too.
    let mut third = message("c");
    third.attachments = vec![Attachment {
        url: "https://cdn.example/c.png".into(),
        name: "c.png".into(),
        mime: "image/png".into(),
        size: 3,
    }];
    store.insert_message(third).await.unwrap();
    assert_eq!(stored_position(&client, second.id).await, (77, 2));
}

#[tokio::test]
async fn a_position_no_insert_carries_is_written_alone_and_at_exit() {
    let (url, _) = suite::fresh_schema().await;
    let store = PgStore::connect(PgConfig::new(url.clone())).await.unwrap();
    let client = raw(&url).await;
    let m = store.insert_message(message("lone")).await.unwrap().message;
    store.set_seq(m.id, 5, 9).await.unwrap();
    let started = std::time::Instant::now();
    while stored_position(&client, m.id).await != (5, 9) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "a pending position was never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= chatgate_storage::pg::POSITION_DELAY / 2,
        "written alone only after waiting for an insert to carry it"
    );
    assert_eq!(store.positions_pending(), 0);
    // What is still pending at a clean exit is written by `flush`.
    let n = store.insert_message(message("last")).await.unwrap().message;
    store.set_seq(n.id, 5, 10).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(stored_position(&client, n.id).await, (5, 10));
}

#[tokio::test]
async fn a_returning_users_identify_is_one_statement_and_writes_nothing() {
    let (url, _) = suite::fresh_schema().await;
    let store = PgStore::connect(PgConfig::new(url.clone())).await.unwrap();
    let client = raw(&url).await;
    let mut user = User {
        id: "rita".into(),
        name: "Rita".into(),
        image: String::new(),
    };
    assert!(store.identify(&user).await.unwrap().is_empty());
    store
        .join("rita", &["lobby".to_owned(), "lobby".to_owned()])
        .await
        .unwrap();
    let versions = || async {
        (
            row_versions(&client, "users", "id = 'rita'").await,
            row_versions(&client, "channel_members", "user_id = 'rita'").await,
        )
    };
    let before = versions().await;
    let statements = store.statements();
    let rooms = store.identify(&user).await.unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].room, "lobby");
    // Joining a room already listed writes nothing either.
    store.join("rita", &["lobby".to_owned()]).await.unwrap();
    assert_eq!(store.statements() - statements, 2);
    assert_eq!(versions().await, before, "no row written or locked");
    // A changed profile is written.
    user.name = "Rita R.".into();
    store.identify(&user).await.unwrap();
    assert_ne!(versions().await.0, before.0);
    let name: String = client
        .query_one("SELECT name FROM users WHERE id = 'rita'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "Rita R.");
}

#[tokio::test]
async fn a_returning_user_with_a_warm_cache_costs_the_database_nothing() {
    let pg = pg().await;
    let cached = CachedStore::connect(pg.clone(), CacheConfig::new(redis_url()))
        .await
        .unwrap();
    let user = User {
        id: format!("warm-{:x}", rand::rng().random::<u32>()),
        name: "Warm".into(),
        image: String::new(),
    };
    cached.identify(&user).await.unwrap();
    cached.join(&user.id, &["lobby".to_owned()]).await.unwrap();
    // The join changed the list: the next Identify reads it once.
    let statements = pg.statements();
    let rooms = cached.identify(&user).await.unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!(pg.statements() - statements, 1);
    // Warm now.
    let statements = pg.statements();
    for _ in 0..3 {
        assert_eq!(cached.identify(&user).await.unwrap().len(), 1);
    }
    assert_eq!(pg.statements() - statements, 0, "answered from Redis");
}

#[tokio::test]
async fn a_position_on_a_locked_row_fails_no_send() {
    let (url, _) = suite::fresh_schema().await;
    let mut config = PgConfig::new(url.clone());
    config.statement_timeout = std::time::Duration::from_millis(300);
    let store = PgStore::connect(config).await.unwrap();
    let first = store
        .insert_message(message("locked"))
        .await
        .unwrap()
        .message;
    store.set_seq(first.id, 3, 1).await.unwrap();
    // Somebody holds the first message's row (an operator's open
    // transaction, a room being deleted).
    let mut holder = raw(&url).await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM messages WHERE id = $1 FOR UPDATE",
        &[&(first.id as i64)],
    )
    .await
    .unwrap();
    // Other people's sends still go through: the first once more without
    // the position, the next without carrying it at all.
    // (Counting inserts only: the background writer may try the row too.)
    let inserts = || {
        store
            .statement_counts()
            .iter()
            .find(|(name, _)| *name == "insert_message")
            .map_or(0, |(_, n)| *n)
    };
    let before = inserts();
    store.insert_message(message("next-1")).await.unwrap();
    assert_eq!(inserts() - before, 2);
    let before = inserts();
    store.insert_message(message("next-2")).await.unwrap();
    assert_eq!(
        inserts() - before,
        1,
        "a later send carried the stuck position again"
    );
    assert_eq!(store.positions_pending(), 1);
    tx.rollback().await.unwrap();
    // Once the row is free, the background writer records it.
    let client = raw(&url).await;
    let started = std::time::Instant::now();
    while stored_position(&client, first.id).await != (3, 1) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "the position was never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
