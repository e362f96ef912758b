//! Who may enter a room, end to end: room policies, grants through the
//! server API, token-allowed rooms, revocation on every node, disconnects,
//! presence and the API's own protection. Real gateway processes, real
//! sockets; the cluster test adds Postgres and Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use serde_json::json;

use chatgate_client::RawConnection;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ErrorCode, ServerFrame};
use common::*;

const QUIET: Duration = Duration::from_millis(300);

fn error_code(frame: &ServerFrame) -> Option<u16> {
    match frame {
        ServerFrame::Error(e) => Some(e.code),
        _ => None,
    }
}

async fn join_reply(c: &mut Conn, rid: u32, rooms: &[&str]) -> ServerFrame {
    c.request(
        rid,
        ClientFrame::Join(Rooms {
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
        }),
    )
    .await
}

async fn send(c: &mut Conn, rid: u32, room: &str, cid: &str) -> ServerFrame {
    c.request(rid, send_frame(room, cid, &format!("body of {cid}")))
        .await
}

/// Waits for the next NewMessage (skipping acks and typing) and returns
/// its body.
async fn next_body(c: &mut Conn) -> String {
    loop {
        match c.expect().await {
            (_, ServerFrame::NewMessage(m)) => return m.message.body,
            (_, ServerFrame::UserTyping(_)) => continue,
            other => panic!("expected NewMessage, got {other:?}"),
        }
    }
}

/// Promise: in a `members` room, a user without a grant (or a token that
/// allows it) can do nothing — join, history, send, react, typing and
/// resume each get their documented answer and nothing is stored or
/// delivered; granted through the API they can; removed, they stop
/// receiving at once and cannot come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_rooms_admit_only_members() {
    let gw = Gateway::start(&API_ARGS);
    let room = "team:1";
    gw.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "alice"}]}),
    );
    // A granted room is on the user's list: a fresh session is in it.
    let (mut alice, ready) = identify_as(&gw, "alice", &[], None).await;
    assert_eq!(rooms_of(&ready.rooms), vec![room]);

    let (mut bob, ready) = identify_as(&gw, "bob", &[], None).await;
    assert!(ready.rooms.is_empty());
    let refused = join_reply(&mut bob, 2, &[room, "public:lobby"]).await;
    assert_eq!(
        error_code(&refused),
        Some(ErrorCode::Forbidden.code()),
        "{refused:?}"
    );
    // All or nothing: the open room of the same request was not joined.
    let r = send(&mut bob, 3, "public:lobby", "b0").await;
    assert_eq!(error_code(&r), Some(ErrorCode::NotInRoom.code()), "{r:?}");
    for (rid, frame) in [
        (4, send_frame(room, "b1", "intruder")),
        (
            5,
            ClientFrame::History(History {
                room: room.into(),
                before: None,
                limit: 10,
            }),
        ),
        (
            6,
            ClientFrame::React(React {
                room: room.into(),
                message_id: 1,
                emoji: "x".into(),
                remove: false,
            }),
        ),
        (7, ClientFrame::Typing(Typing { room: room.into() })),
    ] {
        let reply = bob.request(rid, frame).await;
        assert_eq!(
            error_code(&reply),
            Some(ErrorCode::NotInRoom.code()),
            "rid {rid}: {reply:?}"
        );
    }
    // Alice's message does not reach bob.
    assert!(matches!(
        send(&mut alice, 2, room, "a1").await,
        ServerFrame::MessageSent(_)
    ));
    bob.assert_quiet(QUIET, "a non-member receives nothing")
        .await;

    // Resume into the room with its position: refused, named in an
    // unsolicited Left, nothing replayed, and still unable to send.
    let position = ready_position(&gw, room).await;
    let (mut bob2, ready) = identify_as(
        &gw,
        "bob",
        &[],
        Some(Resume {
            session_id: [0; 16],
            positions: vec![RoomPosition {
                room: room.into(),
                epoch: position.0,
                seq: 0,
            }],
        }),
    )
    .await;
    assert!(ready.rooms.is_empty(), "{:?}", ready.rooms);
    match bob2.expect().await {
        (0, ServerFrame::Resumed(r)) => assert!(r.rooms.is_empty(), "{r:?}"),
        other => panic!("expected Resumed, got {other:?}"),
    }
    match bob2.expect().await {
        (0, ServerFrame::Left(l)) => assert_eq!(l.rooms, vec![room.to_string()]),
        other => panic!("expected the refused rooms, got {other:?}"),
    }
    let r = send(&mut bob2, 2, room, "b2").await;
    assert_eq!(error_code(&r), Some(ErrorCode::NotInRoom.code()));
    drop(bob2);

    // Nothing bob tried was stored.
    let history = gw.api("history", json!({"room": room}));
    let senders: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sender_id"].as_str().unwrap())
        .collect();
    assert_eq!(senders, vec!["alice"], "{history}");

    // Granted: bob joins, reads and receives.
    gw.api(
        "members.add",
        json!({"room": room, "members": [{"user_id": "bob"}]}),
    );
    assert!(matches!(
        join_reply(&mut bob, 10, &[room]).await,
        ServerFrame::Joined(_)
    ));
    match bob
        .request(
            11,
            ClientFrame::History(History {
                room: room.into(),
                before: None,
                limit: 10,
            }),
        )
        .await
    {
        ServerFrame::HistoryPage(p) => assert_eq!(p.messages.len(), 1),
        other => panic!("history: {other:?}"),
    }
    send(&mut alice, 3, room, "a2").await;
    assert_eq!(next_body(&mut bob).await, "body of a2");

    // Removed: bob is told, receives nothing more, cannot send, rejoin or
    // resume.
    let removed = gw.api("members.remove", json!({"room": room, "user_ids": ["bob"]}));
    assert_eq!(removed["removed"], json!(["bob"]));
    match bob.expect().await {
        (0, ServerFrame::Left(l)) => assert_eq!(l.rooms, vec![room.to_string()]),
        other => panic!("expected the removal notice, got {other:?}"),
    }
    send(&mut alice, 4, room, "a3").await;
    bob.assert_quiet(QUIET, "a removed member receives nothing")
        .await;
    let r = send(&mut bob, 12, room, "b3").await;
    assert_eq!(error_code(&r), Some(ErrorCode::NotInRoom.code()), "{r:?}");
    let r = join_reply(&mut bob, 13, &[room]).await;
    assert_eq!(error_code(&r), Some(ErrorCode::Forbidden.code()), "{r:?}");

    // Open rooms behave as before: anyone joins.
    assert!(matches!(
        join_reply(&mut bob, 14, &["public:lobby"]).await,
        ServerFrame::Joined(_)
    ));
    assert!(matches!(
        send(&mut bob, 15, "public:lobby", "b4").await,
        ServerFrame::MessageSent(_)
    ));
}

