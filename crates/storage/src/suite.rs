//! The behavioural contract of [`Store`], as runnable checks.
//!
//! Each engine's test file calls [`run_all`] with a fresh store; a check
//! panics with a message naming the broken rule. Room and user names are
//! prefixed with `tag` so several runs can share one database.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::sync::Arc;

use crate::model::{Attachment, Cursor, Member, NewMessage, ReactionChange, ReactionOutcome, User};
use crate::{Store, StoreError};

fn new_msg(room: &str, sender: &str, cid: &str, body: &str) -> NewMessage {
    NewMessage {
        room: room.into(),
        sender_id: sender.into(),
        sender_name: format!("{sender} name"),
        sender_image: format!("https://i.example/{sender}.png"),
        client_msg_id: cid.into(),
        body: body.into(),
        attachments: vec![],
    }
}

/// The shared test database (`CHAT_TEST_DATABASE_URL`, default the local
/// `test` database).
pub fn test_database_url() -> String {
    std::env::var("CHAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema in the test database, so tests can run in parallel.
/// Returns a URL whose connections use it, and the schema's name.
///
/// The name is `t_<creation time, ns since the epoch, hex>_<pid>_<n>`:
/// unique per process, and old leftovers can be told by their age
/// (`scripts/services` sweeps those of runs that were killed). Every
/// schema made here is dropped when this process exits, and only those:
/// other runs may be using the same database at the same time.
pub async fn fresh_schema() -> (String, String) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let schema = format!("t_{nanos:x}_{}_{n}", std::process::id());
    let base = test_database_url();
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    at_exit::drop_schema(&schema);
    let sep = if base.contains('?') { '&' } else { '?' };
    (
        format!("{base}{sep}options=-csearch_path%3D{schema}"),
        schema,
    )
}

/// Drops this process's schemas when it exits. A test binary has no
/// other end-of-run hook: its tests return on other threads and the
/// harness then calls `exit`, which runs the C library's `atexit`
/// handlers (a failed run exits through the same path). Tests hand
/// schema URLs to gateway processes, so a guard dropped at the end of
/// one test would be too early for some callers.
mod at_exit {
    use std::sync::{Mutex, Once};
    use std::time::Duration;

    static CREATED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static HOOK: Once = Once::new();

    #[allow(unsafe_code)] // the C library's atexit; std has no exit hook
    mod ffi {
        unsafe extern "C" {
            pub(super) fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
        }
    }

    pub(super) fn drop_schema(schema: &str) {
        CREATED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(schema.to_owned());
        HOOK.call_once(|| {
            // SAFETY: `atexit` only records the pointer to a function
            // that lives as long as the program; registered once.
            #[allow(unsafe_code)]
            let refused = unsafe { ffi::atexit(drop_created) } != 0;
            if refused {
                eprintln!("cannot register the test schemas' cleanup; they stay until swept");
            }
        });
    }

    extern "C" fn drop_created() {
        // Unwinding out of an `extern "C"` function aborts: contain it.
        let _ = std::panic::catch_unwind(|| {
            let schemas = std::mem::take(&mut *CREATED.lock().unwrap_or_else(|e| e.into_inner()));
            if schemas.is_empty() {
                return;
            }
            // A runtime of its own on a thread of its own: whatever the
            // exiting thread was running is gone or going.
            let worker = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), drop_all(&schemas))
                        .await
                        .ok()
                })
            });
            let _ = worker.join();
        });
    }

    async fn drop_all(schemas: &[String]) -> Result<(), tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&super::test_database_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        // A gateway killed mid-transaction can hold a lock for a moment;
        // never wait long: the age-based sweep collects what is left.
        client.batch_execute("SET lock_timeout = '5s'").await?;
        for schema in schemas {
            if let Err(e) = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await
            {
                eprintln!("test schema {schema} not dropped: {e}");
            }
        }
        Ok(())
    }
}

/// Runs every check against `store`.
pub async fn run_all(store: Arc<dyn Store>, tag: &str) {
    store.ping().await.unwrap();
    memberships(&*store, tag).await;
    grants_and_room_lists(&*store, tag).await;
    deleted_rooms_are_gone(&*store, tag).await;
    history_since(&*store, tag).await;
    idempotent_insert(&*store, tag).await;
    concurrent_duplicates_store_once(store.clone(), tag).await;
    history_pages_newest_first(&*store, tag).await;
    history_carries_reactions_attachments_and_seq(&*store, tag).await;
    reactions(&*store, tag).await;
}

