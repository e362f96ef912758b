//! The node's live path: it subscribes to the rooms its members are in,
//! puts what arrives in each room's order and delivers it.
//!
//! Three tasks, so that nothing slow ever sits in front of a delivery:
//! - the **loop** owns every channel's [`Channel`] (no locks): it takes
//!   live messages, publishers' notices and the results of the other two,
//!   delivers, and decides when to read a gap from a room's log;
//! - the **subscriber** runs subscription changes one after another on
//!   the dedicated Pub/Sub connection (order matters: an unsubscribe
//!   queued before a subscribe must not land after it), reads where a new
//!   channel starts, and after a reconnect subscribes everything again and
//!   reads every channel's head, so what was published while the
//!   connection was down is read from the logs;
//! - **fills** read a room's recovery log (one short task per gap).
//!
//! A room is subscribed while it has local members (checked every
//! [`MAINTAIN_EVERY`]; a publisher waiting for its own event keeps it)
//! and unsubscribed after: a node receives the events of its members'
//! rooms and no others.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::{DashMap, DashSet};
use fred::clients::Pipeline;
use fred::interfaces::{ClusterInterface, EventInterface};
use fred::prelude::{
    Client, ClientLike, HashesInterface, Options, PubsubInterface, ServerInterface,
    StreamsInterface,
};
use fred::types::Value;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::{broadcast, mpsc, oneshot};

use chatgate_protocol::Codec;

use crate::redis::{FanoutStats, as_bytes, as_str, as_u64, entries, pair};
use crate::sequencer::{Channel, Offered, Sequenced};
use crate::{FanoutError, LocalDelivery, OnSequenced, Position};

/// How often rooms without local members are unsubscribed.
pub(crate) const MAINTAIN_EVERY: Duration = Duration::from_secs(2);

/// How often a node that never lost its connection checks that Redis did
/// not lose its data under it (FLUSHALL, a restart without persistence,
/// a failover to an empty replica).
const INCARNATION_CHECK: Duration = Duration::from_secs(5);

/// How often every subscription is renewed and every head compared.
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(30);

/// Room subscriptions made together at most (one `SSUBSCRIBE` per slot
/// among them, their positions read concurrently).
const SUBSCRIBE_BATCH: usize = 512;

/// How often a node on a Redis Cluster reads the slot map. A slot that
/// moves to another master (resharding) takes its shard channels' subscribers
/// with it without a word to them (Redis sends an unsubscribe push the
/// client library drops): a node that only listens sees no redirection,
/// so it asks, and renews its subscriptions when the map changed.
const SLOT_MAP_EVERY: Duration = Duration::from_secs(1);

/// A Redis Cluster's slot ranges and their masters' node ids, to compare.
type SlotMap = Vec<(u16, u16, String)>;

fn slot_map(client: &Client) -> Option<SlotMap> {
    let state = client.cached_cluster_state()?;
    Some(
        state
            .slots()
            .iter()
            .map(|r| (r.start, r.end, r.id.to_string()))
            .collect(),
    )
}

/// A `CLUSTER SLOTS` reply as a [`SlotMap`] (`None` if it is not one).
fn parse_slots(reply: &Value) -> Option<SlotMap> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut map = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(start), Some(end), Some(Value::Array(primary))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        // By node id: the address a node announces may be a name, an IP
        // or nothing, and the client library may have resolved it.
        let id = primary.get(2).and_then(as_str)?;
        map.push((
            u16::try_from(as_u64(start)?).ok()?,
            u16::try_from(as_u64(end)?).ok()?,
            id,
        ));
    }
    map.sort();
    Some(map)
}

/// Who serves `slot` in `map`.
fn owner(map: &SlotMap, slot: u16) -> Option<&str> {
    map.iter()
        .find(|(start, end, _)| (*start..=*end).contains(&slot))
        .map(|(_, _, server)| server.as_str())
}

/// How long a read of the slot map may take.
const SLOT_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A publish waiting for this node to deliver its event.
pub(crate) struct Waiter {
    pub delivered: oneshot::Sender<(Bytes, Position)>,
    pub on_sequenced: Option<OnSequenced>,
    pub since: std::time::Instant,
    pub room: String,
}

impl Waiter {
    /// Queues the sender's ack (`on_sequenced`) and wakes the publisher:
    /// the one way a publish is acknowledged, whoever does it.
    pub(crate) fn finish(self, at: Position, repeated: bool, frame: Bytes) {
        if let Some(ack) = self.on_sequenced {
            ack(at, repeated);
        }
        let _ = self.delivered.send((frame, at));
    }
}

pub(crate) type Waiters = DashMap<u64, Waiter>;

/// What a channel carries.
#[derive(Debug, Clone)]
enum Kind {
    Room(String),
    /// A partition's control messages (every node listens to all).
    Control,
}

struct State {
    kind: Kind,
    /// Key prefix: `<base>:state`, `:log`; the channel is `<base>:live`.
    base: String,
    channel: Channel,
    /// Callers of `track` waiting for the channel to start.
    waiting: Vec<oneshot::Sender<Option<Position>>>,
    /// Publishers' events whose place is known but that this node has not
    /// delivered yet when the channel starts (see `Cmd::Published`).
    acks: Vec<(u64, Position)>,
    /// A head read while a fill was under way: compared again after it.
    head: Option<Position>,
}