/// The room's current (epoch, seq) as a fresh member sees it.
async fn ready_position(gw: &Gateway, room: &str) -> (u64, u64) {
    let (mut c, _) = identify_as(gw, "position-probe", &[room], None).await;
    match join_reply(&mut c, 2, &[room]).await {
        ServerFrame::Joined(j) => (j.rooms[0].epoch, j.rooms[0].seq),
        other => panic!("{other:?}"),
    }
}

/// Promise: a token's `rooms` claim admits exactly the rooms it names
/// (exact or prefix*); posting roles and history-since-join follow the
/// room's policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rooms_roles_and_history_since_join() {
    let gw = Gateway::start(&[
        API_ARGS[0],
        API_ARGS[1],
        API_ARGS[2],
        API_ARGS[3],
        "--room-policy",
        "news:=members,send=editor,history=since_join",
        "--room-policy",
        "public:=open",
    ]);
    let (mut carol, _) = identify_as(&gw, "carol", &["team:*", "dm:carol:dave"], None).await;
    assert!(matches!(
        join_reply(&mut carol, 2, &["team:9", "dm:carol:dave"]).await,
        ServerFrame::Joined(_)
    ));
    let r = join_reply(&mut carol, 3, &["dm:carol:eve"]).await;
    assert_eq!(error_code(&r), Some(ErrorCode::Forbidden.code()), "{r:?}");

    // An announcement room: editors post, members read.
    gw.api(
        "members.add",
        json!({"room": "news:1", "members": [
            {"user_id": "ed", "role": "editor"}, {"user_id": "reader"}]}),
    );
    let (mut ed, _) = identify_as(&gw, "ed", &[], None).await;
    let (mut reader, ready) = identify_as(&gw, "reader", &[], None).await;
    assert_eq!(rooms_of(&ready.rooms), vec!["news:1"]);
    assert!(matches!(
        send(&mut ed, 2, "news:1", "e1").await,
        ServerFrame::MessageSent(_)
    ));
    assert_eq!(next_body(&mut reader).await, "body of e1");
    let r = send(&mut reader, 2, "news:1", "r1").await;
    assert_eq!(error_code(&r), Some(ErrorCode::Forbidden.code()), "{r:?}");
    let r = reader
        .request(
            3,
            ClientFrame::Typing(Typing {
                room: "news:1".into(),
            }),
        )
        .await;
    assert_eq!(error_code(&r), Some(ErrorCode::Forbidden.code()), "{r:?}");
    // Promoted, the reader may post (every node forgets the old role).
    gw.api(
        "members.add",
        json!({"room": "news:1", "members": [{"user_id": "reader", "role": "editor"}]}),
    );
    assert!(matches!(
        send(&mut reader, 4, "news:1", "r2").await,
        ServerFrame::MessageSent(_)
    ));

    // A member granted now sees only what was posted from now on.
    tokio::time::sleep(Duration::from_millis(20)).await;
    gw.api(
        "members.add",
        json!({"room": "news:1", "members": [{"user_id": "late"}]}),
    );
    send(&mut ed, 3, "news:1", "e2").await;
    let (mut late, _) = identify_as(&gw, "late", &[], None).await;
    match late
        .request(
            2,
            ClientFrame::History(History {
                room: "news:1".into(),
                before: None,
                limit: 50,
            }),
        )
        .await
    {
        ServerFrame::HistoryPage(p) => {
            let bodies: Vec<&str> = p.messages.iter().map(|m| m.body.as_str()).collect();
            assert_eq!(bodies, vec!["body of e2"], "history since the grant");
        }
        other => panic!("{other:?}"),
    }
}