/// Join/leave are idempotent and memberships list exactly the joined rooms.
pub async fn memberships(store: &dyn Store, tag: &str) {
    let u = format!("{tag}-mem-user");
    store
        .upsert_user(&User {
            id: u.clone(),
            name: "M".into(),
            image: String::new(),
        })
        .await
        .unwrap();
    assert!(
        store.memberships(&u).await.unwrap().is_empty(),
        "new user has no rooms"
    );
    let rooms: Vec<String> = ["b", "a", "c"]
        .iter()
        .map(|r| format!("{tag}-{r}"))
        .collect();
    store.join(&u, &rooms).await.unwrap();
    store.join(&u, &rooms[..1]).await.unwrap();
    let mut want = rooms.clone();
    want.sort();
    assert_eq!(listed(store, &u).await, want, "memberships after join");
    // Read again unchanged: where a cache is in front, this read is
    // answered from it (its hit counter shows the cache was really used).
    assert_eq!(listed(store, &u).await, want, "memberships read twice");
    assert!(
        store
            .memberships(&u)
            .await
            .unwrap()
            .iter()
            .all(|m| m.grant.is_none()),
        "joining grants nothing"
    );
    store.leave(&u, &rooms[1..2]).await.unwrap();
    store.leave(&u, &rooms[1..2]).await.unwrap();
    let mut want: Vec<String> = vec![rooms[0].clone(), rooms[2].clone()];
    want.sort();
    assert_eq!(listed(store, &u).await, want, "memberships after leave");
}

async fn listed(store: &dyn Store, user: &str) -> Vec<String> {
    store
        .memberships(user)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.room)
        .collect()
}

fn member(user: &str, role: &str) -> Member {
    Member {
        user_id: user.into(),
        role: role.into(),
        since_ms: 0,
    }
}

/// Grants come only from `add_members`; Leave keeps them, removal takes
/// them and the list entry; a changed role keeps the grant's time.
pub async fn grants_and_room_lists(store: &dyn Store, tag: &str) {
    let room = format!("{tag}-granted");
    let (a, b, c) = (
        format!("{tag}-ga"),
        format!("{tag}-gb"),
        format!("{tag}-gc"),
    );
    assert_eq!(store.grant(&room, &a).await.unwrap(), None, "no grant yet");
    // `a` and `b` never connected: the grant creates what it needs.
    store
        .add_members(&room, &[member(&a, "member"), member(&b, "admin")])
        .await
        .unwrap();
    let ga = store.grant(&room, &a).await.unwrap().expect("a granted");
    assert_eq!(ga.role, "member");
    assert!(ga.since_ms > 0, "grant time recorded");
    // Asked twice: a cache in front answers the second.
    assert_eq!(store.grant(&room, &a).await.unwrap(), Some(ga.clone()));
    assert_eq!(
        store.grant(&room, &c).await.unwrap(),
        None,
        "c was not granted"
    );
    assert_eq!(
        store.grant(&room, &c).await.unwrap(),
        None,
        "a refusal read twice"
    );
    let list = store.memberships(&a).await.unwrap();
    assert_eq!(list.len(), 1, "a grant lists the room: {list:?}");
    assert_eq!(list[0].room, room);
    assert_eq!(
        list[0].grant.as_ref().map(|g| g.role.as_str()),
        Some("member")
    );

    // Leave takes the room off the list, not the grant.
    store.leave(&a, std::slice::from_ref(&room)).await.unwrap();
    assert!(listed(store, &a).await.is_empty(), "left: off the list");
    assert!(
        store.grant(&room, &a).await.unwrap().is_some(),
        "left: still granted"
    );
    store.join(&a, std::slice::from_ref(&room)).await.unwrap();
    assert_eq!(listed(store, &a).await, vec![room.clone()], "joined again");

    // A new role keeps the original grant time.
    store
        .add_members(&room, &[member(&a, "admin")])
        .await
        .unwrap();
    let again = store
        .grant(&room, &a)
        .await
        .unwrap()
        .expect("still granted");
    assert_eq!(again.role, "admin", "role updated (and the cache with it)");
    assert_eq!(again.since_ms, ga.since_ms, "grant time kept");

    let members = store.members(&room, None, 10).await.unwrap();
    let ids: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!(ids, vec![a.as_str(), b.as_str()], "members by user id");
    let page = store.members(&room, Some(&a), 10).await.unwrap();
    assert_eq!(page.len(), 1, "members after a");
    assert_eq!(page[0].user_id, b);
    assert_eq!(store.members(&room, None, 1).await.unwrap().len(), 1);

    // Removal takes grant and list entry; removing again finds nothing.
    let removed = store
        .remove_members(&room, &[a.clone(), c.clone()])
        .await
        .unwrap();
    assert_eq!(removed, vec![a.clone()], "only a was a member");
    assert_eq!(
        store.grant(&room, &a).await.unwrap(),
        None,
        "removed (and the cache with it)"
    );
    assert!(listed(store, &a).await.is_empty(), "removed: off the list");
    assert!(
        store
            .remove_members(&room, std::slice::from_ref(&a))
            .await
            .unwrap()
            .is_empty()
    );
    // A user who only listed the room (an open room) is removable too.
    store
        .upsert_user(&User {
            id: c.clone(),
            name: "C".into(),
            image: String::new(),
        })
        .await
        .unwrap();
    store.join(&c, std::slice::from_ref(&room)).await.unwrap();
    let removed = store
        .remove_members(&room, std::slice::from_ref(&c))
        .await
        .unwrap();
    assert_eq!(removed, vec![c.clone()]);
    assert!(listed(store, &c).await.is_empty());
    assert!(
        store.grant(&room, &b).await.unwrap().is_some(),
        "b untouched"
    );
}

