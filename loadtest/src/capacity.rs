//! What one Redis (or each master of a Redis Cluster) carries for the
//! cluster: `redis-capacity`.
//!
//! The fan-out scenarios pace messages through real gateways, which on a
//! small machine run out of CPU long before Redis does; Redis's command
//! time per message at such a low rate is also mostly a cold core (a
//! script that takes ~1.5 µs back to back takes ~7 µs at one call per
//! millisecond, measured with `redis-cli` on a private server). This
//! scenario drives Redis as hard as the gateway's own fan-out engine can:
//! `nodes` engines in this process (each with its own connections, as
//! separate gateway processes have), every one subscribed to every room
//! (the `spread` shape: each event is written to every node), publishes
//! kept `in_flight` at once, each one what a gateway does per send (the
//! per-user rate limit's lease, then the publish script; its ack waits for
//! the publishing engine's own live delivery). Redis's CPU (user + system,
//! from `INFO`) divided by the acknowledged messages is its cost per
//! message, network writes included; how busy it was says whether it or
//! this process was the bottleneck.
//!
//! Every engine checks what it receives: each room's numbers arrive once
//! each and in order, or the run reports what was lost or repeated.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use chatgate_fanout::cluster::Cluster;
use chatgate_fanout::{Fanout, LocalDelivery, RedisFanoutConfig, RedisStreamsFanout, RoomEvent};
use chatgate_protocol::payload::Message;
use chatgate_protocol::{Codec, ServerFrame};
use fred::interfaces::{ClientLike, ClusterInterface};
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::probes::{self, Snapshot};
use crate::report;

/// What to run.
#[derive(Debug, Clone)]
pub struct CapacityOptions {
    /// The engines' Redis URL (`redis://`, or `redis-cluster://` for a
    /// Redis Cluster).
    pub url: String,
    /// Every Redis server to read `INFO` from (the masters of a cluster).
    pub servers: Vec<String>,
    /// Engines, each subscribed to every room.
    pub nodes: usize,
    /// Rooms published to, round robin.
    pub rooms: usize,
    /// Publishes awaiting their ack at once (over all engines).
    pub in_flight: usize,
    /// Messages per rate-limit call: one lease call per this many sends
    /// (at the gateway's default of 60 a minute a node leases 3 tokens for
    /// 2 s, so a user sending at the cap renews about every 2 sends).
    pub sends_per_lease: u64,
    /// Seconds measured (after 2 s of warm-up).
    pub seconds: u64,
    /// Message body bytes.
    pub body: usize,
    /// Replicas each publish waits for before it is published live and
    /// acknowledged (the gateway's `redis_wait_replicas`).
    pub wait_replicas: u32,
}

/// Per-room numbers one engine received, checked as they come.
#[derive(Default)]
struct Checker {
    next: Mutex<HashMap<String, u64>>,
    delivered: AtomicU64,
    repeated: AtomicU64,
    skipped: AtomicU64,
}

impl LocalDelivery for Checker {
    fn deliver(&self, room: &str, frame: &Bytes, _exclude: Option<u64>, _ephemeral: bool) {
        let seq = match Codec::default().decode_server(frame) {
            Ok((_, ServerFrame::NewMessage(m))) => m.message.seq,
            _ => return,
        };
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let mut next = self.next.lock();
        // Every room starts where its position was read, before the run.
        match next.get_mut(room) {
            None => {}
            Some(n) if seq == *n => *n += 1,
            Some(n) if seq < *n => {
                self.repeated.fetch_add(1, Ordering::Relaxed);
            }
            Some(n) => {
                self.skipped.fetch_add(seq - *n, Ordering::Relaxed);
                *n = seq + 1;
            }
        }
    }
}

/// Reads `INFO` from every server and adds them up.
async fn read_all(servers: &[String]) -> anyhow::Result<(Snapshot, Vec<f64>)> {
    let mut total = Snapshot::default();
    let mut cpu = Vec::with_capacity(servers.len());
    for s in servers {
        let one = probes::redis_snapshot(s)
            .await
            .with_context(|| format!("INFO from {s}"))?;
        cpu.push(one.redis_cpu_seconds().unwrap_or(0.0));
        total.add_redis(&one);
    }
    Ok((total, cpu))
}

