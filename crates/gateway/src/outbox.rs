//! A connection's bounded outbound queue.
//!
//! Anyone may push (room broadcasts from other connections' tasks, the
//! connection's own replies); only the connection task drains. Bounds are
//! in frames and bytes. As the queue fills, ephemeral frames (typing) are
//! shed first; a stored event or reply that does not fit marks the
//! connection slow: the queue is emptied at once (its memory freed) and
//! the connection task closes with 4001, after which the client resumes
//! and the replay delivers what was dropped. A broadcast never waits.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use chatgate_protocol::CloseCode;
use parking_lot::Mutex;

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for writing.
    Queued,
    /// An ephemeral frame dropped because the queue is at least half full.
    Shed,
    /// The frame did not fit: the connection is now marked slow.
    Overflow,
    /// The connection is already closing; the frame was discarded.
    Closed,
}

struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// When the queue last went from empty to non-empty: the enqueue
    /// time of its oldest frame. One clock read per wake-up, not one per
    /// delivered frame.
    since: Option<Instant>,
    closed: Option<CloseCode>,
    /// Close frame text other than the code's own (the application's
    /// reason for a disconnect).
    reason: Option<Box<str>>,
    /// The connection task, when it waits for frames. Kept under the
    /// queue's own lock: one lock per push or drain, and a wake-up only
    /// when the owner is actually parked on an empty queue.
    waker: Option<Waker>,
}

/// The queue. Shared as `Arc<Outbox>` between the room registry and the
/// connection task.
pub struct Outbox {
    state: Mutex<State>,
    max_frames: usize,
    max_bytes: usize,
}

/// Capacity kept after draining; anything larger is released so a burst
/// does not leave an idle connection holding a big buffer.
const KEEP_CAPACITY: usize = 16;

