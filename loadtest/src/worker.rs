//! Coordinator and workers.
//!
//! One process may hold at most ~19,000 sockets here (open-files limit),
//! so a run is split over worker processes, each a copy of this binary
//! started with `worker <spec>`. Workers print one JSON line per second
//! (counters and that second's HDR histograms, serialized) and a final
//! line; the coordinator merges histograms exactly — percentiles are
//! computed from the merged counts, never averaged.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::report::histogram;

/// What one worker runs: the scenario, its share of the work, and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Scenario name.
    pub scenario: String,
    /// Gateway URLs; connections are spread over them round-robin.
    pub urls: Vec<String>,
    /// Token secret.
    pub secret: String,
    /// This worker's index.
    pub worker: usize,
    /// Number of workers.
    pub workers: usize,
    /// Scenario parameters (free-form).
    pub params: Value,
}

/// Histograms and counters a worker accumulates and reports.
#[derive(Default)]
pub struct Meter {
    hists: Mutex<BTreeMap<String, Histogram<u64>>>,
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    recorders: Mutex<BTreeMap<String, Arc<Recorder>>>,
}

/// Shards of a [`Recorder`]: enough that the runtime's threads rarely
/// meet on one lock.
const RECORDER_SHARDS: usize = 16;

/// A histogram for hot loops: one sample costs an uncontended lock and an
/// array increment, with no per-connection histogram to keep or merge
/// (10,000 connections each merging their own histogram a few times a
/// second cost the harness more CPU than the gateway spent delivering).
pub struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            shards: (0..RECORDER_SHARDS)
                .map(|_| Mutex::new(histogram()))
                .collect(),
        }
    }

    /// Records `micros`; `key` (a connection index, say) picks the shard.
    pub fn record_micros(&self, key: u64, micros: u64) {
        let shard = &self.shards[key as usize % RECORDER_SHARDS];
        let mut h = shard.lock().unwrap_or_else(|e| e.into_inner());
        h.saturating_record(micros.max(1));
    }

    /// Adds every shard into `into` and empties the shards.
    fn drain_into(&self, into: &mut Histogram<u64>) {
        for shard in &self.shards {
            let mut h = shard.lock().unwrap_or_else(|e| e.into_inner());
            let _ = into.add(&*h);
            h.reset();
        }
    }
}

impl Meter {
    /// A shared counter by name.
    pub fn counter(&self, name: &str) -> Arc<AtomicU64> {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.entry(name.to_owned()).or_default().clone()
    }

    /// Records a duration (µs) into the named histogram.
    pub fn record(&self, name: &str, d: Duration) {
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        let hist = h.entry(name.to_owned()).or_insert_with(histogram);
        hist.saturating_record(d.as_micros().max(1) as u64);
    }

    /// The named histogram's hot-loop recorder (reported under `name`
    /// together with whatever [`record`](Self::record) put there).
    pub fn recorder(&self, name: &str) -> Arc<Recorder> {
        let mut r = self.recorders.lock().unwrap_or_else(|e| e.into_inner());
        r.entry(name.to_owned())
            .or_insert_with(|| Arc::new(Recorder::new()))
            .clone()
    }

    /// Takes this period's histograms (resetting them) and the counters.
    fn snapshot(&self) -> (BTreeMap<String, String>, BTreeMap<String, u64>) {
        let recorders: Vec<(String, Arc<Recorder>)> = self
            .recorders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        for (name, r) in recorders {
            r.drain_into(h.entry(name).or_insert_with(histogram));
        }
        let hists = h.iter_mut().map(|(k, v)| {
            let s = encode(v);
            v.reset();
            (k.clone(), s)
        });
        let hists = hists.collect();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect();
        (hists, counters)
    }
}

fn encode(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    let _ = V2Serializer::new().serialize(h, &mut buf);
    B64.encode(buf)
}

fn decode(s: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = B64.decode(s)?;
    Ok(Deserializer::new().deserialize(&mut &bytes[..])?)
}

/// One line of worker output.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    /// "tick" or "done".
    kind: String,
    /// Seconds since the worker started.
    t: f64,
    hists: BTreeMap<String, String>,
    counters: BTreeMap<String, u64>,
    #[serde(default)]
    error: Option<String>,
}

/// Runs in a worker process: reports every second until `work` ends.
pub async fn report_while<F>(meter: Arc<Meter>, work: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let emit = |kind: &str, error: Option<String>| {
        let (hists, counters) = meter.snapshot();
        let line = Line {
            kind: kind.into(),
            t: started.elapsed().as_secs_f64(),
            hists,
            counters,
            error,
        };
        println!("{}", serde_json::to_string(&line).unwrap_or_default());
    };
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => emit("tick", None),
        }
    };
    emit("done", result.as_ref().err().map(|e| format!("{e:#}")));
    result
}

