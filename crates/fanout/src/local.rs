//! Single-node fan-out: sequence numbers and recovery logs in memory.
//!
//! The epoch is the node's start time in milliseconds: a restarted node
//! has lost its logs, and the new epoch tells resuming clients so instead
//! of letting them believe in a gapless stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
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
}

impl Default for LocalFanoutConfig {
    fn default() -> Self {
        LocalFanoutConfig {
            recovery_window: Duration::from_secs(120),
            max_events_per_room: 10_000,
        }
    }
}

/// One recorded event: its sequence number, when, its frame, and for a
/// message the sender's idempotency key.
type Logged = (u64, Instant, Bytes, Option<Box<str>>);

#[derive(Default)]
struct RoomLog {
    /// Last assigned sequence number.
    seq: u64,
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
    fn trim(&mut self, now: Instant, config: &LocalFanoutConfig) {
        while let Some((_, at, _, _)) = self.events.front() {
            if self.events.len() > config.max_events_per_room
                || now.duration_since(*at) > config.recovery_window
            {
                if let Some((_, _, _, Some(key))) = self.events.pop_front() {
                    self.published.remove(&key);
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
    epoch: u64,
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
            epoch,
            config,
            rooms: DashMap::new(),
            sink,
        }
    }

    /// This node's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn log(&self, room: &str) -> Arc<Mutex<RoomLog>> {
        if let Some(log) = self.rooms.get(room) {
            return log.clone();
        }
        self.rooms.entry(room.to_owned()).or_default().clone()
    }

    /// Drops expired events of every room. The gateway calls this
    /// periodically so idle rooms release their logs.
    pub fn sweep(&self) {
        let now = Instant::now();
        for entry in self.rooms.iter() {
            entry.value().lock().trim(now, &self.config);
        }
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
                epoch: self.epoch,
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
        let frame = self.encode(room, event, self.epoch, seq)?;
        log.seq = seq;
        let now = Instant::now();
        if let Some(k) = &key {
            log.published.insert(k.clone(), seq);
        }
        log.events.push_back((seq, now, frame.clone(), key));
        log.trim(now, &self.config);
        // Delivered under the room's lock: the next event of this room
        // cannot overtake this one in any member's queue, nor the
        // sender's acknowledgement.
        self.sink.deliver(room, &frame, exclude, false);
        let position = Position {
            epoch: self.epoch,
            seq,
        };
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
        let seq = self.rooms.get(room).map(|log| log.lock().seq).unwrap_or(0);
        Ok(Position {
            epoch: self.epoch,
            seq,
        })
    }

    fn maintain(&self) {
        self.sweep();
    }

    async fn replay(&self, room: &str, since: Position) -> Result<Replay, FanoutError> {
        let log = self.log(room);
        let mut log = log.lock();
        log.trim(Instant::now(), &self.config);
        let current = Position {
            epoch: self.epoch,
            seq: log.seq,
        };
        if since.epoch != self.epoch || since.seq > log.seq {
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
        let epoch = f.epoch();
        match f.replay("r", Position { epoch, seq: 2 }).await.unwrap() {
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
        let up_to_date = f.replay("r", Position { epoch, seq: 5 }).await.unwrap();
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
                f.replay("r", bad).await.unwrap(),
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
        let epoch = f.epoch();
        assert!(matches!(
            f.replay("r", Position { epoch, seq: 5 }).await.unwrap(),
            Replay::NotRecoverable {
                current: Position { seq: 10, .. }
            }
        ));
        match f.replay("r", Position { epoch, seq: 7 }).await.unwrap() {
            Replay::Events { frames, .. } => assert_eq!(frames.len(), 3),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn expired_events_are_swept() {
        let (f, _) = fanout(LocalFanoutConfig {
            recovery_window: Duration::ZERO,
            ..Default::default()
        });
        f.publish("r", message("a"), None, None).await.unwrap();
        std::thread::sleep(Duration::from_millis(2));
        f.sweep();
        assert_eq!(f.retained_events(), 0);
        assert_eq!(
            f.position("r").await.unwrap().seq,
            1,
            "the counter survives the sweep"
        );
    }
}
