//! The worker side of the multi-process scenarios: `idle`, `fanout`,
//! `chat`. Each worker opens its share of the connections and reports
//! through its [`Meter`]; the coordinator ([`crate::run`]) steers phases
//! with stdin commands ("go", "burst", "stop").

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};

use chatgate_client::{Incoming, RawConnection};
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ServerFrame};

use crate::conn::{Closed, Target, session, source_address};
use crate::worker::{Meter, Recorder, Spec, wait_for};

fn param(p: &Value, key: &str, default: u64) -> u64 {
    p.get(key).and_then(Value::as_u64).unwrap_or(default)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The coordinator's run id: client message ids must not repeat across
/// runs, or the gateway would (rightly) treat them as retries.
fn run_id(spec: &Spec) -> u64 {
    param(&spec.params, "run", 0)
}

/// Runs this worker's part of `spec`.
pub async fn run_worker(spec: Spec, meter: Arc<Meter>) -> anyhow::Result<()> {
    match spec.scenario.as_str() {
        "idle" => idle(spec, meter).await,
        "fanout" => fanout(spec, meter).await,
        "chat" => chat(spec, meter).await,
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

fn targets(spec: &Spec) -> anyhow::Result<Vec<Target>> {
    spec.urls.iter().map(|u| Target::parse(u)).collect()
}

/// Body of a timed message: publisher id, its sequence, send time (ns).
fn stamp(publisher: u64, seq: u64, pad: usize) -> String {
    let mut s = format!("{publisher}|{seq}|{}|", now_ns());
    while s.len() < pad {
        s.push('x');
    }
    s
}

fn parse_stamp(body: &str) -> Option<(u64, u64, u64)> {
    let mut it = body.split('|');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

/// Tracks per-publisher order at one receiver: duplicates and gaps.
#[derive(Default)]
struct Order {
    last: HashMap<u64, u64>,
}

impl Order {
    /// Returns (duplicate, gap) for this arrival.
    fn see(&mut self, publisher: u64, seq: u64) -> (bool, u64) {
        let last = self.last.entry(publisher).or_insert(0);
        if seq <= *last {
            return (true, 0);
        }
        let gap = seq - *last - 1;
        *last = seq;
        (false, gap)
    }
}

/// One receiver's accounting of timed messages: count, latency from the
/// body's timestamp, and per-publisher order (duplicates, gaps). Counter
/// handles are taken once; a message costs no lookup by name.
struct Arrivals {
    received: Arc<AtomicU64>,
    dups: Arc<AtomicU64>,
    gaps: Arc<AtomicU64>,
    delivery: Arc<Recorder>,
    order: Order,
    /// The publisher id this receiver sends under, if it sends.
    me: Option<u64>,
}

impl Arrivals {
    fn new(meter: &Meter) -> Self {
        Arrivals {
            received: meter.counter("received"),
            dups: meter.counter("duplicates"),
            gaps: meter.counter("gaps"),
            delivery: meter.recorder("delivery"),
            order: Order::default(),
            me: None,
        }
    }

    /// A receiver that also publishes as `publisher`. The sending
    /// connection never gets its own message (it has the ack instead), so
    /// one arriving there is a message delivered twice to that client.
    fn publishing_as(mut self, publisher: u64) -> Self {
        self.me = Some(publisher);
        self
    }

    /// Accounts a NewMessage with this `body`, received at `now` (ns);
    /// `key` spreads recording over the recorder's shards.
    fn message(&mut self, key: u64, now: u64, body: &str) {
        if let Some((publisher, seq, sent)) = parse_stamp(body) {
            if self.me == Some(publisher) {
                self.dups.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let (dup, gap) = self.order.see(publisher, seq);
            if dup {
                self.dups.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.gaps.fetch_add(gap, Ordering::Relaxed);
            self.delivery
                .record_micros(key, now.saturating_sub(sent) / 1000);
        }
        self.received.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads a member's socket until stopped: counts messages, records
/// latency from the body's timestamp, tracks order; heartbeats on time.
/// A connection that ends before "stop" is counted in `closed_early`
/// (its later deliveries are missing, and the run must say why), and an
/// Error frame, which no request of a member asks for, in
/// `error_replies`.
async fn member_loop(
    id: u64,
    mut c: RawConnection,
    meter: Arc<Meter>,
    mut stop: watch::Receiver<String>,
) {
    let closed = meter.counter("closed_early");
    let error_replies = meter.counter("error_replies");
    let mut arrivals = Arrivals::new(&meter);
    let mut beat = tokio::time::interval(Duration::from_secs(20));
    beat.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() == "stop" {
                    let _ = c.close().await;
                    return;
                }
            }
            _ = beat.tick() => {
                if c.send(0, &ClientFrame::Heartbeat).await.is_err() {
                    closed.fetch_add(1, Ordering::Relaxed);
                    tracing_free_log(&format!("member {id}: heartbeat failed, connection closed"));
                    return;
                }
            }
            r = c.recv() => match r {
                Ok(Incoming::Frames(frames)) => {
                    let now = now_ns();
                    for (_, f) in frames {
                        match f {
                            ServerFrame::NewMessage(m) => arrivals.message(id, now, &m.message.body),
                            ServerFrame::Error(e) => {
                                error_replies.fetch_add(1, Ordering::Relaxed);
                                tracing_free_log(&format!("member {id}: server error {}", e.code));
                            }
                            _ => {}
                        }
                    }
                }
                other => {
                    closed.fetch_add(1, Ordering::Relaxed);
                    tracing_free_log(&format!("member {id}: connection ended early: {other:?}"));
                    return;
                }
            }
        }
    }
}

/// Awaits every task. A task that panicked left its connection's
/// deliveries silently missing; it fails the worker, which the
/// coordinator reports as a worker error (and `--check` refuses).
async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) -> anyhow::Result<()> {
    let mut panicked = 0;
    for t in tasks {
        if t.await.is_err() {
            panicked += 1;
        }
    }
    if panicked > 0 {
        anyhow::bail!("{panicked} connection task(s) panicked");
    }
    Ok(())
}

/// `idle`: open connections (each in 2 rooms: `all` and one of many
/// small rooms), hold them; on "burst" worker 0 sends messages to `all`.
async fn idle(spec: Spec, meter: Arc<Meter>) -> anyhow::Result<()> {
    let p = &spec.params;
    let total = param(p, "connections", 1000) as usize;
    let small_rooms = param(p, "rooms", 100).max(1);
    let concurrency = param(p, "concurrency", 64) as usize;
    let burst = param(p, "burst", 100);
    let targets = targets(&spec)?;
    let mut commands = crate::worker::commands();
    let source = source_address(spec.worker + spec.workers * (run_id(&spec) % 64) as usize);
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let connected = meter.counter("connected");
    let failed = meter.counter("failed");
    let mut joins = Vec::new();
    let mine: Vec<usize> = (0..total)
        .filter(|i| i % spec.workers == spec.worker)
        .collect();
    let span_start = Instant::now();
    let span_left = Arc::new(std::sync::atomic::AtomicUsize::new(mine.len()));
    for i in mine {
        let span_left = span_left.clone();
        let permit = gate.clone().acquire_owned().await?;
        let target = targets[i % targets.len()].clone();
        let meter = meter.clone();
        let (connected, failed) = (connected.clone(), failed.clone());
        let token = crate::token(&spec.secret, &format!("idle-{}-{i}", run_id(&spec)));
        let rooms = vec![
            "all".to_string(),
            format!("room-{}", i as u64 % small_rooms),
        ];
        let stop = commands.clone();
        joins.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = session(&target, source, token, &rooms).await;
            drop(permit);
            if span_left.fetch_sub(1, Ordering::Relaxed) == 1 {
                // The last of this worker's connects: record the span.
                meter.record("connect_span", span_start.elapsed());
            }
            match r {
                Ok((c, _)) => {
                    meter.record("connect", t0.elapsed());
                    connected.fetch_add(1, Ordering::Relaxed);
                    member_loop(i as u64, c, meter, stop).await;
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tracing_free_log(&format!("connect failed: {e:#}"));
                }
            }
        }));
    }
    meter
        .counter("workers_connected")
        .store(1, Ordering::Relaxed);
    if spec.worker == 0 && wait_for(&mut commands, "burst").await {
        let (mut publisher, _) = session(
            &targets[0],
            source,
            crate::token(&spec.secret, &format!("idle-publisher-{}", run_id(&spec))),
            &["all".to_string()],
        )
        .await
        .context("publisher session")?;
        let sent = meter.counter("burst_sent");
        for n in 1..=burst {
            let frame = ClientFrame::Send(Send {
                room: "all".into(),
                client_msg_id: format!("burst-{}-{n}", run_id(&spec)),
                body: stamp(0, n, 80),
                attachments: vec![],
            });
            publisher.send(n as u32 + 10, &frame).await?;
            sent.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Read the publisher's acks until stop: an Error or a closed
        // connection here means burst messages may never be delivered.
        let acked = meter.counter("burst_acked");
        let errors = meter.counter("send_errors");
        let closed = meter.counter("closed_early");
        let mut stop = commands.clone();
        loop {
            tokio::select! {
                r = publisher.recv() => match r {
                    Ok(Incoming::Frames(frames)) => {
                        for (_, f) in frames {
                            match f {
                                ServerFrame::MessageSent(_) => {
                                    acked.fetch_add(1, Ordering::Relaxed);
                                }
                                ServerFrame::Error(e) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    tracing_free_log(&format!("burst publisher: server error {}", e.code));
                                }
                                _ => {}
                            }
                        }
                    }
                    other => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        tracing_free_log(&format!("burst publisher: connection ended early: {other:?}"));
                        break;
                    }
                },
                _ = stop.changed() => if *stop.borrow() == "stop" { break },
            }
        }
        let _ = publisher.close().await;
    }
    wait_for(&mut commands, "stop").await;
    join_all(joins).await
}

