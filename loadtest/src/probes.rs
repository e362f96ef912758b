//! What the rest of the deployment spent during a run: Postgres (CPU of
//! its processes, transactions, write transactions), Redis (CPU, command
//! time, bytes out) and the gateways' own store statement counters.
//!
//! A chat action's cost is not only the gateway's: a deployment pays for
//! the database and Redis work behind every send, history page and
//! reconnect. Each probe is read at phase marks (before connecting, when
//! the run starts, when it stops) and the report divides the differences
//! by what the harness did in between. Postgres's process CPU comes from
//! `/proc`, so those figures need the database on this machine; its
//! writing transactions come from the transaction id counter (read-only
//! ones take no id), its log volume from the WAL position.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Where to read from; every part is optional.
#[derive(Debug, Clone, Default)]
pub struct ProbeTargets {
    /// A Postgres URL on the gateways' database.
    pub postgres: Option<String>,
    /// A `redis://host:port` address of the Redis the gateways use.
    pub redis: Option<String>,
    /// Each gateway's Prometheus `/metrics` URL (`http://host:port/metrics`).
    pub metrics: Vec<String>,
}

impl ProbeTargets {
    /// Whether there is anything to read.
    pub fn any(&self) -> bool {
        self.postgres.is_some() || self.redis.is_some() || !self.metrics.is_empty()
    }
}

/// One reading of every probe.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    at: Option<Instant>,
    /// CPU seconds per Postgres process id (every backend and helper).
    pg_cpu: BTreeMap<i32, f64>,
    /// WAL position, in bytes: what the writes cost the log.
    pg_wal: Option<i64>,
    /// The next transaction id: it advances once per transaction that
    /// wrote (read-only ones take none).
    pg_next_xid: Option<i64>,
    /// Backends connected to the database.
    pg_backends: Option<i64>,
    redis_cpu: Option<f64>,
    /// Redis command time (µs) and calls, summed over commands.
    redis_usec: Option<f64>,
    redis_calls: Option<f64>,
    redis_net_out: Option<f64>,
    /// Per command: (calls, µs).
    redis_commands: BTreeMap<String, (f64, f64)>,
    /// `chat_store_statements_total` per statement, summed over gateways.
    statements: BTreeMap<String, f64>,
    problems: Vec<String>,
}

/// A reading under way, by label.
type Reading = (String, tokio::task::JoinHandle<Snapshot>);

/// Reads the probes at marks set from synchronous code (the coordinator's
/// tick), each reading in its own task.
#[derive(Clone)]
pub struct Probes {
    targets: Arc<ProbeTargets>,
    taken: Arc<Mutex<Vec<Reading>>>,
}

impl Probes {
    /// Probes for `targets` (nothing is read until [`Probes::mark`]).
    pub fn new(targets: ProbeTargets) -> Self {
        Probes {
            targets: Arc::new(targets),
            taken: Arc::default(),
        }
    }

    /// Starts a reading labelled `label`; needs a Tokio runtime.
    pub fn mark(&self, label: &str) {
        if !self.targets.any() {
            return;
        }
        let targets = self.targets.clone();
        let task = tokio::spawn(async move { snapshot(&targets).await });
        if let Ok(mut taken) = self.taken.lock() {
            taken.push((label.to_owned(), task));
        }
    }

    /// Waits for every reading and returns them by label.
    pub async fn readings(&self) -> BTreeMap<String, Snapshot> {
        let tasks = match self.taken.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => Vec::new(),
        };
        let mut out = BTreeMap::new();
        for (label, task) in tasks {
            if let Ok(s) = task.await {
                out.insert(label, s);
            }
        }
        out
    }
}

impl Snapshot {
    /// Redis's CPU seconds (user + system) at this reading.
    pub fn redis_cpu_seconds(&self) -> Option<f64> {
        self.redis_cpu
    }