/// Promise: the server API is not on the public port, refuses a wrong or
/// missing key, and is off without a configured key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_needs_its_key_and_its_own_port() {
    let gw = Gateway::start(&API_ARGS);
    let api = gw.api.unwrap();
    let body = json!({"room": "team:x", "members": [{"user_id": "mallory"}]}).to_string();
    for key in [None, Some("wrong-key-0123456789"), Some("")] {
        let (status, reply) = http_call(api, "POST", "/api/members.add", key, &body);
        assert_eq!(status, 401, "key {key:?}: {reply}");
    }
    // Not on the public port, with or without the key.
    let (status, _) = http_call(gw.addr, "POST", "/api/members.add", Some(API_KEY), &body);
    assert_eq!(status, 404, "the public port has no server API");
    // Nothing was granted.
    let (mut m, ready) = identify_as(&gw, "mallory", &[], None).await;
    assert!(ready.rooms.is_empty());
    let r = join_reply(&mut m, 2, &["team:x"]).await;
    assert_eq!(error_code(&r), Some(ErrorCode::Forbidden.code()));
    // Health and metrics need no key there.
    assert_eq!(http_call(api, "GET", "/health", None, "").0, 200);
    assert_eq!(http_call(api, "GET", "/metrics", None, "").0, 200);
    // Bad requests are 400 with a reason, unknown methods 404.
    let (status, reply) = gw.api_with_key("members.add", json!({"room": ""}), API_KEY);
    assert_eq!(status, 400, "{reply}");
    let (status, _) = gw.api_with_key("nope", json!({}), API_KEY);
    assert_eq!(status, 404);

    // Without a key the API does not listen at all.
    let plain = Gateway::start(&["--admin-listen", "127.0.0.1:0"]);
    assert!(plain.api.is_none());
}

