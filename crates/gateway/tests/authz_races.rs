//! Races and caches around room authorization: a removal racing a join,
//! a resume or a cache fill; a deleted room's cached lists; refusals that
//! must not grow Redis; history hidden from new members staying hidden on
//! resume. Each test failed before the fix it names.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use chatgate_client::RawConnection;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ServerFrame};
use common::*;

async fn send(c: &mut Conn, rid: u32, room: &str, cid: &str, body: &str) -> ServerFrame {
    c.request(rid, send_frame(room, cid, body)).await
}

fn fresh_ns() -> String {
    format!("tr{:x}", rand::random::<u64>())
}

fn redis_keys(ns: &str) -> Vec<String> {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-u",
            &shared_redis_url(),
            "--scan",
            "--pattern",
            &format!("{ns}:*"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn drop_keys(ns: &str) {
    let keys = redis_keys(ns);
    for chunk in keys.chunks(500) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-u", &shared_redis_url(), "DEL"])
            .args(chunk)
            .output();
    }
}

fn member(user: &str) -> chatgate_storage::Member {
    chatgate_storage::Member {
        user_id: user.into(),
        role: "member".into(),
        since_ms: 0,
    }
}

fn resume_naming(prefix: &str, n: usize, extra: Option<RoomPosition>) -> Resume {
    Resume {
        session_id: [0; 16],
        positions: (0..n)
            .map(|i| RoomPosition {
                room: format!("{prefix}{i}"),
                epoch: 1,
                seq: 0,
            })
            .chain(extra)
            .collect(),
    }
}

/// Promise: whenever a removal lands while a session opens (its resume
/// made slow by 999 rooms it may not enter), the removed member ends up
/// outside the room: nothing posted after the removal reaches them, and
/// they cannot post. (Fixed: a removal log the opening session checks
/// after joining the hub.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_racing_a_resume_leaves_the_member_out() {
    let db = fresh_database_url().await;
    let gw = Gateway::start(&[
        API_ARGS[0],
        API_ARGS[1],
        API_ARGS[2],
        API_ARGS[3],
        "--database-url",
        &db,
    ]);
    let room = "team:race";
    gw.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "mallory"}, {"user_id": "alice"}]}),
    );
    let api = gw.api.unwrap();
    // How long such a resume takes to open, to land the removal inside it.
    let t = Instant::now();
    let mut raw = RawConnection::connect(&gw.url()).await.unwrap();
    raw.send(
        1,
        &ClientFrame::Identify(Identify {
            token: token_for("mallory", &[]),
            resume: Some(resume_naming("team:calib-", 999, None)),
        }),
    )
    .await
    .unwrap();
    let mut c = Conn::new(raw);
    assert!(matches!(c.expect().await, (1, ServerFrame::Ready(_))));
    let open_time = t.elapsed();
    drop(c);
    for attempt in 0..4 {
        gw.api(
            "members.add",
            json!({"room": room, "members": [{"user_id": "mallory"}]}),
        );
        let mut raw = RawConnection::connect(&gw.url()).await.unwrap();
        raw.send(
            1,
            &ClientFrame::Identify(Identify {
                token: token_for("mallory", &[]),
                resume: Some(resume_naming(&format!("team:fake{attempt}-"), 999, None)),
            }),
        )
        .await
        .unwrap();
        let mut m = Conn::new(raw);
        tokio::time::sleep(open_time / 3).await;
        let body = json!({"room": room, "user_ids": ["mallory"]}).to_string();
        let (status, reply) = tokio::task::spawn_blocking(move || {
            http_call(api, "POST", "/api/members.remove", Some(API_KEY), &body)
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{reply}");
        // Whatever Ready says, after its frames the member is out.
        match m.expect().await {
            (1, ServerFrame::Ready(_)) => {}
            other => panic!("{other:?}"),
        }
        let text = format!("after the removal #{attempt}");
        gw.api("publish", json!({"room": room, "body": text}));
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some((_, f)) = m
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            if let ServerFrame::NewMessage(n) = &f {
                panic!(
                    "attempt {attempt}: a removed member received {:?}",
                    n.message.body
                );
            }
        }
        let r = send(
            &mut m,
            5,
            room,
            &format!("m{attempt}"),
            "removed but posting",
        )
        .await;
        assert!(
            matches!(&r, ServerFrame::Error(e) if e.code == 3),
            "attempt {attempt}: a removed member could post: {r:?}"
        );
    }
}