    /// Adds another server's Redis reading to this one (the masters of a
    /// Redis Cluster, read one by one, as one Redis).
    pub fn add_redis(&mut self, other: &Snapshot) {
        fn sum(a: Option<f64>, b: Option<f64>) -> Option<f64> {
            match (a, b) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            }
        }
        self.at = self.at.or(other.at);
        self.redis_cpu = sum(self.redis_cpu, other.redis_cpu);
        self.redis_usec = sum(self.redis_usec, other.redis_usec);
        self.redis_calls = sum(self.redis_calls, other.redis_calls);
        self.redis_net_out = sum(self.redis_net_out, other.redis_net_out);
        for (name, (calls, usec)) in &other.redis_commands {
            let e = self.redis_commands.entry(name.clone()).or_default();
            e.0 += calls;
            e.1 += usec;
        }
    }
}

/// One Redis server's reading (`redis://host:port` or `host:port`).
pub async fn redis_snapshot(url: &str) -> anyhow::Result<Snapshot> {
    let mut s = Snapshot {
        at: Some(Instant::now()),
        ..Snapshot::default()
    };
    read_redis(url, &mut s).await?;
    Ok(s)
}

async fn snapshot(targets: &ProbeTargets) -> Snapshot {
    let mut s = Snapshot {
        at: Some(Instant::now()),
        ..Snapshot::default()
    };
    if let Some(url) = &targets.postgres
        && let Err(e) = read_postgres(url, &mut s).await
    {
        s.problems.push(format!("postgres: {e:#}"));
    }
    if let Some(addr) = &targets.redis
        && let Err(e) = read_redis(addr, &mut s).await
    {
        s.problems.push(format!("redis: {e:#}"));
    }
    for url in &targets.metrics {
        match read_metrics(url).await {
            Ok(m) => {
                for (k, v) in m {
                    *s.statements.entry(k).or_default() += v;
                }
            }
            Err(e) => s.problems.push(format!("metrics {url}: {e:#}")),
        }
    }
    s
}

async fn read_postgres(url: &str, s: &mut Snapshot) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting")?;
    let conn = tokio::spawn(connection);
    // The whole server's processes: backends of every database plus the
    // WAL writer, checkpointer and friends (their work is the writes').
    let rows = client
        .query("SELECT pid FROM pg_stat_activity", &[])
        .await?;
    for row in rows {
        let pid: i32 = row.get(0);
        if let Some(cpu) = process_cpu(pid as u32) {
            s.pg_cpu.insert(pid, cpu);
        }
    }
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
                    pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                    numbackends
             FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    s.pg_wal = Some(row.get(0));
    s.pg_next_xid = Some(row.get(1));
    s.pg_backends = Some(i64::from(row.get::<_, i32>(2)));
    drop(client);
    let _ = conn.await;
    Ok(())
}

/// CPU seconds (user + system) of a process, from `/proc`.
pub fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// One `INFO all` over plain RESP (the harness needs nothing more of Redis).
async fn read_redis(url: &str, s: &mut Snapshot) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(host_port(url)).await?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n")
        .await?;
    let mut header = String::new();
    stream.read_line(&mut header).await?;
    let len: usize = header
        .trim_end()
        .strip_prefix('$')
        .with_context(|| format!("unexpected reply {header:?}"))?
        .parse()?;
    let mut body = vec![0u8; len + 2];
    stream.read_exact(&mut body).await?;
    let text = String::from_utf8_lossy(&body[..len]);
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
    };
    s.redis_cpu =
        Some(field("used_cpu_sys").unwrap_or(0.0) + field("used_cpu_user").unwrap_or(0.0));
    s.redis_net_out = field("total_net_output_bytes");
    let (mut calls, mut usec) = (0.0, 0.0);
    for line in text.lines() {
        // cmdstat_evalsha:calls=10,usec=500,usec_per_call=50.0,...
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let value = |k: &str| -> f64 {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0.0)
        };
        let (c, u) = (value("calls"), value("usec"));
        calls += c;
        usec += u;
        s.redis_commands.insert(name.to_owned(), (c, u));
    }
    s.redis_calls = Some(calls);
    s.redis_usec = Some(usec);
    Ok(())
}