enum Cmd {
    Track {
        room: String,
        base: String,
        reply: oneshot::Sender<Option<Position>>,
    },
    Started {
        channel: String,
        at: Position,
    },
    /// A publisher learned its event's place: acknowledge it now if this
    /// node will not deliver it (not subscribed, or it started after it).
    Published {
        room_channel: String,
        pid: u64,
        at: Position,
    },
    Filled {
        channel: String,
        from: Position,
        through: u64,
        entries: Vec<Sequenced>,
    },
    FillFailed {
        channel: String,
    },
    Heads(Vec<(String, Option<Position>)>),
}

enum Op {
    /// `room`: `None` for a control channel (always wanted).
    Subscribe {
        channel: String,
        base: String,
        room: Option<String>,
    },
    Unsubscribe(String),
    /// After a reconnect (or a lagging receiver): subscribe all again
    /// (`resubscribe`), check what survived, read every head.
    Recover {
        channels: Vec<(String, String)>,
        resubscribe: bool,
    },
    CheckIncarnations,
    /// Reads the cluster's slot map again (a change arrives as an event).
    SyncSlots,
}

/// Settings of the live path.
pub(crate) struct LiveConfig {
    pub namespace: String,
    pub partitions: u32,
    pub instance: String,
    /// How long a gap waits for a late event before the log is read.
    pub gap_patience: Duration,
    /// How old a head read after a reconnect must be before its events are
    /// read from the log (publishers that wait for replicas publish live
    /// only after the replica has the event; a head can be ahead of that).
    pub head_delay: Duration,
    /// How long an epoch created by a position read lives without events.
    pub epoch_ttl_ms: i64,
    /// Replicas a publish waits for (0: none). Events read from a log
    /// with no later live event to vouch for them are delivered only once
    /// this many replicas hold them too.
    pub replicas: u32,
    /// How long that confirmation may take.
    pub replica_timeout: Duration,
}

/// The engine's handle on the live path.
pub(crate) struct Live {
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Rooms subscribed or being subscribed.
    tracked: Arc<DashSet<String>>,
    /// Control channels not started yet (see [`Live::started`]).
    controls_pending: Arc<tokio::sync::Semaphore>,
    partitions: u32,
    subscriber: Client,
    /// The connections confirming fills with a replica (`WAIT` holds
    /// its connection, so not the command one).
    barrier: Option<Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Leave no subscribed connection behind (tests start and drop
        // many nodes in one process).
        crate::redis::quit_later(
            [self.subscriber.clone()]
                .into_iter()
                .chain(self.barrier.clone()),
        );
    }
}

/// Writes the room's state hash (field `c`) only on a master whose log
/// holds the very entry read last (the same header: after a failover a
/// new master can give its number to another event). KEYS: log, state.
/// ARGV: that entry's id, its header, instance. Keys that exist: while
/// the slot migrates, a declared key the master lacks would refuse it.
const CONFIRM: &str = r#"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local f, same = e[1][2], false
for i = 1, #f, 2 do
  if f[i] == 'o' and f[i + 1] == ARGV[2] then same = true end
end
if not same or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'c', ARGV[3])
return 1
"#;

/// Waits until `replicas` replicas hold what a fill read from `log`, up
/// to the entry `last` (its number and header): on one connection to the
/// master of the log's slot, a script that writes `state` only if that
/// master holds the entry (so the write follows it in the master's
/// stream), then
/// `WAIT`, which answers once replicas have that stream up to the write.
/// Both are sent together and never redirected or sent again: a
/// redirection (the slot moved) or a new connection (a `WAIT` there
/// would not cover the write) fails the confirmation, and the caller
/// tries again later.
async fn confirm_replicated(
    client: &Client,
    log: &str,
    state: &str,
    last: (u64, Bytes),
    instance: &str,
    replicas: u32,
    timeout: Duration,
) -> Result<(), FanoutError> {
    // One attempt: fred counts a followed redirection as an attempt.
    let mut options = Options {
        max_attempts: Some(1),
        fail_fast: true,
        ..Options::default()
    };
    let slot = fred::util::redis_keyslot(log.as_bytes());
    if client.is_clustered() {
        options.cluster_node = Some(
            client
                .cached_cluster_state()
                .and_then(|state| state.get_server(slot).cloned())
                .ok_or_else(|| FanoutError::Unavailable("no master known for the slot".into()))?,
        );
    }
    let want = i64::from(replicas);
    let pipeline = Pipeline::from(client.with_options(&options));
    // EVAL: the script text travels (a confirmation is rare, and a
    // pipeline cannot reload a script Redis lost).
    let eval = CustomCommand::new_static("EVAL", ClusterHash::Custom(slot), false);
    let _: () = pipeline
        .custom(
            eval,
            vec![
                Value::from(CONFIRM),
                Value::from(2),
                Value::from(log),
                Value::from(state),
                Value::from(format!("{}-1", last.0)),
                Value::Bytes(last.1),
                Value::from(instance),
            ],
        )
        .await
        .map_err(crate::redis::err)?;
    let _: () = pipeline
        .wait(want, timeout.as_millis().max(1) as i64)
        .await
        .map_err(crate::redis::err)?;
    let replies: Vec<Result<i64, fred::error::Error>> = pipeline.try_all().await;
    match replies.as_slice() {
        [Err(e), ..] | [_, Err(e)] => Err(crate::redis::err(e)),
        [Ok(1), Ok(acked)] if *acked >= want => Ok(()),
        [Ok(1), Ok(acked)] => Err(FanoutError::Unavailable(format!(
            "{acked} of {want} replicas hold what a fill read"
        ))),
        [Ok(_), Ok(_)] => Err(FanoutError::Unavailable(
            "the master no longer holds what a fill read".into(),
        )),
        _ => Err(FanoutError::Unavailable(
            "unexpected confirmation reply".into(),
        )),
    }
}

