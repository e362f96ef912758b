//! The coordinator side of `idle`, `fanout`, `ramp` and `chat`: starts
//! workers, steers their phases, samples the gateway processes, and turns
//! the merged results into a summary table, a JSON report and a picture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::report;
use crate::worker::{Command, Merged, Spec, coordinate};

/// Options shared by every multi-process scenario.
#[derive(Debug, Clone)]
pub struct Common {
    /// Gateway URLs.
    pub urls: Vec<String>,
    /// Token secret.
    pub secret: String,
    /// Worker processes.
    pub workers: usize,
    /// Gateway process ids to sample (RSS, CPU) when local.
    pub gateway_pids: Vec<u32>,
    /// Where to write `<name>.json` and `<name>.svg`.
    pub out: Option<PathBuf>,
}

impl Common {
    /// What the coordinator hands its workers for `scenario`.
    fn spec(&self, scenario: &str, params: Value) -> Spec {
        Spec {
            scenario: scenario.into(),
            urls: self.urls.clone(),
            secret: self.secret.clone(),
            worker: 0,
            workers: self.workers,
            params,
        }
    }
}

/// RSS (bytes) and CPU time (seconds) of a process, from /proc.
fn proc_sample(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((rss_kb * 1024, ticks / 100.0))
}

/// Summed over the gateway pids.
fn gateway_sample(pids: &[u32]) -> (u64, f64) {
    pids.iter()
        .filter_map(|p| proc_sample(*p))
        .fold((0, 0.0), |a, s| (a.0 + s.0, a.1 + s.1))
}

