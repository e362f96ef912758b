//! The coordinator side of `idle`, `fanout`, `ramp` and `chat`: starts
//! workers, steers their phases, samples the gateway processes, and turns
//! the merged results into a summary table, a JSON report and a picture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::probes::{Actions, ProbeTargets, Probes, phase_cost};
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
    /// Postgres, Redis and gateway metrics to read for per-action costs.
    pub probes: ProbeTargets,
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
    Some((rss_kb * 1024, crate::probes::process_cpu(pid)?))
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
    let json_path = write_report(dir, name, report)?;
    let svg_path = dir.join(format!("{name}.svg"));
    std::fs::write(&svg_path, svg)?;
    eprintln!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// Writes `<dir>/<name>.json` and returns its path. The single-process
/// scenarios (`latency`, `sends`, `history`) use it too, so `--out` gives
/// a report for every scenario and the smoke run can insist on each.
pub fn write_report(dir: &Path, name: &str, report: &Value) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let json_path = dir.join(format!("{name}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)? + "\n")?;
    Ok(json_path)
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
    let mut drain = Drain::default();
    let merged = coordinate(spec, |t, c| {
        let (rss, _) = gateway_sample(&pids);
        peak_rss = peak_rss.max(rss);
        rss_series.push((t, rss as f64 / 1e6));
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        let done = get("connected") + get("failed");
        if t % 5 == 0 {
            eprintln!(
                "[{t:>4}s] phase {phase}: connected {} failed {} received {} closed early {} gateway RSS {:.1} MB",
                get("connected"), get("failed"), get("received"), get("closed_early"), rss as f64 / 1e6
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
            2 if drain.over(
                get("received") >= expected_burst,
                get("received") + get("burst_sent"),
                t >= phase_at + 120,
            ) =>
            {
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
    let count = |k: &str| merged.counters.get(k).copied().unwrap_or(0);
    let connected = count("connected");
    let failed = count("failed");
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
        "burst deliveries received: {} of {expected_burst}, duplicated {}, gaps {}, connections closed early {}",
        count("received"),
        count("duplicates"),
        count("gaps"),
        count("closed_early")
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
            "burst_received": count("received"),
            "burst_expected": expected_burst,
            "burst_sent": count("burst_sent"),
            "burst_acked": count("burst_acked"),
            "unacked": count("burst_sent").saturating_sub(count("burst_acked") + count("send_errors")),
            "duplicated": count("duplicates"),
            "gaps": count("gaps"),
            "send_errors": count("send_errors"),
            "closed_early": count("closed_early"),
            "error_replies": count("error_replies"),
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

/// When to end a run's drain (publishing is over, deliveries may still
/// be arriving). Done as soon as everything sent is acknowledged and
/// delivered; otherwise when `progress` (deliveries + acks) has not moved
/// for [`Drain::QUIET`] seconds, or at a hard limit. Waiting for the
/// deliveries themselves rather than a fixed quiet time means a slow
/// machine does not cut a correct run short (which would read as loss),
/// and a lossy run still ends.
#[derive(Default)]
struct Drain {
    last: u64,
    quiet: u64,
}

impl Drain {
    const QUIET: u64 = 5;

    /// Called once a second; true when the drain is over.
    fn over(&mut self, all_in: bool, progress: u64, limit: bool) -> bool {
        if progress == self.last {
            self.quiet += 1;
        } else {
            self.quiet = 0;
        }
        self.last = progress;
        all_in || self.quiet >= Self::QUIET || limit
    }
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
    /// Each room's members on one gateway (room r on URL r mod URLs).
    pub rooms_on_one_node: bool,
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
            "rooms_on_one_node": u64::from(p.rooms_on_one_node),
        }),
    );
    let pids = common.gateway_pids.clone();
    let probes = Probes::new(common.probes.clone());
    let mut each_at_go: Vec<f64> = Vec::new();
    let mut each_at_end: Vec<f64> = Vec::new();
    let each_cpu = |pids: &[u32]| -> Vec<f64> {
        pids.iter()
            .map(|p| crate::probes::process_cpu(*p).unwrap_or(0.0))
            .collect()
    };
    let mut phase = 0;
    let mut go_at = 0u64;
    let mut cpu_at_go = 0.0;
    let mut cpu_at_end = 0.0;
    let mut peak_rss = 0u64;
    let mut rss_series: Vec<(u64, f64)> = Vec::new();
    let mut drain = Drain::default();
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
                each_at_go = each_cpu(&pids);
                probes.mark("go");
                Command::Broadcast("go")
            }
            // Publishing is over (a second's margin for the workers' own
            // clocks and their once-a-second reports).
            1 if t > go_at + p.seconds => {
                let publishing = get("publishers_done") < get("publishers");
                let answered = get("acked") + get("send_errors") >= get("sent");
                let all_in = !publishing && answered && get("received") >= get("expected");
                if drain.over(
                    all_in,
                    get("received") + get("acked"),
                    t >= go_at + p.seconds + 30,
                ) {
                    cpu_at_end = cpu;
                    each_at_end = each_cpu(&pids);
                    probes.mark("end");
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
    let unacked = get("sent").saturating_sub(get("acked") + get("send_errors"));
    let rate = received as f64 / p.seconds as f64;
    let cpu = (cpu_at_end - cpu_at_go) / p.seconds as f64;
    let delivery = total(&merged, "delivery");
    println!(
        "fanout {}x{} at {}/s per room for {} s: {} sent, {} acked, {} deliveries ({rate:.0}/s), lost {lost}, duplicated {}, gaps {}, send errors {}, closed early {}",
        p.rooms,
        p.members,
        p.rate,
        p.seconds,
        get("sent"),
        get("acked"),
        received,
        get("duplicates"),
        get("gaps"),
        get("send_errors"),
        get("closed_early")
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
    let per_node: Vec<f64> = each_at_end
        .iter()
        .zip(&each_at_go)
        .map(|(end, go)| (end - go) / p.seconds as f64)
        .collect();
    if per_node.len() > 1 {
        let shown: Vec<String> = per_node
            .iter()
            .map(|c| format!("{:.0}%", c * 100.0))
            .collect();
        println!("gateway CPU per node: {}", shown.join(" "));
    }
    let readings = probes.readings().await;
    let redis = match (readings.get("go"), readings.get("end")) {
        (Some(go), Some(end)) => crate::probes::redis_per_message(go, end, get("acked"), received),
        _ => Value::Null,
    };
    for e in &merged.errors {
        println!("error: {e}");
    }
    let report = json!({
        "scenario": "fanout",
        "params": { "rooms": p.rooms, "members": p.members, "publishers": p.publishers, "rate": p.rate, "seconds": p.seconds, "body": p.body, "slow": p.slow, "rooms_on_one_node": p.rooms_on_one_node, "gateways": common.urls.len() },
        "summary": {
            "deliveries_per_sec": rate,
            "delivered": received,
            "expected": expected,
            "lost": lost,
            "duplicated": get("duplicates"),
            "gaps": get("gaps"),
            "sent": get("sent"),
            "acked": get("acked"),
            "unacked": unacked,
            "send_errors": get("send_errors"),
            "failed": get("failed"),
            "closed_early": get("closed_early"),
            "error_replies": get("error_replies"),
            "p50_ms": delivery.map(|h| ms(h.value_at_quantile(0.5))),
            "p90_ms": delivery.map(|h| ms(h.value_at_quantile(0.9))),
            "p99_ms": delivery.map(|h| ms(h.value_at_quantile(0.99))),
            "p999_ms": delivery.map(|h| ms(h.value_at_quantile(0.999))),
            "max_ms": delivery.map(|h| ms(h.max())),
            "gateway_cpu_cores": cpu,
            "gateway_cpu_cores_per_node": per_node,
            "peak_rss_mb": peak_rss as f64 / 1e6,
        },
        "redis": redis,
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
/// whose p99 stays under `bound_ms` with nothing lost and the offered load
/// carried. That "best rate" is a measurement for people: it depends on
/// the machine, so `--check` never looks at it. What `--check` refuses in
/// a ramp is the behaviour of every step that ran (loss, duplicates, gaps,
/// errors, connections closed early, nothing delivered, worker errors),
/// listed per step in the report. The ramp stops after the first step over
/// the bound unless `all_steps` is set (the smoke run sets it, so that it
/// covers the same steps on any machine).
pub async fn ramp(
    common: &Common,
    base: &FanoutParams,
    start: u64,
    factor: f64,
    steps: u32,
    bound_ms: f64,
    all_steps: bool,
) -> anyhow::Result<Value> {
    let mut results = Vec::new();
    let mut best: Option<(u64, f64, f64)> = None;
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
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
        for key in BEHAVIOUR_COUNTS {
            if let Some(n) = s[key].as_u64() {
                *totals.entry(key).or_default() += n;
            }
        }
        if let Some(e) = r["errors"].as_array() {
            errors.extend(
                e.iter()
                    .map(|e| format!("step {step}: {}", e.as_str().unwrap_or_default())),
            );
        }
        let step_problems = problems(&r);
        let p99 = s["p99_ms"].as_f64().unwrap_or(f64::INFINITY);
        let per_sec = s["deliveries_per_sec"].as_f64().unwrap_or(0.0);
        // A step passes only if the gateway really carried the offered
        // load (within 10 %), with p99 under the bound and nothing wrong.
        let offered = (rate * base.rooms * (base.members - 1)) as f64;
        let ok = p99 <= bound_ms && step_problems.is_empty() && per_sec >= 0.9 * offered;
        println!(
            "ramp step {step}: {rate}/s per room -> {per_sec:.0} deliveries/s, p99 {p99:.2} ms {}{}",
            if ok { "ok" } else { "over" },
            if step_problems.is_empty() {
                String::new()
            } else {
                format!(" ({})", step_problems.join(", "))
            }
        );
        results.push(json!({
            "rate": rate, "deliveries_per_sec": per_sec, "p99_ms": p99, "p50_ms": s["p50_ms"], "ok": ok,
            "delivered": s["delivered"], "expected": s["expected"], "lost": s["lost"],
            "duplicated": s["duplicated"], "gaps": s["gaps"], "problems": step_problems,
        }));
        if ok {
            if best.is_none_or(|b| b.0 < rate) {
                best = Some((rate, per_sec, p99));
            }
        } else if !all_steps {
            break;
        }
        rate = ((rate as f64) * factor).ceil() as u64;
    }
    match best {
        Some((r, d, p99)) => println!(
            "ramp: highest passing rate {r}/s per room = {d:.0} deliveries/s at p99 {p99:.2} ms (bound {bound_ms} ms)"
        ),
        None => println!(
            "ramp: no step passed (p99 bound {bound_ms} ms, 90 % of offered load, nothing wrong)"
        ),
    }
    let mut summary = json!({
        "best_rate_per_room": best.map(|b| b.0),
        "best_deliveries_per_sec": best.map(|b| b.1),
        "best_p99_ms": best.map(|b| b.2),
        "steps_run": results.len(),
    });
    if let Some(o) = summary.as_object_mut() {
        for (k, v) in &totals {
            o.insert((*k).to_owned(), (*v).into());
        }
    }
    let report = json!({
        "scenario": "ramp",
        "params": { "rooms": base.rooms, "members": base.members, "bound_ms": bound_ms },
        "steps": results,
        "summary": summary,
        "errors": errors,
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

/// `chat`: a realistic mix over `connections` for `seconds`. All
/// connections open first; then the mix runs; then the run drains until
/// every acknowledged message has reached every other member of its room
/// (or nothing more arrives), so that loss is measured, not guessed.
pub async fn chat(
    common: &Common,
    connections: u64,
    room_size: u64,
    seconds: u64,
    think_ms: u64,
) -> anyhow::Result<Value> {
    check_limits(connections as usize, common.workers)?;
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let spec = common.spec(
        "chat",
        json!({ "connections": connections, "room_size": room_size, "seconds": seconds, "think_ms": think_ms, "concurrency": 64, "run": run_id }),
    );
    let pids = common.gateway_pids.clone();
    let probes = Probes::new(common.probes.clone());
    let mut phase = 0;
    let mut go_at = 0u64;
    let cpu_start = gateway_sample(&pids).1;
    probes.mark("start");
    let mut cpu0 = 0.0;
    let mut cpu1 = None;
    let mut peak_rss = 0u64;
    let mut drain = Drain::default();
    let merged = coordinate(spec, |t, c| {
        let (rss, cpu) = gateway_sample(&pids);
        peak_rss = peak_rss.max(rss);
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        match phase {
            0 if get("connected") + get("failed") >= connections
                && get("workers_connected") >= common.workers as u64 =>
            {
                phase = 1;
                go_at = t;
                cpu0 = cpu;
                probes.mark("go");
                Command::Broadcast("go")
            }
            // Every chatter has stopped acting (each counts `finished`
            // once, however it ended): wait for the deliveries.
            1 if t >= go_at + seconds && get("finished") >= get("connected") => {
                if cpu1.is_none() {
                    cpu1 = Some(cpu);
                    probes.mark("end");
                }
                let all_in = get("received") >= get("expected");
                if drain.over(all_in, get("received"), t >= go_at + seconds + 60) {
                    phase = 2;
                    Command::Broadcast("stop")
                } else {
                    Command::None
                }
            }
            _ if t > go_at + seconds + 600 => Command::Broadcast("stop"),
            _ => Command::None,
        }
    })
    .await?;
    let cpu1 = cpu1.unwrap_or(cpu0);
    let get = |k: &str| merged.counters.get(k).copied().unwrap_or(0);
    let lost = get("expected").saturating_sub(get("received"));
    println!(
        "chat: {} connected, {} failed, {} sends, {} typing, {} reactions, {} history pages, resumes {} ok / {} gap, {} received of {} expected, lost {lost}, duplicated {}, gaps {}, {} error replies, {} unexpected replies, {} closed early, {} errors",
        get("connected"),
        get("failed"),
        get("send"),
        get("typing"),
        get("react"),
        get("history"),
        get("resumed_ok"),
        get("resumed_gap"),
        get("received"),
        get("expected"),
        get("duplicates"),
        get("gaps"),
        get("error_replies"),
        get("unexpected_replies"),
        get("closed_early"),
        get("errors")
    );
    // Server errors by code, e.g. `error_rate_limited`.
    let error_codes: BTreeMap<&str, u64> = merged
        .counters
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("error_")?, *v)))
        .filter(|(k, _)| *k != "replies")
        .collect();
    if !error_codes.is_empty() {
        println!("server errors by code: {error_codes:?}");
    }
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
    // What each phase cost Postgres, Redis and the gateways, per action.
    let readings = probes.readings().await;
    let mut costs = serde_json::Map::new();
    let resumes = get("resumed_ok") + get("resumed_gap");
    let phases = [
        (
            "connect",
            "start",
            "go",
            Actions {
                total: get("connected"),
                sends: 0,
                identifies: get("connected"),
            },
            cpu0 - cpu_start,
        ),
        (
            "run",
            "go",
            "end",
            Actions {
                total: get("send") + get("typing") + get("react") + get("history") + resumes,
                sends: get("acked"),
                identifies: resumes,
            },
            cpu1 - cpu0,
        ),
    ];
    for (label, from, to, actions, cpu) in phases {
        if let (Some(a), Some(b)) = (readings.get(from), readings.get(to)) {
            costs.insert(label.into(), phase_cost(label, a, b, actions, cpu));
        }
    }
    // Returning users: what an Identify costs once the traffic is over,
    // the first time (caches as the run left them) and again (warm).
    if common.probes.any() {
        let users = connections.min(RETURNING_USERS);
        for label in ["returning", "returning again"] {
            let cpu_a = gateway_sample(&pids).1;
            probes.mark("a");
            let a = probes.readings().await;
            let opened = reconnect_users(common, run_id, users, room_size).await?;
            let cpu_b = gateway_sample(&pids).1;
            probes.mark("b");
            let b = probes.readings().await;
            if let (Some(a), Some(b)) = (a.get("a"), b.get("b")) {
                let actions = Actions {
                    total: opened,
                    sends: 0,
                    identifies: opened,
                };
                costs.insert(
                    label.into(),
                    phase_cost(label, a, b, actions, cpu_b - cpu_a),
                );
            }
        }
    }
    for e in &merged.errors {
        println!("error: {e}");
    }
    let report = json!({
        "scenario": "chat",
        "costs": costs,
        "summary": {
            "connected": get("connected"), "failed": get("failed"), "sends": get("send"), "acked": get("acked"),
            "typing": get("typing"), "reactions": get("react"),
            "history_pages": get("history"), "resumed_ok": get("resumed_ok"), "resumed_gap": get("resumed_gap"),
            "delivered": get("received"), "expected": get("expected"), "lost": lost,
            "duplicated": get("duplicates"), "gaps": get("gaps"),
            "error_replies": get("error_replies"), "unexpected_replies": get("unexpected_replies"),
            "closed_early": get("closed_early"), "errors": get("errors"),
            "send_p99_ms": total(&merged, "send").map(|h| ms(h.value_at_quantile(0.99))),
            "delivery_p99_ms": total(&merged, "delivery").map(|h| ms(h.value_at_quantile(0.99))),
            "history_p99_ms": total(&merged, "history").map(|h| ms(h.value_at_quantile(0.99))),
            "gateway_cpu_cores": (cpu1 - cpu0) / seconds as f64,
            "peak_rss_mb": peak_rss as f64 / 1e6,
        },
        "error_codes": error_codes,
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

/// Users reconnected after a chat run to price a returning user's Identify.
const RETURNING_USERS: u64 = 500;

/// Opens and closes a session for each of the first `users` chatters of
/// run `run` (each lists its room already, so it only identifies), 16 at
/// a time; returns how many reached Ready.
async fn reconnect_users(
    common: &Common,
    run: u64,
    users: u64,
    room_size: u64,
) -> anyhow::Result<u64> {
    use crate::conn::{Target, session, source_address};
    let targets: Vec<Target> = common
        .urls
        .iter()
        .map(|u| Target::parse(u))
        .collect::<anyhow::Result<_>>()?;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..users {
        let permit = gate.clone().acquire_owned().await?;
        let target = targets[i as usize % targets.len()].clone();
        let (user, room) = crate::scenario::chatter(run, i, room_size);
        let token = crate::token(&common.secret, &user);
        tasks.push(tokio::spawn(async move {
            let ok = session(&target, source_address(0), token, &[room])
                .await
                .is_ok();
            drop(permit);
            ok
        }));
    }
    let mut opened = 0;
    for t in tasks {
        opened += u64::from(t.await.unwrap_or(false));
    }
    Ok(opened)
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

/// Summary counts of what went wrong; each must be zero. Wall-clock
/// numbers (latency, rates, the ramp's best rate) are not among them: a
/// check that CI runs on a shared, slow machine must refuse wrong
/// behaviour, not slowness. Timing belongs to the harness's reports.
const BEHAVIOUR_COUNTS: [&str; 11] = [
    "lost",
    "duplicated",
    "gaps",
    "unacked",
    "send_errors",
    "error_replies",
    "unexpected_replies",
    "failed",
    "closed_early",
    "resumed_gap",
    "errors",
];

/// What `--check` refuses: anything lost, duplicated, out of order,
/// unanswered, failed, errored or closed early; a scenario that delivers
/// messages delivering none (a run that cannot fail proves nothing); a
/// ramp step with any of those; worker errors.
pub fn problems(report: &Value) -> Vec<String> {
    if report["scenario"] == "ramp" {
        // Each step is a fan-out run checked on its own.
        return match report["steps"].as_array() {
            Some(steps) if !steps.is_empty() => steps
                .iter()
                .enumerate()
                .flat_map(|(i, step)| {
                    step["problems"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(move |p| {
                            format!(
                                "step {i} ({}/s per room): {}",
                                step["rate"],
                                p.as_str().unwrap_or_default()
                            )
                        })
                })
                .collect(),
            _ => vec!["no ramp step ran".into()],
        };
    }
    let s = &report["summary"];
    let mut out = Vec::new();
    for key in BEHAVIOUR_COUNTS {
        if let Some(n) = s.get(key).and_then(Value::as_u64).filter(|n| *n > 0) {
            out.push(format!("{key} = {n}"));
        }
    }
    // Scenarios that deliver messages: fanout and chat (`delivered` of
    // `expected`), idle (its burst).
    for (got_key, want_key) in [
        ("delivered", "expected"),
        ("burst_received", "burst_expected"),
    ] {
        let (Some(got), Some(want)) = (
            s.get(got_key).and_then(Value::as_u64),
            s.get(want_key).and_then(Value::as_u64),
        ) else {
            continue;
        };
        if want == 0 {
            out.push(format!(
                "{want_key} = 0: nothing was acknowledged, so nothing could be checked"
            ));
        }
        if got == 0 {
            out.push(format!("{got_key} = 0: nothing was delivered"));
        } else if got != want {
            out.push(format!("{got_key} {got} of {want}"));
        }
    }
    match &report["errors"] {
        Value::Array(e) if !e.is_empty() => out.push(format!("worker errors {}", report["errors"])),
        // `sends` counts its failed requests here.
        Value::Number(n) if n.as_u64().is_some_and(|n| n > 0) => out.push(format!("errors = {n}")),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fanout_report(summary: Value) -> Value {
        let mut s = json!({
            "delivered": 100, "expected": 100, "lost": 0, "duplicated": 0, "gaps": 0,
            "sent": 10, "acked": 10, "unacked": 0, "send_errors": 0, "failed": 0,
            "closed_early": 0, "error_replies": 0, "p99_ms": 900.0, "deliveries_per_sec": 1.0,
        });
        if let (Some(s), Some(changes)) = (s.as_object_mut(), summary.as_object()) {
            for (k, v) in changes {
                s.insert(k.clone(), v.clone());
            }
        }
        json!({ "scenario": "fanout", "summary": s, "errors": [] })
    }

    #[test]
    fn a_clean_run_passes_however_slow() {
        assert!(problems(&fanout_report(json!({}))).is_empty());
    }

    #[test]
    fn every_kind_of_misbehaviour_is_refused() {
        for key in [
            "lost",
            "duplicated",
            "gaps",
            "unacked",
            "send_errors",
            "failed",
            "closed_early",
            "error_replies",
        ] {
            let p = problems(&fanout_report(json!({ key: 1 })));
            assert!(p.iter().any(|p| p.starts_with(key)), "{key}: {p:?}");
        }
        let chat = json!({ "scenario": "chat", "summary": {
            "delivered": 5, "expected": 5, "unexpected_replies": 1, "resumed_gap": 1, "errors": 1,
        }, "errors": [] });
        assert_eq!(problems(&chat).len(), 3);
        let worker = json!({ "scenario": "fanout", "summary": {}, "errors": ["worker 0: boom"] });
        assert_eq!(problems(&worker).len(), 1);
    }

    #[test]
    fn nothing_delivered_is_refused() {
        let p = problems(&fanout_report(json!({ "delivered": 0, "expected": 0 })));
        assert_eq!(p.len(), 2, "{p:?}");
        let idle =
            json!({ "scenario": "idle", "summary": { "burst_received": 0, "burst_expected": 20 } });
        assert_eq!(problems(&idle).len(), 1);
        let idle = json!({ "scenario": "idle", "summary": { "burst_received": 19, "burst_expected": 20 } });
        assert_eq!(problems(&idle), ["burst_received 19 of 20"]);
    }

    #[test]
    fn a_ramp_is_refused_for_any_step_but_never_for_its_timing() {
        let slow = json!({ "scenario": "ramp", "summary": { "best_rate_per_room": null },
            "steps": [{ "rate": 20, "problems": [] }, { "rate": 40, "problems": [] }] });
        assert!(problems(&slow).is_empty());
        let lossy = json!({ "scenario": "ramp", "summary": { "best_rate_per_room": 20 },
            "steps": [{ "rate": 20, "problems": [] }, { "rate": 40, "problems": ["lost = 3"] }] });
        assert_eq!(problems(&lossy), ["step 1 (40/s per room): lost = 3"]);
        let empty = json!({ "scenario": "ramp", "summary": {}, "steps": [] });
        assert_eq!(problems(&empty), ["no ramp step ran"]);
    }
}