/// A room's position (its epoch created if it has none; see
/// [`crate::redis::POSITION`]).
async fn read_position(
    client: &Client,
    script: &Script,
    base: &str,
    epoch_ttl_ms: i64,
) -> Result<Position, FanoutError> {
    let reply: Value = script
        .evalsha_with_reload(
            client,
            vec![format!("{base}:state")],
            vec![Value::from(epoch_ttl_ms)],
        )
        .await
        .map_err(crate::redis::err)?;
    let (epoch, seq) = pair(reply)?;
    Ok(Position { epoch, seq })
}

/// `<base>:live`.
pub(crate) fn channel_of(base: &str) -> String {
    format!("{base}:live")
}

/// `{ns}:{p<N>}:control`: partition N's control channel's keys.
pub(crate) fn control_base(namespace: &str, p: u32) -> String {
    format!("{namespace}:{{p{p}}}:control")
}

impl Live {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        config: LiveConfig,
        subscriber: Client,
        command: Client,
        position: Script,
        codec: Codec,
        sink: Arc<dyn LocalDelivery>,
        waiters: Arc<Waiters>,
        stats: Arc<FanoutStats>,
    ) -> Live {
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (ops, op_rx) = mpsc::unbounded_channel();
        let tracked = Arc::new(DashSet::new());
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        let errors = subscriber.error_rx();
        let changes = subscriber.cluster_change_rx();
        let slots_pending = Arc::new(AtomicBool::new(false));
        let barrier = (config.replicas > 0).then(|| {
            let b = command.clone_new();
            let _task = b.connect();
            b
        });
        let manager = Manager {
            slots_pending: slots_pending.clone(),
            tracked: tracked.clone(),
            subscriber: subscriber.clone(),
            command: command.clone(),
            position,
            incarnation: Script::from_lua(INCARNATION),
            incarnation_keys: (0..config.partitions)
                .map(|p| format!("{}:{{p{p}}}:incarnation", config.namespace))
                .collect(),
            known: None,
            checks: AtomicU64::new(0),
            instance: config.instance.clone(),
            epoch_ttl_ms: config.epoch_ttl_ms,
            cmds: cmds.clone(),
            sink: sink.clone(),
            stats: stats.clone(),
        };
        let mut channels = HashMap::new();
        for p in 0..config.partitions {
            let base = control_base(&config.namespace, p);
            let channel = channel_of(&base);
            let _ = ops.send(Op::Subscribe {
                channel: channel.clone(),
                base: base.clone(),
                room: None,
            });
            channels.insert(
                channel,
                State {
                    kind: Kind::Control,
                    base,
                    channel: Channel::new(),
                    waiting: Vec::new(),
                    acks: Vec::new(),
                    head: None,
                },
            );
        }
        let controls_pending = Arc::new(tokio::sync::Semaphore::new(0));
        let worker_partitions = config.partitions;
        let worker = Loop {
            recover_at: None,
            slots: None,
            slots_pending: slots_pending.clone(),
            barrier: barrier.clone(),
            subscriber: subscriber.clone(),
            controls_started: controls_pending.clone(),
            config,
            command,
            codec,
            sink,
            waiters,
            stats,
            tracked: tracked.clone(),
            channels,
            gapped: HashSet::new(),
            ops,
            cmds: cmds.clone(),
        };
        let tasks = vec![
            tokio::spawn(manager.run(op_rx)),
            tokio::spawn(worker.run(cmd_rx, messages, reconnects, errors, changes)),
        ];
        Live {
            cmds,
            tracked,
            controls_pending,
            partitions: worker_partitions,
            subscriber,
            barrier,
            tasks,
        }
    }

    /// Returns once every control channel is listened to.
    pub(crate) async fn started(&self) {
        let _ = self.controls_pending.acquire_many(self.partitions).await;
    }

    /// Subscribes this node to `room` (keys under `base`) if it is not
    /// yet; returns once the node delivers its events, with the position
    /// it started from when it started now.
    pub(crate) async fn track(
        &self,
        room: &str,
        base: String,
        timeout: Duration,
    ) -> Result<Option<Position>, FanoutError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Track {
                room: room.to_owned(),
                base,
                reply,
            })
            .map_err(|_| FanoutError::Unavailable("live path stopped".into()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(at)) => Ok(at),
            _ => Err(FanoutError::Unavailable(
                "could not subscribe to the room".into(),
            )),
        }
    }

    /// Whether this node is subscribed (or subscribing) to `room`.
    pub(crate) fn tracks(&self, room: &str) -> bool {
        self.tracked.contains(room)
    }

    /// Tells the loop where a publisher's event went (see `Cmd::Published`).
    pub(crate) fn published(&self, base: &str, pid: u64, at: Position) {
        let _ = self.cmds.send(Cmd::Published {
            room_channel: channel_of(base),
            pid,
            at,
        });
    }
}

/// A partition's incarnation: written once (first writer wins) and read
/// back. A different value than the one a node remembers means Redis
/// lost the partition's data since it last looked.
const INCARNATION: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