impl Outbox {
    /// An empty queue with the given bounds. Allocates nothing until the
    /// first push.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                since: None,
                closed: None,
                reason: None,
                waker: None,
            }),
            max_frames,
            max_bytes,
        }
    }

    /// Enqueues `frame`. Never blocks beyond a short uncontended lock.
    pub fn push(&self, frame: Bytes, ephemeral: bool) -> Pushed {
        let mut s = self.state.lock();
        if s.closed.is_some() {
            return Pushed::Closed;
        }
        let len = s.queue.len();
        if ephemeral && (len * 2 >= self.max_frames || s.bytes * 2 >= self.max_bytes) {
            return Pushed::Shed;
        }
        if len >= self.max_frames || s.bytes + frame.len() > self.max_bytes {
            s.closed = Some(CloseCode::SlowConsumer);
            s.queue = VecDeque::new();
            s.bytes = 0;
            let waker = s.waker.take();
            drop(s);
            if let Some(w) = waker {
                w.wake();
            }
            return Pushed::Overflow;
        }
        s.bytes += frame.len();
        s.queue.push_back(frame);
        // The consumer drains everything per wake-up, so only the
        // empty -> non-empty transition needs a wake-up.
        let waker = if len == 0 {
            s.since = Some(Instant::now());
            s.waker.take()
        } else {
            None
        };
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
        Pushed::Queued
    }

    /// Marks the queue closed with `code` (shutdown) and wakes the owner.
    pub fn close(&self, code: CloseCode) {
        self.close_with(code, None);
    }

    /// Closes with `code` and, as the close frame's text, `reason` (cut
    /// to the 123 bytes a close frame holds) instead of the code's own.
    pub fn close_with(&self, code: CloseCode, reason: Option<&str>) {
        let mut s = self.state.lock();
        if s.closed.is_none() {
            s.closed = Some(code);
            s.reason = reason.map(|r| {
                let mut end = r.len().min(123);
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                r[..end].into()
            });
            s.queue = VecDeque::new();
            s.bytes = 0;
        }
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The close frame text given with [`Outbox::close_with`].
    pub fn reason(&self) -> Option<String> {
        self.state.lock().reason.as_deref().map(str::to_owned)
    }

    /// The close reason, if the queue was closed.
    pub fn closed(&self) -> Option<CloseCode> {
        self.state.lock().closed
    }

    /// Ready while frames are queued or the queue is closed; otherwise
    /// waits for a push or the close. Level-triggered: a push that raced
    /// with the owner's last drain is never missed.
    pub async fn ready(&self) {
        self.wait_until(|s| (!s.queue.is_empty() || s.closed.is_some()).then_some(()))
            .await
    }

    /// Waits until the queue is closed (while the owner is busy writing,
    /// pushes must not wake it into a busy loop).
    pub async fn closing(&self) -> CloseCode {
        self.wait_until(|s| s.closed).await
    }

    fn wait_until<T: 'static>(
        &self,
        done: fn(&State) -> Option<T>,
    ) -> impl Future<Output = T> + '_ {
        poll_fn(move |cx| {
            let mut s = self.state.lock();
            if let Some(v) = done(&s) {
                return Poll::Ready(v);
            }
            if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// Moves up to `max_frames` queued frames into `out`, oldest first,
    /// and returns when the oldest of them was queued. `Err` when the
    /// queue was closed. The owner drains until it sees the queue empty
    /// before it waits again.
    pub fn drain(
        &self,
        out: &mut Vec<Bytes>,
        max_frames: usize,
    ) -> Result<Option<Instant>, CloseCode> {
        let mut s = self.state.lock();
        if let Some(code) = s.closed {
            return Err(code);
        }
        let n = s.queue.len().min(max_frames);
        let mut moved = 0;
        out.extend(s.queue.drain(..n).inspect(|f| moved += f.len()));
        s.bytes -= moved;
        // What stays queued keeps `since`: an upper bound on its wait.
        let oldest = if s.queue.is_empty() {
            s.since.take()
        } else {
            s.since
        };
        if s.queue.is_empty() && s.queue.capacity() > KEEP_CAPACITY {
            s.queue = VecDeque::new();
        }
        Ok(oldest.filter(|_| n > 0))
    }

    /// Frames currently queued.
    pub fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_typing_then_overflows() {
        let q = Outbox::new(4, 1 << 20);
        let f = Bytes::from_static(b"frame");
        assert_eq!(q.push(f.clone(), true), Pushed::Queued);
        assert_eq!(q.push(f.clone(), false), Pushed::Queued);
        assert_eq!(
            q.push(f.clone(), true),
            Pushed::Shed,
            "half full: typing is shed"
        );
        assert_eq!(q.push(f.clone(), false), Pushed::Queued);
        assert_eq!(q.push(f.clone(), false), Pushed::Queued);
        assert_eq!(q.push(f.clone(), false), Pushed::Overflow);
        assert_eq!(q.len(), 0, "overflow frees the queue");
        assert_eq!(q.push(f, false), Pushed::Closed);
        let mut out = Vec::new();
        assert_eq!(q.drain(&mut out, 10), Err(CloseCode::SlowConsumer));
    }

    #[test]
    fn byte_bound_and_drain_order() {
        let q = Outbox::new(100, 10);
        assert_eq!(q.push(Bytes::from_static(b"12345"), false), Pushed::Queued);
        assert_eq!(q.push(Bytes::from_static(b"678"), false), Pushed::Queued);
        let mut out = Vec::new();
        q.drain(&mut out, 1).unwrap();
        assert_eq!(out[0], Bytes::from_static(b"12345"));
        q.drain(&mut out, 10).unwrap();
        assert_eq!(out[1], Bytes::from_static(b"678"));
        assert!(q.is_empty());
        assert_eq!(
            q.push(Bytes::from_static(b"12345678901"), false),
            Pushed::Overflow
        );
    }

    #[tokio::test]
    async fn ready_is_level_triggered_and_closing_ignores_pushes() {
        use std::sync::Arc;
        use std::time::Duration;
        use tokio::time::timeout;
        let q = Arc::new(Outbox::new(8, 1 << 20));
        let f = Bytes::from_static(b"frame");
        // A push that lands before the owner waits is not missed.
        q.push(f.clone(), false);
        timeout(Duration::from_secs(5), q.ready())
            .await
            .expect("a queued frame makes the outbox ready");
        let mut out = Vec::new();
        q.drain(&mut out, 10).unwrap();
        // An owner parked on the empty queue is woken by a push.
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.ready().await }
        });
        tokio::task::yield_now().await;
        q.push(f.clone(), false);
        timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the push wakes the owner")
            .unwrap();
        // While writing, the owner waits for a close only.
        assert!(
            timeout(Duration::from_millis(50), q.closing())
                .await
                .is_err(),
            "queued frames do not end a wait for the close"
        );
        q.close(CloseCode::ShuttingDown);
        assert_eq!(
            timeout(Duration::from_secs(5), q.closing()).await,
            Ok(CloseCode::ShuttingDown)
        );
        timeout(Duration::from_secs(5), q.ready())
            .await
            .expect("a closed outbox is ready (the owner must see the close)");
    }
}
