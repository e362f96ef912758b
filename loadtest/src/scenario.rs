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

use crate::conn::{Target, session, source_address};
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
}

impl Arrivals {
    fn new(meter: &Meter) -> Self {
        Arrivals {
            received: meter.counter("received"),
            dups: meter.counter("duplicates"),
            gaps: meter.counter("gaps"),
            delivery: meter.recorder("delivery"),
            order: Order::default(),
        }
    }

    /// Accounts a NewMessage with this `body`, received at `now` (ns);
    /// `key` spreads recording over the recorder's shards.
    fn message(&mut self, key: u64, now: u64, body: &str) {
        if let Some((publisher, seq, sent)) = parse_stamp(body) {
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
async fn member_loop(
    id: u64,
    mut c: RawConnection,
    meter: Arc<Meter>,
    mut stop: watch::Receiver<String>,
) {
    let closed = meter.counter("closed_by_server");
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
                    return;
                }
            }
            r = c.recv() => match r {
                Ok(Incoming::Frames(frames)) => {
                    let now = now_ns();
                    for (_, f) in frames {
                        if let ServerFrame::NewMessage(m) = f {
                            arrivals.message(id, now, &m.message.body);
                        }
                    }
                }
                _ => {
                    closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
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
        // Keep the publisher's acks drained until stop.
        let mut stop = commands.clone();
        loop {
            tokio::select! {
                _ = publisher.recv() => {}
                _ = stop.changed() => if *stop.borrow() == "stop" { break },
            }
        }
    }
    wait_for(&mut commands, "stop").await;
    for j in joins {
        let _ = j.await;
    }
    Ok(())
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
        let target = targets[j as usize % targets.len()].clone();
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
    for j in joins {
        let _ = j.await;
    }
    Ok(())
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
    let mut arrivals = Arrivals::new(&meter);
    let mut sent_at: HashMap<u32, Instant> = HashMap::new();
    // Publishers start at spread-out phases of their interval: started
    // together, every room would publish in the same instant and the run
    // would measure one synchronized burst per interval, not a rate.
    let phase = (id as f64 * 0.618_033_988_75).fract();
    let mut next = tokio::time::Instant::now() + interval.mul_f64(phase);
    let mut seq = 0u64;
    let mut sending = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next), if sending => {
                if Instant::now() >= until {
                    sending = false;
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
                if c.send(rid, &frame).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
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
                            ServerFrame::Error(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            ServerFrame::NewMessage(m) => {
                                arrivals.message(id, now, &m.message.body);
                            }
                            _ => {}
                        }
                    }
                }
                _ => return,
            },
            _ = stop.changed() => if *stop.borrow() == "stop" {
                let _ = c.close().await;
                return;
            },
        }
    }
}

