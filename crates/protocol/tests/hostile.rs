//! Hostile input: random bytes, truncations, lying length fields and a
//! deflate bomb must each produce a typed error, never a panic, and never
//! allocate more than the configured payload cap.
#![allow(unsafe_code)] // the counting allocator below
#![allow(clippy::unwrap_used)] // a panic here is a failed test

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, Codec, CodecConfig, DecodeError};

/// Tracks, per thread, bytes allocated minus bytes freed and the peak of
/// that since the last reset. Per thread because tests run on several
/// threads at once: a process-wide count would add the other tests'
/// allocations to this one's peak (a lock only serialises measurements,
/// not the unmeasured tests around them). The decoder allocates on its
/// caller's thread, so that thread's count is the decoder's.
struct Counting;

thread_local! {
    // Const-initialised cells of plain integers: no allocation and no
    // destructor, so the allocator itself may use them.
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(bytes: usize) {
    let _ = CURRENT.try_with(|c| {
        let now = c.get().wrapping_add(bytes as isize);
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrank(bytes: usize) {
    // Memory allocated on another thread may be freed here: the count can
    // go below zero, which only lowers this thread's baseline.
    let _ = CURRENT.try_with(|c| c.set(c.get().wrapping_sub(bytes as isize)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            grew(new_size - layout.size());
        } else {
            shrank(layout.size() - new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result and the peak extra bytes it allocated
/// on this thread.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, peak.saturating_sub(base).max(0) as usize)
}

/// A simple deterministic generator (no external RNG needed).
fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

const MIB: usize = 1024 * 1024;

#[test]
fn one_mib_of_random_bytes_is_a_typed_error() {
    let codec = Codec::default();
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    let mut bytes: Vec<u8> = (0..MIB).map(|_| xorshift(&mut seed) as u8).collect();
    // Try it under every client and server opcode, compressed and not.
    for op in [1u8, 2, 3, 4, 5, 6, 7, 8, 0x40, 0x47, 0x60, 0x7F] {
        for flags in [0u8, 1] {
            bytes[0] = op;
            bytes[1] = flags;
            let (r, peak) = peak_alloc(|| {
                (
                    codec.decode_client(&bytes).err(),
                    codec.decode_server_all(&bytes).err(),
                )
            });
            assert!(
                r.0.is_some() && r.1.is_some(),
                "random bytes decoded as op {op:#x}"
            );
            assert!(
                peak <= 2 * MIB,
                "op {op:#x} flags {flags}: peak {peak} bytes"
            );
        }
    }
}

#[test]
fn over_the_frame_cap_is_rejected_before_any_work() {
    let codec = Codec::default();
    let big = vec![5u8; MIB + 1];
    let (r, peak) = peak_alloc(|| codec.decode_client(&big));
    assert_eq!(
        r,
        Err(DecodeError::FrameTooLarge {
            len: MIB + 1,
            max: MIB
        })
    );
    assert!(peak < 1024, "peak {peak}");
}

#[test]
fn every_truncation_of_a_real_frame_is_an_error() {
    let codec = Codec::default();
    let frame = ClientFrame::Identify(Identify {
        token: "token-token".into(),
        resume: Some(Resume {
            session_id: [3; 16],
            positions: vec![
                RoomPosition {
                    room: "general".into(),
                    epoch: 1 << 40,
                    seq: 300,
                },
                RoomPosition {
                    room: "x".into(),
                    epoch: 1,
                    seq: 1,
                },
            ],
        }),
    });
    let bytes = codec.encode_client(77, &frame).unwrap();
    assert_eq!(codec.decode_client(&bytes).unwrap(), (77, frame));
    for cut in 0..bytes.len() {
        let err = codec.decode_client(&bytes[..cut]).unwrap_err();
        let expected = if cut < 6 {
            "truncated_header"
        } else {
            "malformed_payload"
        };
        assert_eq!(err.kind(), expected, "cut at {cut}: {err}");
    }
}

#[test]
fn lying_lengths_do_not_allocate() {
    let codec = Codec::default();
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // String length 2^64-1, 2^32-1 and 1 MiB with one byte present.
    for len in [
        vec![0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        vec![0xFC, 0xFF, 0xFF, 0xFF, 0xFF],
        vec![0xFC, 0x00, 0x00, 0x10, 0x00],
    ] {
        // Typing { room }
        let mut f = vec![6, 0, 0, 0, 0, 0];
        f.extend(&len);
        f.push(b'a');
        cases.push(f);
        // Join { rooms: [..] } with a lying count
        let mut f = vec![3, 0, 1, 0, 0, 0];
        f.extend(&len);
        f.extend([1, b'a']);
        cases.push(f);
        // Identify with resume positions lying
        let mut f = vec![1, 0, 1, 0, 0, 0, 1, b't', 1];
        f.extend([0u8; 16]);
        f.extend(&len);
        cases.push(f);
        // HistoryPage with a lying message count (server direction)
        let mut f = vec![0x47, 0, 1, 0, 0, 0, 1, b'g'];
        f.extend(&len);
        f.push(1);
        cases.push(f);
        // Batch with a lying frame length
        let mut f = vec![0x7F, 0, 0, 0, 0, 0, 1];
        f.extend(&len);
        f.push(0x61);
        cases.push(f);
    }
    for case in cases {
        let (r, peak) = peak_alloc(|| {
            if case[0] < 0x40 {
                codec.decode_client(&case).err()
            } else {
                codec.decode_server_all(&case).err()
            }
        });
        let err = r.unwrap_or_else(|| panic!("decoded {case:x?}"));
        assert_eq!(err.kind(), "malformed_payload", "{case:x?}");
        assert!(peak < 16 * 1024, "{case:x?}: allocated {peak} bytes");
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn deflate_bomb_stops_at_the_cap() {
    let codec = Codec::default();
    // 64 MiB of zeros is about 64 KiB of DEFLATE: a 1000x bomb.
    let z = deflate(&vec![0u8; 64 * MIB]);
    assert!(z.len() < MIB);
    let mut frame = vec![5, 1, 1, 0, 0, 0];
    frame.extend(&z);
    // A request stops at the largest payload its opcode can legally have.
    let send_cap =
        chatgate_protocol::limits::max_client_payload(chatgate_protocol::Opcode::Send).unwrap();
    let (r, peak) = peak_alloc(|| codec.decode_client(&frame));
    assert_eq!(r, Err(DecodeError::PayloadTooLarge { max: send_cap }));
    assert!(peak <= send_cap + 128 * 1024, "peak {peak}");
    // A server frame (a client reading one) stops at the payload cap.
    let mut event = vec![0x60, 1, 0, 0, 0, 0];
    event.extend(&z);
    let (r, peak) = peak_alloc(|| codec.decode_server(&event));
    assert_eq!(r, Err(DecodeError::PayloadTooLarge { max: MIB }));
    // Output buffer (<= cap + 1) plus the inflater's own state.
    assert!(peak <= MIB + 128 * 1024, "peak {peak}");

    // A smaller cap is honoured exactly too.
    let small = Codec::new(CodecConfig {
        max_payload_bytes: 4096,
        ..CodecConfig::default()
    });
    let (r, peak) = peak_alloc(|| small.decode_server(&event));
    assert_eq!(r, Err(DecodeError::PayloadTooLarge { max: 4096 }));
    assert!(peak <= 4096 + 128 * 1024, "peak {peak}");
}

#[test]
fn a_payload_exactly_at_the_cap_still_decodes() {
    let cap = 64 * 1024;
    let codec = Codec::new(CodecConfig {
        max_payload_bytes: cap,
        max_frame_bytes: cap + 6,
        ..CodecConfig::default()
    });
    // UserTyping { room, user_id } with a room string filling the payload
    // exactly: 5-byte varint (0xFC + u32) + (cap - 6) bytes + an empty
    // user id.
    let payload = |extra: usize| {
        let mut p = vec![0xFC];
        p.extend(((cap - 6 + extra) as u32).to_le_bytes());
        p.extend(std::iter::repeat_n(b'r', cap - 6 + extra));
        p.push(0);
        p
    };
    assert_eq!(payload(0).len(), cap);
    let mut plain = vec![0x61, 0, 0, 0, 0, 0];
    plain.extend(payload(0));
    assert!(codec.decode_server(&plain).is_ok());
    let mut packed = vec![0x61, 1, 0, 0, 0, 0];
    packed.extend(deflate(&payload(0)));
    assert!(codec.decode_server(&packed).is_ok());
    // One byte more is refused.
    let mut packed = vec![0x61, 1, 0, 0, 0, 0];
    packed.extend(deflate(&payload(1)));
    assert_eq!(
        codec.decode_server(&packed),
        Err(DecodeError::PayloadTooLarge { max: cap })
    );
    // A compressed request inflates no further than its opcode's legal
    // maximum, under any cap: a Typing names one room, 129 bytes at most.
    let mut typing = vec![6, 1, 0, 0, 0, 0];
    typing.extend(deflate(&payload(0)));
    assert_eq!(
        codec.decode_client(&typing),
        Err(DecodeError::PayloadTooLarge {
            max: chatgate_protocol::limits::max_client_payload(chatgate_protocol::Opcode::Typing)
                .unwrap()
        })
    );
}
