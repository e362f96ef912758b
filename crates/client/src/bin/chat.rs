//! `chat`: talk to a chatgate server from a terminal.
//!
//! ```text
//! chat --token "$T" talk general          # interactive: type lines, see others
//! chat --token "$T" send general "hello"  # one message, prints the ack
//! chat --token "$T" tail general random   # print messages as they arrive
//! chat --token "$T" history general       # newest 50 messages
//! ```

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};

use chatgate_client::{Client, ClientConfig, Event};
use chatgate_protocol::payload::{Message, NewMessage};

#[derive(Parser)]
#[command(
    name = "chat",
    version,
    about = "Command-line client for a chatgate server"
)]
struct Cli {
    /// Server WebSocket URL.
    #[arg(long, env = "CHAT_URL", default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Access token (`chatgate token --user NAME` prints one).
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM file of a CA to trust for `wss://` besides Mozilla's and the system's roots (a
    /// private CA, a test certificate).
    #[arg(long, env = "CHAT_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a room, print what others say, send each line you type.
    Talk {
        /// Room name.
        room: String,
    },
    /// Send one message and print the acknowledgement.
    Send {
        /// Room name.
        room: String,
        /// Message text.
        text: String,
    },
    /// Join rooms and print messages as they arrive.
    Tail {
        /// Room names.
        #[arg(required = true)]
        rooms: Vec<String>,
    },
    /// Print the newest messages of a room.
    History {
        /// Room name.
        room: String,
        /// How many (1..=100).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// The sender as the server vouches for it: the display name is the
/// sender's own claim, so the user id always shows beside it (two users
/// may pick one name); an empty id is the application's system message.
fn show(m: &Message) {
    if m.sender_id.is_empty() {
        println!("[{}] (system) {}: {}", m.room, m.sender_name, m.body);
    } else {
        println!(
            "[{}] {} <{}>: {}",
            m.room, m.sender_name, m.sender_id, m.body
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = ClientConfig::new(&cli.url, &cli.token);
    if let Some(path) = &cli.ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        config.tls = Some(chatgate_protocol::tls::client_config(Some(&pem))?);
    }
    let (client, mut events) = Client::connect(config)
        .await
        .with_context(|| format!("connecting to {}", cli.url))?;
    match cli.command {
        Command::Send { room, text } => {
            client.join(&[&room]).await?;
            let ack = client.send(&room, &text).await?;
            println!(
                "sent: id {} seq {} in {}",
                ack.message_id, ack.seq, ack.room
            );
        }
        Command::History { room, limit } => {
            client.join(&[&room]).await?;
            let page = client.history(&room, None, limit).await?;
            for m in page.messages.iter().rev() {
                show(m);
            }
        }
        Command::Tail { rooms } => {
            let names: Vec<&str> = rooms.iter().map(String::as_str).collect();
            client.join(&names).await?;
            eprintln!("listening in {} (Ctrl-C to stop)", rooms.join(", "));
            while let Some(ev) = events.recv().await {
                print_event(&ev);
            }
        }
        Command::Talk { room } => {
            client.join(&[&room]).await?;
            eprintln!(
                "joined {room} as {}; type a line and press Enter (Ctrl-D to quit)",
                client.user_id()
            );
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            loop {
                tokio::select! {
                    line = lines.next_line() => match line? {
                        Some(text) if !text.trim().is_empty() => {
                            if let Err(e) = client.send(&room, &text).await {
                                eprintln!("not sent: {e}");
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                    ev = events.recv() => match ev {
                        Some(ev) => print_event(&ev),
                        None => break,
                    },
                }
            }
        }
    }
    Ok(())
}

fn print_event(ev: &Event) {
    match ev {
        Event::Message(NewMessage { message, .. }) => show(message),
        Event::Typing(t) => eprintln!("[{}] {} is typing…", t.room, t.user_id),
        Event::Reaction(r) => eprintln!(
            "[{}] {} reacted {} to #{}",
            r.room, r.user_id, r.emoji, r.message_id
        ),
        Event::Disconnected { code, reconnecting } => {
            eprintln!(
                "disconnected (code {code:?}){}",
                if *reconnecting {
                    ", reconnecting…"
                } else {
                    ""
                }
            )
        }
        Event::Resumed(r) => {
            for room in r.rooms.iter().filter(|r| !r.recovered) {
                eprintln!(
                    "[{}] missed events could not be recovered; run `chat history`",
                    room.room
                );
            }
        }
        Event::Missed { room, .. } => {
            eprintln!("[{room}] messages were missed; run `chat history`")
        }
        Event::StreamLost { room, .. } => {
            eprintln!("[{room}] the room's stream was lost; run `chat history`")
        }
        Event::Error(e) => eprintln!("error {}: {}", e.code, e.message),
        Event::Removed { rooms } => {
            eprintln!("removed from {} (membership ended)", rooms.join(", "))
        }
        Event::Closed { code, reason } => eprintln!("closed (code {code:?}): {reason}"),
        Event::Ready(_) => {}
    }
}
