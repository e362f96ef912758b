//! `chatgate-loadtest`: drive a gateway and report what it did.

use clap::{Parser, Subcommand};

use chatgate_loadtest::latency::{self, LatencyOptions};

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
    };
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}