/// Promise: a deleted room is not entered again from a room list the
/// Redis cache kept, even when it is re-created for other people.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_room_is_not_reentered_from_a_cached_room_list() {
    let db = fresh_database_url().await;
    let redis = shared_redis_url();
    let ns = fresh_ns();
    let gw = Gateway::start(&[
        API_ARGS[0],
        API_ARGS[1],
        API_ARGS[2],
        API_ARGS[3],
        "--database-url",
        &db,
        "--redis-url",
        &redis,
        "--redis-namespace",
        &ns,
    ]);
    let room = "team:deleted";
    gw.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "mallory"}]}),
    );
    let (m, ready) = identify_as(&gw, "mallory", &[], None).await;
    assert_eq!(rooms_of(&ready.rooms), vec![room]);
    drop(m);
    gw.api("rooms.delete", json!({"room": room}));
    gw.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "alice"}]}),
    );
    let (mut m2, ready) = identify_as(&gw, "mallory", &[], None).await;
    assert!(
        ready.rooms.is_empty(),
        "back in a deleted room: {:?}",
        rooms_of(&ready.rooms)
    );
    let r = m2
        .request(
            2,
            ClientFrame::Join(Rooms {
                rooms: vec![room.into()],
            }),
        )
        .await;
    assert!(matches!(&r, ServerFrame::Error(e) if e.code == 9), "{r:?}");
    drop_keys(&ns);
}

/// Promise: refusals cost no Redis keys (a client asking for made-up
/// rooms must not grow Redis), and a refused Join stops at its first
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_grow_no_redis_keys() {
    let db = fresh_database_url().await;
    let redis = shared_redis_url();
    let ns = fresh_ns();
    let gw = Gateway::start(&[
        API_ARGS[0],
        API_ARGS[1],
        API_ARGS[2],
        API_ARGS[3],
        "--database-url",
        &db,
        "--redis-url",
        &redis,
        "--redis-namespace",
        &ns,
    ]);
    let (mut m, _) = identify_as(&gw, "mallory", &[], None).await;
    for j in 0..20 {
        let rooms: Vec<String> = (0..100).map(|i| format!("team:made-up-{j}-{i}")).collect();
        let r = m.request(2 + j, ClientFrame::Join(Rooms { rooms })).await;
        assert!(matches!(&r, ServerFrame::Error(e) if e.code == 9), "{r:?}");
    }
    let grants: Vec<String> = redis_keys(&ns)
        .into_iter()
        .filter(|k| k.ends_with(":members"))
        .collect();
    let misses = gw.metric("chat_membership_cache_total{result=\"miss\"}");
    drop_keys(&ns);
    assert!(
        grants.is_empty(),
        "refusals made Redis keys: {}",
        grants.len()
    );
    assert_eq!(
        misses, 20.0,
        "one lookup per refused Join, not one per name"
    );
}

/// Promise: a room that hides history from before a member joined hides
/// it from a resume too: nothing is replayed, the member reloads History.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_join_history_is_not_replayed() {
    let gw = Gateway::start(&[
        API_ARGS[0],
        API_ARGS[1],
        API_ARGS[2],
        API_ARGS[3],
        "--room-policy",
        "secret:=members,history=since_join",
    ]);
    let room = "secret:board";
    gw.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "old"}]}),
    );
    let (mut old, ready) = identify_as(&gw, "old", &[], None).await;
    let epoch = ready.rooms[0].epoch;
    send(&mut old, 2, room, "b1", "before the grant").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    gw.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "new"}]}),
    );
    let (mut new, _) = identify_as(
        &gw,
        "new",
        &[],
        Some(Resume {
            session_id: [0; 16],
            positions: vec![RoomPosition {
                room: room.into(),
                epoch,
                seq: 0,
            }],
        }),
    )
    .await;
    loop {
        match new.expect().await {
            (_, ServerFrame::NewMessage(m)) => panic!("replayed {:?}", m.message.body),
            (0, ServerFrame::Resumed(r)) => {
                assert_eq!(r.rooms.len(), 1);
                assert!(!r.rooms[0].recovered, "{r:?}");
                break;
            }
            _ => {}
        }
    }
}