/// A deleted room has no messages, grants or list entries left.
pub async fn deleted_rooms_are_gone(store: &dyn Store, tag: &str) {
    let room = format!("{tag}-deleted");
    let u = format!("{tag}-du");
    assert!(store.create_room(&room).await.unwrap(), "created");
    assert!(!store.create_room(&room).await.unwrap(), "exists already");
    store
        .add_members(&room, &[member(&u, "member")])
        .await
        .unwrap();
    let first = store
        .insert_message(new_msg(&room, &u, "d1", "bye"))
        .await
        .unwrap();
    assert!(store.delete_room(&room).await.unwrap(), "deleted");
    assert!(
        store
            .history(&room, None, 10, 0)
            .await
            .unwrap()
            .messages
            .is_empty(),
        "messages gone"
    );
    assert_eq!(store.grant(&room, &u).await.unwrap(), None, "grants gone");
    assert!(listed(store, &u).await.is_empty(), "list entries gone");
    assert!(!store.delete_room(&room).await.unwrap(), "nothing left");
    // The idempotency key went with the message: the same id stores anew.
    let again = store
        .insert_message(new_msg(&room, &u, "d1", "bye"))
        .await
        .unwrap();
    assert!(!again.duplicate, "a new message after the room was deleted");
    assert_ne!(again.message.id, first.message.id);
}