/// Promise: disconnect closes every connection of the user with the
/// documented code and reason; presence lists exactly who is online in
/// the room; deleting a room takes everyone out of it and its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_presence_and_room_deletion() {
    let gw = Gateway::start(&API_ARGS);
    let room = "team:ops";
    gw.api(
        "members.add",
        json!({"room": room, "members": [
            {"user_id": "u1"}, {"user_id": "u2"}, {"user_id": "u3"}]}),
    );
    let (mut a1, _) = identify_as(&gw, "u1", &[], None).await;
    let (mut a2, _) = identify_as(&gw, "u1", &[], None).await;
    let (mut b, _) = identify_as(&gw, "u2", &[], None).await;
    let presence = gw.api("presence", json!({"room": room}));
    assert_eq!(
        presence["users"],
        json!([{"user_id": "u1", "connections": 2}, {"user_id": "u2", "connections": 1}]),
        "{presence}"
    );
    assert_eq!(presence["complete"], json!(true));

    gw.api(
        "disconnect",
        json!({"user_id": "u1", "reason": "banned by the moderators"}),
    );
    for c in [&mut a1, &mut a2] {
        assert_eq!(c.close_code().await, Some(4107));
        let (_, reason) = c.closed.clone().unwrap().unwrap();
        assert_eq!(reason, "banned by the moderators");
    }
    assert!(b.alive().await, "another user is untouched");
    let presence = gw.api("presence", json!({"room": room}));
    assert_eq!(
        presence["users"],
        json!([{"user_id": "u2", "connections": 1}])
    );
    // A reconnect request: 4006, the client may come back.
    gw.api("disconnect", json!({"user_id": "u2", "reconnect": true}));
    assert_eq!(b.close_code().await, Some(4006));

    let (mut c, _) = identify_as(&gw, "u3", &[], None).await;
    send(&mut c, 2, room, "c1").await;
    let deleted = gw.api("rooms.delete", json!({"room": room}));
    assert_eq!(deleted["deleted"], json!(true));
    match c.expect().await {
        (0, ServerFrame::Left(l)) => assert_eq!(l.rooms, vec![room.to_string()]),
        other => panic!("expected the deletion notice, got {other:?}"),
    }
    let history = gw.api("history", json!({"room": room}));
    assert_eq!(history["messages"], json!([]));
    let r = join_reply(&mut c, 3, &[room]).await;
    assert_eq!(error_code(&r), Some(ErrorCode::Forbidden.code()));
}