/// Promise: what `rooms.delete` deleted does not come back through a
/// resume's replay, on one node or through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_messages_are_not_replayed() {
    let ns = fresh_ns();
    let redis = shared_redis_url();
    let cluster_args = [
        API_ARGS[0],
        API_ARGS[1],
        API_ARGS[2],
        API_ARGS[3],
        "--cluster",
        "--redis-url",
        &redis,
        "--redis-namespace",
        &ns,
    ];
    for gw in [Gateway::start(&API_ARGS), Gateway::start(&cluster_args)] {
        let room = "public:doomed";
        let (mut a, _) = identify_as(&gw, "a", &[], None).await;
        let position = match a
            .request(
                2,
                ClientFrame::Join(Rooms {
                    rooms: vec![room.into()],
                }),
            )
            .await
        {
            ServerFrame::Joined(j) => (j.rooms[0].epoch, j.rooms[0].seq),
            other => panic!("{other:?}"),
        };
        send(&mut a, 3, room, "d1", "doxxing the moderators deleted").await;
        assert_eq!(
            gw.api("rooms.delete", json!({"room": room}))["deleted"],
            json!(true)
        );
        let (mut b, _) = identify_as(
            &gw,
            "b",
            &[],
            Some(Resume {
                session_id: [0; 16],
                positions: vec![RoomPosition {
                    room: room.into(),
                    epoch: position.0,
                    seq: position.1,
                }],
            }),
        )
        .await;
        loop {
            match b.expect().await {
                (_, ServerFrame::NewMessage(m)) => panic!("replayed {:?}", m.message.body),
                (0, ServerFrame::Resumed(r)) => {
                    assert!(!r.rooms[0].recovered, "{r:?}");
                    break;
                }
                _ => {}
            }
        }
    }
    drop_keys(&ns);
}

/// Promise: a grant read from the database while a removal is applied is
/// not put back in the Redis cache afterwards (a room generation guards
/// the fill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cache_fill_racing_a_removal_does_not_keep_the_grant() {
    use chatgate_storage::{CacheConfig, CachedStore, Store};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let slow = slow::Slow::store(Duration::from_millis(300));
    let mut config = CacheConfig::new(shared_redis_url());
    config.namespace = fresh_ns();
    let ns = config.namespace.clone();
    let cached = Arc::new(CachedStore::connect(slow.clone(), config).await.unwrap());
    let room = "team:cachefill";
    cached
        .add_members(room, &[member("mallory")])
        .await
        .unwrap();
    slow.slow.store(true, Ordering::SeqCst);
    let c1 = cached.clone();
    let grant_read = tokio::spawn(async move { c1.grant(room, "mallory").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    cached
        .remove_members(room, &["mallory".to_string()])
        .await
        .unwrap();
    let _ = grant_read.await.unwrap();
    slow.slow.store(false, Ordering::SeqCst);
    let served = cached.grant(room, "mallory").await.unwrap();
    drop_keys(&ns);
    assert_eq!(served, None, "the cache serves a removed grant");
}

/// Promise: the node's own cache does not keep a grant read while the
/// removal's control message was applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cache_fill_racing_a_removal_does_not_keep_the_grant() {
    use chatgate_gateway::access::Rooms;
    use chatgate_gateway::metrics::Metrics;
    use chatgate_gateway::policy::Policies;
    use chatgate_storage::Store;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let slow = slow::Slow::store(Duration::from_millis(300));
    let rooms = Arc::new(Rooms::new(
        slow.clone(),
        Policies::default(),
        Arc::new(Metrics::new()),
    ));
    let room = "team:nodecache";
    slow.add_members(room, &[member("mallory")]).await.unwrap();
    slow.slow.store(true, Ordering::SeqCst);
    let r1 = rooms.clone();
    let in_flight = tokio::spawn(async move { r1.rights(room, "mallory", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    slow.remove_members(room, &["mallory".to_string()])
        .await
        .unwrap();
    rooms.forget(room, &["mallory".to_string()]);
    let _ = in_flight.await.unwrap();
    slow.slow.store(false, Ordering::SeqCst);
    let later = rooms.rights(room, "mallory", &[]).await.unwrap();
    assert_eq!(later.entry, None, "the node admits a removed member");
}

mod slow {
    //! A store whose grant and room-list reads return `delay` after they
    //! read (a loaded database, a slow network): what a cache fill races.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use crate::common::hooked::{Hook, Hooked};

    pub struct Slow {
        pub slow: AtomicBool,
        pub delay: Duration,
    }

    pub type SlowReads = Hooked<Slow>;

    impl Slow {
        pub fn store(delay: Duration) -> Arc<SlowReads> {
            Hooked::new(Slow {
                slow: AtomicBool::new(false),
                delay,
            })
        }
        async fn pause(&self) {
            if self.slow.load(Ordering::SeqCst) {
                tokio::time::sleep(self.delay).await;
            }
        }
    }

    #[async_trait]
    impl Hook for Slow {
        async fn after_memberships(&self) {
            self.pause().await;
        }
        async fn after_grant(&self) {
            self.pause().await;
        }
    }
}
