//! The shared Store suite against the in-memory engine, plus the
//! memory engine's own bound.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::sync::Arc;

use chatgate_storage::{MemoryStore, MemoryStoreConfig, NewMessage, Store, suite};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_suite() {
    suite::run_all(Arc::new(MemoryStore::default()), "mem").await;
}

#[tokio::test]
async fn memory_store_keeps_only_the_newest_messages_per_room() {
    let store = MemoryStore::new(MemoryStoreConfig {
        max_messages_per_room: 10,
        ..MemoryStoreConfig::default()
    });
    for i in 0..25 {
        store
            .insert_message(NewMessage {
                room: "r".into(),
                sender_id: "u".into(),
                sender_name: "U".into(),
                sender_image: String::new(),
                client_msg_id: format!("c{i}"),
                body: format!("{i}"),
                attachments: vec![],
            })
            .await
            .unwrap();
    }
    let page = store.history("r", None, 100, 0).await.unwrap();
    assert_eq!(page.messages.len(), 10);
    assert_eq!(page.messages[0].body, "24");
    assert_eq!(page.messages[9].body, "15");
    assert!(page.next.is_none());
}

/// Bytes bound a room too: large messages are dropped oldest first once
/// the room holds more text than its cap, however few they are.
#[tokio::test]
async fn memory_store_bounds_a_room_by_bytes() {
    let store = MemoryStore::new(MemoryStoreConfig {
        max_bytes_per_room: 100_000,
        ..MemoryStoreConfig::default()
    });
    for i in 0..50 {
        store
            .insert_message(NewMessage {
                room: "big".into(),
                sender_id: "u".into(),
                sender_name: "U".into(),
                sender_image: String::new(),
                client_msg_id: format!("c{i}"),
                body: format!("{i:02}{}", "x".repeat(16_000)),
                attachments: vec![],
            })
            .await
            .unwrap();
    }
    let page = store.history("big", None, 100, 0).await.unwrap();
    let kept: usize = page.messages.iter().map(|m| m.body.len()).sum();
    assert!(kept <= 100_000, "{kept} bytes kept");
    assert!(page.messages.len() >= 5, "{} kept", page.messages.len());
    assert!(page.messages[0].body.starts_with("49"), "the newest stay");
}
