//! Single-node fan-out: sequence numbers and recovery logs in memory.
//!
//! Each room's stream has its own epoch, taken when the stream starts
//! (milliseconds since the Unix epoch, never reused in the process): a
//! restarted node has lost its logs, and a room idle for longer than the
//! recovery window has its stream forgotten (so made-up room names cost
//! nothing for long); either way the next stream has a new epoch, which
//! tells resuming clients so instead of letting them believe in a
//! gapless stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use chatgate_protocol::Codec;

use crate::{
    Fanout, FanoutError, LocalDelivery, OnSequenced, Position, Published, Replay, RoomEvent,
};

/// Tuning for [`LocalFanout`].
#[derive(Debug, Clone, Copy)]
pub struct LocalFanoutConfig {
    /// How long events stay replayable. Default 2 minutes, the recovery
    /// window clients are promised.
    pub recovery_window: Duration,
    /// Events kept per room regardless of age, so one very busy room
    /// cannot hold unbounded memory. Default 10,000.
    pub max_events_per_room: usize,
    /// Bytes of frames kept per room. Default 8 MiB: 10,000 events of the
    /// largest size would be ~400 MiB, a count alone does not bound
    /// memory. Past it the oldest go (a resume from before them is "not
    /// recovered").
    pub max_bytes_per_room: usize,
    /// How long a room's stream (epoch and counter) outlives its last
    /// event. Default 24 h: a quiet room keeps its epoch (its members
    /// need not reload), and rooms nobody uses go. A stream that never
    /// had an event (an epoch given to a joining member, or to a resume
    /// naming a made-up room) goes after the recovery window.
    pub stream_idle_ttl: Duration,
}

impl Default for LocalFanoutConfig {
    fn default() -> Self {
        LocalFanoutConfig {
            recovery_window: Duration::from_secs(120),
            max_events_per_room: 10_000,
            max_bytes_per_room: 8 << 20,
            stream_idle_ttl: Duration::from_secs(86_400),
        }
    }
}

/// One recorded event: its sequence number, when, its frame, and for a
/// message the sender's idempotency key.
type Logged = (u64, Instant, Bytes, Option<Box<str>>);

struct RoomLog {
    /// This stream's epoch.
    epoch: u64,
    /// Last assigned sequence number.
    seq: u64,
    /// When the last event was published (an idle stream is forgotten).
    last: Instant,
    /// Bytes of the frames in `events`.
    bytes: usize,
    /// Recent events, oldest first, with contiguous sequence numbers
    /// ending at `seq`.
    events: VecDeque<Logged>,
    /// Idempotency key -> sequence of the messages in `events`, so a
    /// publish repeated after its record was lost is answered with the
    /// original position instead of a second delivery (as the Redis
    /// script does).
    published: HashMap<Box<str>, u64>,
}

impl RoomLog {
    fn new(epoch: u64) -> RoomLog {
        RoomLog {
            epoch,
            seq: 0,
            last: Instant::now(),
            bytes: 0,
            events: VecDeque::new(),
            published: HashMap::new(),
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    fn trim(&mut self, now: Instant, config: &LocalFanoutConfig) {
        while let Some((_, at, _, _)) = self.events.front() {
            if self.events.len() > config.max_events_per_room
                || self.bytes > config.max_bytes_per_room
                || now.duration_since(*at) > config.recovery_window
            {
                if let Some((_, _, frame, key)) = self.events.pop_front() {
                    self.bytes = self.bytes.saturating_sub(frame.len());
                    if let Some(key) = key {
                        self.published.remove(&key);
                    }
                }
            } else {
                break;
            }
        }
    }
}

/// The single-node [`Fanout`].
pub struct LocalFanout {
    codec: Codec,
    /// The last epoch given to a stream.
    epoch: AtomicU64,
    config: LocalFanoutConfig,
    rooms: DashMap<String, Arc<Mutex<RoomLog>>>,
    sink: Arc<dyn LocalDelivery>,
}

impl LocalFanout {
    /// A fan-out delivering through `sink`, encoding with `codec`.
    pub fn new(codec: Codec, config: LocalFanoutConfig, sink: Arc<dyn LocalDelivery>) -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1)
            .max(1);
        LocalFanout {
            codec,
            epoch: AtomicU64::new(epoch - 1),
            config,
            rooms: DashMap::new(),
            sink,
        }
    }

    /// A new stream's epoch: the time in milliseconds, or one more than
    /// the last one given, so no two streams of this process share one.
    fn next_epoch(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let prev = self
            .epoch
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(prev + 1)
    }