/// `chat_store_statements_total{statement="..."}` from one gateway.
async fn read_metrics(url: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let rest = url
        .strip_prefix("http://")
        .context("metrics URLs are http://host:port/path")?;
    let (addr, path) = rest.split_once('/').unwrap_or((rest, "metrics"));
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("chat_store_statements_total{statement=\"") else {
            continue;
        };
        let Some((name, value)) = rest.split_once("\"}") else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            out.insert(name.to_owned(), v);
        }
    }
    Ok(out)
}

/// Commands the gateway sends only from inside its Lua scripts (their
/// time is in the script's).
const SCRIPT_ONLY: &[&str] = &[
    "xadd", "incr", "incrby", "decrby", "pexpire", "expire", "ttl", "hset", "hsetnx", "hget",
    "hmget", "hincrby", "hdel", "hgetall", "xlen", "xdel", "time",
];

/// Redis's cost per acknowledged message between two readings: command
/// time (every command, the ones the gateways send for limits and
/// registry included), calls, and bytes written to its clients (per
/// message and per delivery), with the commands that took the time.
pub fn redis_per_message(from: &Snapshot, to: &Snapshot, messages: u64, deliveries: u64) -> Value {
    let (Some(u0), Some(u1), Some(c0), Some(c1)) = (
        from.redis_usec,
        to.redis_usec,
        from.redis_calls,
        to.redis_calls,
    ) else {
        return Value::Null;
    };
    let per = |x: f64, n: u64| if n == 0 { 0.0 } else { x / n as f64 };
    let out = match (from.redis_net_out, to.redis_net_out) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let cpu = match (from.redis_cpu, to.redis_cpu) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let mut commands: Vec<(String, f64, f64)> = to
        .redis_commands
        .iter()
        .map(|(name, (calls, usec))| {
            let (c, u) = from.redis_commands.get(name).copied().unwrap_or((0.0, 0.0));
            (name.clone(), calls - c, usec - u)
        })
        .filter(|(_, calls, _)| *calls > 0.0)
        .collect();
    commands.sort_by(|a, b| b.2.total_cmp(&a.2));
    // Redis counts the commands a script runs under their own names as
    // well as in the script's time: summing every command counts them
    // twice. These are the ones the gateway runs inside its scripts only.
    let nested: f64 = commands
        .iter()
        .filter(|(name, _, _)| SCRIPT_ONLY.contains(&name.as_str()))
        .map(|(_, _, us)| us)
        .sum();
    let summed = per(u1 - u0, messages);
    let usec = per(u1 - u0 - nested, messages);
    println!(
        "redis per message: {usec:.1} us of command time ({summed:.1} summed over every command, scripts' own commands twice), {:.2} calls, {:.0} bytes out ({:.0} per delivery), {:.1} us CPU",
        per(c1 - c0, messages),
        per(out, messages),
        per(out, deliveries),
        per(cpu, messages) * 1e6,
    );
    for (name, calls, us) in commands.iter().take(5) {
        println!(
            "  {name:<10} {:>6.2} calls, {:>6.1} us per message ({:.1} us per call)",
            per(*calls, messages),
            per(*us, messages),
            if *calls > 0.0 { us / calls } else { 0.0 }
        );
    }
    json!({
        "usec_per_message": usec,
        "usec_per_message_summed": summed,
        "calls_per_message": per(c1 - c0, messages),
        "bytes_out_per_message": per(out, messages),
        "bytes_out_per_delivery": per(out, deliveries),
        "cpu_us_per_message": per(cpu, messages) * 1e6,
        "commands": commands
            .iter()
            .map(|(n, c, u)| json!({ "command": n, "calls_per_message": per(*c, messages), "usec_per_message": per(*u, messages) }))
            .collect::<Vec<_>>(),
    })
}