/// Stderr logging for workers (stdout carries the report lines).
fn tracing_free_log(msg: &str) {
    eprintln!("[worker] {msg}");
}

/// `fanout`: `rooms` rooms of `members` members spread over workers and
/// URLs; on "go", the first `publishers` members of each room publish at
/// `rate` messages/s per room for `seconds`.
async fn fanout(spec: Spec, meter: Arc<Meter>) -> anyhow::Result<()> {
    let p = &spec.params;
    let rooms = param(p, "rooms", 1);
    let members = param(p, "members", 100);
    let publishers = param(p, "publishers", 1).min(members).max(1);
    let rate = param(p, "rate", 100) as f64;
    let seconds = param(p, "seconds", 10);
    let body = param(p, "body", 100) as usize;
    let concurrency = param(p, "concurrency", 64) as usize;
    let slow = param(p, "slow", 0);
    let rooms_on_one_node = param(p, "rooms_on_one_node", 0) == 1;
    let targets = targets(&spec)?;
    let mut commands = crate::worker::commands();
    let source = source_address(spec.worker + spec.workers * (run_id(&spec) % 64) as usize);
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let connected = meter.counter("connected");
    let failed = meter.counter("failed");
    let mut joins = Vec::new();
    let mut pubs: Vec<(u64, u64, RawConnection)> = Vec::new();
    let mut sloths: Vec<RawConnection> = Vec::new();
    let total = rooms * members;
    let mut pending = Vec::new();
    for j in (0..total + slow).filter(|j| *j as usize % spec.workers == spec.worker) {
        let permit = gate.clone().acquire_owned().await?;
        let room = if j < total { j / members } else { 0 };
        let is_pub = j < total && j % members < publishers;
        let node = if rooms_on_one_node { room } else { j };
        let target = targets[node as usize % targets.len()].clone();
        let token = crate::token(&spec.secret, &format!("fan-{}-{j}", run_id(&spec)));
        let meter2 = meter.clone();
        pending.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = session(&target, source, token, &[format!("fan-{room}")]).await;
            drop(permit);
            if r.is_ok() {
                meter2.record("connect", t0.elapsed());
            }
            (j, room, is_pub, r)
        }));
    }
    for t in pending {
        let (j, room, is_pub, r) = t.await?;
        match r {
            Ok((c, _)) => {
                connected.fetch_add(1, Ordering::Relaxed);
                if j >= total {
                    sloths.push(c);
                } else if is_pub {
                    pubs.push((j, room, c));
                } else {
                    joins.push(tokio::spawn(member_loop(
                        j,
                        c,
                        meter.clone(),
                        commands.clone(),
                    )));
                }
            }
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                tracing_free_log(&format!("connect failed: {e:#}"));
            }
        }
    }
    meter
        .counter("workers_connected")
        .store(1, Ordering::Relaxed);
    if !wait_for(&mut commands, "go").await {
        return Ok(());
    }
    // Publishers: open loop at a fixed rate; a reader task per publisher
    // counts acks (each ack means members-1 expected deliveries) and the
    // deliveries it receives from the room's other publishers.
    let run = run_id(&spec);
    let per_pub = rate / publishers as f64;
    let interval = Duration::from_secs_f64(1.0 / per_pub.max(0.001));
    let until = Instant::now() + Duration::from_secs(seconds);
    for (j, room, c) in pubs {
        let meter = meter.clone();
        let stop = commands.clone();
        joins.push(tokio::spawn(async move {
            publisher(j, room, c, meter, stop, interval, until, body, members, run).await;
        }));
    }
    wait_for(&mut commands, "stop").await;
    drop(sloths);
    join_all(joins).await
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    id: u64,
    room: u64,
    mut c: RawConnection,
    meter: Arc<Meter>,
    mut stop: watch::Receiver<String>,
    interval: Duration,
    until: Instant,
    body: usize,
    members: u64,
    run: u64,
) {
    let acked = meter.counter("acked");
    let expected = meter.counter("expected");
    let sent = meter.counter("sent");
    let errors = meter.counter("send_errors");
    let closed = meter.counter("closed_early");
    // The coordinator stops the run once every publisher is done and
    // everything it sent is acknowledged and delivered.
    let done = meter.counter("publishers_done");
    meter.counter("publishers").fetch_add(1, Ordering::Relaxed);
    let mut arrivals = Arrivals::new(&meter).publishing_as(id + 1);
    let mut sent_at: HashMap<u32, Instant> = HashMap::new();
    // Publishers start at spread-out phases of their interval: started
    // together, every room would publish in the same instant and the run
    // would measure one synchronized burst per interval, not a rate.
    let phase = (id as f64 * 0.618_033_988_75).fract();
    let mut next = tokio::time::Instant::now() + interval.mul_f64(phase);
    let mut seq = 0u64;
    let mut sending = true;
    // A publisher whose connection ends early stops publishing, so its
    // room gets fewer messages than the rate says, and nothing else would
    // notice: it is counted, and the run fails `--check`.
    let ended_early = |why: String| {
        closed.fetch_add(1, Ordering::Relaxed);
        tracing_free_log(&format!("publisher {id}: connection ended early: {why}"));
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next), if sending => {
                if Instant::now() >= until {
                    sending = false;
                    done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                seq += 1;
                let rid = (seq % 4_000_000_000) as u32 + 1;
                let frame = ClientFrame::Send(Send {
                    room: format!("fan-{room}"),
                    client_msg_id: format!("{run}-p{id}-{seq}"),
                    body: stamp(id + 1, seq, body),
                    attachments: vec![],
                });
                sent_at.insert(rid, Instant::now());
                if let Err(e) = c.send(rid, &frame).await {
                    ended_early(format!("send failed: {e}"));
                    done.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                next += interval;
                // Never burst to catch up after a stall: that would
                // measure the harness, not the gateway.
                let now = tokio::time::Instant::now();
                if next < now {
                    next = now;
                }
            }
            r = c.recv() => match r {
                Ok(Incoming::Frames(frames)) => {
                    let now = now_ns();
                    for (rid, f) in frames {
                        match f {
                            ServerFrame::MessageSent(_) => {
                                acked.fetch_add(1, Ordering::Relaxed);
                                expected.fetch_add(members - 1, Ordering::Relaxed);
                                if let Some(t) = sent_at.remove(&rid) {
                                    meter.record("ack", t.elapsed());
                                }
                            }
                            ServerFrame::Error(e) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                tracing_free_log(&format!("publisher {id}: server error {}", e.code));
                            }
                            ServerFrame::NewMessage(m) => {
                                arrivals.message(id, now, &m.message.body);
                            }
                            _ => {}
                        }
                    }
                }
                other => {
                    ended_early(format!("{other:?}"));
                    if sending {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            },
            _ = stop.changed() => if *stop.borrow() == "stop" {
                let _ = c.close().await;
                return;
            },
        }
    }
}

/// `chat`: all connections open first (each in one room of `room_size`
/// members); on "go" every connection runs a realistic mix for
/// `seconds` (sends, typing, reactions, history pages, reconnects with
/// resume), then keeps reading until "stop" so that every message sent
/// can arrive. Sends carry the sender's id and its own sequence, so each
/// receiver checks every sender's messages for duplicates and gaps, and
/// each acknowledged send expects one delivery per other room member.
async fn chat(spec: Spec, meter: Arc<Meter>) -> anyhow::Result<()> {
    let p = &spec.params;
    let total = param(p, "connections", 200);
    let room_size = param(p, "room_size", 20).max(2);
    let seconds = param(p, "seconds", 20);
    let think_ms = param(p, "think_ms", 2000).max(50);
    let concurrency = param(p, "concurrency", 64) as usize;
    let targets = targets(&spec)?;
    let mut commands = crate::worker::commands();
    let source = source_address(spec.worker + spec.workers * (run_id(&spec) % 64) as usize);
    let run = run_id(&spec);
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let connected = meter.counter("connected");
    let failed = meter.counter("failed");
    // Everyone is in the room before anyone sends: a member that joined
    // late would rightly miss earlier messages, which would read as loss.
    let mut pending = Vec::new();
    for i in (0..total).filter(|i| *i as usize % spec.workers == spec.worker) {
        let permit = gate.clone().acquire_owned().await?;
        let target = targets[i as usize % targets.len()].clone();
        let (user, room) = chatter(run, i, room_size);
        let token = crate::token(&spec.secret, &user);
        let meter = meter.clone();
        pending.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = session(&target, source, token.clone(), std::slice::from_ref(&room)).await;
            drop(permit);
            if r.is_ok() {
                meter.record("connect", t0.elapsed());
            }
            (i, target, token, room, r)
        }));
    }
    let mut chatters = Vec::new();
    for t in pending {
        let (i, target, token, room, r) = t.await?;
        match r {
            Ok((c, ready)) => {
                connected.fetch_add(1, Ordering::Relaxed);
                // Room r holds chatters r*room_size .. (r+1)*room_size-1.
                let first = i / room_size * room_size;
                let members = room_size.min(total - first);
                chatters.push(Chatter::new(
                    i, c, ready, room, members, target, source, token, think_ms, &meter,
                ));
            }
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                tracing_free_log(&format!("chatter {i}: connect failed: {e:#}"));
            }
        }
    }
    meter
        .counter("workers_connected")
        .store(1, Ordering::Relaxed);
    if !wait_for(&mut commands, "go").await {
        return Ok(());
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for ch in chatters {
        let stop = commands.clone();
        tasks.push(tokio::spawn(ch.run(until, stop)));
    }
    join_all(tasks).await
}

