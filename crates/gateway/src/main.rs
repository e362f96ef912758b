//! `chatgate`: run the gateway, or mint a development token.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use chatgate_gateway::admin::AdminServer;
use chatgate_gateway::auth::{Claims, Verifier, unix_now};
use chatgate_gateway::config::{Config, Overrides};
use chatgate_gateway::starting::{self, Progress};
use chatgate_gateway::{Node, Server, server};

#[derive(Parser)]
#[command(
    name = "chatgate",
    version,
    about = "Real-time chat gateway (WebSocket, binary protocol chat.v1)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print an access token signed with the configured secret.
    Token {
        /// User id (the token subject).
        #[arg(long)]
        user: String,
        /// Display name (defaults to the user id).
        #[arg(long)]
        name: Option<String>,
        /// Avatar URL.
        #[arg(long)]
        picture: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
        /// Rooms the token allows beyond grants, comma-separated; a
        /// trailing `*` makes a prefix (`team-1:*`), `*` allows all.
        #[arg(long, value_delimiter = ',')]
        rooms: Vec<String>,
    },
    /// Ask a running gateway's `/health` (exit 0 when it answers 200):
    /// for container health checks, where the image has no curl.
    Health {
        /// Address to ask; default the configured listen address (an
        /// unspecified one, such as 0.0.0.0, asked on loopback).
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    // Before the configuration: max_connections defaults from the limit.
    let limits = match command {
        Command::Serve => Some(chatgate_gateway::config::raise_open_files_limit()),
        _ => None,
    };
    let config = Config::load(&cli.overrides)?;
    match command {
        Command::Token {
            user,
            name,
            picture,
            ttl,
            rooms,
        } => {
            let longest = config.auth.max_lifetime.as_secs();
            if ttl == 0 || ttl > longest {
                anyhow::bail!(
                    "--ttl must be between 1 and {longest} s (the longest token lifetime the \
                     gateway accepts; raise it with --jwt-max-lifetime-secs)"
                );
            }
            let token = Verifier::new(config.token_secret.as_bytes()).mint(&Claims {
                sub: user,
                name,
                picture,
                exp: unix_now().saturating_add(ttl),
                rooms,
            });
            println!("{token}");
            Ok(())
        }
        Command::Serve => serve(config, limits),
        Command::Health { addr, timeout_ms } => {
            let mut addr = addr.unwrap_or(config.listen);
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            match health(addr, Duration::from_millis(timeout_ms)) {
                Ok(body) => {
                    println!("{body}");
                    Ok(())
                }
                Err(e) => {
                    eprintln!("chatgate at {addr} is not healthy: {e:#}");
                    std::process::exit(1)
                }
            }
        }
    }
}

/// One `GET /health`; the body when the answer is 200.
fn health(addr: std::net::SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).context("connecting")?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut reply)
        .context("reading the answer")?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        anyhow::bail!("answered {status:?}");
    }
    Ok(body.trim().to_owned())
}

fn serve(config: Config, limits: Option<std::io::Result<(u64, u64)>>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CHAT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match limits {
        Some(Ok((before, after))) if after > before => {
            tracing::info!(
                before,
                after,
                "raised the open-files limit to its hard limit"
            )
        }
        Some(Ok((_, now))) => tracing::info!(open_files = now, "open-files limit"),
        Some(Err(e)) => tracing::warn!(error = %e, "could not raise the open-files limit"),
        None => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        // Signals first: a SIGTERM while waiting for backends ends the
        // wait; one right after the readiness line drains.
        let mut signals = Signals::install()?;
        // The port is bound before the backends are reached, and answers
        // (alive, not ready) while they are awaited.
        let listener = server::bind_listener(&config).context("binding the listen address")?;
        let addr = listener.local_addr()?;
        announce(format_args!("chatgate starting on http://{addr}"));
        let progress = Progress::new();
        let build = build_when_reachable(config, progress.clone());
        let node = tokio::select! {
            node = starting::serve_until(&listener, progress, build) => node,
            () = signals.wait() => {
                tracing::info!("signal received while starting; exiting");
                return Ok(());
            }
        };
        let server = Server::on(node.clone(), listener);
        let addr = server.local_addr()?;
        tracing::info!(
            %addr,
            store = node.store.engine(),
            fanout = node.fanout.engine(),
            max_connections = node.config.max_connections,
            "chatgate listening"
        );
        let policies: Vec<String> = node
            .rooms
            .policies()
            .iter()
            .map(|p| p.to_string())
            .collect();
        tracing::info!(policies = ?policies, "room policies (longest prefix first)");
        // The server API runs only with a key: without one it could only
        // refuse, and /health and /metrics are on the public port anyway.
        let admin = match (node.config.admin_listen, &node.config.admin_api_key) {
            (Some(at), Some(_)) => {
                let admin = AdminServer::bind(node.clone(), at)
                    .await
                    .with_context(|| format!("binding the server API address {at}"))?;
                let addr = admin.local_addr()?;
                tracing::info!(%addr, "server API listening");
                announce(format_args!("chatgate server API on http://{addr}"));
                Some(admin)
            }
            (Some(_), None) => {
                tracing::info!("no admin_api_key: the server API is off");
                None
            }
            (None, _) => None,
        };
        // Scripts and tests wait for this line.
        announce(format_args!(
            "chatgate listening on http://{addr} (WebSocket at ws://{addr}/ws)"
        ));
        let handle = server.shutdown_handle();
        if let Some(admin) = admin {
            tokio::spawn(admin.run(handle.subscribe()));
        }
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("signal received");
            handle.shutdown();
        });
        let served = server.run().await;
        // Stream positions the store holds back are written before exiting.
        if let Err(e) = node.store.flush().await {
            tracing::warn!(error = %e, "could not write the last stream positions");
        }
        served
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// One line on stdout for scripts and tests to wait for. A closed stdout
/// (the reader went away) is no reason to stop serving: `println!` would
/// panic there.
fn announce(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Builds the node, retrying with backoff (0.5 s doubling to 10 s) for as
/// long as a backend cannot be reached: an orchestrator that starts the
/// gateway before its database gets a gateway that waits, says what for
/// (log and `/health`), and serves once it can.
async fn build_when_reachable(config: Config, progress: Arc<Progress>) -> Arc<Node> {
    let mut wait = Duration::from_millis(500);
    loop {
        let attempt = tokio::time::timeout(BUILD_ATTEMPT, Node::build(config.clone())).await;
        let failure = match attempt {
            Ok(Ok(node)) => return node,
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("reaching the backends took over {BUILD_ATTEMPT:?}"),
        };
        // The outermost context names the step, never an address or a
        // credential: that is what /health shows. The log has it all.
        progress.failed(failure.to_string());
        tracing::warn!(error = %format!("{failure:#}"), retry_in = ?wait, "waiting for backends");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// How long one attempt to reach the backends may take.
const BUILD_ATTEMPT: Duration = Duration::from_secs(60);

/// SIGTERM and SIGINT, registered up front.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