/// What the harness did in one phase, to divide costs by.
#[derive(Debug, Clone, Copy, Default)]
pub struct Actions {
    /// Every request and reconnect.
    pub total: u64,
    /// Acknowledged sends.
    pub sends: u64,
    /// Sessions opened (Identify).
    pub identifies: u64,
}

/// The cost of one phase (`from` to `to`), per action, as a printed
/// table and as JSON.
pub fn phase_cost(
    label: &str,
    from: &Snapshot,
    to: &Snapshot,
    actions: Actions,
    gateway_cpu: f64,
) -> Value {
    let secs = match (from.at, to.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-3),
        _ => 1.0,
    };
    let per = |x: f64, n: u64| if n == 0 { 0.0 } else { x / n as f64 };
    let mut out = serde_json::Map::new();
    out.insert("seconds".into(), json!(secs));
    out.insert("actions".into(), json!(actions.total));
    println!(
        "{label}: {:.1} s, {} actions ({} acked sends, {} identifies)",
        secs, actions.total, actions.sends, actions.identifies
    );
    let mut row = |name: &str, cpu: f64| {
        println!(
            "  {name:<9} CPU {:>5.0}% of a core, {:>7.1} us per action",
            cpu / secs * 100.0,
            per(cpu, actions.total) * 1e6
        );
        out.insert(
            format!("{name}_cpu"),
            json!({ "cores": cpu / secs, "us_per_action": per(cpu, actions.total) * 1e6 }),
        );
    };
    row("gateways", gateway_cpu);
    if !to.pg_cpu.is_empty() {
        // Processes that ended between the readings are left out; new ones
        // count from zero.
        let cpu: f64 = to
            .pg_cpu
            .iter()
            .map(|(pid, c)| c - from.pg_cpu.get(pid).copied().unwrap_or(0.0))
            .filter(|d| *d >= 0.0)
            .sum();
        row("postgres", cpu);
    }
    if let (Some(a), Some(b)) = (from.redis_cpu, to.redis_cpu) {
        row("redis", b - a);
    }
    if let (Some(a), Some(b)) = (from.pg_wal, to.pg_wal) {
        let wal = (b - a).max(0) as f64;
        let writes = match (from.pg_next_xid, to.pg_next_xid) {
            // Less this probe's own readings (read-only: none).
            (Some(x), Some(y)) => (y - x).max(0) as f64,
            _ => 0.0,
        };
        // Per identify only where nothing else writes (no sends).
        let per_identify = (actions.sends == 0).then(|| per(writes, actions.identifies));
        println!(
            "  postgres  {writes:.0} transactions wrote ({:.2} per action, {:.2} per acked send{}), {:.0} WAL bytes per action, {} backends",
            per(writes, actions.total),
            per(writes, actions.sends),
            per_identify.map_or(String::new(), |w| format!(", {w:.2} per identify")),
            per(wal, actions.total),
            to.pg_backends.unwrap_or(0)
        );
        out.insert(
            "postgres_transactions".into(),
            json!({ "writing": writes, "writing_per_send": per(writes, actions.sends),
                    "writing_per_identify": per_identify,
                    "wal_bytes_per_action": per(wal, actions.total), "backends": to.pg_backends }),
        );
    }
    if let (Some(a), Some(b)) = (from.redis_usec, to.redis_usec) {
        let calls = to.redis_calls.unwrap_or(0.0) - from.redis_calls.unwrap_or(0.0);
        let out_bytes = to.redis_net_out.unwrap_or(0.0) - from.redis_net_out.unwrap_or(0.0);
        println!(
            "  redis     {:.0} commands, {:.1} us of command time per action ({:.1} per acked send), {:.0} bytes out per action",
            calls,
            per(b - a, actions.total),
            per(b - a, actions.sends),
            per(out_bytes, actions.total)
        );
        let mut top: Vec<(String, f64, f64)> = to
            .redis_commands
            .iter()
            .map(|(k, (c, u))| {
                let (c0, u0) = from.redis_commands.get(k).copied().unwrap_or((0.0, 0.0));
                (k.clone(), c - c0, u - u0)
            })
            .filter(|(_, c, _)| *c > 0.0)
            .collect();
        top.sort_by(|a, b| b.2.total_cmp(&a.2));
        let top: Vec<String> = top
            .iter()
            .take(5)
            .map(|(k, c, u)| format!("{k} {c:.0} x {:.1} us", per(*u, (*c).max(1.0) as u64)))
            .collect();
        println!("            top: {}", top.join(", "));
        out.insert(
            "redis_commands".into(),
            json!({ "calls": calls, "usec": b - a, "usec_per_send": per(b - a, actions.sends), "bytes_out": out_bytes }),
        );
    }
    if !to.statements.is_empty() {
        let diff: BTreeMap<&str, f64> = to
            .statements
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    v - from.statements.get(k).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, d)| *d > 0.0)
            .collect();
        let sum = |names: &[&str]| {
            names
                .iter()
                .map(|n| diff.get(n).copied().unwrap_or(0.0))
                .sum::<f64>()
        };
        let commits_per_send = per(sum(&SEND_COMMITS), actions.sends);
        let identify = per(sum(&IDENTIFY_STATEMENTS), actions.identifies);
        let list: Vec<String> = diff.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
        println!("  store statements: {}", list.join(", "));
        println!(
            "  store commits per acked send {commits_per_send:.2}; profile and room-list statements per identify {identify:.2}"
        );
        out.insert(
            "store_statements".into(),
            json!({ "by_statement": diff, "commits_per_send": commits_per_send,
                    "statements_per_identify": identify }),
        );
    }
    for p in from.problems.iter().chain(&to.problems) {
        println!("  probe problem: {p}");
    }
    Value::Object(out)
}