/// `since_ms` hides what is older, and pagination stops there.
pub async fn history_since(store: &dyn Store, tag: &str) {
    let room = format!("{tag}-since");
    let mut stamps = Vec::new();
    for i in 0..4 {
        let m = store
            .insert_message(new_msg(&room, "s", &format!("{tag}-s{i}"), "x"))
            .await
            .unwrap();
        stamps.push(m.message.created_at_ms);
        // Distinct milliseconds, so the bound falls between messages.
        while store_clock_ms() <= m.message.created_at_ms {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    let since = stamps[2];
    let all = store.history(&room, None, 10, since).await.unwrap();
    assert_eq!(all.messages.len(), 2, "two messages from `since` on");
    assert!(all.messages.iter().all(|m| m.created_at_ms >= since));
    assert_eq!(all.next, None, "no older page past the bound");
    let first = store.history(&room, None, 1, since).await.unwrap();
    assert_eq!(first.messages.len(), 1);
    let rest = store.history(&room, first.next, 10, since).await.unwrap();
    assert_eq!(rest.messages.len(), 1, "the second page stops at the bound");
    assert_eq!(rest.next, None);
    assert_eq!(
        store
            .history(&room, None, 10, 0)
            .await
            .unwrap()
            .messages
            .len(),
        4,
        "0 means no bound"
    );
}

fn store_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A retried (sender, client id) returns the original and stores nothing.
pub async fn idempotent_insert(store: &dyn Store, tag: &str) {
    let room = format!("{tag}-idem");
    let first = store
        .insert_message(new_msg(&room, "alice", "cid-1", "one"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = store
        .insert_message(new_msg(&room, "alice", "cid-1", "changed"))
        .await
        .unwrap();
    assert!(again.duplicate, "retry must be flagged duplicate");
    assert_eq!(again.message.id, first.message.id);
    assert_eq!(
        again.message.body, "one",
        "retry returns the original message"
    );
    // Same client id from another sender is a different message.
    let other = store
        .insert_message(new_msg(&room, "bob", "cid-1", "bob's"))
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert_ne!(other.message.id, first.message.id);
    let page = store.history(&room, None, 100, 0).await.unwrap();
    assert_eq!(page.messages.len(), 2, "exactly two messages stored");
}

/// Racing retries of one message store it exactly once.
pub async fn concurrent_duplicates_store_once(store: Arc<dyn Store>, tag: &str) {
    let room = format!("{tag}-race");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = store.clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            s.insert_message(new_msg(&room, "carol", "same", "x"))
                .await
                .unwrap()
        }));
    }
    let mut ids = Vec::new();
    let mut fresh = 0;
    for t in tasks {
        let r = t.await.unwrap();
        ids.push(r.message.id);
        fresh += usize::from(!r.duplicate);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all retries see one id");
    assert_eq!(fresh, 1, "exactly one insert is not a duplicate");
    assert_eq!(
        store
            .history(&room, None, 100, 0)
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
}

/// Keyset pagination walks every message once, newest first.
pub async fn history_pages_newest_first(store: &dyn Store, tag: &str) {
    let room = format!("{tag}-hist");
    let empty = store.history(&room, None, 50, 0).await.unwrap();
    assert!(
        empty.messages.is_empty() && empty.next.is_none(),
        "empty room"
    );
    let mut ids = Vec::new();
    for i in 0..125 {
        let m = store
            .insert_message(new_msg(&room, "dave", &format!("h{i}"), &format!("m{i}")))
            .await;
        ids.push(m.unwrap().message.id);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        let page = store.history(&room, cursor, 50, 0).await.unwrap();
        pages += 1;
        assert!(page.messages.len() <= 50);
        for w in page.messages.windows(2) {
            assert!(
                (w[0].created_at_ms, w[0].id) > (w[1].created_at_ms, w[1].id),
                "page not newest first"
            );
        }
        seen.extend(page.messages.iter().map(|m| m.id));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 10, "pagination does not terminate");
    }
    assert_eq!(pages, 3, "125 messages are 3 pages of 50");
    ids.reverse();
    assert_eq!(seen, ids, "every message exactly once, newest first");
    let newest = store.history(&room, None, 1, 0).await.unwrap();
    assert_eq!(newest.messages[0].body, "m124");
}

/// History returns reactions, attachments and the recorded sequence.
pub async fn history_carries_reactions_attachments_and_seq(store: &dyn Store, tag: &str) {
    let room = format!("{tag}-rich");
    let mut m = new_msg(&room, "erin", "r1", "with file");
    m.attachments = vec![Attachment {
        url: "https://cdn.example/x.png".into(),
        name: "x.png".into(),
        mime: "image/png".into(),
        size: 1234,
    }];
    let stored = store.insert_message(m.clone()).await.unwrap().message;
    store
        .set_seq(stored.id, 1_795_000_000_000, 7)
        .await
        .unwrap();
    // A retry learns the position the message was published at, epoch
    // included (an ack must not pair the sequence with another epoch).
    let retry = store.insert_message(m).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.epoch, retry.message.seq, retry.message.id),
        (1_795_000_000_000, 7, stored.id)
    );
    for (user, emoji) in [("u1", "👍"), ("u2", "👍"), ("u1", "🎉")] {
        let change = ReactionChange {
            room: room.clone(),
            message_id: stored.id,
            user_id: user.into(),
            emoji: emoji.into(),
            remove: false,
        };
        assert_eq!(
            store.react(&change).await.unwrap(),
            ReactionOutcome::Changed
        );
    }
    let page = store.history(&room, None, 10, 0).await.unwrap();
    let got = &page.messages[0];
    assert_eq!(got.seq, 7, "recorded sequence");
    assert_eq!(got.attachments.len(), 1);
    assert_eq!(got.attachments[0].size, 1234);
    let mut counts: Vec<(String, u32)> = got
        .reactions
        .iter()
        .map(|r| (r.emoji.clone(), r.count))
        .collect();
    counts.sort();
    assert_eq!(counts, vec![("🎉".to_string(), 1), ("👍".to_string(), 2)]);
}

/// Reactions are idempotent per (user, emoji) and checked against the room.
pub async fn reactions(store: &dyn Store, tag: &str) {
    let room = format!("{tag}-react");
    let msg = store
        .insert_message(new_msg(&room, "frank", "x1", "react to me"))
        .await
        .unwrap();
    let mut change = ReactionChange {
        room: room.clone(),
        message_id: msg.message.id,
        user_id: "grace".into(),
        emoji: "🔥".into(),
        remove: false,
    };
    assert_eq!(
        store.react(&change).await.unwrap(),
        ReactionOutcome::Changed
    );
    assert_eq!(
        store.react(&change).await.unwrap(),
        ReactionOutcome::Unchanged
    );
    change.remove = true;
    assert_eq!(
        store.react(&change).await.unwrap(),
        ReactionOutcome::Changed
    );
    assert_eq!(
        store.react(&change).await.unwrap(),
        ReactionOutcome::Unchanged
    );
    let page = store.history(&room, None, 1, 0).await.unwrap();
    assert!(
        page.messages[0].reactions.is_empty(),
        "removed reaction is gone"
    );
    let wrong_room = ReactionChange {
        room: format!("{tag}-elsewhere"),
        ..change.clone()
    };
    assert_eq!(store.react(&wrong_room).await, Err(StoreError::NotFound));
    let missing = ReactionChange {
        message_id: u64::MAX - 1,
        ..change
    };
    assert_eq!(store.react(&missing).await, Err(StoreError::NotFound));
}
