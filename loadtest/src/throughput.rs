//! Closed-loop load: stored-and-acknowledged sends per second, and
//! history page latency.

use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use chatgate_client::RawConnection;
use chatgate_protocol::payload::{Cursor, History, Send};
use chatgate_protocol::{ClientFrame, ServerFrame};

use crate::report::{self, histogram, record};

/// Settings for [`sends`].
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Gateway URL.
    pub url: String,
    /// Token secret.
    pub secret: String,
    /// Concurrent senders (one connection each, one message in flight).
    pub senders: usize,
    /// Rooms the senders are spread over.
    pub rooms: usize,
    /// How long to send.
    pub duration: Duration,
}

async fn reply(c: &mut RawConnection, rid: u32) -> anyhow::Result<ServerFrame> {
    Ok(crate::conn::reply(c, rid, Duration::from_secs(30)).await?.0)
}

async fn session(url: &str, token: String, rooms: Vec<String>) -> anyhow::Result<RawConnection> {
    let target = crate::conn::Target::parse(url)?;
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    Ok(crate::conn::session(&target, local, token, &rooms).await?.0)
}

/// Every sender sends, waits for MessageSent, sends again, for the
/// duration. Counts acknowledged (stored) messages.
pub async fn sends(o: &SendOptions) -> anyhow::Result<Value> {
    let mut tasks = Vec::new();
    let run = format!(
        "{:x}",
        Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id())
    );
    for s in 0..o.senders {
        let o = o.clone();
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let room = format!("load-{}", s % o.rooms.max(1));
            let mut c = session(
                &o.url,
                crate::token(&o.secret, &format!("sender-{s}")),
                vec![room.clone()],
            )
            .await?;
            let mut h = histogram();
            let mut errors = 0u64;
            let end = Instant::now() + o.duration;
            let mut i = 0u64;
            while Instant::now() < end {
                i += 1;
                let frame = ClientFrame::Send(Send {
                    room: room.clone(),
                    client_msg_id: format!("{run}-{s}-{i}"),
                    body: "load test message with a realistic length of about eighty bytes.."
                        .into(),
                    attachments: vec![],
                });
                let rid = (i % 1_000_000) as u32 + 10;
                let t0 = Instant::now();
                c.send(rid, &frame).await?;
                match reply(&mut c, rid).await? {
                    ServerFrame::MessageSent(_) => record(&mut h, t0.elapsed()),
                    _ => errors += 1,
                }
            }
            anyhow::Ok((h, errors))
        }));
    }
    let started = Instant::now();
    let mut all: Histogram<u64> = histogram();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        all.add(h)?;
        errors += e;
    }
    let secs = started
        .elapsed()
        .as_secs_f64()
        .max(o.duration.as_secs_f64());
    let rate = all.len() as f64 / secs;
    println!("{}", report::line("send -> ack (stored)", &all));
    println!(
        "{:<28} {rate:.0} acknowledged sends/s ({} senders, {} errors)",
        "", o.senders, errors
    );
    Ok(json!({
        "scenario": "sends",
        "senders": o.senders,
        "acked_per_sec": rate,
        "errors": errors,
        "send_to_ack": report::json(&all),
    }))
}

/// Settings for [`history`].
#[derive(Debug, Clone)]
pub struct HistoryOptions {
    /// Gateway URL.
    pub url: String,
    /// Token secret.
    pub secret: String,
    /// Room to page through.
    pub room: String,
    /// Pages to fetch.
    pub pages: usize,
    /// Page size.
    pub limit: u32,
}

/// Fetches pages: alternately the newest page and pages deep in the room
/// (walking back with cursors), timing each.
pub async fn history(o: &HistoryOptions) -> anyhow::Result<Value> {
    let mut c = session(
        &o.url,
        crate::token(&o.secret, "history-reader"),
        vec![o.room.clone()],
    )
    .await?;
    let mut h = histogram();
    let mut cursor: Option<Cursor> = None;
    let mut rows = 0usize;
    for i in 0..o.pages {
        let rid = (i % 1_000_000) as u32 + 10;
        let t0 = Instant::now();
        c.send(
            rid,
            &ClientFrame::History(History {
                room: o.room.clone(),
                before: cursor,
                limit: o.limit,
            }),
        )
        .await?;
        match reply(&mut c, rid).await? {
            ServerFrame::HistoryPage(p) => {
                record(&mut h, t0.elapsed());
                rows += p.messages.len();
                cursor = p.next;
            }
            other => bail!("unexpected reply {other:?}"),
        }
    }
    println!("{}", report::line("history page", &h));
    println!(
        "{:<28} {rows} messages in {} pages of {}",
        "", o.pages, o.limit
    );
    Ok(
        json!({ "scenario": "history", "pages": o.pages, "limit": o.limit, "page": report::json(&h) }),
    )
}