/// Statements that commit a stored message or its stream position.
const SEND_COMMITS: [&str; 3] = ["insert_message", "insert_messages", "set_seqs"];
/// Statements an Identify runs (the profile, the room list); whether
/// they wrote is Postgres's transaction counter's to say.
const IDENTIFY_STATEMENTS: [&str; 3] = ["identify", "upsert_user", "memberships"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_addresses_lose_scheme_credentials_and_database() {
        assert_eq!(host_port("redis://127.0.0.1:6379/0"), "127.0.0.1:6379");
        assert_eq!(host_port("redis://u:p@127.0.0.1:7000"), "127.0.0.1:7000");
        assert_eq!(host_port("127.0.0.1:7001"), "127.0.0.1:7001");
    }

    #[test]
    fn costs_are_divided_by_what_was_done() {
        let from = Snapshot {
            at: Some(Instant::now()),
            pg_wal: Some(100),
            pg_next_xid: Some(1000),
            statements: [("insert_message".to_owned(), 10.0)].into(),
            ..Snapshot::default()
        };
        let to = Snapshot {
            at: from.at.map(|t| t + std::time::Duration::from_secs(2)),
            pg_wal: Some(400),
            pg_next_xid: Some(1100),
            statements: [
                ("insert_message".to_owned(), 60.0),
                ("set_seqs".to_owned(), 50.0),
                ("identify".to_owned(), 20.0),
            ]
            .into(),
            ..Snapshot::default()
        };
        let actions = Actions {
            total: 200,
            sends: 50,
            identifies: 10,
        };
        let v = phase_cost("run", &from, &to, actions, 1.0);
        assert_eq!(v["store_statements"]["commits_per_send"], 2.0);
        assert_eq!(v["store_statements"]["statements_per_identify"], 2.0);
        assert_eq!(v["postgres_transactions"]["writing_per_send"], 2.0);
        assert_eq!(v["gateways_cpu"]["cores"], 0.5);
        // Writes are put on Identify only in a phase without sends.
        assert!(v["postgres_transactions"]["writing_per_identify"].is_null());
        let reconnects = Actions {
            sends: 0,
            ..actions
        };
        let v = phase_cost("returning", &from, &to, reconnects, 1.0);
        assert_eq!(v["postgres_transactions"]["writing_per_identify"], 10.0);
    }
}