struct Loop {
    config: LiveConfig,
    command: Client,
    codec: Codec,
    sink: Arc<dyn LocalDelivery>,
    waiters: Arc<Waiters>,
    stats: Arc<FanoutStats>,
    tracked: Arc<DashSet<String>>,
    channels: HashMap<String, State>,
    /// Channels holding events ahead of a gap.
    gapped: HashSet<String>,
    ops: mpsc::UnboundedSender<Op>,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// A permit per control channel started.
    controls_started: Arc<tokio::sync::Semaphore>,
    /// The Pub/Sub connection (for its state).
    subscriber: Client,
    /// A coalesced recovery (re-read every head) due then.
    recover_at: Option<tokio::time::Instant>,
    /// The slot map the subscriptions were last made under (clusters).
    slots: Option<SlotMap>,
    /// A slot map read is queued (one at a time, whatever Redis is doing).
    slots_pending: Arc<AtomicBool>,
    /// See [`Live`]'s field (`None` without replicas to wait for).
    barrier: Option<Client>,
}

impl Loop {
    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut messages: broadcast::Receiver<fred::types::Message>,
        mut reconnects: broadcast::Receiver<fred::types::config::Server>,
        mut errors: broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>,
        mut changes: broadcast::Receiver<Vec<fred::types::ClusterStateChange>>,
    ) {
        let tick_every = (self.config.gap_patience / 2).max(Duration::from_millis(5));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut maintained = tokio::time::Instant::now();
        let mut checked = tokio::time::Instant::now();
        let mut resubscribed = tokio::time::Instant::now();
        let mut slots_read = tokio::time::Instant::now();
        self.slots = slot_map(&self.subscriber);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                biased;
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { return };
                    self.command(cmd, &mut out);
                }
                message = messages.recv() => match message {
                    Ok(m) => self.message(m, &mut out),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Messages were dropped between the connection and
                        // this loop: read what is missing from the logs.
                        tracing::warn!(dropped = n, "live path lagged; recovering from the logs");
                        self.recover(false);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                change = changes.recv() => {
                    if !matches!(change, Err(broadcast::error::RecvError::Closed)) {
                        // Slots moved (a failover, resharding): Redis may
                        // have unsubscribed this node from channels whose
                        // slot left a master without closing the
                        // connection. Subscribe again, read what was missed.
                        // Every read of the map says "changed", so the map
                        // itself is compared.
                        let now = slot_map(&self.subscriber);
                        if now.is_none() || now != self.slots {
                            // Only the rooms whose slot changed master (all,
                            // without two maps to compare).
                            let moved: Option<HashSet<String>> = match (&self.slots, &now) {
                                (Some(old), Some(new)) => Some(
                                    self.channels
                                        .keys()
                                        .filter(|c| {
                                            let slot = fred::util::redis_keyslot(c.as_bytes());
                                            owner(old, slot) != owner(new, slot)
                                        })
                                        .cloned()
                                        .collect(),
                                ),
                                _ => None,
                            };
                            self.slots = now;
                            match moved {
                                Some(moved) if moved.is_empty() => {}
                                Some(moved) => self.recover_only(&moved),
                                None => self.recover(true),
                            }
                        }
                    }
                }
                server = reconnects.recv() => {
                    if server.is_ok() || matches!(server, Err(broadcast::error::RecvError::Lagged(_))) {
                        // Not ready again until everything is subscribed
                        // and what was missed is read.
                        self.stats.connected.store(false, Ordering::Relaxed);
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.recover(true);
                    }
                }
                error = errors.recv() => {
                    if !matches!(error, Err(broadcast::error::RecvError::Closed)) {
                        // The connection broke: not ready until it is back
                        // and caught up (a reconnect starts that).
                        self.stats.connected.store(false, Ordering::Relaxed);
                    }
                }
                _ = tick.tick() => {
                    if !self.subscriber.is_connected() {
                        self.stats.connected.store(false, Ordering::Relaxed);
                    }
                    self.fills_due();
                    if maintained.elapsed() >= MAINTAIN_EVERY {
                        maintained = tokio::time::Instant::now();
                        self.maintain();
                    }
                    if checked.elapsed() >= INCARNATION_CHECK {
                        checked = tokio::time::Instant::now();
                        let _ = self.ops.send(Op::CheckIncarnations);
                    }
                    // Now and then everything again: a subscription Redis
                    // dropped without telling (a slot moved away and back)
                    // or a message lost at the tail of a quiet room costs
                    // at most this long.
                    if self.subscriber.is_clustered()
                        && slots_read.elapsed() >= SLOT_MAP_EVERY
                        && !self.slots_pending.swap(true, Ordering::Relaxed)
                    {
                        slots_read = tokio::time::Instant::now();
                        let _ = self.ops.send(Op::SyncSlots);
                    }
                    if resubscribed.elapsed() >= RESUBSCRIBE_EVERY {
                        resubscribed = tokio::time::Instant::now();
                        self.recover(true);
                    }
                    if self.recover_at.is_some_and(|t| t <= tokio::time::Instant::now()) {
                        self.recover_at = None;
                        self.recover(false);
                    }
                }
            }
        }
    }

    fn command(&mut self, cmd: Cmd, out: &mut Vec<Sequenced>) {
        match cmd {
            Cmd::Track { room, base, reply } => {
                let channel = channel_of(&base);
                if let Some(state) = self.channels.get_mut(&channel) {
                    if state.channel.position().is_some() {
                        let _ = reply.send(None);
                    } else {
                        state.waiting.push(reply);
                    }
                    return;
                }
                self.tracked.insert(room.clone());
                let _ = self.ops.send(Op::Subscribe {
                    channel: channel.clone(),
                    base: base.clone(),
                    room: Some(room.clone()),
                });
                self.channels.insert(
                    channel,
                    State {
                        kind: Kind::Room(room),
                        base,
                        channel: Channel::new(),
                        waiting: vec![reply],
                        acks: Vec::new(),
                        head: None,
                    },
                );
            }
            Cmd::Started { channel, at } => {
                let Some(state) = self.channels.get_mut(&channel) else {
                    return;
                };
                if state.channel.position().is_none() && matches!(state.kind, Kind::Control) {
                    self.controls_started.add_permits(1);
                }
                state.channel.start(at, out);
                for w in state.waiting.drain(..) {
                    let _ = w.send(Some(at));
                }
                if state.channel.has_gap() {
                    self.gapped.insert(channel.clone());
                }
                self.flush(&channel, out);
            }
            Cmd::Published {
                room_channel,
                pid,
                at,
            } => self.published(&room_channel, pid, at),
            Cmd::Filled {
                channel,
                from,
                through,
                entries,
            } => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    let skipped = state.channel.skipped;
                    state.channel.fill(from, through, entries, out);
                    let lost = state.channel.skipped - skipped;
                    if lost > 0 {
                        self.stats.overruns.fetch_add(lost, Ordering::Relaxed);
                        tracing::warn!(
                            channel,
                            lost,
                            "events neither received live nor kept in the log; members reload"
                        );
                    }
                    self.flush(&channel, out);
                    self.head_again(&channel);
                }
            }
            Cmd::FillFailed { channel } => {
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.channel.filling = false;
                    if !state.channel.has_gap() && state.head.is_none() {
                        // A head read after a reconnect asked for it:
                        // read the heads again, once, a little later.
                        self.recover_at.get_or_insert_with(|| {
                            tokio::time::Instant::now() + Duration::from_secs(1)
                        });
                    }
                    self.head_again(&channel);
                }
            }
            Cmd::Heads(heads) => {
                for (channel, head) in heads {
                    let Some(head) = head else { continue };
                    let Some(state) = self.channels.get_mut(&channel) else {
                        continue;
                    };
                    if state.channel.filling {
                        // Compared once the fill under way is done.
                        state.head = Some(match state.head {
                            Some(h) if (h.epoch, h.seq) > (head.epoch, head.seq) => h,
                            _ => head,
                        });
                        continue;
                    }
                    if let Some((from, through)) = state.channel.behind(head) {
                        state.channel.filling = true;
                        self.spawn_fill(channel, from, through, self.config.head_delay, true);
                    }
                }
            }
        }
    }

    /// A head read while a fill was under way: fills what is still behind.
    fn head_again(&mut self, channel: &str) {
        let Some(state) = self.channels.get_mut(channel) else {
            return;
        };
        if state.channel.filling {
            return;
        }
        let Some(head) = state.head.take() else {
            return;
        };
        if let Some((from, through)) = state.channel.behind(head) {
            state.channel.filling = true;
            self.spawn_fill(
                channel.to_owned(),
                from,
                through,
                self.config.head_delay,
                true,
            );
        }
    }

    /// Acknowledges a publisher now when this node will not deliver its
    /// event: the room is not subscribed here, or its channel started
    /// after the event, or passed it without it (the event was neither
    /// received nor in the log). Otherwise the delivery acknowledges it.
    fn published(&mut self, channel: &str, pid: u64, at: Position) {
        if let Some(state) = self.channels.get_mut(channel) {
            state.acks.push((pid, at));
            self.settle(channel);
            return;
        }
        self.ack_now(pid, at);
    }

    /// Acknowledges the channel's publishers whose events it has passed
    /// without delivering them.
    fn settle(&mut self, channel: &str) {
        let Some(state) = self.channels.get_mut(channel) else {
            return;
        };
        if state.acks.is_empty() {
            return;
        }
        let Some(now) = state.channel.position() else {
            return;
        };
        let mut passed = Vec::new();
        state.acks.retain(|(pid, at)| {
            let behind = at.epoch < now.epoch || (at.epoch == now.epoch && at.seq <= now.seq);
            if behind {
                passed.push((*pid, *at));
            }
            !behind
        });
        for (pid, at) in passed {
            self.ack_now(pid, at);
        }
    }

    fn ack_now(&self, pid: u64, at: Position) {
        if let Some((_, w)) = self.waiters.remove(&pid) {
            w.finish(at, false, Bytes::new());
        }
    }

    fn message(&mut self, message: fred::types::Message, out: &mut Vec<Sequenced>) {
        let Some(payload) = as_bytes(&message.value) else {
            return;
        };
        let channel = &*message.channel;
        let Some(state) = self.channels.get_mut(channel) else {
            return;
        };
        match payload.first() {
            Some(b's') => {
                let Some(event) = Sequenced::parse_live(&payload) else {
                    return;
                };
                if state.channel.offer(event, out) == Offered::Held {
                    self.gapped.insert(channel.to_owned());
                }
                let channel = channel.to_owned();
                self.flush(&channel, out);
            }
            Some(b'e') => {
                // Typing: `e<conn> <instance>\n<frame>`, delivered as is
                // (no order, no recovery).
                let Kind::Room(room) = &state.kind else {
                    return;
                };
                if state.channel.position().is_none() {
                    return;
                }
                let Some(end) = payload.iter().position(|b| *b == b'\n') else {
                    return;
                };
                let header = std::str::from_utf8(&payload[1..end]).unwrap_or_default();
                let (conn, instance) = header.split_once(' ').unwrap_or(("0", ""));
                let conn: u64 = conn.parse().unwrap_or(0);
                let exclude = (instance == self.config.instance && conn != 0).then_some(conn);
                self.sink
                    .deliver(room, &payload.slice(end + 1..), exclude, true);
            }
            _ => {}
        }
    }

    /// Delivers what the channel released, in order, then acknowledges
    /// publishers whose events it passed without them.
    fn flush(&mut self, channel: &str, out: &mut Vec<Sequenced>) {
        self.deliver(channel, out);
        self.settle(channel);
    }

    fn deliver(&mut self, channel: &str, out: &mut Vec<Sequenced>) {
        if out.is_empty() {
            return;
        }
        let Some(state) = self.channels.get(channel) else {
            out.clear();
            return;
        };
        for event in out.drain(..) {
            match &state.kind {
                Kind::Control => self.sink.control(&event.frame),
                Kind::Room(room) => {
                    let mine = event.instance == self.config.instance.as_bytes();
                    let exclude = (mine && event.conn != 0).then_some(event.conn);
                    let frame = self.codec.compress_frame(event.frame);
                    self.sink.deliver(room, &frame, exclude, false);
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    if mine && let Some((_, w)) = self.waiters.remove(&event.pid) {
                        let position = Position {
                            epoch: event.epoch,
                            seq: event.seq,
                        };
                        w.finish(position, false, frame);
                    }
                }
            }
        }
    }

    fn fills_due(&mut self) {
        let mut oldest = Duration::ZERO;
        let mut due = Vec::new();
        self.gapped.retain(|channel| {
            let Some(state) = self.channels.get_mut(channel) else {
                return false;
            };
            if !state.channel.has_gap() {
                return false;
            }
            oldest = oldest.max(state.channel.gap_age());
            if let Some((from, through)) = state.channel.due_fill(self.config.gap_patience) {
                state.channel.filling = true;
                due.push((channel.clone(), from, through));
            }
            true
        });
        self.stats
            .lag_ms
            .store(oldest.as_millis() as i64, Ordering::Relaxed);
        for (channel, from, through) in due {
            // Before events heard live: a replica has them (replication
            // is ordered, and the live ones were confirmed).
            self.spawn_fill(channel, from, through, Duration::ZERO, false);
        }
    }

    /// Reads the numbers after `from` through `through` from the room's
    /// log (after `delay`). `unvouched`: nothing later was heard live, so
    /// with replicas to wait for, what was read is delivered only once a
    /// replica is known to hold it — an event whose publisher's `WAIT`
    /// failed may sit in the master's log alone, and a failover would take
    /// it back after members saw it.
    fn spawn_fill(
        &self,
        channel: String,
        from: Position,
        through: u64,
        delay: Duration,
        unvouched: bool,
    ) {
        let Some(state) = self.channels.get(&channel) else {
            return;
        };
        let log = format!("{}:log", state.base);
        let confirm = match (&self.barrier, unvouched) {
            (Some(client), true) => Some((
                client.clone(),
                log.clone(),
                format!("{}:state", state.base),
                self.config.instance.clone(),
                self.config.replicas,
                self.config.replica_timeout,
            )),
            _ => None,
        };
        let client = self.command.clone();
        let cmds = self.cmds.clone();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let count = through.saturating_sub(from.seq);
            let reply: Result<Value, _> = client
                .xrange(
                    log,
                    format!("{}-1", from.seq + 1),
                    format!("{through}-1"),
                    Some(count),
                )
                .await;
            let reply = reply.map_err(crate::redis::err);
            let last = reply.as_ref().ok().and_then(last_entry);
            let reply = match (reply, confirm, last) {
                (Ok(v), Some((barrier, log, key, instance, replicas, timeout)), Some(last)) => {
                    confirm_replicated(&barrier, &log, &key, last, &instance, replicas, timeout)
                        .await
                        .map(|()| v)
                }
                (reply, _, _) => reply,
            };
            let cmd = match reply {
                Ok(v) => Cmd::Filled {
                    channel,
                    from,
                    through,
                    entries: log_entries(&v),
                },
                Err(e) => {
                    stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "reading a room log to fill a gap failed");
                    Cmd::FillFailed { channel }
                }
            };
            let _ = cmds.send(cmd);
        });
    }

    /// Rooms without local members (and no publisher waiting on them) are
    /// given up.
    fn maintain(&mut self) {
        let waited: HashSet<String> = self.waiters.iter().map(|w| w.room.clone()).collect();
        let mut gone = Vec::new();
        for (channel, state) in &self.channels {
            let Kind::Room(room) = &state.kind else {
                continue;
            };
            // A channel not started yet stays while a join waits for it.
            let waiting =
                state.channel.position().is_none() && state.waiting.iter().any(|w| !w.is_closed());
            if waiting || self.sink.has_members(room) || waited.contains(room) {
                continue;
            }
            gone.push((channel.clone(), room.clone()));
        }
        for (channel, room) in gone {
            self.channels.remove(&channel);
            self.gapped.remove(&channel);
            self.tracked.remove(&room);
            let _ = self.ops.send(Op::Unsubscribe(channel));
        }
    }

    fn recover(&mut self, resubscribe: bool) {
        let channels = self
            .channels
            .iter()
            .map(|(c, s)| (c.clone(), s.base.clone()))
            .collect();
        let _ = self.ops.send(Op::Recover {
            channels,
            resubscribe,
        });
    }

    /// Subscribes `channels` again and reads what they missed.
    fn recover_only(&mut self, channels: &HashSet<String>) {
        let channels = self
            .channels
            .iter()
            .filter(|(c, _)| channels.contains(*c))
            .map(|(c, s)| (c.clone(), s.base.clone()))
            .collect();
        let _ = self.ops.send(Op::Recover {
            channels,
            resubscribe: true,
        });
    }
}

