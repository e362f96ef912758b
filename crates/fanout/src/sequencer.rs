//! Per-channel ordering of live events on one node.
//!
//! The live path (Redis sharded Pub/Sub) may lose a message — a dropped
//! connection, a subscriber cut off for an overfull output buffer, a
//! publisher that died between the script and its publish — and, when
//! publishers wait for a replica before publishing, may deliver two
//! publishers' events out of order. A [`Channel`] turns what arrives into
//! the channel's sequence: each number once, in order. What is ahead of
//! the next expected number is held; a gap held too long is filled from
//! the room's recovery log (the caller reads it and hands the entries to
//! [`Channel::fill`]); what is at or behind the expected number is a
//! repeat and dropped. Pure logic, no I/O: the subscriber task owns one
//! `Channel` per subscribed room (and one per control partition).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::Position;

/// One sequenced event as the live path and the recovery log carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequenced {
    /// The room stream's epoch.
    pub epoch: u64,
    /// Its number in the epoch.
    pub seq: u64,
    /// The publishing connection (excluded from delivery on its node), 0
    /// for none.
    pub conn: u64,
    /// The publisher's waiter on its node (see `RedisStreamsFanout`).
    pub pid: u64,
    /// The publishing process (`node@start_ms`).
    pub instance: Bytes,
    /// The finished frame (or a control message's payload).
    pub frame: Bytes,
}

impl Sequenced {
    /// Parses the header both carriers put before the frame (the publish
    /// script writes it): `<epoch> <seq> <conn> <pid> <instance>`, the
    /// instance last (the only part that is not a number). Nothing is
    /// copied: the instance is a slice of `header`.
    pub fn parse(header: Bytes, frame: Bytes) -> Option<Sequenced> {
        let mut numbers = [0u64; 4];
        let mut at = 0;
        for n in &mut numbers {
            let len = header[at..].iter().position(|b| *b == b' ')?;
            *n = std::str::from_utf8(&header[at..at + len])
                .ok()?
                .parse()
                .ok()?;
            at += len + 1;
        }
        let [epoch, seq, conn, pid] = numbers;
        Some(Sequenced {
            epoch,
            seq,
            conn,
            pid,
            instance: header.slice(at..),
            frame,
        })
    }

    /// A live message: `s<header>\n<frame>`.
    pub fn parse_live(message: &Bytes) -> Option<Sequenced> {
        let body = message.strip_prefix(b"s")?;
        let end = body.iter().position(|b| *b == b'\n')?;
        Sequenced::parse(message.slice(1..1 + end), message.slice(1 + end + 1..))
    }
}

/// Most events a channel holds ahead of a gap. Past it the gap is filled
/// at once instead of waiting (a flood behind a lost message must not
/// grow without bound).
pub const MAX_HELD: usize = 4096;

/// What became of an offered event.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Delivered now (with any held events it unblocked).
    Delivered,
    /// Ahead of a gap: held until the gap is filled.
    Held,
    /// Already delivered, or of an older epoch: dropped.
    Repeat,
    /// The channel is not started yet: kept until it is.
    Early,
}

/// The ordering state of one channel on this node.
#[derive(Debug)]
pub struct Channel {
    /// `None` until the position it starts from is known.
    at: Option<Position>,
    /// Arrived before the start position was known.
    early: Vec<Sequenced>,
    /// Ahead of the next expected number.
    held: BTreeMap<u64, Sequenced>,
    /// Since when the oldest gap has been waiting.
    gap_since: Option<Instant>,
    /// A fill (a read of the recovery log) is under way.
    pub filling: bool,
    /// Events skipped because neither the live path nor the log had them
    /// (trimmed, expired, lost with a failed Redis).
    pub skipped: u64,
}

impl Default for Channel {
    fn default() -> Self {
        Channel::new()
    }
}

impl Channel {
    /// A channel waiting for its start position.
    pub fn new() -> Channel {
        Channel {
            at: None,
            early: Vec::new(),
            held: BTreeMap::new(),
            gap_since: None,
            filling: false,
            skipped: 0,
        }
    }