fn message(room: &str, id: u64, body: &str) -> RoomEvent {
    RoomEvent::Message(Message {
        id,
        room: room.to_owned(),
        seq: 0,
        sender_id: format!("u{}", id % 1024),
        sender_name: "capacity".into(),
        sender_image: String::new(),
        client_msg_id: format!("c{id}"),
        body: body.to_owned(),
        attachments: vec![],
        reactions: vec![],
        created_at_ms: 1,
    })
}

/// The `host:port` of every server a Redis URL names: the address and,
/// for a cluster URL, each `node=` seed.
fn url_hosts(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let main = main.rsplit_once('@').map_or(main, |(_, h)| h);
    let mut hosts = vec![main.split('/').next().unwrap_or(main).to_owned()];
    hosts.extend(
        query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("node="))
            .map(str::to_owned),
    );
    hosts
}

/// Refuses any server that is not on this machine's loopback.
async fn loopback_only(urls: &[&str]) -> anyhow::Result<()> {
    for url in urls {
        for host in url_hosts(url) {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(host.as_str())
                .await
                .with_context(|| format!("resolving {host}"))?
                .collect();
            anyhow::ensure!(
                !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()),
                "the load harness only targets loopback addresses (got {host})"
            );
        }
    }
    Ok(())
}

/// A cluster's seeds may be on loopback while the servers it announces
/// (and the engines would then connect to) are not: asks a seed, on a
/// plain connection, before any engine connects.
async fn announced_loopback_only(url: &str) -> anyhow::Result<()> {
    let Some(rest) = url
        .strip_prefix("redis-cluster://")
        .or_else(|| url.strip_prefix("rediss-cluster://"))
    else {
        return Ok(());
    };
    let seed = url_hosts(rest).into_iter().next().unwrap_or_default();
    let scheme = if url.starts_with("rediss") {
        "rediss"
    } else {
        "redis"
    };
    let client = chatgate_fanout::redis::redis_client(
        &format!("{scheme}://{seed}"),
        None,
        Some(Duration::from_secs(2)),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let _task = client.init().await?;
    let slots: fred::types::Value = client.cluster_slots().await?;
    let _ = client.quit().await;
    let fred::types::Value::Array(ranges) = slots else {
        anyhow::bail!("unexpected CLUSTER SLOTS reply from {seed}");
    };
    for range in ranges {
        let fred::types::Value::Array(parts) = range else {
            continue;
        };
        for node in parts.into_iter().skip(2) {
            let fred::types::Value::Array(node) = node else {
                continue;
            };
            let host = node.first().and_then(|h| h.as_string()).unwrap_or_default();
            let port = node.get(1).and_then(|p| p.as_u64()).unwrap_or(0);
            // An empty host means "the address you reached me at".
            let host = if host.is_empty() {
                seed.clone()
            } else {
                format!("{host}:{port}")
            };
            loopback_only(&[host.as_str()]).await?;
        }
    }
    Ok(())
}

/// Runs the scenario and returns its report.
pub async fn run(o: &CapacityOptions) -> anyhow::Result<Value> {
    anyhow::ensure!(o.nodes >= 1 && o.rooms >= 1 && o.in_flight >= 1);
    let mut urls = vec![o.url.as_str()];
    urls.extend(o.servers.iter().map(String::as_str));
    loopback_only(&urls).await?;
    announced_loopback_only(&o.url).await?;
    let namespace = format!("cap{}", std::process::id());
    let mut engines = Vec::with_capacity(o.nodes);
    let mut checkers = Vec::with_capacity(o.nodes);
    for i in 0..o.nodes {
        let checker = Arc::new(Checker::default());
        let mut config = RedisFanoutConfig::new(o.url.clone(), format!("cap{i}"));
        config.namespace = namespace.clone();
        config.replicas = o.wait_replicas;
        // What a run leaves in Redis goes with the recovery window.
        config.stream_idle_ttl = config.recovery_window;
        let engine = RedisStreamsFanout::connect(config, Codec::default(), checker.clone())
            .await
            .map_err(|e| anyhow::anyhow!("engine {i}: {e}"))?;
        let limits = Cluster::new(engine.client().clone(), &namespace, &format!("cap{i}"));
        engines.push(Arc::new((engine, limits)));
        checkers.push(checker);
    }
    let rooms: Arc<Vec<String>> = Arc::new((0..o.rooms).map(|r| format!("cap-{r}")).collect());
    // Reading a room's position is how the gateway subscribes a node to
    // it (after adding its first member there).
    // All at once on every engine, as when a restarted node's members
    // come back and join their rooms.
    let subscribing = Instant::now();
    let mut joins = tokio::task::JoinSet::new();
    for (e, checker) in engines.iter().zip(&checkers) {
        for room in rooms.iter() {
            let (e, checker, room) = (e.clone(), checker.clone(), room.clone());
            joins.spawn(async move {
                let at = e.0.position(&room).await?;
                checker.next.lock().insert(room, at.seq + 1);
                Ok::<(), chatgate_fanout::FanoutError>(())
            });
        }
    }
    while let Some(joined) = joins.join_next().await {
        joined?.map_err(|err| anyhow::anyhow!("position: {err}"))?;
    }
    let subscribed_ms = subscribing.elapsed().as_secs_f64() * 1e3;
    println!(
        "subscribed {} rooms on each of {} engine(s) at once in {subscribed_ms:.0} ms",
        o.rooms, o.nodes
    );
    let body: Arc<str> = "x".repeat(o.body).into();
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let reasons: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let latency = Arc::new(Mutex::new(report::histogram()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let warmup = Duration::from_secs(2);
    let stop_at = Instant::now() + warmup + Duration::from_secs(o.seconds);
    let mut tasks = Vec::with_capacity(o.in_flight);
    for t in 0..o.in_flight {
        let engine = engines[t % engines.len()].clone();
        let reasons = reasons.clone();
        let (rooms, body, sent, acked, failed, latency, measuring) = (
            rooms.clone(),
            body.clone(),
            sent.clone(),
            acked.clone(),
            failed.clone(),
            latency.clone(),
            measuring.clone(),
        );
        let per_lease = o.sends_per_lease.max(1);
        tasks.push(tokio::spawn(async move {
            let mut local = report::histogram();
            // Every acknowledged (room, number), warm-up included.
            let mut mine: Vec<(usize, u64)> = Vec::new();
            while Instant::now() < stop_at {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                let index = (n % rooms.len() as u64) as usize;
                let room = &rooms[index];
                let started = Instant::now();
                if n % per_lease == 0 {
                    let user = format!("u{}", n % 1024);
                    let _ = engine.1.take_messages(&user, 1_000_000, 3).await;
                }
                match engine
                    .0
                    .publish(room, message(room, n + 1, &body), None, None)
                    .await
                {
                    Ok(published) => {
                        mine.push((index, published.position.seq));
                        if measuring.load(Ordering::Relaxed) {
                            acked.fetch_add(1, Ordering::Relaxed);
                            report::record(&mut local, started.elapsed());
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        *reasons.lock().entry(e.to_string()).or_default() += 1;
                    }
                }
            }
            let _ = latency.lock().add(&local);
            mine
        }));
    }
    tokio::time::sleep(warmup).await;
    let delivered_before: Vec<u64> = checkers
        .iter()
        .map(|c| c.delivered.load(Ordering::Relaxed))
        .collect();
    let (from, cpu_from) = read_all(&o.servers).await?;
    let own_from = probes::process_cpu(std::process::id());
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (to, cpu_to) = read_all(&o.servers).await?;
    let own_to = probes::process_cpu(std::process::id());
    let delivered: u64 = checkers
        .iter()
        .zip(&delivered_before)
        .map(|(c, b)| c.delivered.load(Ordering::Relaxed) - b)
        .sum();
    let mut acked_all: Vec<(usize, u64)> = Vec::new();
    for t in tasks {
        if let Ok(mine) = t.await {
            acked_all.extend(mine);
        }
    }
    // Per engine, the acknowledged events it has not delivered: numbers
    // at or past where its room's run of delivered numbers stops.
    let undelivered = |c: &Checker| -> u64 {
        let next = c.next.lock();
        acked_all
            .iter()
            .filter(|(room, seq)| next.get(&rooms[*room]).is_none_or(|n| seq >= n))
            .count() as u64
    };
    // Let the last events reach every engine before the checks.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && checkers.iter().any(|c| undelivered(c) > 0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked = acked.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    let expected = acked_all.len() as u64 * o.nodes as u64;
    let missing: u64 = checkers.iter().map(|c| undelivered(c)).sum();
    let delivered_all = expected - missing;
    let repeated: u64 = checkers
        .iter()
        .map(|c| c.repeated.load(Ordering::Relaxed))
        .sum();
    let skipped: u64 = checkers
        .iter()
        .map(|c| c.skipped.load(Ordering::Relaxed))
        .sum();

    let rate = acked as f64 / elapsed;
    let redis_busy: Vec<f64> = cpu_from
        .iter()
        .zip(&cpu_to)
        .map(|(a, b)| (b - a) / elapsed)
        .collect();
    let busy_total: f64 = redis_busy.iter().sum();
    let cpu_us = if acked == 0 {
        0.0
    } else {
        busy_total * elapsed / acked as f64 * 1e6
    };
    let own_busy = match (own_from, own_to) {
        (Some(a), Some(b)) => (b - a) / elapsed,
        _ => 0.0,
    };
    let hist = latency.lock().clone();
    println!(
        "redis-capacity: {} engine(s), {} rooms, {} in flight, {:.0} s: {acked} acked ({rate:.0}/s), {delivered} deliveries, failed {failed}, lost {missing}, repeated {repeated}, skipped {skipped}",
        o.nodes, o.rooms, o.in_flight, elapsed
    );
    println!("{}", report::line("send -> ack", &hist));
    let mut reasons: Vec<(String, u64)> = reasons.lock().drain().collect();
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    for (why, n) in reasons.iter().take(5) {
        println!("  failed {n}: {why}");
    }
    println!(
        "redis busy {:.0}% of one core ({}), this process {:.0}%",
        busy_total * 100.0,
        redis_busy
            .iter()
            .zip(&o.servers)
            .map(|(b, s)| format!("{s} {:.0}%", b * 100.0))
            .collect::<Vec<_>>()
            .join(", "),
        own_busy * 100.0
    );
    // Below saturation each call finds a colder core and reads fewer
    // commands per wake-up: the cost per message is then an upper bound
    // (and the rate a lower one).
    println!(
        "redis CPU per acked message: {cpu_us:.1} us => one busy Redis core carries {:.0} msg/s of this shape{}",
        if cpu_us > 0.0 { 1e6 / cpu_us } else { 0.0 },
        // One server busy, or several sharing a core (as the script pins
        // them) busy together.
        if busy_total >= 0.9 || redis_busy.iter().any(|b| *b >= 0.9) {
            ""
        } else {
            " (Redis was not saturated: a lower bound)"
        }
    );
    let per_message = probes::redis_per_message(&from, &to, acked, delivered);
    Ok(json!({
        "scenario": "redis-capacity",
        "nodes": o.nodes,
        "rooms": o.rooms,
        "in_flight": o.in_flight,
        "sends_per_lease": o.sends_per_lease,
        "body": o.body,
        "subscribed_ms": subscribed_ms,
        "wait_replicas": o.wait_replicas,
        "seconds": elapsed,
        "servers": o.servers,
        "acked": acked,
        "acked_per_second": rate,
        "deliveries": delivered,
        // The whole run, warm-up included, as `--check` reads it:
        // acknowledged events delivered on every engine (events whose
        // publish failed but that went out anyway are not counted).
        "summary": {
            "failed": failed,
            "lost": missing,
            "duplicated": repeated,
            "gaps": skipped,
            "delivered": delivered_all,
            "expected": expected,
        },
        "ack": report::json(&hist),
        "failures": reasons.iter().map(|(why, n)| json!({ "error": why, "count": n })).collect::<Vec<_>>(),
        "redis_busy_per_server": redis_busy,
        "redis_busy": busy_total,
        "harness_busy": own_busy,
        "redis_cpu_us_per_message": cpu_us,
        "messages_per_redis_core": if cpu_us > 0.0 { 1e6 / cpu_us } else { 0.0 },
        "redis": per_message,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_of_a_url_is_named() {
        assert_eq!(
            url_hosts("redis://127.0.0.1:6379/0"),
            vec!["127.0.0.1:6379"]
        );
        assert_eq!(
            url_hosts("redis://user:pw@localhost:7000"),
            vec!["localhost:7000"]
        );
        assert_eq!(
            url_hosts("redis-cluster://127.0.0.1:1?node=127.0.0.2:2&node=10.0.0.1:3"),
            vec!["127.0.0.1:1", "127.0.0.2:2", "10.0.0.1:3"]
        );
    }

    #[tokio::test]
    async fn servers_off_loopback_are_refused() {
        assert!(loopback_only(&["redis://127.0.0.1:6379"]).await.is_ok());
        let err = loopback_only(&["redis-cluster://127.0.0.1:1?node=10.0.0.1:3"])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }
}
