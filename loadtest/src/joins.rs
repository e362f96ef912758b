//! Join latency in a `members` room, with the membership answer cold
//! (first join after the grant: the node's cache and the Redis cache
//! miss, the store answers) and warm (the node's cache answers), against
//! an `open` room, which needs no answer at all.
//!
//! Grants go through the gateway's server API, so the gateway must run
//! with `--admin-api-key`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use chatgate_client::RawConnection;
use chatgate_protocol::payload::Rooms;
use chatgate_protocol::token::{Claims, Verifier, unix_now};
use chatgate_protocol::{ClientFrame, ServerFrame};

use crate::report::{self, histogram, record};

/// Settings for [`run`].
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Gateway URL.
    pub url: String,
    /// Token secret.
    pub secret: String,
    /// Server API address (host:port).
    pub api: SocketAddr,
    /// Server API key.
    pub api_key: String,
    /// Users to measure (one cold and one warm join each).
    pub users: usize,
}

/// One server API call (blocking; setup only, not timed).
fn api_call(o: &JoinOptions, method: &str, body: &Value) -> anyhow::Result<Value> {
    let body = body.to_string();
    let mut s = TcpStream::connect(o.api).context("connecting to the server API")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        o.api_key,
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, reply) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{method}: {head} {reply}");
    }
    Ok(serde_json::from_str(reply)?)
}

async fn request(
    c: &mut RawConnection,
    rid: u32,
    frame: ClientFrame,
) -> anyhow::Result<ServerFrame> {
    c.send(rid, &frame).await?;
    Ok(crate::conn::reply(c, rid, Duration::from_secs(30)).await?.0)
}

fn rooms(name: &str) -> Rooms {
    Rooms {
        rooms: vec![name.to_owned()],
    }
}

/// Per user: connect, be granted the room (so no cache has the answer,
/// and the grant's control message has reached the node), join (cold),
/// leave (the grant stays), join (warm), and join an open room.
pub async fn run(o: &JoinOptions) -> anyhow::Result<Value> {
    let tag = format!("{:x}", unix_now() ^ u64::from(std::process::id()));
    let room = format!("bench-join-{tag}");
    let open = format!("public:bench-join-{tag}");
    let users: Vec<String> = (0..o.users).map(|i| format!("joiner-{tag}-{i}")).collect();
    let target = crate::conn::Target::parse(&o.url)?;
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    let (mut cold, mut warm, mut free) = (histogram(), histogram(), histogram());
    for user in &users {
        // No `rooms` claim: the grant is what lets the user in.
        let token = Verifier::new(o.secret.as_bytes()).mint(&Claims {
            sub: user.clone(),
            name: None,
            picture: None,
            exp: unix_now() + 3600,
            rooms: Vec::new(),
        });
        let (mut c, ready) = crate::conn::session(&target, local, token, &[]).await?;
        if !ready.rooms.is_empty() {
            bail!("{user}: rooms before the grant");
        }
        api_call(
            o,
            "members.add",
            &json!({ "room": room, "members": [{ "user_id": user }] }),
        )?;
        // The grant's control message is handled by the node's fan-out;
        // a heartbeat round trip lets it land first.
        request(&mut c, 2, ClientFrame::Heartbeat).await?;
        for (rid, h) in [(3, &mut cold), (5, &mut warm)] {
            let t0 = Instant::now();
            match request(&mut c, rid, ClientFrame::Join(rooms(&room))).await? {
                ServerFrame::Joined(_) => record(h, t0.elapsed()),
                other => bail!("{user}: join answered {other:?}"),
            }
            request(&mut c, rid + 1, ClientFrame::Leave(rooms(&room))).await?;
        }
        let t0 = Instant::now();
        match request(&mut c, 7, ClientFrame::Join(rooms(&open))).await? {
            ServerFrame::Joined(_) => record(&mut free, t0.elapsed()),
            other => bail!("{user}: open join answered {other:?}"),
        }
    }
    println!("{}", report::line("join, cold (store)", &cold));
    println!("{}", report::line("join, warm (node cache)", &warm));
    println!("{}", report::line("join, open room", &free));
    Ok(json!({
        "scenario": "joins",
        "users": o.users,
        "cold": report::json(&cold),
        "warm": report::json(&warm),
        "open": report::json(&free),
    }))
}