    /// The last event delivered (or the start), once started.
    pub fn position(&self) -> Option<Position> {
        self.at
    }

    /// Starts the channel after the room's position was read: nothing at
    /// or before `at` is delivered (it was published before this node
    /// listened, and members that join read their own later position).
    /// Events that arrived meanwhile are offered again. No-op once
    /// started.
    pub fn start(&mut self, at: Position, out: &mut Vec<Sequenced>) {
        if self.at.is_some() {
            return;
        }
        self.at = Some(at);
        for event in std::mem::take(&mut self.early) {
            self.offer(event, out);
        }
    }

    /// Takes one event from the live path; what becomes deliverable is
    /// appended to `out`, in order.
    pub fn offer(&mut self, event: Sequenced, out: &mut Vec<Sequenced>) -> Offered {
        let Some(at) = self.at else {
            if self.early.len() < MAX_HELD {
                self.early.push(event);
            }
            return Offered::Early;
        };
        if event.epoch < at.epoch {
            return Offered::Repeat;
        }
        if event.epoch > at.epoch {
            // A new stream (the room idled out, or Redis lost its data):
            // numbering starts over in it.
            self.restart(event.epoch);
        }
        let at = self.at.unwrap_or(Position {
            epoch: event.epoch,
            seq: 0,
        });
        if event.seq <= at.seq || self.held.contains_key(&event.seq) {
            return Offered::Repeat;
        }
        if event.seq > at.seq + 1 {
            // Past the cap the event is dropped: it is in the room's log,
            // and the next fill reaches it (the gap is still there).
            if self.held.len() < MAX_HELD {
                self.held.insert(event.seq, event);
            }
            if self.gap_since.is_none() {
                self.gap_since = Some(Instant::now());
            }
            return Offered::Held;
        }
        self.advance(event, out);
        self.drain(out);
        Offered::Delivered
    }

    fn restart(&mut self, epoch: u64) {
        self.at = Some(Position { epoch, seq: 0 });
        self.held.retain(|_, e| e.epoch == epoch);
        self.gap_since = (!self.held.is_empty()).then(Instant::now);
    }

    fn advance(&mut self, event: Sequenced, out: &mut Vec<Sequenced>) {
        self.at = Some(Position {
            epoch: event.epoch,
            seq: event.seq,
        });
        out.push(event);
    }

    /// Delivers the held events that follow on without a gap.
    fn drain(&mut self, out: &mut Vec<Sequenced>) {
        while let Some(at) = self.at {
            let Some(entry) = self.held.first_entry() else {
                break;
            };
            if *entry.key() <= at.seq {
                entry.remove();
                continue;
            }
            if *entry.key() != at.seq + 1 {
                break;
            }
            let event = entry.remove();
            self.advance(event, out);
        }
        self.gap_since = if self.held.is_empty() {
            None
        } else {
            Some(self.gap_since.unwrap_or_else(Instant::now))
        };
    }

    /// The numbers to read from the recovery log when a gap has waited
    /// `patience` (or the held events reached [`MAX_HELD`]): the first
    /// missing one through the one before the oldest held. `None` when
    /// there is no such gap or a fill is already under way.
    pub fn due_fill(&self, patience: Duration) -> Option<(Position, u64)> {
        if self.filling {
            return None;
        }
        let at = self.at?;
        let (first_held, _) = self.held.first_key_value()?;
        let waited = self.gap_since.is_some_and(|t| t.elapsed() >= patience);
        (waited || self.held.len() >= MAX_HELD).then_some((at, first_held - 1))
    }

