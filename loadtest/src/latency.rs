//! Idle-server latency: how long a new session takes to become Ready, and
//! how long a message takes to be acknowledged and delivered.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use chatgate_client::{Incoming, RawConnection};
use chatgate_protocol::payload::{Rooms, Send};
use chatgate_protocol::{ClientFrame, ServerFrame};

use crate::report::{self, histogram, record};

/// What to measure.
#[derive(Debug, Clone)]
pub struct LatencyOptions {
    /// WebSocket URL of the gateway.
    pub url: String,
    /// Token secret of the gateway.
    pub secret: String,
    /// Sessions to open (one sample each).
    pub connects: usize,
    /// Sessions opened concurrently.
    pub concurrency: usize,
    /// Messages to send (one ack and one delivery sample each).
    pub messages: usize,
}

async fn frames(c: &mut RawConnection) -> anyhow::Result<Vec<(u32, ServerFrame)>> {
    match c.recv_timeout(Duration::from_secs(10)).await? {
        Some(Incoming::Frames(f)) => Ok(f),
        Some(Incoming::Closed(code)) => bail!("closed: {code:?}"),
        None => bail!("no reply within 10 s"),
    }
}

async fn open(url: &str, token: String) -> anyhow::Result<RawConnection> {
    let target = crate::conn::Target::parse(url)?;
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    Ok(crate::conn::session(&target, local, token, &[]).await?.0)
}

/// Connect + Identify -> Ready, `connects` times.
pub async fn connects(o: &LatencyOptions) -> anyhow::Result<(Histogram<u64>, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per_task = o.connects.div_ceil(o.concurrency.max(1));
    for t in 0..o.concurrency.max(1) {
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            for i in 0..per_task {
                let user = format!("lat-{t}-{i}");
                let t0 = Instant::now();
                let mut c = open(&o.url, crate::token(&o.secret, &user)).await?;
                record(&mut h, t0.elapsed());
                let _ = c.close().await;
            }
            anyhow::Ok(h)
        }));
    }
    let mut all = histogram();
    for t in tasks {
        all.add(t.await??).context("merging histograms")?;
    }
    Ok((all, started.elapsed()))
}

/// Send -> MessageSent (ack) and send -> NewMessage at the other member
/// (delivery), one message at a time.
pub async fn round_trips(o: &LatencyOptions) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let room = "latency-room".to_string();
    let mut a = open(&o.url, crate::token(&o.secret, "lat-sender")).await?;
    let mut b = open(&o.url, crate::token(&o.secret, "lat-receiver")).await?;
    for c in [&mut a, &mut b] {
        c.send(
            2,
            &ClientFrame::Join(Rooms {
                rooms: vec![room.clone()],
            }),
        )
        .await?;
        while !frames(c).await?.iter().any(|(rid, _)| *rid == 2) {}
    }
    let (mut ack, mut delivery) = (histogram(), histogram());
    let messages = o.messages;
    let receiver = tokio::spawn(async move {
        let mut got = Vec::with_capacity(1 << 14);
        // Once everything is in, a short quiet spell shows that nothing
        // more (a duplicate) follows.
        let quiet = |n: usize| Duration::from_millis(if n >= messages { 500 } else { 5000 });
        while let Ok(Some(Incoming::Frames(f))) = b.recv_timeout(quiet(got.len())).await {
            let now = Instant::now();
            got.extend(f.into_iter().filter_map(|(_, f)| match f {
                ServerFrame::NewMessage(m) => Some((m.message.client_msg_id, now)),
                _ => None,
            }));
        }
        got
    });
    // Ids unique to this run: a second run against the same gateway must
    // not be taken for retries (which are acknowledged, not delivered).
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = |i: usize| format!("lat-{run}-{i}");
    let mut sent_at = Vec::with_capacity(o.messages);
    for i in 0..o.messages {
        let frame = ClientFrame::Send(Send {
            room: room.clone(),
            client_msg_id: id(i),
            body: "a typical short chat message, about sixty bytes long, ok".into(),
            attachments: vec![],
        });
        let t0 = Instant::now();
        a.send(10, &frame).await?;
        loop {
            if frames(&mut a)
                .await?
                .iter()
                .any(|(rid, f)| *rid == 10 && matches!(f, ServerFrame::MessageSent(_)))
            {
                break;
            }
        }
        record(&mut ack, t0.elapsed());
        sent_at.push(t0);
    }
    let _ = a.close().await;
    let got = receiver.await?;
    // The i-th delivery must be the i-th message: a count alone would let
    // a loss and a duplicate cancel out.
    if let Some((i, (got_id, _))) = got.iter().enumerate().find(|(i, (g, _))| *g != id(*i)) {
        bail!(
            "delivery {i} was {got_id}, expected {} (lost, duplicated or out of order)",
            id(i)
        );
    }
    if got.len() != sent_at.len() {
        bail!("receiver got {} of {} messages", got.len(), sent_at.len());
    }
    for (s, (_, r)) in sent_at.iter().zip(&got) {
        record(&mut delivery, r.saturating_duration_since(*s));
    }
    Ok((ack, delivery))
}

/// Runs both measurements, prints the summary, returns the JSON report.
pub async fn run(o: &LatencyOptions) -> anyhow::Result<Value> {
    let (connect, elapsed) = connects(o).await?;
    println!("{}", report::line("connect+identify -> Ready", &connect));
    let rate = connect.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{:<28} {rate:.0} sessions/s (concurrency {})",
        "", o.concurrency
    );
    let (ack, delivery) = round_trips(o).await?;
    println!("{}", report::line("send -> ack", &ack));
    println!("{}", report::line("send -> delivered", &delivery));
    Ok(json!({
        "scenario": "latency",
        "connect_to_ready": report::json(&connect),
        "sessions_per_sec": rate,
        "send_to_ack": report::json(&ack),
        "send_to_delivery": report::json(&delivery),
    }))
}
