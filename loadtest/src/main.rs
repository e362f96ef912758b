//! `chatgate-loadtest`: drive a gateway and report what it did.

use clap::{Parser, Subcommand};

use chatgate_loadtest::latency::{self, LatencyOptions};
use chatgate_loadtest::throughput::{self, HistoryOptions, SendOptions};

#[derive(Parser)]
#[command(
    name = "chatgate-loadtest",
    version,
    about = "Load-test harness for chatgate"
)]
struct Cli {
    /// Gateway WebSocket URL (loopback by default).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws", global = true)]
    url: String,
    /// The gateway's token secret.
    #[arg(long, env = "CHAT_TOKEN_SECRET", default_value = chatgate_loadtest::DEV_SECRET, global = true, hide_env_values = true)]
    token_secret: String,
    /// Write the JSON report here.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.scenario {
        Scenario::Latency {
            connects,
            concurrency,
            messages,
        } => {
            let o = LatencyOptions {
                url: cli.url,
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
                url: cli.url,
                secret: cli.token_secret,
                senders,
                rooms,
                duration: std::time::Duration::from_secs(seconds),
            };
            throughput::sends(&o).await?
        }
        Scenario::History { room, pages, limit } => {
            let o = HistoryOptions {
                url: cli.url,
                secret: cli.token_secret,
                room,
                pages,
                limit,
            };
            throughput::history(&o).await?
        }
    };
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}