    /// How long the oldest gap has been waiting.
    pub fn gap_age(&self) -> Duration {
        self.gap_since.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Whether a gap is waiting (for the caller's timer).
    pub fn has_gap(&self) -> bool {
        !self.held.is_empty()
    }

    /// Takes what the recovery log had for the numbers after `from`
    /// through `through` of `from.epoch` (in any order, extras ignored).
    /// Numbers the log did not have are skipped (counted in `skipped`):
    /// the members see the gap in the sequence and reload (PROTOCOL.md
    /// §9.5). Ignored if the channel moved to another epoch meanwhile.
    pub fn fill(
        &mut self,
        from: Position,
        through: u64,
        mut entries: Vec<Sequenced>,
        out: &mut Vec<Sequenced>,
    ) {
        self.filling = false;
        let Some(at) = self.at else {
            return;
        };
        if at.epoch != from.epoch {
            return;
        }
        entries.retain(|e| e.epoch == from.epoch && e.seq > at.seq && e.seq <= through);
        entries.sort_by_key(|e| e.seq);
        entries.dedup_by_key(|e| e.seq);
        for event in entries {
            let at = self.at.unwrap_or(from);
            if event.seq > at.seq + 1 {
                self.skipped += event.seq - at.seq - 1;
            }
            self.held.remove(&event.seq);
            self.advance(event, out);
        }
        let at = self.at.unwrap_or(from);
        if at.seq < through {
            self.skipped += through - at.seq;
            self.at = Some(Position {
                epoch: at.epoch,
                seq: through,
            });
        }
        self.drain(out);
    }

    /// The room's head as read from Redis after this node may have missed
    /// live messages (a reconnect): the numbers between what was
    /// delivered and `head` are a gap to fill now, a newer epoch starts
    /// over. Returns the range to read, if any.
    pub fn behind(&mut self, head: Position) -> Option<(Position, u64)> {
        let at = self.at?;
        if head.epoch < at.epoch {
            return None;
        }
        if head.epoch > at.epoch {
            self.restart(head.epoch);
        }
        let at = self.at?;
        (head.seq > at.seq && !self.filling).then_some((at, head.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header the publish script writes.
    fn header(e: &Sequenced) -> String {
        format!(
            "{} {} {} {} {}",
            e.epoch,
            e.seq,
            e.conn,
            e.pid,
            String::from_utf8_lossy(&e.instance)
        )
    }

    /// The live message the publish script sends.
    fn live(e: &Sequenced) -> Bytes {
        let mut out = format!("s{}\n", header(e)).into_bytes();
        out.extend_from_slice(&e.frame);
        out.into()
    }

    fn ev(epoch: u64, seq: u64) -> Sequenced {
        Sequenced {
            epoch,
            seq,
            conn: 7,
            pid: seq,
            instance: "n 1@5".into(),
            frame: Bytes::from(format!("frame {seq}\nwith a newline")),
        }
    }

    fn seqs(out: &[Sequenced]) -> Vec<u64> {
        out.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn the_live_form_and_the_header_round_trip() {
        let e = ev(1_700_000_000_000, 42);
        assert_eq!(Sequenced::parse_live(&live(&e)), Some(e.clone()));
        assert_eq!(
            Sequenced::parse(Bytes::from(header(&e)), e.frame.clone()),
            Some(e)
        );
        assert_eq!(
            Sequenced::parse_live(&Bytes::from_static(b"s1 2 3\nx")),
            None
        );
        assert_eq!(
            Sequenced::parse_live(&Bytes::from_static(b"e1 2 3 4 n\nx")),
            None
        );
    }

    #[test]
    fn in_order_events_are_delivered_and_repeats_dropped() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        assert_eq!(c.offer(ev(1, 5), &mut out), Offered::Early);
        c.start(Position { epoch: 1, seq: 4 }, &mut out);
        assert_eq!(seqs(&out), [5]);
        assert_eq!(c.offer(ev(1, 5), &mut out), Offered::Repeat);
        assert_eq!(c.offer(ev(1, 6), &mut out), Offered::Delivered);
        assert_eq!(c.offer(ev(0, 7), &mut out), Offered::Repeat);
        assert_eq!(seqs(&out), [5, 6]);
    }

    #[test]
    fn events_at_or_before_the_start_are_not_delivered() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        c.offer(ev(1, 3), &mut out);
        c.offer(ev(1, 4), &mut out);
        c.start(Position { epoch: 1, seq: 3 }, &mut out);
        assert_eq!(seqs(&out), [4]);
    }

    #[test]
    fn a_gap_holds_later_events_until_they_arrive_or_are_filled() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        c.start(Position { epoch: 1, seq: 0 }, &mut out);
        c.offer(ev(1, 1), &mut out);
        assert_eq!(c.offer(ev(1, 3), &mut out), Offered::Held);
        assert_eq!(c.offer(ev(1, 4), &mut out), Offered::Held);
        assert_eq!(c.due_fill(Duration::from_secs(60)), None);
        assert_eq!(
            c.due_fill(Duration::ZERO),
            Some((Position { epoch: 1, seq: 1 }, 2))
        );
        // Reordered, not lost: 2 comes late and unblocks 3 and 4.
        c.offer(ev(1, 2), &mut out);
        assert_eq!(seqs(&out), [1, 2, 3, 4]);
        assert!(!c.has_gap());

        // Lost: the log fills it, repeats from the log are ignored.
        c.offer(ev(1, 7), &mut out);
        let (from, through) = c.due_fill(Duration::ZERO).unwrap();
        assert_eq!((from.seq, through), (4, 6));
        c.filling = true;
        c.fill(
            from,
            through,
            vec![ev(1, 6), ev(1, 5), ev(1, 4), ev(1, 5)],
            &mut out,
        );
        assert_eq!(seqs(&out), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(c.skipped, 0);
    }

    #[test]
    fn numbers_the_log_lacks_are_skipped_and_counted() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        c.start(Position { epoch: 1, seq: 0 }, &mut out);
        c.offer(ev(1, 5), &mut out);
        c.fill(Position { epoch: 1, seq: 0 }, 4, vec![ev(1, 3)], &mut out);
        assert_eq!(seqs(&out), [3, 5]);
        assert_eq!(c.skipped, 3, "1, 2 and 4");
    }

    #[test]
    fn a_new_epoch_starts_over_and_drops_the_old() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        c.start(Position { epoch: 1, seq: 9 }, &mut out);
        assert_eq!(c.offer(ev(2, 1), &mut out), Offered::Delivered);
        assert_eq!(c.offer(ev(1, 10), &mut out), Offered::Repeat);
        assert_eq!(c.position(), Some(Position { epoch: 2, seq: 1 }));
    }

    #[test]
    fn a_head_read_after_a_reconnect_names_what_was_missed() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        c.start(Position { epoch: 1, seq: 2 }, &mut out);
        assert_eq!(c.behind(Position { epoch: 1, seq: 2 }), None);
        assert_eq!(
            c.behind(Position { epoch: 1, seq: 5 }),
            Some((Position { epoch: 1, seq: 2 }, 5))
        );
        assert_eq!(
            c.behind(Position { epoch: 3, seq: 2 }),
            Some((Position { epoch: 3, seq: 0 }, 2))
        );
    }

    #[test]
    fn a_fill_for_an_epoch_left_behind_is_ignored() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        c.start(Position { epoch: 1, seq: 0 }, &mut out);
        c.offer(ev(2, 1), &mut out);
        c.fill(Position { epoch: 1, seq: 0 }, 3, vec![ev(1, 1)], &mut out);
        assert_eq!(c.position(), Some(Position { epoch: 2, seq: 1 }));
    }

    #[test]
    fn too_many_held_events_make_the_fill_due_at_once() {
        let mut c = Channel::new();
        let mut out = Vec::new();
        c.start(Position { epoch: 1, seq: 0 }, &mut out);
        for s in 2..(2 + MAX_HELD as u64) {
            c.offer(ev(1, s), &mut out);
        }
        assert!(c.due_fill(Duration::from_secs(3600)).is_some());
    }
}