/// The limit this process may open (soft RLIMIT_NOFILE), from /proc.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// Refuses a plan the machine cannot carry, saying what to change.
pub fn check_limits(sockets: usize, workers: usize) -> anyhow::Result<()> {
    let per_worker = sockets.div_ceil(workers.max(1));
    let nofile = open_files_limit();
    if per_worker + 64 > nofile {
        bail!(
            "{sockets} sockets over {workers} workers is {per_worker} per process, but a process may open {nofile} files \
             (ulimit -n). Use --workers {} or raise the limit (ulimit -n / LimitNOFILE).",
            sockets.div_ceil(nofile.saturating_sub(64).max(1))
        );
    }
    let ports = crate::conn::SOURCE_PORTS;
    if per_worker > ports {
        bail!(
            "each worker uses one source address with {ports} ports but would need {per_worker}; use more --workers"
        );
    }
    Ok(())
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Per-second series of one histogram: [t, p50, p99] in ms.
fn series(m: &Merged, name: &str) -> Vec<(u64, f64, f64)> {
    m.timeline
        .get(name)
        .map(|per| {
            per.iter()
                .map(|(t, h)| {
                    (
                        *t,
                        ms(h.value_at_quantile(0.5)),
                        ms(h.value_at_quantile(0.99)),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn counter_series(m: &Merged, name: &str) -> Vec<(u64, f64)> {
    m.counters_timeline
        .iter()
        .map(|(t, c)| (*t, c.get(name).copied().unwrap_or(0) as f64))
        .collect()
}

fn total<'a>(m: &'a Merged, name: &str) -> Option<&'a Histogram<u64>> {
    m.totals.get(name)
}

fn print_hist(m: &Merged, name: &str, label: &str) {
    if let Some(h) = total(m, name) {
        println!("{}", report::line(label, h));
    }
}

fn hist_json(m: &Merged, name: &str) -> Value {
    total(m, name).map(report::json).unwrap_or(Value::Null)
}

fn write_outputs(common: &Common, name: &str, report: &Value, svg: String) -> anyhow::Result<()> {
    let Some(dir) = &common.out else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let json_path = dir.join(format!("{name}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)? + "\n")?;
    let svg_path = dir.join(format!("{name}.svg"));
    std::fs::write(&svg_path, svg)?;
    eprintln!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// `idle`: hold `connections` sockets (each in 2 rooms), measure memory
/// per connection idle, after a burst of `burst` messages to every
/// connection, and idle again.
pub async fn idle(
    common: &Common,
    connections: usize,
    rooms: u64,
    concurrency: u64,
    burst: u64,
) -> anyhow::Result<Value> {
    check_limits(connections, common.workers)?;
    let spec = common.spec(
        "idle",
        json!({ "connections": connections, "rooms": rooms, "concurrency": concurrency, "burst": burst }),
    );
    let pids = common.gateway_pids.clone();
    let baseline = gateway_sample(&pids);
    let started = Instant::now();
    let mut phase = 0;
    let mut phase_at = 0u64;
    let mut all_connected_at = None;
    let mut idle_rss = 0u64;
    let mut after_rss = 0u64;
    let mut peak_rss = 0u64;
    let mut rss_series: Vec<(u64, f64)> = Vec::new();
    let expected_burst = burst * connections as u64;
    let merged = coordinate(spec, |t, c| {
        let (rss, _) = gateway_sample(&pids);
        peak_rss = peak_rss.max(rss);
        rss_series.push((t, rss as f64 / 1e6));
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        let done = get("connected") + get("failed");
        if t % 5 == 0 {
            eprintln!(
                "[{t:>4}s] phase {phase}: connected {} failed {} received {} closed {} gateway RSS {:.1} MB",
                get("connected"), get("failed"), get("received"), get("closed_by_server"), rss as f64 / 1e6
            );
        }
        match phase {
            0 if done >= connections as u64 && get("workers_connected") >= common.workers as u64 => {
                all_connected_at = Some(started.elapsed());
                phase = 1;
                phase_at = t;
                Command::None
            }
            1 if t >= phase_at + 3 => {
                idle_rss = rss;
                phase = 2;
                phase_at = t;
                Command::Broadcast("burst")
            }
            2 if get("received") >= expected_burst || t >= phase_at + 120 => {
                phase = 3;
                phase_at = t;
                Command::None
            }
            3 if t >= phase_at + 5 => {
                after_rss = rss;
                phase = 4;
                Command::Broadcast("stop")
            }
            _ if t > 900 => Command::Broadcast("stop"),
            _ => Command::None,
        }
    })
    .await?;
    let connected = merged.counters.get("connected").copied().unwrap_or(0);
    let failed = merged.counters.get("failed").copied().unwrap_or(0);
    // The slowest worker's connect span (first connect to last Ready).
    let secs = total(&merged, "connect_span")
        .map(|h| h.max() as f64 / 1e6)
        .or(all_connected_at.map(|d| d.as_secs_f64()))
        .unwrap_or(f64::NAN);
    let per_conn =
        |rss: u64| (rss.saturating_sub(baseline.0)) as f64 / connected.max(1) as f64 / 1024.0;
    println!(
        "idle: {connected} connected, {failed} failed over {} worker(s), in {secs:.1} s ({:.0}/s)",
        common.workers,
        connected as f64 / secs
    );
    print_hist(&merged, "connect", "connect+identify+join");
    println!(
        "gateway RSS per connection: idle {:.2} KiB, after a burst of {burst} {:.2} KiB (peak RSS {:.1} MB, baseline {:.1} MB)",
        per_conn(idle_rss),
        per_conn(after_rss),
        peak_rss as f64 / 1e6,
        baseline.0 as f64 / 1e6
    );
    println!(
        "burst deliveries received: {} of {expected_burst}",
        merged.counters.get("received").copied().unwrap_or(0)
    );
    for e in &merged.errors {
        println!("error: {e}");
    }
    let report = json!({
        "scenario": "idle",
        "summary": {
            "connections": connected,
            "failed": failed,
            "connects_per_sec": connected as f64 / secs,
            "connect_p50_ms": total(&merged, "connect").map(|h| ms(h.value_at_quantile(0.5))),
            "connect_p99_ms": total(&merged, "connect").map(|h| ms(h.value_at_quantile(0.99))),
            "rss_per_conn_idle_kib": per_conn(idle_rss),
            "rss_per_conn_after_burst_kib": per_conn(after_rss),
            "peak_rss_mb": peak_rss as f64 / 1e6,
            "burst_received": merged.counters.get("received"),
            "burst_expected": expected_burst,
        },
        "connect": hist_json(&merged, "connect"),
        "timeline": {
            "connected": counter_series(&merged, "connected"),
            "gateway_rss_mb": rss_series,
            "connect_ms": series(&merged, "connect"),
        },
        "errors": merged.errors,
    });
    let svg = crate::svg::render(
        &format!("idle: {connected} connections"),
        &[
            &[
                ("connect p50 (ms)", series_p50(&merged, "connect")),
                ("connect p99 (ms)", series_p99(&merged, "connect")),
            ],
            &[("connections", counter_series(&merged, "connected"))],
            &[("gateway RSS (MB)", rss_series_of(&report))],
        ],
    );
    write_outputs(common, "idle", &report, svg)?;
    Ok(report)
}

fn series_p50(m: &Merged, name: &str) -> Vec<(u64, f64)> {
    series(m, name)
        .into_iter()
        .map(|(t, p50, _)| (t, p50))
        .collect()
}

fn series_p99(m: &Merged, name: &str) -> Vec<(u64, f64)> {
    series(m, name)
        .into_iter()
        .map(|(t, _, p99)| (t, p99))
        .collect()
}

/// Delivery latency, messages received per second and connections over
/// the run (the fan-out and chat pictures).
fn delivery_chart(title: &str, merged: &Merged) -> String {
    crate::svg::render(
        title,
        &[
            &[
                ("delivery p50 (ms)", series_p50(merged, "delivery")),
                ("delivery p99 (ms)", series_p99(merged, "delivery")),
            ],
            &[(
                "messages received/s",
                crate::svg::per_second(&counter_series(merged, "received")),
            )],
            &[("connections", counter_series(merged, "connected"))],
        ],
    )
}

fn rss_series_of(report: &Value) -> Vec<(u64, f64)> {
    report["timeline"]["gateway_rss_mb"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_u64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Parameters of one fan-out run.
#[derive(Debug, Clone)]
pub struct FanoutParams {
    /// Rooms.
    pub rooms: u64,
    /// Members per room.
    pub members: u64,
    /// Publishing members per room.
    pub publishers: u64,
    /// Messages per second per room.
    pub rate: u64,
    /// Publishing time.
    pub seconds: u64,
    /// Body bytes.
    pub body: u64,
    /// Extra members of room 0 that never read.
    pub slow: u64,
}

/// One fan-out run; returns the report (and prints its summary).
pub async fn fanout(common: &Common, p: &FanoutParams, name: &str) -> anyhow::Result<Value> {
    let sockets = (p.rooms * p.members + p.slow) as usize;
    check_limits(sockets, common.workers)?;
    let spec = common.spec(
        "fanout",
        json!({
            "rooms": p.rooms, "members": p.members, "publishers": p.publishers, "rate": p.rate,
            "seconds": p.seconds, "body": p.body, "slow": p.slow, "concurrency": 64,
        }),
    );
    let pids = common.gateway_pids.clone();
    let mut phase = 0;
    let mut go_at = 0u64;
    let mut cpu_at_go = 0.0;
    let mut cpu_at_end = 0.0;
    let mut peak_rss = 0u64;
    let mut rss_series: Vec<(u64, f64)> = Vec::new();
    let mut last_received = 0u64;
    let mut settled = 0;
    let merged = coordinate(spec, |t, c| {
        let (rss, cpu) = gateway_sample(&pids);
        peak_rss = peak_rss.max(rss);
        rss_series.push((t, rss as f64 / 1e6));
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        match phase {
            0 if get("connected") + get("failed") >= sockets as u64
                && get("workers_connected") >= common.workers as u64 =>
            {
                phase = 1;
                go_at = t + 1;
                cpu_at_go = cpu;
                Command::Broadcast("go")
            }
            1 if t >= go_at + p.seconds => {
                // Publishing is over; wait until deliveries stop growing.
                let r = get("received");
                if r == last_received {
                    settled += 1
                } else {
                    settled = 0
                }
                last_received = r;
                if settled >= 2 || t >= go_at + p.seconds + 30 {
                    cpu_at_end = cpu;
                    phase = 2;
                    Command::Broadcast("stop")
                } else {
                    Command::None
                }
            }
            _ if t > 1800 => Command::Broadcast("stop"),
            _ => Command::None,
        }
    })
    .await?;
    let get = |k: &str| merged.counters.get(k).copied().unwrap_or(0);
    let received = get("received");
    let expected = get("expected");
    let lost = expected.saturating_sub(received);
    let rate = received as f64 / p.seconds as f64;
    let cpu = (cpu_at_end - cpu_at_go) / p.seconds as f64;
    let delivery = total(&merged, "delivery");
    println!(
        "fanout {}x{} at {}/s per room for {} s: {} sent, {} acked, {} deliveries ({rate:.0}/s), lost {lost}, duplicated {}, gaps {}",
        p.rooms,
        p.members,
        p.rate,
        p.seconds,
        get("sent"),
        get("acked"),
        received,
        get("duplicates"),
        get("gaps")
    );
    print_hist(&merged, "delivery", "send -> delivered");
    print_hist(&merged, "ack", "send -> ack");
    if !pids.is_empty() {
        println!(
            "gateway CPU {:.0}% of one core during publishing, peak RSS {:.1} MB",
            cpu * 100.0,
            peak_rss as f64 / 1e6
        );
    }
    for e in &merged.errors {
        println!("error: {e}");
    }
    let report = json!({
        "scenario": "fanout",
        "params": { "rooms": p.rooms, "members": p.members, "publishers": p.publishers, "rate": p.rate, "seconds": p.seconds, "body": p.body, "slow": p.slow },
        "summary": {
            "deliveries_per_sec": rate,
            "delivered": received,
            "expected": expected,
            "lost": lost,
            "duplicated": get("duplicates"),
            "gaps": get("gaps"),
            "send_errors": get("send_errors"),
            "p50_ms": delivery.map(|h| ms(h.value_at_quantile(0.5))),
            "p90_ms": delivery.map(|h| ms(h.value_at_quantile(0.9))),
            "p99_ms": delivery.map(|h| ms(h.value_at_quantile(0.99))),
            "p999_ms": delivery.map(|h| ms(h.value_at_quantile(0.999))),
            "max_ms": delivery.map(|h| ms(h.max())),
            "gateway_cpu_cores": cpu,
            "peak_rss_mb": peak_rss as f64 / 1e6,
        },
        "delivery": hist_json(&merged, "delivery"),
        "ack": hist_json(&merged, "ack"),
        "timeline": {
            "delivery_ms": series(&merged, "delivery"),
            "received": counter_series(&merged, "received"),
            "connected": counter_series(&merged, "connected"),
            "gateway_rss_mb": rss_series,
        },
        "errors": merged.errors,
    });
    let svg = delivery_chart(
        &format!("fanout {}x{} at {}/s per room", p.rooms, p.members, p.rate),
        &merged,
    );
    write_outputs(common, name, &report, svg)?;
    Ok(report)
}

/// `ramp`: fan-out runs at rising publish rates; reports the highest rate
/// whose p99 stays under `bound_ms` with nothing lost.
pub async fn ramp(
    common: &Common,
    base: &FanoutParams,
    start: u64,
    factor: f64,
    steps: u32,
    bound_ms: f64,
) -> anyhow::Result<Value> {
    let mut results = Vec::new();
    let mut best: Option<(u64, f64, f64)> = None;
    let mut rate = start;
    for step in 0..steps {
        let p = FanoutParams {
            rate,
            ..base.clone()
        };
        let r = fanout(
            &Common {
                out: None,
                ..common.clone()
            },
            &p,
            &format!("ramp-{step}"),
        )
        .await?;
        let s = &r["summary"];
        let p99 = s["p99_ms"].as_f64().unwrap_or(f64::INFINITY);
        let per_sec = s["deliveries_per_sec"].as_f64().unwrap_or(0.0);
        // A step passes only if the gateway really carried the offered
        // load (within 10 %), with p99 under the bound and nothing lost.
        let offered = (rate * base.rooms * (base.members - 1)) as f64;
        let ok =
            p99 <= bound_ms && s["lost"] == 0 && s["duplicated"] == 0 && per_sec >= 0.9 * offered;
        println!(
            "ramp step {step}: {rate}/s per room -> {per_sec:.0} deliveries/s, p99 {p99:.2} ms {}",
            if ok { "ok" } else { "over" }
        );
        results.push(json!({ "rate": rate, "deliveries_per_sec": per_sec, "p99_ms": p99, "p50_ms": s["p50_ms"], "ok": ok, "lost": s["lost"] }));
        if ok {
            best = Some((rate, per_sec, p99));
        } else {
            break;
        }
        rate = ((rate as f64) * factor).ceil() as u64;
    }
    match best {
        Some((r, d, p99)) => println!(
            "ramp: highest passing rate {r}/s per room = {d:.0} deliveries/s at p99 {p99:.2} ms (bound {bound_ms} ms)"
        ),
        None => println!("ramp: even the first step exceeded p99 {bound_ms} ms"),
    }
    let report = json!({
        "scenario": "ramp",
        "params": { "rooms": base.rooms, "members": base.members, "bound_ms": bound_ms },
        "steps": results,
        "summary": {
            "best_rate_per_room": best.map(|b| b.0),
            "best_deliveries_per_sec": best.map(|b| b.1),
            "best_p99_ms": best.map(|b| b.2),
        },
    });
    let pts = |key: &str| -> Vec<(u64, f64)> {
        results
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s[key].as_f64().unwrap_or(0.0)))
            .collect()
    };
    let step_labels: Vec<String> = results
        .iter()
        .map(|s| s["rate"].as_u64().unwrap_or(0).to_string())
        .collect();
    let svg = crate::svg::render_steps(
        &format!(
            "ramp {}x{}: latency and deliveries per step",
            base.rooms, base.members
        ),
        "messages/s per room (one step each)",
        &step_labels,
        bound_ms,
        &[
            &[("p99 (ms)", pts("p99_ms")), ("p50 (ms)", pts("p50_ms"))],
            &[("deliveries/s", pts("deliveries_per_sec"))],
        ],
    );
    write_outputs(common, "ramp", &report, svg)?;
    Ok(report)
}

/// `chat`: a realistic mix over `connections` for `seconds`.
pub async fn chat(
    common: &Common,
    connections: u64,
    room_size: u64,
    seconds: u64,
    think_ms: u64,
) -> anyhow::Result<Value> {
    check_limits(connections as usize, common.workers)?;
    let spec = common.spec(
        "chat",
        json!({ "connections": connections, "room_size": room_size, "seconds": seconds, "think_ms": think_ms }),
    );
    let pids = common.gateway_pids.clone();
    let mut started = false;
    let mut cpu0 = 0.0;
    let mut cpu1 = 0.0;
    let mut peak_rss = 0u64;
    let merged = coordinate(spec, |_, c| {
        let (rss, cpu) = gateway_sample(&pids);
        peak_rss = peak_rss.max(rss);
        cpu1 = cpu;
        if !started && c.get("workers_connected").copied().unwrap_or(0) >= common.workers as u64 {
            started = true;
            cpu0 = cpu;
            return Command::Broadcast("go");
        }
        Command::None
    })
    .await?;
    let get = |k: &str| merged.counters.get(k).copied().unwrap_or(0);
    println!(
        "chat: {} connected, {} sends, {} typing, {} reactions, {} history pages, resumes {} ok / {} gap, {} received, {} errors",
        get("connected"),
        get("send"),
        get("typing"),
        get("react"),
        get("history"),
        get("resumed_ok"),
        get("resumed_gap"),
        get("received"),
        get("errors")
    );
    for (n, l) in [
        ("send", "send -> ack"),
        ("delivery", "send -> delivered"),
        ("history", "history page"),
        ("resume", "reconnect+resume"),
        ("connect", "connect+identify+join"),
    ] {
        print_hist(&merged, n, l);
    }
    if !pids.is_empty() {
        println!(
            "gateway CPU {:.0}% of one core, peak RSS {:.1} MB",
            (cpu1 - cpu0) / seconds as f64 * 100.0,
            peak_rss as f64 / 1e6
        );
    }
    let report = json!({
        "scenario": "chat",
        "summary": {
            "connected": get("connected"), "sends": get("send"), "typing": get("typing"), "reactions": get("react"),
            "history_pages": get("history"), "resumed_ok": get("resumed_ok"), "resumed_gap": get("resumed_gap"),
            "received": get("received"), "errors": get("errors"),
            "send_p99_ms": total(&merged, "send").map(|h| ms(h.value_at_quantile(0.99))),
            "delivery_p99_ms": total(&merged, "delivery").map(|h| ms(h.value_at_quantile(0.99))),
            "history_p99_ms": total(&merged, "history").map(|h| ms(h.value_at_quantile(0.99))),
            "gateway_cpu_cores": (cpu1 - cpu0) / seconds as f64,
            "peak_rss_mb": peak_rss as f64 / 1e6,
        },
        "send": hist_json(&merged, "send"),
        "delivery": hist_json(&merged, "delivery"),
        "history": hist_json(&merged, "history"),
        "resume": hist_json(&merged, "resume"),
        "errors": merged.errors,
    });
    let svg = delivery_chart(&format!("chat: {connections} connections"), &merged);
    write_outputs(common, "chat", &report, svg)?;
    Ok(report)
}

/// Prints each summary number of `new` against `old` (same scenario).
pub fn compare(old_path: &Path, new: &Value) -> anyhow::Result<()> {
    let old: Value = serde_json::from_str(&std::fs::read_to_string(old_path)?)?;
    let (Some(o), Some(n)) = (old["summary"].as_object(), new["summary"].as_object()) else {
        bail!("both reports need a summary");
    };
    println!("change against {}:", old_path.display());
    let keys: BTreeMap<_, _> = n.iter().collect();
    for (k, nv) in keys {
        let (Some(a), Some(b)) = (o.get(k).and_then(Value::as_f64), nv.as_f64()) else {
            continue;
        };
        let pct = if a != 0.0 {
            (b - a) / a.abs() * 100.0
        } else {
            0.0
        };
        println!("  {k:<32} {a:>14.3} -> {b:>14.3}  ({pct:+.1}%)");
    }
    Ok(())
}

/// What `--check` refuses: anything lost, duplicated, failed or errored.
pub fn problems(report: &Value) -> Vec<String> {
    let s = &report["summary"];
    let mut out = Vec::new();
    for key in [
        "lost",
        "duplicated",
        "gaps",
        "failed",
        "errors",
        "send_errors",
    ] {
        if let Some(n) = s.get(key).and_then(Value::as_u64).filter(|n| *n > 0) {
            out.push(format!("{key} = {n}"));
        }
    }
    let got = s.get("burst_received").and_then(Value::as_u64);
    let want = s.get("burst_expected").and_then(Value::as_u64);
    if let (Some(got), Some(want)) = (got, want)
        && got != want
    {
        out.push(format!("burst received {got} of {want}"));
    }
    if report["errors"].as_array().is_some_and(|e| !e.is_empty()) {
        out.push(format!("worker errors {}", report["errors"]));
    }
    if report["scenario"] == "ramp" && report["summary"]["best_rate_per_room"].is_null() {
        out.push("no ramp step passed".into());
    }
    out
}
