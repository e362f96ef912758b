//! The abuse suite: what one hostile (or merely unlucky) client could do
//! to a node or to other users, tried against a real gateway process.
//! Each test fails on a gateway without the bound it checks.

mod common;


use chatgate_protocol::ServerFrame;
use chatgate_protocol::limits::{MAX_ATTACHMENTS, MAX_BODY_BYTES};
use chatgate_protocol::payload::*;
use chatgate_protocol::ClientFrame;
use common::*;
use rand::Rng;

/// Text that does not compress (so no frame shrinks below its limit).
fn noise(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(rng.random_range(b'!'..=b'~')))
        .collect()
}

/// The largest message §6 allows.
fn largest_message(room: &str, cid: &str) -> ClientFrame {
    let attachment = || Attachment {
        url: format!("https://files.test/{}", noise(2048 - 19)),
        name: noise(255),
        mime: noise(127),
        size: u64::MAX,
    };
    ClientFrame::Send(Send {
        room: room.into(),
        client_msg_id: cid.into(),
        body: noise(MAX_BODY_BYTES),
        attachments: (0..MAX_ATTACHMENTS).map(|_| attachment()).collect(),
    })
}

/// Forty maximum-size messages are more than one frame holds: pages end
/// early with a cursor, and paging on reads every message once, in order.
#[tokio::test]
async fn history_of_maximum_size_messages_pages_instead_of_failing() {
    let gw = Gateway::start(&["--messages-per-minute", "1000"]);
    let mut alice = user(&gw, "alice").await;
    let room = "public:big";
    join(&mut alice, &[room]).await;
    let mut sent = Vec::new();
    for i in 0..40u32 {
        match alice.request(10 + i, largest_message(room, &format!("m{i}"))).await {
            ServerFrame::MessageSent(s) => sent.push(s.message_id),
            other => panic!("send {i}: {other:?}"),
        }
    }
    let mut reader = user(&gw, "bob").await;
    join(&mut reader, &[room]).await;
    let mut seen = Vec::new();
    let mut before = None;
    let mut pages = 0;
    loop {
        let page = reader
            .request(
                100 + pages,
                ClientFrame::History(History {
                    room: room.into(),
                    before,
                    limit: 50,
                }),
            )
            .await;
        let ServerFrame::HistoryPage(page) = page else {
            panic!("page {pages}: {page:?}");
        };
        pages += 1;
        assert!(!page.messages.is_empty() || page.next.is_none(), "empty page with a cursor");
        seen.extend(page.messages.iter().map(|m| m.id));
        match page.next {
            Some(c) => before = Some(c),
            None => break,
        }
        assert!(pages < 20, "paging does not end");
    }
    sent.reverse();
    assert_eq!(seen, sent, "every message once, newest first");
    assert!(pages >= 2, "one frame cannot hold forty such messages");
}