/// Chatter `i` of run `run`: its user id and its room (rooms of
/// `room_size`, at least 2, as `chat` makes them).
pub fn chatter(run: u64, i: u64, room_size: u64) -> (String, String) {
    (
        format!("chatter-{run}-{i}"),
        format!("chat-{}", i / room_size.max(2)),
    )
}

/// One chat connection: its session, its position in its room (for
/// resume), and its account of what it sent and received.
struct Chatter {
    i: u64,
    c: RawConnection,
    session_id: SessionId,
    room: String,
    /// Members of the room, this one included.
    members: u64,
    target: Target,
    source: std::net::IpAddr,
    token: String,
    think_ms: u64,
    /// (epoch, seq) of the last room event seen, own acks included.
    position: (u64, u64),
    last_msg: Option<u64>,
    /// This chatter's own message sequence (1, 2, ...), in its bodies.
    sends: u64,
    rid: u32,
    rng: u64,
    arrivals: Arrivals,
    meter: Arc<Meter>,
}

impl Chatter {
    #[allow(clippy::too_many_arguments)]
    fn new(
        i: u64,
        c: RawConnection,
        ready: Ready,
        room: String,
        members: u64,
        target: Target,
        source: std::net::IpAddr,
        token: String,
        think_ms: u64,
        meter: &Arc<Meter>,
    ) -> Self {
        let position = ready
            .rooms
            .iter()
            .find(|r| r.room == room)
            .map(|r| (r.epoch, r.seq))
            .unwrap_or((0, 0));
        Chatter {
            i,
            c,
            session_id: ready.session_id,
            room,
            members,
            target,
            source,
            token,
            think_ms,
            position,
            last_msg: None,
            sends: 0,
            rid: 10,
            rng: i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            arrivals: Arrivals::new(meter).publishing_as(i + 1),
            meter: meter.clone(),
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Acts until `until`, then reads until "stop". A chatter that ends
    /// early is counted: `closed_early` when its connection closed,
    /// `errors` for anything else. Either fails `--check`, since its
    /// room's deliveries to it stop there.
    async fn run(mut self, until: Instant, mut stop: watch::Receiver<String>) {
        let finished = self.meter.counter("finished");
        let result = self.act_until(until).await;
        finished.fetch_add(1, Ordering::Relaxed);
        let result = match result {
            Ok(()) => self.drain(&mut stop).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let key = if e.downcast_ref::<Closed>().is_some() {
                "closed_early"
            } else {
                "errors"
            };
            self.meter.counter(key).fetch_add(1, Ordering::Relaxed);
            tracing_free_log(&format!("chatter {}: {e:#}", self.i));
        }
    }

    async fn act_until(&mut self, until: Instant) -> anyhow::Result<()> {
        loop {
            // Think, reading whatever arrives meanwhile.
            let think = Duration::from_millis(self.think_ms / 2 + self.next() % self.think_ms);
            self.read_for(think).await?;
            if Instant::now() >= until {
                return Ok(());
            }
            self.act().await?;
        }
    }

    /// Reads events for `d`.
    async fn read_for(&mut self, d: Duration) -> anyhow::Result<()> {
        let wake = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(wake, self.c.recv()).await {
                Err(_) => return Ok(()),
                Ok(Ok(Incoming::Frames(frames))) => {
                    let now = now_ns();
                    for (rid, f) in frames {
                        self.unasked(rid, f, now);
                    }
                }
                Ok(Ok(Incoming::Closed(code))) => return Err(Closed(code).into()),
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// After acting: reads until the coordinator says "stop" (it waits
    /// until every acknowledged message has arrived, or nothing more
    /// does), heartbeating meanwhile.
    async fn drain(&mut self, stop: &mut watch::Receiver<String>) -> anyhow::Result<()> {
        let mut beat = tokio::time::interval(Duration::from_secs(20));
        beat.tick().await;
        loop {
            tokio::select! {
                _ = stop.changed() => if *stop.borrow() == "stop" {
                    let _ = self.c.close().await;
                    return Ok(());
                },
                _ = beat.tick() => self.c.send(0, &ClientFrame::Heartbeat).await?,
                r = self.c.recv() => match r? {
                    Incoming::Frames(frames) => {
                        let now = now_ns();
                        for (rid, f) in frames {
                            self.unasked(rid, f, now);
                        }
                    }
                    Incoming::Closed(code) => return Err(Closed(code).into()),
                },
            }
        }
    }

    /// Moves the room position to (epoch, seq); a new epoch starts over.
    fn advance(&mut self, epoch: u64, seq: u64) {
        if epoch != self.position.0 {
            self.position = (epoch, seq);
        } else {
            self.position.1 = self.position.1.max(seq);
        }
    }

    /// An Error the scenario did not provoke: every one fails `--check`
    /// (`error_replies`); per-code counters say which.
    fn server_error(&self, e: &ErrorBody) {
        let name = chatgate_protocol::ErrorCode::from_u16(e.code).map_or("unknown", |c| c.name());
        self.meter
            .counter("error_replies")
            .fetch_add(1, Ordering::Relaxed);
        self.meter
            .counter(&format!("error_{name}"))
            .fetch_add(1, Ordering::Relaxed);
        tracing_free_log(&format!(
            "chatter {}: server error {name}: {}",
            self.i, e.message
        ));
    }

    /// A frame that answers no pending request: an event (request id 0),
    /// or an Error for a request id 0. Anything else is a reply nobody
    /// waits for.
    fn unasked(&mut self, rid: u32, f: ServerFrame, now: u64) {
        match f {
            ServerFrame::NewMessage(m) => {
                self.advance(m.epoch, m.message.seq);
                self.last_msg = Some(m.message.id);
                self.arrivals.message(self.i, now, &m.message.body);
            }
            ServerFrame::Reaction(r) => self.advance(r.epoch, r.seq),
            ServerFrame::UserTyping(_) => {
                self.meter
                    .counter("typing_received")
                    .fetch_add(1, Ordering::Relaxed);
            }
            ServerFrame::Error(e) => self.server_error(&e),
            ServerFrame::HeartbeatAck(_) => {}
            other => {
                self.meter
                    .counter("unexpected_replies")
                    .fetch_add(1, Ordering::Relaxed);
                tracing_free_log(&format!(
                    "chatter {}: unexpected {:?} with request id {rid}",
                    self.i,
                    other.opcode()
                ));
            }
        }
    }

    /// One action of the mix, answered before the next.
    async fn act(&mut self) -> anyhow::Result<()> {
        self.rid += 1;
        let rid = self.rid;
        let roll = self.next() % 100;
        let started = Instant::now();
        let room = self.room.clone();
        let (name, frame) = match roll {
            0..=39 => {
                self.sends += 1;
                (
                    "send",
                    ClientFrame::Send(Send {
                        room,
                        client_msg_id: format!("chat-{}-{}-{}", self.i, rid, now_ns()),
                        body: stamp(self.i + 1, self.sends, 60),
                        attachments: vec![],
                    }),
                )
            }
            40..=74 => ("typing", ClientFrame::Typing(Typing { room })),
            75..=86 => match self.last_msg {
                Some(id) => {
                    let remove = self.next().is_multiple_of(2);
                    (
                        "react",
                        ClientFrame::React(React {
                            room,
                            message_id: id,
                            emoji: "👍".into(),
                            remove,
                        }),
                    )
                }
                None => ("typing", ClientFrame::Typing(Typing { room })),
            },
            87..=97 => (
                "history",
                ClientFrame::History(History {
                    room,
                    before: None,
                    limit: 50,
                }),
            ),
            _ => return self.resume().await,
        };
        self.c.send(rid, &frame).await?;
        let (answer, others) =
            crate::conn::reply(&mut self.c, rid, Duration::from_secs(20)).await?;
        let now = now_ns();
        for (r, f) in others {
            self.unasked(r, f, now);
        }
        let ok = match (name, answer) {
            (_, ServerFrame::Error(e)) => {
                self.server_error(&e);
                false
            }
            // A fresh client_msg_id acknowledged as a duplicate: the
            // gateway took a new message for a retry and did not deliver it.
            ("send", ServerFrame::MessageSent(m)) if !m.duplicate => {
                self.advance(m.epoch, m.seq);
                self.meter.counter("acked").fetch_add(1, Ordering::Relaxed);
                self.meter
                    .counter("expected")
                    .fetch_add(self.members - 1, Ordering::Relaxed);
                true
            }
            ("react", ServerFrame::Reacted(r)) => {
                // seq 0: nothing changed, nothing published (§5.1).
                if r.seq != 0 {
                    self.advance(r.epoch, r.seq);
                }
                true
            }
            ("typing", ServerFrame::Ok) | ("history", ServerFrame::HistoryPage(_)) => true,
            (_, other) => {
                self.meter
                    .counter("unexpected_replies")
                    .fetch_add(1, Ordering::Relaxed);
                tracing_free_log(&format!(
                    "chatter {}: {name} answered with {:?}",
                    self.i,
                    other.opcode()
                ));
                false
            }
        };
        if ok {
            self.meter.record(name, started.elapsed());
        }
        self.meter.counter(name).fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the connection and resumes from the last position on a new
    /// one. The replay (between Ready and Resumed) and any live events
    /// sharing Resumed's message are accounted like any other delivery:
    /// they are what makes a resume gapless.
    async fn resume(&mut self) -> anyhow::Result<()> {
        let _ = self.c.close().await;
        let t0 = Instant::now();
        let mut nc = crate::conn::connect_from(&self.target, self.source).await?;
        let resume = Resume {
            session_id: self.session_id,
            positions: vec![RoomPosition {
                room: self.room.clone(),
                epoch: self.position.0,
                seq: self.position.1,
            }],
        };
        nc.send(
            1,
            &ClientFrame::Identify(Identify {
                token: self.token.clone(),
                resume: Some(resume),
            }),
        )
        .await?;
        self.c = nc;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut resumed = false;
        while !resumed {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frames = match self.c.recv_timeout(left).await? {
                Some(Incoming::Frames(frames)) => frames,
                Some(Incoming::Closed(code)) => return Err(Closed(code).into()),
                None => anyhow::bail!("no Resumed within 20 s"),
            };
            let now = now_ns();
            for (rid, f) in frames {
                match f {
                    ServerFrame::Ready(r) if rid == 1 => self.session_id = r.session_id,
                    ServerFrame::Resumed(r) => {
                        resumed = true;
                        let key = if r.rooms.iter().all(|r| r.recovered) {
                            "resumed_ok"
                        } else {
                            "resumed_gap"
                        };
                        self.meter.counter(key).fetch_add(1, Ordering::Relaxed);
                        if let Some(rr) = r.rooms.iter().find(|rr| rr.room == self.room) {
                            self.position = (rr.epoch, rr.seq);
                        }
                    }
                    other => self.unasked(rid, other, now),
                }
            }
        }
        self.meter.record("resume", t0.elapsed());
        Ok(())
    }
}