    /// The room's stream, started when it has none.
    fn log(&self, room: &str) -> Arc<Mutex<RoomLog>> {
        if let Some(log) = self.rooms.get(room) {
            return log.clone();
        }
        self.rooms
            .entry(room.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(RoomLog::new(self.next_epoch()))))
            .clone()
    }

    /// Drops expired events of every room, and forgets the streams of
    /// rooms idle past their time (see
    /// [`LocalFanoutConfig::stream_idle_ttl`]): memory follows the rooms
    /// in use. The gateway calls this periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.rooms.retain(|_, log| {
            // In use elsewhere (a publish or replay holding it): keep.
            if Arc::strong_count(log) > 1 {
                return true;
            }
            let mut l = log.lock();
            l.trim(now, &self.config);
            let ttl = if l.seq == 0 {
                self.config.recovery_window
            } else {
                self.config.stream_idle_ttl
            };
            !(l.events.is_empty() && now.duration_since(l.last) > ttl)
        });
    }

    /// Rooms with a stream now (for tests and metrics).
    pub fn streams(&self) -> usize {
        self.rooms.len()
    }

    /// Events currently held for replay, over all rooms (for metrics).
    pub fn retained_events(&self) -> usize {
        self.rooms
            .iter()
            .map(|e| e.value().lock().events.len())
            .sum()
    }

    fn encode(
        &self,
        room: &str,
        event: RoomEvent,
        epoch: u64,
        seq: u64,
    ) -> Result<Bytes, FanoutError> {
        let frame = event.into_frame(room, epoch, seq);
        self.codec
            .encode_server(0, &frame)
            .map_err(|e| FanoutError::Encode(e.to_string()))
    }
}