/// Promise, across a 3-node cluster on Postgres and Redis: grants made on
/// one node hold on every node; a server-API publish reaches members on
/// every node, is in history and is resumable; a removal takes the member
/// out on the node it is connected to before anything published after
/// it; disconnect reaches every node; presence counts every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_holds_across_a_cluster() {
    let cluster = Cluster::start(3, &shared_redis_url(), &API_ARGS).await;
    let [n0, n1, n2] = &cluster.nodes[..] else {
        panic!("three nodes")
    };
    let room = "team:cluster";
    n0.api(
        "members.add",
        json!({"room": room, "members": [
            {"user_id": "alice"}, {"user_id": "bob"}, {"user_id": "carol"}]}),
    );
    let (mut alice, r) = identify_as(n0, "alice", &[], None).await;
    assert_eq!(rooms_of(&r.rooms), vec![room]);
    let (mut bob, r) = identify_as(n1, "bob", &[], None).await;
    assert_eq!(rooms_of(&r.rooms), vec![room]);
    let (mut carol, r) = identify_as(n2, "carol", &[], None).await;
    assert_eq!(rooms_of(&r.rooms), vec![room]);
    let bob_was = (r.rooms[0].epoch, r.rooms[0].seq);
    let (mut dave, _) = identify_as(n1, "dave", &[], None).await;
    let r = join_reply(&mut dave, 2, &[room]).await;
    assert_eq!(error_code(&r), Some(ErrorCode::Forbidden.code()), "{r:?}");

    // A system message through the API of the node nobody is on... well,
    // of node 2: every member on every node gets it.
    let published = n2.api(
        "publish",
        json!({"room": room, "body": "maintenance at noon", "sender_name": "system"}),
    );
    assert_eq!(published["duplicate"], json!(false), "{published}");
    for c in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(next_body(c).await, "maintenance at noon");
    }
    dave.assert_quiet(QUIET, "a non-member on a member's node")
        .await;
    let history = n1.api("history", json!({"room": room}));
    assert_eq!(history["messages"][0]["body"], json!("maintenance at noon"));
    assert_eq!(history["messages"][0]["sender_id"], json!(""));
    // Resumable: bob comes back on node 0 from before the publish.
    let (mut bob2, r) = identify_as(
        n0,
        "bob",
        &[],
        Some(Resume {
            session_id: [0; 16],
            positions: vec![RoomPosition {
                room: room.into(),
                epoch: bob_was.0,
                seq: bob_was.1,
            }],
        }),
    )
    .await;
    assert_eq!(rooms_of(&r.rooms), vec![room]);
    assert_eq!(next_body(&mut bob2).await, "maintenance at noon");
    match bob2.expect().await {
        (0, ServerFrame::Resumed(r)) => {
            assert!(r.rooms[0].recovered && r.rooms[0].replayed == 1, "{r:?}")
        }
        other => panic!("{other:?}"),
    }

    // Removed through node 1 while connected to node 2: carol is out
    // before the next message, which she never receives.
    n1.api(
        "members.remove",
        json!({"room": room, "user_ids": ["carol"]}),
    );
    n0.api("publish", json!({"room": room, "body": "after carol"}));
    match carol.expect().await {
        (0, ServerFrame::Left(l)) => assert_eq!(l.rooms, vec![room.to_string()]),
        other => panic!("expected the removal first, got {other:?}"),
    }
    carol.assert_quiet(QUIET, "nothing after the removal").await;
    assert_eq!(next_body(&mut alice).await, "after carol");
    // Her resume is refused on any node.
    let (mut carol2, r) = identify_as(
        n0,
        "carol",
        &[],
        Some(Resume {
            session_id: [0; 16],
            positions: vec![RoomPosition {
                room: room.into(),
                epoch: bob_was.0,
                seq: bob_was.1,
            }],
        }),
    )
    .await;
    assert!(r.rooms.is_empty(), "{:?}", r.rooms);
    match carol2.expect().await {
        (0, ServerFrame::Resumed(r)) => assert!(r.rooms.is_empty()),
        other => panic!("{other:?}"),
    }

    // Presence counts every node: alice (n0), bob twice (n1, n0).
    let presence = n2.api("presence", json!({"room": room}));
    assert_eq!(
        presence["users"],
        json!([{"user_id": "alice", "connections": 1}, {"user_id": "bob", "connections": 2}]),
        "{presence}"
    );
    assert_eq!(presence["complete"], json!(true), "{presence}");

    // Disconnect through node 2 closes bob's connections on nodes 0 and 1.
    n2.api("disconnect", json!({"user_id": "bob"}));
    assert_eq!(bob.close_code().await, Some(4107));
    assert_eq!(bob2.close_code().await, Some(4107));
    assert!(alice.alive().await);
}

/// Promise: a token cannot make one user look like another in clients:
/// names with direction or invisible characters, and pictures that are
/// not http(s), are refused at Identify (4100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disguised_names_and_pictures_are_refused() {
    use chatgate_gateway::auth::{Claims, Verifier, unix_now};
    let gw = Gateway::start(&[]);
    let secret = chatgate_gateway::config::DEV_SECRET;
    for (name, picture) in [
        (Some("Alice\u{202E}gnp.exe"), None),
        (Some("ad\u{200B}min"), None),
        (Some("line\nbreak"), None),
        (None, Some("javascript:alert(1)")),
    ] {
        let token = Verifier::new(secret.as_bytes()).mint(&Claims {
            sub: "mallory".into(),
            name: name.map(str::to_owned),
            picture: picture.map(str::to_owned),
            exp: unix_now() + 60,
            rooms: Vec::new(),
        });
        let raw = send_identify(&gw, token, None).await;
        assert_eq!(
            Conn::new(raw).close_code().await,
            Some(4100),
            "{name:?} {picture:?}"
        );
    }
    // Joiners stay allowed (scripts and emoji need them).
    let token = Verifier::new(secret.as_bytes()).mint(&Claims {
        sub: "zoe".into(),
        name: Some("Zoë 👩\u{200D}💻".into()),
        picture: Some("https://i.example/z.png".into()),
        exp: unix_now() + 60,
        rooms: Vec::new(),
    });
    let mut raw = RawConnection::connect(&gw.url()).await.unwrap();
    raw.send(
        1,
        &ClientFrame::Identify(Identify {
            token,
            resume: None,
        }),
    )
    .await
    .unwrap();
    match Conn::new(raw).expect().await {
        (1, ServerFrame::Ready(r)) => assert_eq!(r.user_name, "Zoë 👩\u{200D}💻"),
        other => panic!("{other:?}"),
    }
}
