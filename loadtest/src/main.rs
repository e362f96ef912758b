//! `chatgate-loadtest`: drive a gateway and report what it did.
//!
//! Every scenario stops by itself; targets must be loopback addresses.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use chatgate_loadtest::latency::{self, LatencyOptions};
use chatgate_loadtest::run::{self, Common, FanoutParams};
use chatgate_loadtest::throughput::{self, HistoryOptions, SendOptions};
use chatgate_loadtest::worker::{Meter, Spec, report_while};

#[derive(Parser)]
#[command(
    name = "chatgate-loadtest",
    version,
    about = "Load-test harness for chatgate"
)]
struct Cli {
    /// Gateway WebSocket URL; repeat to spread connections over nodes.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws", global = true)]
    urls: Vec<String>,
    /// The gateway's token secret.
    #[arg(long, env = "CHAT_TOKEN_SECRET", default_value = chatgate_loadtest::DEV_SECRET, global = true, hide_env_values = true)]
    token_secret: String,
    /// Write the JSON report here (single-process scenarios).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Directory for `<scenario>.json` and `<scenario>.svg`.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Worker processes, single-threaded each (each stays under the
    /// open-files limit); default: one per core.
    #[arg(long, default_value_t = cores(), global = true)]
    workers: usize,
    /// Gateway process ids to sample for RSS and CPU (local runs).
    #[arg(long = "gateway-pid", global = true)]
    gateway_pids: Vec<u32>,
    /// The gateways' Postgres, to read its CPU (processes on this machine)
    /// and transactions per action (`chat`).
    #[arg(long, global = true)]
    postgres_url: Option<String>,
    /// The gateways' Redis (`redis://host:port`), to read its CPU, command
    /// time and bytes out per action (`chat`).
    #[arg(long, global = true)]
    redis_url: Option<String>,
    /// A gateway's `/metrics` URL (repeat per node), to read its store
    /// statements per action (`chat`).
    #[arg(long = "metrics-url", global = true)]
    metrics_urls: Vec<String>,
    /// Print the change against an earlier JSON report.
    #[arg(long, global = true)]
    compare: Option<PathBuf>,
    /// Exit non-zero if anything was lost, duplicated, out of order,
    /// failed, errored or closed early, or if nothing was delivered (what
    /// CI's smoke run uses). Never refuses a run for being slow.
    #[arg(long, global = true)]
    check: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    /// Rooms.
    #[arg(long, default_value_t = 1)]
    rooms: u64,
    /// Members per room.
    #[arg(long, default_value_t = 1000)]
    members: u64,
    /// Publishing members per room.
    #[arg(long, default_value_t = 1)]
    publishers: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Message body bytes.
    #[arg(long, default_value_t = 100)]
    body: u64,
    /// Extra members of room 0 that never read (slow consumers).
    #[arg(long, default_value_t = 0)]
    slow: u64,
    /// Every member of a room on the same gateway (room r on URL r mod
    /// URLs), instead of members spread over all of them: the scale-out
    /// shape, where a node should pay only for its own rooms.
    #[arg(long)]
    rooms_on_one_node: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// Connect-to-Ready and message round-trip latency on an idle server.
    Latency {
        /// Sessions to open.
        #[arg(long, default_value_t = 10_000)]
        connects: usize,
        /// Sessions opened at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Messages to time.
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
    },
    /// Stored-and-acknowledged sends per second (closed loop).
    Sends {
        /// Concurrent senders.
        #[arg(long, default_value_t = 64)]
        senders: usize,
        /// Rooms they are spread over.
        #[arg(long, default_value_t = 16)]
        rooms: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Join latency in a members room (grant cold / warm) and an open
    /// room; needs the gateway's server API.
    Joins {
        /// Server API address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        api: std::net::SocketAddr,
        /// Server API key.
        #[arg(long, env = "CHAT_ADMIN_API_KEY")]
        api_key: String,
        /// Users measured.
        #[arg(long, default_value_t = 2000)]
        users: usize,
    },
    /// History page latency, walking back through a room.
    History {
        /// Room to read.
        #[arg(long, default_value = "history-1m")]
        room: String,
        /// Pages to fetch.
        #[arg(long, default_value_t = 10_000)]
        pages: usize,
        /// Messages per page.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Hold N authenticated sockets (2 rooms each); memory per connection
    /// idle and after a burst.
    Idle {
        /// Sockets in total (over all workers).
        #[arg(long, default_value_t = 50_000)]
        connections: usize,
        /// Small rooms (each connection is in `all` and one of these).
        #[arg(long, default_value_t = 500)]
        rooms: u64,
        /// Connects in flight per worker.
        #[arg(long, default_value_t = 64)]
        concurrency: u64,
        /// Messages every connection receives in the burst.
        #[arg(long, default_value_t = 100)]
        burst: u64,
    },
    /// Rooms of members with publishers at a fixed rate.
    Fanout {
        #[command(flatten)]
        f: FanoutArgs,
        /// Messages per second per room.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
    },
    /// Fan-out at rising rates until p99 passes the bound.
    Ramp {
        #[command(flatten)]
        f: FanoutArgs,
        /// First rate (messages/s per room).
        #[arg(long, default_value_t = 250)]
        start: u64,
        /// Rate multiplier per step.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// Most steps.
        #[arg(long, default_value_t = 8)]
        steps: u32,
        /// p99 bound in ms.
        #[arg(long, default_value_t = 50.0)]
        bound_ms: f64,
        /// Run every step, also after one goes over the bound (the smoke
        /// run's `--check` then covers the same steps on any machine).
        #[arg(long)]
        all_steps: bool,
    },
    /// A realistic mix: sends, typing, reactions, history, resumes.
    Chat {
        /// Connections.
        #[arg(long, default_value_t = 2000)]
        connections: u64,
        /// Members per room.
        #[arg(long, default_value_t = 20)]
        room_size: u64,
        /// Seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Mean think time between actions, ms.
        #[arg(long, default_value_t = 2000)]
        think_ms: u64,
    },
    /// What Redis carries for the cluster: the gateway's fan-out engine
    /// (several, one per simulated node, in this process) publishing as
    /// fast as Redis acknowledges; Redis CPU per message from `INFO`.
    RedisCapacity {
        /// Engines (nodes), each subscribed to every room.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Rooms.
        #[arg(long, default_value_t = 256)]
        rooms: usize,
        /// Publishes awaiting their ack at once.
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
        /// Sends per rate-limit lease call.
        #[arg(long, default_value_t = 2)]
        sends_per_lease: u64,
        /// Seconds measured (after 2 s of warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Message body bytes.
        #[arg(long, default_value_t = 100)]
        body: usize,
        /// Replicas a publish waits for (`WAIT`) before it is live.
        #[arg(long, default_value_t = 0)]
        wait_replicas: u32,
        /// The engines' Redis URL (default: `--redis-url`); a
        /// `redis-cluster://` URL for a Redis Cluster.
        #[arg(long)]
        engine_url: Option<String>,
        /// Redis servers to read `INFO` from (repeat for each master of a
        /// cluster; default: `--redis-url`).
        #[arg(long = "server")]
        servers: Vec<String>,
    },
    /// Internal: one worker process of a multi-process scenario.
    #[command(hide = true)]
    Worker {
        /// JSON spec from the coordinator.
        spec: String,
    },
}

fn fanout_params(f: &FanoutArgs, rate: u64) -> FanoutParams {
    FanoutParams {
        rooms: f.rooms,
        members: f.members,
        publishers: f.publishers,
        rate,
        seconds: f.seconds,
        body: f.body,
        slow: f.slow,
        rooms_on_one_node: f.rooms_on_one_node,
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::Worker { spec } = &cli.scenario {
        // One thread per worker process: the coordinator starts as many
        // workers as it wants cores, and a single-threaded runtime spends
        // nothing on work stealing or cross-thread wake-ups (the harness
        // must cost less than what it measures).
        let spec: Spec = serde_json::from_str(spec)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let meter = Arc::new(Meter::default());
        let result = runtime.block_on(report_while(
            meter.clone(),
            chatgate_loadtest::scenario::run_worker(spec, meter),
        ));
        // The stdin reader sits in a blocking read the runtime would wait
        // for on shutdown; leave directly.
        std::process::exit(i32::from(result.is_err()));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(coordinate_cli(cli))
}

async fn coordinate_cli(cli: Cli) -> anyhow::Result<()> {
    let url = cli.urls.first().cloned().unwrap_or_default();
    let common = Common {
        urls: cli.urls.clone(),
        secret: cli.token_secret.clone(),
        workers: cli.workers.max(1),
        gateway_pids: cli.gateway_pids.clone(),
        out: cli.out.clone(),
        probes: chatgate_loadtest::probes::ProbeTargets {
            postgres: cli.postgres_url.clone(),
            redis: cli.redis_url.clone(),
            metrics: cli.metrics_urls.clone(),
        },
    };
    // The multi-process scenarios write `<scenario>.json` into `--out`
    // themselves (with a picture); these four only have a report.
    let single = match &cli.scenario {
        Scenario::Latency { .. } => Some("latency"),
        Scenario::Sends { .. } => Some("sends"),
        Scenario::History { .. } => Some("history"),
        Scenario::Joins { .. } => Some("joins"),
        Scenario::RedisCapacity { .. } => Some("redis-capacity"),
        _ => None,
    };
    let report = match cli.scenario {
        Scenario::Latency {
            connects,
            concurrency,
            messages,
        } => {
            let o = LatencyOptions {
                url,
                secret: cli.token_secret,
                connects,
                concurrency,
                messages,
            };
            latency::run(&o).await?
        }
        Scenario::Sends {
            senders,
            rooms,
            seconds,
        } => {
            let o = SendOptions {
                url,
                secret: cli.token_secret,
                senders,
                rooms,
                duration: std::time::Duration::from_secs(seconds),
            };
            throughput::sends(&o).await?
        }
        Scenario::Joins {
            api,
            api_key,
            users,
        } => {
            let o = chatgate_loadtest::joins::JoinOptions {
                url,
                secret: cli.token_secret,
                api,
                api_key,
                users,
            };
            chatgate_loadtest::joins::run(&o).await?
        }
        Scenario::History { room, pages, limit } => {
            let o = HistoryOptions {
                url,
                secret: cli.token_secret,
                room,
                pages,
                limit,
            };
            throughput::history(&o).await?
        }
        Scenario::Idle {
            connections,
            rooms,
            concurrency,
            burst,
        } => run::idle(&common, connections, rooms, concurrency, burst).await?,
        Scenario::Fanout { f, rate } => {
            run::fanout(&common, &fanout_params(&f, rate), "fanout").await?
        }
        Scenario::Ramp {
            f,
            start,
            factor,
            steps,
            bound_ms,
            all_steps,
        } => {
            run::ramp(
                &common,
                &fanout_params(&f, start),
                start,
                factor,
                steps,
                bound_ms,
                all_steps,
            )
            .await?
        }
        Scenario::Chat {
            connections,
            room_size,
            seconds,
            think_ms,
        } => run::chat(&common, connections, room_size, seconds, think_ms).await?,
        Scenario::RedisCapacity {
            nodes,
            rooms,
            in_flight,
            sends_per_lease,
            seconds,
            body,
            wait_replicas,
            engine_url,
            servers,
        } => {
            let redis = cli.redis_url.clone();
            let url = engine_url
                .or_else(|| redis.clone())
                .context("redis-capacity needs --redis-url or --engine-url")?;
            let servers = if servers.is_empty() {
                redis.into_iter().collect()
            } else {
                servers
            };
            anyhow::ensure!(
                !servers.is_empty(),
                "redis-capacity needs --server or --redis-url"
            );
            let o = chatgate_loadtest::capacity::CapacityOptions {
                url,
                servers,
                nodes,
                rooms,
                in_flight,
                sends_per_lease,
                seconds,
                body,
                wait_replicas,
            };
            chatgate_loadtest::capacity::run(&o).await?
        }
        Scenario::Worker { .. } => unreachable!("handled above"),
    };
    if let (Some(name), Some(dir)) = (single, &cli.out) {
        let path = run::write_report(dir, name, &report)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(old) = cli.compare {
        run::compare(&old, &report)?;
    }
    if cli.check {
        let problems = run::problems(&report);
        if !problems.is_empty() {
            anyhow::bail!("check failed: {}", problems.join(", "));
        }
    }
    Ok(())
}