/// The merged view of all workers.
#[derive(Default)]
pub struct Merged {
    /// Totals per histogram name.
    pub totals: BTreeMap<String, Histogram<u64>>,
    /// Per-second histograms per name (second -> histogram).
    pub timeline: BTreeMap<String, BTreeMap<u64, Histogram<u64>>>,
    /// Per-second counters, summed over workers (latest value per worker).
    pub counters_timeline: BTreeMap<u64, BTreeMap<String, u64>>,
    /// Final counters, summed over workers.
    pub counters: BTreeMap<String, u64>,
    /// Worker errors.
    pub errors: Vec<String>,
}

/// What the coordinator's per-second hook may tell the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Nothing this second.
    None,
    /// Send this word to every worker's stdin.
    Broadcast(&'static str),
}

/// Starts `spec.workers` copies of this binary and merges what they say.
/// `on_tick` runs once per second in the coordinator with the elapsed
/// seconds and the current summed counters (gateway sampling, phase
/// changes); it may broadcast a command to the workers.
pub async fn coordinate(
    spec: Spec,
    mut on_tick: impl FnMut(u64, &BTreeMap<String, u64>) -> Command,
) -> anyhow::Result<Merged> {
    use tokio::io::AsyncWriteExt;
    let exe = std::env::current_exe().context("locating the harness binary")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Line)>();
    let mut spec = spec;
    if let Some(p) = spec.params.as_object_mut() {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // A caller that needs the run id itself (to name its users) sets it.
        p.entry("run").or_insert(run.into());
    }
    let mut children = Vec::new();
    let mut controls = Vec::new();
    for w in 0..spec.workers {
        let mut s = spec.clone();
        s.worker = w;
        let mut child = tokio::process::Command::new(&exe)
            .arg("worker")
            .arg(serde_json::to_string(&s)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        controls.push(child.stdin.take().context("worker stdin")?);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(line) = serde_json::from_str::<Line>(&l) {
                    let _ = tx.send((w, line));
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let mut merged = Merged::default();
    let mut last_counters: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); spec.workers];
    let mut done = 0;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while done < spec.workers {
        tokio::select! {
            msg = rx.recv() => {
                let Some((w, line)) = msg else { break };
                let second = line.t.round() as u64;
                for (name, b64) in &line.hists {
                    let h = decode(b64)?;
                    if h.is_empty() {
                        continue;
                    }
                    merged.totals.entry(name.clone()).or_insert_with(histogram).add(&h)?;
                    let per = merged.timeline.entry(name.clone()).or_default();
                    per.entry(second).or_insert_with(histogram).add(&h)?;
                }
                last_counters[w] = line.counters.clone();
                let mut sum: BTreeMap<String, u64> = BTreeMap::new();
                for c in &last_counters {
                    for (k, v) in c {
                        *sum.entry(k.clone()).or_default() += v;
                    }
                }
                merged.counters_timeline.insert(second, sum.clone());
                merged.counters = sum;
                if line.kind == "done" {
                    done += 1;
                    if let Some(e) = line.error {
                        merged.errors.push(format!("worker {w}: {e}"));
                    }
                }
            }
            _ = tick.tick() => {
                if let Command::Broadcast(word) = on_tick(started.elapsed().as_secs(), &merged.counters) {
                    for c in controls.iter_mut() {
                        let _ = c.write_all(format!("{word}\n").as_bytes()).await;
                        let _ = c.flush().await;
                    }
                }
            }
        }
    }
    drop(controls);
    for mut c in children {
        let status = c.wait().await?;
        if !status.success() && merged.errors.is_empty() {
            merged.errors.push(format!("a worker exited with {status}"));
        }
    }
    if done < spec.workers {
        bail!("only {done} of {} workers finished", spec.workers);
    }
    Ok(merged)
}

/// Commands from the coordinator, as a watch channel of the last word
/// read on stdin ("go", "burst", "stop").
pub fn commands() -> tokio::sync::watch::Receiver<String> {
    let (tx, rx) = tokio::sync::watch::channel(String::new());
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let _ = tx.send(l.trim().to_owned());
        }
        let _ = tx.send("stop".into());
    });
    rx
}

/// Waits until the coordinator says `word` (or "stop").
pub async fn wait_for(rx: &mut tokio::sync::watch::Receiver<String>, word: &str) -> bool {
    loop {
        {
            let v = rx.borrow_and_update();
            if *v == word {
                return true;
            }
            if *v == "stop" {
                return false;
            }
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}