/// Runs subscription changes in order on the Pub/Sub connection.
struct Manager {
    slots_pending: Arc<AtomicBool>,
    tracked: Arc<DashSet<String>>,
    subscriber: Client,
    command: Client,
    position: Script,
    incarnation: Script,
    incarnation_keys: Vec<String>,
    known: Option<Vec<String>>,
    checks: AtomicU64,
    instance: String,
    epoch_ttl_ms: i64,
    cmds: mpsc::UnboundedSender<Cmd>,
    sink: Arc<dyn LocalDelivery>,
    stats: Arc<FanoutStats>,
}

impl Manager {
    async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>) {
        crate::redis::start_connecting(&self.subscriber).await;
        if let Ok(known) = self.incarnations().await {
            self.known = Some(known);
        }
        let mut next = None;
        loop {
            let op = match next.take() {
                Some(op) => op,
                None => match ops.recv().await {
                    Some(op) => op,
                    None => return,
                },
            };
            let mut backoff = Duration::from_millis(50);
            match op {
                Op::Subscribe {
                    channel,
                    base,
                    room,
                } => {
                    // Rooms asked for meanwhile go with it (a restarted
                    // node's members join thousands at once): one
                    // SSUBSCRIBE per slot, their positions read together.
                    let mut batch = vec![(channel, base, room)];
                    while batch.len() < SUBSCRIBE_BATCH {
                        match ops.try_recv() {
                            Ok(Op::Subscribe {
                                channel,
                                base,
                                room,
                            }) => batch.push((channel, base, room)),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    loop {
                        // A room given up meanwhile (its members left, or
                        // the join waiting for it timed out) is not retried.
                        batch.retain(|(_, _, room)| {
                            room.as_ref().is_none_or(|r| self.tracked.contains(r))
                        });
                        if batch.is_empty() {
                            break;
                        }
                        match self.subscribe(&mut batch).await {
                            Ok(()) => {
                                self.succeeded();
                                break;
                            }
                            Err(e) => self.failed(e, &mut backoff).await,
                        }
                    }
                }
                Op::Unsubscribe(channel) => {
                    let _ = self.subscriber.sunsubscribe(channel).await;
                }
                Op::Recover {
                    channels,
                    resubscribe,
                } => {
                    // What survived first: members must hear of a loss
                    // before anything of the new streams reaches them.
                    while let Err(e) = self.check_incarnations().await {
                        self.failed(e, &mut backoff).await;
                    }
                    if resubscribe {
                        for group in by_slot(&channels) {
                            while let Err(e) = self.resubscribe(group.clone()).await {
                                self.failed(e, &mut backoff).await;
                            }
                        }
                    }
                    while let Err(e) = self.heads(&channels).await {
                        self.failed(e, &mut backoff).await;
                    }
                    self.succeeded();
                }
                Op::CheckIncarnations => {
                    if let Err(e) = self.check_incarnations().await {
                        tracing::debug!(error = %e, "incarnation check failed");
                    }
                }
                Op::SyncSlots => {
                    // Read on the command connection (the Pub/Sub client's
                    // own refresh opens a connection and holds its reads);
                    // the subscriber's map is refreshed only when it differs.
                    let read = tokio::time::timeout(
                        SLOT_READ_TIMEOUT,
                        self.command.cluster_slots::<Value>(),
                    )
                    .await;
                    match read {
                        Ok(Ok(reply)) => {
                            let fresh = parse_slots(&reply);
                            let mut known = slot_map(&self.subscriber);
                            if let Some(known) = known.as_mut() {
                                known.sort();
                            }
                            if fresh.is_some() && fresh != known {
                                let synced = tokio::time::timeout(
                                    SLOT_READ_TIMEOUT,
                                    self.subscriber.sync_cluster(),
                                )
                                .await;
                                if !matches!(synced, Ok(Ok(()))) {
                                    tracing::debug!("refreshing the slot map failed");
                                }
                            }
                        }
                        _ => tracing::debug!("slot map read failed"),
                    }
                    self.slots_pending.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    /// After a failed call: counts it, says so in `/health`, backs off
    /// (Redis is away; the caller tries again).
    async fn failed(&self, e: FanoutError, backoff: &mut Duration) {
        self.stats.connected.store(false, Ordering::Relaxed);
        self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "live path: Redis unavailable; retrying");
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_secs(1));
    }

    fn succeeded(&self) {
        self.stats.connected.store(true, Ordering::Relaxed);
    }

    /// Subscribes `batch` (channel, base, room) and starts each channel
    /// at the position read after its subscription; what started leaves
    /// `batch`, what failed stays for the caller's next try.
    async fn subscribe(
        &mut self,
        batch: &mut Vec<(String, String, Option<String>)>,
    ) -> Result<(), FanoutError> {
        let mut seen = HashSet::new();
        let pairs: Vec<(String, String)> = batch
            .iter()
            .filter(|(c, _, _)| seen.insert(c.clone()))
            .map(|(c, b, _)| (c.clone(), b.clone()))
            .collect();
        for group in by_slot(&pairs) {
            self.subscriber
                .ssubscribe(group)
                .await
                .map_err(crate::redis::err)?;
        }
        // Concurrent reads leave on the connection back to back.
        let mut reads = tokio::task::JoinSet::new();
        for (channel, base) in pairs {
            let (client, script, ttl) = (
                self.command.clone(),
                self.position.clone(),
                self.epoch_ttl_ms,
            );
            reads.spawn(async move {
                let at = read_position(&client, &script, &base, ttl).await;
                (channel, at)
            });
        }
        let mut started = HashSet::new();
        let mut failure = None;
        while let Some(read) = reads.join_next().await {
            match read {
                Ok((channel, Ok(at))) => {
                    let _ = self.cmds.send(Cmd::Started {
                        channel: channel.clone(),
                        at,
                    });
                    started.insert(channel);
                }
                Ok((_, Err(e))) => failure = Some(e),
                Err(e) => failure = Some(crate::redis::err(e)),
            }
        }
        batch.retain(|(channel, _, _)| !started.contains(channel));
        failure.map_or(Ok(()), Err)
    }

    async fn resubscribe(&mut self, channels: Vec<String>) -> Result<(), FanoutError> {
        self.subscriber
            .ssubscribe(channels)
            .await
            .map_err(crate::redis::err)
    }

    /// Every channel's head (epoch and last number), without creating any.
    async fn heads(&mut self, channels: &[(String, String)]) -> Result<(), FanoutError> {
        let mut heads = Vec::with_capacity(channels.len());
        for chunk in channels.chunks(256) {
            let pipeline = self.command.pipeline();
            for (_, base) in chunk {
                let _: () = pipeline
                    .hmget(format!("{base}:state"), vec!["e", "s"])
                    .await
                    .map_err(crate::redis::err)?;
            }
            let values: Vec<Value> = pipeline.all().await.map_err(crate::redis::err)?;
            for ((channel, _), pair) in chunk.iter().zip(values) {
                let head = match pair {
                    Value::Array(pair) => match pair.as_slice() {
                        [epoch, seq] => as_u64(epoch).map(|epoch| Position {
                            epoch,
                            seq: as_u64(seq).unwrap_or(0),
                        }),
                        _ => None,
                    },
                    _ => None,
                };
                heads.push((channel.clone(), head));
            }
        }
        let _ = self.cmds.send(Cmd::Heads(heads));
        Ok(())
    }

    async fn incarnations(&self) -> Result<Vec<String>, FanoutError> {
        let check = self.checks.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}#{check}@{}", self.instance, crate::redis::now_ms());
        let mut out = Vec::with_capacity(self.incarnation_keys.len());
        for key in &self.incarnation_keys {
            let v: Value = self
                .incarnation
                .evalsha_with_reload(
                    &self.command,
                    vec![key.clone()],
                    vec![Value::from(token.as_str())],
                )
                .await
                .map_err(crate::redis::err)?;
            out.push(as_str(&v).unwrap_or_default());
        }
        Ok(out)
    }

    /// Compares the partitions' incarnations with the remembered ones; a
    /// change means Redis lost data, and the node's members are made to
    /// resume (they may have missed events that are gone).
    async fn check_incarnations(&mut self) -> Result<(), FanoutError> {
        let now = self.incarnations().await?;
        let lost = self
            .known
            .as_ref()
            .is_some_and(|before| before.iter().zip(&now).any(|(a, b)| a != b));
        self.known = Some(now);
        if lost {
            self.stats.streams_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("Redis lost the room streams (restarted without its data?)");
            self.sink.streams_lost();
        }
        Ok(())
    }
}

/// Channels grouped by hash tag (`{p<N>}`): one SSUBSCRIBE per slot.
fn by_slot(channels: &[(String, String)]) -> Vec<Vec<String>> {
    let mut groups: HashMap<&str, Vec<String>> = HashMap::new();
    for (channel, _) in channels {
        let tag = channel
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(tag, _)| tag)
            .unwrap_or("");
        groups.entry(tag).or_default().push(channel.clone());
    }
    groups
        .into_values()
        .flat_map(|g| g.chunks(512).map(<[String]>::to_vec).collect::<Vec<_>>())
        .collect()
}

/// The highest-numbered entry of a log read: its number and header.
fn last_entry(v: &Value) -> Option<(u64, Bytes)> {
    entries(v)
        .into_iter()
        .filter_map(|(id, fields)| {
            let seq = id.split_once('-')?.0.parse().ok()?;
            Some((seq, fields.get("o").and_then(as_bytes)?))
        })
        .max_by_key(|(seq, _)| *seq)
}

/// A room log's entries (`f` frame, `o` header) as events.
fn log_entries(v: &Value) -> Vec<Sequenced> {
    entries(v)
        .into_iter()
        .filter_map(|(_, fields)| {
            let frame = fields.get("f").and_then(as_bytes)?;
            let header = fields.get("o").and_then(as_bytes)?;
            Sequenced::parse(header, frame)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::from(host),
            Value::from(port),
            Value::from(format!("id-{port}")),
        ])
    }

    #[test]
    fn a_cluster_slots_reply_reads_as_a_sorted_slot_map() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::from(5461),
                Value::from(16383),
                node("10.0.0.2", 6379),
                node("10.0.0.5", 6379),
            ]),
            Value::Array(vec![
                Value::from(0),
                Value::from(5460),
                node("10.0.0.1", 6380),
            ]),
        ]);
        let map = parse_slots(&reply).expect("a slot map");
        assert_eq!(
            map,
            vec![
                (0, 5460, "id-6380".to_owned()),
                (5461, 16383, "id-6379".to_owned()),
            ]
        );
        assert_eq!(owner(&map, 5460), Some("id-6380"));
        assert_eq!(owner(&map, 5461), Some("id-6379"));
        assert_eq!(parse_slots(&Value::from("nope")), None);
        assert_eq!(parse_slots(&Value::Array(vec![Value::from(1)])), None);
    }
}