#[async_trait]
impl Fanout for LocalFanout {
    fn engine(&self) -> &'static str {
        "local"
    }

    async fn publish(
        &self,
        room: &str,
        event: RoomEvent,
        exclude: Option<u64>,
        on_sequenced: Option<OnSequenced>,
    ) -> Result<Published, FanoutError> {
        let key: Option<Box<str>> = event.idempotency_key().map(Into::into);
        let log = self.log(room);
        let mut log = log.lock();
        if let Some(&seq) = key.as_ref().and_then(|k| log.published.get(k)) {
            let position = Position {
                epoch: log.epoch,
                seq,
            };
            if let Some(ack) = on_sequenced {
                ack(position, true);
            }
            return Ok(Published {
                position,
                frame: Bytes::new(),
            });
        }
        let seq = log.seq + 1;
        // Encode before committing the number: a failure leaves no gap.
        let frame = self.encode(room, event, log.epoch, seq)?;
        log.seq = seq;
        let now = Instant::now();
        log.last = now;
        if let Some(k) = &key {
            log.published.insert(k.clone(), seq);
        }
        log.bytes += frame.len();
        log.events.push_back((seq, now, frame.clone(), key));
        log.trim(now, &self.config);
        // Delivered under the room's lock: the next event of this room
        // cannot overtake this one in any member's queue, nor the
        // sender's acknowledgement.
        self.sink.deliver(room, &frame, exclude, false);
        let position = log.position();
        if let Some(ack) = on_sequenced {
            ack(position, false);
        }
        Ok(Published { position, frame })
    }

    async fn publish_ephemeral(
        &self,
        room: &str,
        frame: Bytes,
        exclude: Option<u64>,
    ) -> Result<(), FanoutError> {
        self.sink.deliver(room, &frame, exclude, true);
        Ok(())
    }

    async fn forget_room(&self, room: &str) -> Result<(), FanoutError> {
        if let Some(log) = self.rooms.get(room).map(|l| l.clone()) {
            let mut log = log.lock();
            log.events.clear();
            log.bytes = 0;
            log.published.clear();
        }
        Ok(())
    }

    async fn control(&self, key: &str, payload: Bytes) -> Result<(), FanoutError> {
        // Under the room's lock, as a publish delivers: a publish already
        // delivering finishes first, and none delivers past it.
        // (A key without a log, such as a user name, gets none made.)
        let log = self.rooms.get(key).map(|l| l.clone());
        let _ordered = log.as_ref().map(|l| l.lock());
        self.sink.control(&payload);
        Ok(())
    }

    async fn position(&self, room: &str) -> Result<Position, FanoutError> {
        // A room without a stream gets one (an epoch, no events), so a
        // member that joined before the first event resumes into it; the
        // sweep forgets it after the recovery window if nothing comes.
        Ok(self.log(room).lock().position())
    }

    fn maintain(&self) {
        self.sweep();
    }

    async fn replay(
        &self,
        room: &str,
        since: Position,
        limit: usize,
    ) -> Result<Replay, FanoutError> {
        let log = self.log(room);
        let mut log = log.lock();
        log.trim(Instant::now(), &self.config);
        let current = log.position();
        if since.epoch != log.epoch || since.seq > log.seq || log.seq - since.seq > limit as u64 {
            return Ok(Replay::NotRecoverable { current });
        }
        if since.seq == log.seq {
            return Ok(Replay::Events {
                frames: Vec::new(),
                position: current,
            });
        }
        let oldest = match log.events.front() {
            Some((s, _, _, _)) => *s,
            None => return Ok(Replay::NotRecoverable { current }),
        };
        if since.seq + 1 < oldest {
            return Ok(Replay::NotRecoverable { current });
        }
        let skip = (since.seq + 1 - oldest) as usize;
        let frames = log
            .events
            .iter()
            .skip(skip)
            .map(|(_, _, f, _)| f.clone())
            .collect();
        Ok(Replay::Events {
            frames,
            position: current,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatgate_protocol::ServerFrame;
    use chatgate_protocol::payload::Message;

    /// (room, frame, excluded connection, ephemeral)
    type Delivery = (String, Bytes, Option<u64>, bool);

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Delivery>>);

    impl LocalDelivery for Recorder {
        fn deliver(&self, room: &str, frame: &Bytes, exclude: Option<u64>, ephemeral: bool) {
            self.0
                .lock()
                .push((room.to_owned(), frame.clone(), exclude, ephemeral));
        }
    }

    fn message(body: &str) -> RoomEvent {
        RoomEvent::Message(Message {
            id: 1,
            room: "r".into(),
            seq: 0,
            sender_id: "u".into(),
            sender_name: "U".into(),
            sender_image: String::new(),
            client_msg_id: body.into(),
            body: body.into(),
            attachments: vec![],
            reactions: vec![],
            created_at_ms: 0,
        })
    }

    fn fanout(config: LocalFanoutConfig) -> (LocalFanout, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (LocalFanout::new(Codec::default(), config, rec.clone()), rec)
    }

    #[tokio::test]
    async fn sequences_are_gapless_and_replayable() {
        let (f, rec) = fanout(LocalFanoutConfig::default());
        for i in 1..=5u64 {
            let p = f
                .publish("r", message(&i.to_string()), Some(9), None)
                .await
                .unwrap();
            assert_eq!(p.position.seq, i);
        }
        assert_eq!(f.position("r").await.unwrap().seq, 5);
        assert_eq!(rec.0.lock().len(), 5);
        assert!(
            rec.0
                .lock()
                .iter()
                .all(|(_, _, ex, eph)| *ex == Some(9) && !eph)
        );
        let epoch = f.position("r").await.unwrap().epoch;
        match f
            .replay("r", Position { epoch, seq: 2 }, usize::MAX)
            .await
            .unwrap()
        {
            Replay::Events { frames, position } => {
                assert_eq!(frames.len(), 3);
                assert_eq!(position.seq, 5);
                let seqs: Vec<u64> = frames
                    .iter()
                    .map(|b| match Codec::default().decode_server(b).unwrap().1 {
                        ServerFrame::NewMessage(m) => m.message.seq,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                assert_eq!(seqs, vec![3, 4, 5]);
            }
            other => panic!("{other:?}"),
        }
        let up_to_date = f
            .replay("r", Position { epoch, seq: 5 }, usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            up_to_date,
            Replay::Events {
                frames: vec![],
                position: Position { epoch, seq: 5 }
            }
        );
        for bad in [
            Position {
                epoch: epoch + 1,
                seq: 2,
            },
            Position { epoch, seq: 6 },
        ] {
            assert!(matches!(
                f.replay("r", bad, usize::MAX).await.unwrap(),
                Replay::NotRecoverable { .. }
            ));
        }
    }

    /// A message published again (its record was lost) is answered with
    /// its original position and delivered to nobody a second time.
    #[tokio::test]
    async fn a_repeated_publish_of_a_message_is_not_delivered_again() {
        let (f, rec) = fanout(LocalFanoutConfig::default());
        let acked = Arc::new(Mutex::new(Vec::new()));
        let ack = |acked: &Arc<Mutex<Vec<(Position, bool)>>>| -> OnSequenced {
            let acked = acked.clone();
            Box::new(move |p, before| acked.lock().push((p, before)))
        };
        let first = f
            .publish("r", message("m1"), Some(1), Some(ack(&acked)))
            .await
            .unwrap();
        f.publish("r", message("m2"), Some(1), None).await.unwrap();
        let again = f
            .publish("r", message("m1"), Some(1), Some(ack(&acked)))
            .await
            .unwrap();
        assert_eq!(again.position, first.position);
        assert_eq!(rec.0.lock().len(), 2, "m1 and m2, once each");
        assert_eq!(
            *acked.lock(),
            vec![(first.position, false), (first.position, true)]
        );
        assert_eq!(f.position("r").await.unwrap().seq, 2);
    }

    #[tokio::test]
    async fn trimmed_history_is_reported_not_recoverable() {
        let (f, _) = fanout(LocalFanoutConfig {
            max_events_per_room: 3,
            ..Default::default()
        });
        for i in 0..10 {
            f.publish("r", message(&i.to_string()), None, None)
                .await
                .unwrap();
        }
        let epoch = f.position("r").await.unwrap().epoch;
        assert!(matches!(
            f.replay("r", Position { epoch, seq: 5 }, usize::MAX)
                .await
                .unwrap(),
            Replay::NotRecoverable {
                current: Position { seq: 10, .. }
            }
        ));
        match f
            .replay("r", Position { epoch, seq: 7 }, usize::MAX)
            .await
            .unwrap()
        {
            Replay::Events { frames, .. } => assert_eq!(frames.len(), 3),
            other => panic!("{other:?}"),
        }
    }

    /// A room idle past the recovery window loses its stream: its events
    /// and its counter go, and the next stream has a new epoch, so a
    /// client still holding the old position is told "not recovered"
    /// instead of meeting sequence numbers that start again. Rooms only
    /// asked about (a resume naming made-up rooms) go the same way.
    #[tokio::test]
    async fn idle_streams_are_forgotten_and_come_back_with_a_new_epoch() {
        let (f, _) = fanout(LocalFanoutConfig {
            recovery_window: Duration::ZERO,
            stream_idle_ttl: Duration::from_millis(1),
            ..Default::default()
        });
        let first = f.publish("r", message("a"), None, None).await.unwrap();
        for i in 0..1000 {
            f.position(&format!("made-up-{i}")).await.unwrap();
        }
        assert_eq!(f.streams(), 1001);
        std::thread::sleep(Duration::from_millis(2));
        f.sweep();
        assert_eq!(f.retained_events(), 0);
        assert_eq!(f.streams(), 0, "idle streams are gone");
        let next = f.publish("r", message("b"), None, None).await.unwrap();
        assert!(next.position.epoch > first.position.epoch);
        // A quiet room with events keeps its stream for the idle TTL.
        let (quiet, _) = fanout(LocalFanoutConfig {
            recovery_window: Duration::ZERO,
            ..Default::default()
        });
        let kept = quiet.publish("q", message("a"), None, None).await.unwrap();
        quiet.position("made-up").await.unwrap();
        std::thread::sleep(Duration::from_millis(2));
        quiet.sweep();
        assert_eq!(quiet.streams(), 1, "only the made-up one went");
        assert_eq!(quiet.position("q").await.unwrap(), kept.position);
        assert_eq!(next.position.seq, 1);
        assert!(matches!(
            f.replay("r", first.position, usize::MAX).await.unwrap(),
            Replay::NotRecoverable { current } if current == next.position
        ));
    }

    /// A member that joined before the first event resumes into the
    /// stream that started meanwhile.
    #[tokio::test]
    async fn a_position_taken_before_the_first_event_replays() {
        let (f, _) = fanout(LocalFanoutConfig::default());
        let joined = f.position("r").await.unwrap();
        assert_eq!(joined.seq, 0);
        f.publish("r", message("a"), None, None).await.unwrap();
        match f.replay("r", joined, usize::MAX).await.unwrap() {
            Replay::Events { frames, .. } => assert_eq!(frames.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    /// Bytes bound a room's log too: a few large events push the oldest
    /// out, and a resume from before them is "not recovered".
    #[tokio::test]
    async fn a_log_is_bounded_by_bytes() {
        let (f, _) = fanout(LocalFanoutConfig {
            max_bytes_per_room: 50_000,
            ..Default::default()
        });
        // Text that does not compress.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let big: String = (0..16_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'!' + (x % 90) as u8)
            })
            .collect();
        let first = f
            .publish("r", message(&format!("0{big}")), None, None)
            .await
            .unwrap();
        for i in 1..10 {
            f.publish("r", message(&format!("{i}{big}")), None, None)
                .await
                .unwrap();
        }
        assert!(f.retained_events() <= 3, "{} kept", f.retained_events());
        assert!(matches!(
            f.replay(
                "r",
                Position {
                    seq: first.position.seq - 1,
                    ..first.position
                },
                usize::MAX
            )
            .await
            .unwrap(),
            Replay::NotRecoverable { .. }
        ));
    }

    /// Streams of this process never share an epoch, however fast they
    /// start.
    #[tokio::test]
    async fn epochs_are_never_reused() {
        let (f, _) = fanout(LocalFanoutConfig::default());
        let mut epochs = std::collections::HashSet::new();
        for i in 0..100 {
            let p = f
                .publish(&format!("r{i}"), message("a"), None, None)
                .await
                .unwrap();
            assert!(epochs.insert(p.position.epoch), "epoch reused");
        }
    }
}