/// `chat`: every connection runs a realistic mix for `seconds`: sends,
/// typing, reactions, history pages, and reconnects with resume.
async fn chat(spec: Spec, meter: Arc<Meter>) -> anyhow::Result<()> {
    let p = &spec.params;
    let total = param(p, "connections", 200);
    let room_size = param(p, "room_size", 20).max(2);
    let seconds = param(p, "seconds", 20);
    let think_ms = param(p, "think_ms", 2000).max(50);
    let targets = targets(&spec)?;
    let mut commands = crate::worker::commands();
    let source = source_address(spec.worker + spec.workers * (run_id(&spec) % 64) as usize);
    let until = Instant::now() + Duration::from_secs(seconds + 5);
    meter
        .counter("workers_connected")
        .store(1, Ordering::Relaxed);
    if !wait_for(&mut commands, "go").await {
        return Ok(());
    }
    let mut tasks = Vec::new();
    for i in (0..total).filter(|i| *i as usize % spec.workers == spec.worker) {
        let target = targets[i as usize % targets.len()].clone();
        let meter = meter.clone();
        let secret = spec.secret.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = chatter(
                i, &target, source, &secret, room_size, think_ms, until, &meter,
            )
            .await
            {
                meter.counter("errors").fetch_add(1, Ordering::Relaxed);
                tracing_free_log(&format!("chatter {i}: {e:#}"));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn chatter(
    i: u64,
    target: &Target,
    source: std::net::IpAddr,
    secret: &str,
    room_size: u64,
    think_ms: u64,
    until: Instant,
    meter: &Meter,
) -> anyhow::Result<()> {
    use crate::conn::reply;
    let run = now_ns();
    let room = format!("chat-{}", i / room_size);
    let token = crate::token(secret, &format!("chatter-{run}-{i}"));
    let t0 = Instant::now();
    let (mut c, ready) =
        session(target, source, token.clone(), std::slice::from_ref(&room)).await?;
    meter.record("connect", t0.elapsed());
    meter.counter("connected").fetch_add(1, Ordering::Relaxed);
    let mut position = ready
        .rooms
        .iter()
        .find(|r| r.room == room)
        .map(|r| (r.epoch, r.seq))
        .unwrap_or((0, 0));
    let mut last_msg: Option<u64> = None;
    let delivery = meter.recorder("delivery");
    let received = meter.counter("received");
    let typing = meter.counter("typing_received");
    let mut rid = 10u32;
    let mut rng = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    while Instant::now() + Duration::from_secs(5) < until {
        // Think, reading whatever arrives meanwhile.
        let think = Duration::from_millis(think_ms / 2 + next() % think_ms);
        let wake = tokio::time::Instant::now() + think;
        loop {
            match tokio::time::timeout_at(wake, c.recv()).await {
                Err(_) => break,
                Ok(Ok(Incoming::Frames(frames))) => {
                    let now = now_ns();
                    for (_, f) in frames {
                        match f {
                            ServerFrame::NewMessage(m) => {
                                position = (m.epoch, position.1.max(m.message.seq));
                                last_msg = Some(m.message.id);
                                if let Some((_, _, sent)) = parse_stamp(&m.message.body) {
                                    delivery.record_micros(i, now.saturating_sub(sent) / 1000);
                                }
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                            ServerFrame::Reaction(r) => position = (r.epoch, position.1.max(r.seq)),
                            ServerFrame::UserTyping(_) => {
                                typing.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                }
                Ok(_) => anyhow::bail!("connection closed"),
            }
        }
        rid += 1;
        let roll = next() % 100;
        let started = Instant::now();
        let (name, frame) = match roll {
            0..=39 => (
                "send",
                ClientFrame::Send(Send {
                    room: room.clone(),
                    client_msg_id: format!("chat-{run}-{i}-{rid}"),
                    body: stamp(i + 1, u64::from(rid), 60),
                    attachments: vec![],
                }),
            ),
            40..=74 => ("typing", ClientFrame::Typing(Typing { room: room.clone() })),
            75..=86 => match last_msg {
                Some(id) => (
                    "react",
                    ClientFrame::React(React {
                        room: room.clone(),
                        message_id: id,
                        emoji: "👍".into(),
                        remove: next() % 2 == 0,
                    }),
                ),
                None => ("typing", ClientFrame::Typing(Typing { room: room.clone() })),
            },
            87..=97 => (
                "history",
                ClientFrame::History(History {
                    room: room.clone(),
                    before: None,
                    limit: 50,
                }),
            ),
            _ => {
                // Drop the connection and resume from the last position.
                let _ = c.close().await;
                let t0 = Instant::now();
                let mut nc = crate::conn::connect_from(target, source).await?;
                let resume = Resume {
                    session_id: ready.session_id,
                    positions: vec![RoomPosition {
                        room: room.clone(),
                        epoch: position.0,
                        seq: position.1,
                    }],
                };
                nc.send(
                    1,
                    &ClientFrame::Identify(Identify {
                        token: token.clone(),
                        resume: Some(resume),
                    }),
                )
                .await?;
                loop {
                    let (f, _) = reply(&mut nc, 0, Duration::from_secs(20)).await?;
                    if let ServerFrame::Resumed(r) = f {
                        let key = if r.rooms.iter().all(|r| r.recovered) {
                            "resumed_ok"
                        } else {
                            "resumed_gap"
                        };
                        meter.counter(key).fetch_add(1, Ordering::Relaxed);
                        if let Some(rr) = r.rooms.first() {
                            position = (rr.epoch, rr.seq);
                        }
                        break;
                    }
                }
                meter.record("resume", t0.elapsed());
                c = nc;
                continue;
            }
        };
        c.send(rid, &frame).await?;
        let (answer, _) = reply(&mut c, rid, Duration::from_secs(20)).await?;
        match answer {
            ServerFrame::Error(e) => {
                meter
                    .counter(&format!("error_{}", e.code))
                    .fetch_add(1, Ordering::Relaxed);
            }
            ServerFrame::MessageSent(m) => {
                position = (m.epoch, position.1.max(m.seq));
                meter.record(name, started.elapsed());
            }
            _ => meter.record(name, started.elapsed()),
        }
        meter.counter(name).fetch_add(1, Ordering::Relaxed);
    }
    let _ = c.close().await;
    Ok(())
}
