//! Encode/decode cost of the two frames that dominate traffic: a typical
//! chat message (~200-byte body) and a 4 KiB one that gets compressed.
//! Criterion prints time per frame and, via `Throughput`, bytes/s; the
//! frames/s figure is 1 / time.

use std::hint::black_box;

use chatgate_protocol::payload::{Message, NewMessage, Send};
use chatgate_protocol::{ClientFrame, Codec, ServerFrame};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn event(body: String) -> ServerFrame {
    ServerFrame::NewMessage(NewMessage {
        epoch: 1,
        message: Message {
            id: 123_456_789,
            room: "general".into(),
            seq: 98_765,
            sender_id: "u-3f2a9c".into(),
            sender_name: "Alice Example".into(),
            sender_image: "https://cdn.example/u/3f2a9c.png".into(),
            client_msg_id: "0b6c8f0e-6f7e-4d1e-9a53-3c2f1d7a9e11".into(),
            body,
            attachments: vec![],
            reactions: vec![],
            created_at_ms: 1_764_316_800_000,
        },
    })
}

fn send(body: String) -> ClientFrame {
    ClientFrame::Send(Send {
        room: "general".into(),
        client_msg_id: "0b6c8f0e-6f7e-4d1e-9a53-3c2f1d7a9e11".into(),
        body,
        attachments: vec![],
    })
}

fn chat_text(len: usize) -> String {
    let words = [
        "hey", "did", "you", "see", "the", "deploy", "it", "went", "fine", "🎉", "ok", "lunch?",
    ];
    let mut s = String::new();
    let mut i = 0usize;
    while s.len() < len {
        s.push_str(words[(i * 7 + i / 3) % words.len()]);
        s.push(' ');
        i += 1;
    }
    s.truncate(s.floor_char_boundary(len));
    s
}

fn bench(c: &mut Criterion) {
    let codec = Codec::default();
    for (label, len) in [("200B", 200usize), ("4KiB", 4096)] {
        let ev = event(chat_text(len));
        let wire = codec.encode_server(0, &ev).expect("encode");
        let mut g = c.benchmark_group(format!("new_message_{label}"));
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function("encode", |b| {
            b.iter(|| codec.encode_server(0, black_box(&ev)))
        });
        g.bench_function("decode", |b| {
            b.iter(|| codec.decode_server(black_box(&wire)))
        });
        g.finish();

        let req = send(chat_text(len));
        let wire = codec.encode_client(7, &req).expect("encode");
        let mut g = c.benchmark_group(format!("send_{label}"));
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function("encode", |b| {
            b.iter(|| codec.encode_client(7, black_box(&req)))
        });
        g.bench_function("decode", |b| {
            b.iter(|| codec.decode_client(black_box(&wire)))
        });
        g.finish();
    }
}

/// A connection's queued events coalesced into one Batch frame: this runs
/// once per recipient per write, so it is on the fan-out path.
fn bench_batch(c: &mut Criterion) {
    let codec = Codec::new(chatgate_protocol::CodecConfig {
        compress_threshold: usize::MAX,
        ..Default::default()
    });
    let frames: Vec<bytes::Bytes> = (0..30)
        .map(|_| {
            codec
                .encode_server(0, &event(chat_text(100)))
                .expect("encode")
        })
        .collect();
    let total: usize = frames.iter().map(|f| f.len()).sum();
    let mut g = c.benchmark_group("batch_30_events");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("encode", |b| {
        b.iter(|| codec.encode_batch(black_box(&frames)))
    });
    g.finish();
}

criterion_group!(benches, bench, bench_batch);
criterion_main!(benches);
