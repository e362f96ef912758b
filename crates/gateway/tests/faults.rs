//! Fault injection in the style of a small Jepsen test: three cluster
//! nodes on Postgres and a private, durable Redis; members in a few rooms
//! sending with retries and resuming through every fault; a scheduler
//! that SIGKILLs, SIGTERMs and SIGSTOPs nodes and kills Redis, restarting
//! it with and without its data. At the end every acknowledged message
//! must have reached every member of its room exactly once (live, by a
//! resume's replay, or by a History reload the protocol asked for), in
//! sequence order, the sender's own acknowledgements included, and be in
//! History once.
//!
//! `CHAT_FAULTS_SECONDS` sets how long faults are injected (default 24,
//! what CI runs); a longer run is the same test:
//! `CHAT_FAULTS_SECONDS=600 cargo test --release -p chatgate-gateway --test faults -- --nocapture`.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatgate_client::RawConnection;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ErrorCode, ServerFrame};
use common::*;

const ROOMS: usize = 3;
const MEMBERS_PER_ROOM: usize = 4;
const NODES: usize = 3;

/// Where the live nodes can be reached (`None` while one is down).
type Urls = Arc<Mutex<Vec<Option<String>>>>;

/// What one member saw, kept outside its task so the test can watch it.
#[derive(Default)]
struct Seen {
    /// Message ids delivered live or by replay, in arrival order.
    delivered: Vec<u64>,
    /// Message ids found in History reloads the protocol asked for.
    covered: HashSet<u64>,
    /// This member's acknowledged message ids.
    acked: Vec<u64>,
    /// Broken promises: order, gaps, unexpected errors.
    violations: Vec<String>,
    resumes_recovered: u32,
    resumes_reloaded: u32,
    close_codes: BTreeMap<Option<u16>, u32>,
    /// A send not yet acknowledged.
    pending: bool,
}

struct Member {
    user: String,
    room: String,
    seen: Arc<Mutex<Seen>>,
    session: Option<[u8; 16]>,
    position: Option<(u64, u64)>,
    next_cid: u32,
    pending: Option<String>,
    /// Request id of the pending send on this connection, while unanswered.
    awaiting: Option<u32>,
    /// The protocol asked for a History reload not yet done.
    must_reload: bool,
    /// Frames that arrived while History was being read.
    backlog: Vec<(u32, ServerFrame)>,
    /// The last few frames, to explain a broken promise.
    recent: Vec<String>,
    rid: u32,
}

enum Next {
    Reconnect,
    Done,
}

impl Member {
    fn note(&self, what: String) {
        self.seen.lock().unwrap().violations.push(what);
    }

    fn rid(&mut self) -> u32 {
        self.rid = self.rid.wrapping_add(1).max(2);
        self.rid
    }

    /// One room event at (`epoch`, `seq`) on this connection, the
    /// member's own acknowledgement included.
    fn at(&mut self, epoch: u64, seq: u64, what: &str) {
        match self.position {
            Some((e, s)) if e == epoch => {
                if seq <= s {
                    self.note(format!("{}: {what} seq {seq} after {s}", self.user));
                } else if seq > s + 1 {
                    self.note(format!(
                        "{}: {what} skipped {s} -> {seq} after {:?}",
                        self.user, self.recent
                    ));
                }
            }
            // Another epoch: the stream was lost; reload (PROTOCOL.md §9.5).
            Some(_) => self.must_reload = true,
            None => {}
        }
        self.position = Some((epoch, seq));
    }

    /// Reads the room's History back to its start; frames arriving
    /// meanwhile wait in the backlog. `false` if the connection ended.
    async fn reload(&mut self, c: &mut Conn) -> bool {
        let mut before = None;
        loop {
            let rid = self.rid();
            let req = ClientFrame::History(History {
                room: self.room.clone(),
                before,
                limit: 100,
            });
            if c.raw.send(rid, &req).await.is_err() {
                return false;
            }
            let page = loop {
                match c.next(Duration::from_secs(5)).await {
                    Some((r, ServerFrame::HistoryPage(p))) if r == rid => break p,
                    Some(other) => self.backlog.push(other),
                    None => return false,
                }
            };
            self.seen
                .lock()
                .unwrap()
                .covered
                .extend(page.messages.iter().map(|m| m.id));
            match page.next {
                Some(next) => before = Some(next),
                None => {
                    self.must_reload = false;
                    return true;
                }
            }
        }
    }

    fn frame(&mut self, rid: u32, frame: ServerFrame) {
        if self.recent.len() == 6 {
            self.recent.remove(0);
        }
        self.recent.push(match &frame {
            ServerFrame::NewMessage(m) => format!("event {}:{}", m.epoch, m.message.seq),
            ServerFrame::MessageSent(a) => {
                format!("ack {}:{} dup={} rid={rid}", a.epoch, a.seq, a.duplicate)
            }
            ServerFrame::Error(e) => format!("error {} rid={rid}", e.code),
            ServerFrame::Resumed(r) => format!("resumed {:?}", r.rooms),
            other => format!("{other:?}").chars().take(40).collect(),
        });
        match frame {
            ServerFrame::NewMessage(m) => {
                self.at(m.epoch, m.message.seq, "NewMessage");
                self.seen.lock().unwrap().delivered.push(m.message.id);
            }
            ServerFrame::MessageSent(a) => {
                if !a.duplicate && a.seq != 0 {
                    self.at(a.epoch, a.seq, "MessageSent");
                }
                let mut seen = self.seen.lock().unwrap();
                if !seen.acked.contains(&a.message_id) {
                    seen.acked.push(a.message_id);
                }
                seen.pending = false;
                self.pending = None;
                self.awaiting = None;
            }
            ServerFrame::Error(e) => {
                let retry = ErrorCode::from_u16(e.code).is_some_and(|c| c.retryable());
                if !retry {
                    self.note(format!("{}: error {e:?} for request {rid}", self.user));
                }
                if self.awaiting == Some(rid) {
                    // The pending send goes again at the next tick.
                    self.awaiting = None;
                }
            }
            ServerFrame::Resumed(r) => {
                for room in r.rooms {
                    self.position = Some((room.epoch, room.seq));
                    if room.recovered {
                        self.seen.lock().unwrap().resumes_recovered += 1;
                    } else {
                        self.seen.lock().unwrap().resumes_reloaded += 1;
                        self.must_reload = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// Handles what waited while History was read, then reloads if asked.
    /// `false` if the connection ended.
    async fn catch_up(&mut self, c: &mut Conn) -> bool {
        loop {
            for (rid, f) in std::mem::take(&mut self.backlog) {
                self.frame(rid, f);
            }
            if !self.must_reload {
                return true;
            }
            if !self.reload(c).await {
                return false;
            }
        }
    }

    /// Connects to a live node, identifies (resuming after the first
    /// time), and sends and reads until the connection ends.
    async fn connection(&mut self, urls: &Urls, sending: &AtomicBool, done: &AtomicBool) -> Next {
        let url = {
            let urls = urls.lock().unwrap();
            let live: Vec<String> = urls.iter().flatten().cloned().collect();
            if live.is_empty() {
                None
            } else {
                Some(live[rand::random::<u32>() as usize % live.len()].clone())
            }
        };
        let Some(url) = url else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Next::Reconnect;
        };
        let Ok(Ok(mut raw)) =
            tokio::time::timeout(Duration::from_secs(2), RawConnection::connect(&url)).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Next::Reconnect;
        };
        let resume = match (self.session, self.position) {
            (Some(session_id), Some((epoch, seq))) => Some(Resume {
                session_id,
                positions: vec![RoomPosition {
                    room: self.room.clone(),
                    epoch,
                    seq,
                }],
            }),
            _ => None,
        };
        let identify = Identify {
            token: token(&self.user),
            resume,
        };
        if raw.send(1, &ClientFrame::Identify(identify)).await.is_err() {
            return Next::Reconnect;
        }
        let mut c = Conn::new(raw);
        self.awaiting = None;
        let Some((_, ServerFrame::Ready(ready))) = c.next(Duration::from_secs(5)).await else {
            return self.ended(&mut c).await;
        };
        self.session = Some(ready.session_id);
        if let Some(r) = ready.rooms.iter().find(|r| r.room == self.room) {
            self.position = Some((r.epoch, r.seq));
        } else {
            let rid = self.rid();
            let join = ClientFrame::Join(Rooms {
                rooms: vec![self.room.clone()],
            });
            c.raw.send(rid, &join).await.ok();
            loop {
                match c.next(Duration::from_secs(5)).await {
                    Some((r, ServerFrame::Joined(j))) if r == rid => {
                        // Events after the joined position may come just
                        // before Joined (PROTOCOL.md §9.5).
                        if let Some(p) = j.rooms.first()
                            && !matches!(self.position, Some((e, s)) if e == p.epoch && s > p.seq)
                        {
                            self.position = Some((p.epoch, p.seq));
                        }
                        break;
                    }
                    Some((r, f)) => self.frame(r, f),
                    None => return self.ended(&mut c).await,
                }
            }
        }
        if !self.catch_up(&mut c).await {
            return self.ended(&mut c).await;
        }
        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(150));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if done.load(Ordering::Relaxed) && self.pending.is_none() {
                        return Next::Done;
                    }
                    if last_heard.elapsed() > Duration::from_secs(3) {
                        // A paused node: give up on this connection.
                        return Next::Reconnect;
                    }
                    if self.pending.is_none() && sending.load(Ordering::Relaxed) {
                        self.next_cid += 1;
                        self.pending = Some(format!("{}-{}", self.user, self.next_cid));
                        self.seen.lock().unwrap().pending = true;
                    }
                    let rid = self.rid();
                    let frame = match (&self.pending, self.awaiting) {
                        (Some(cid), None) => {
                            self.awaiting = Some(rid);
                            send_frame(&self.room, cid, "jepsen")
                        }
                        _ => ClientFrame::Heartbeat,
                    };
                    if c.raw.send(rid, &frame).await.is_err() {
                        return self.ended(&mut c).await;
                    }
                }
                got = c.next(Duration::from_millis(100)) => match got {
                    Some((rid, frame)) => {
                        last_heard = Instant::now();
                        self.frame(rid, frame);
                        if !self.catch_up(&mut c).await {
                            return self.ended(&mut c).await;
                        }
                    }
                    None if c.closed.is_some() => return self.ended(&mut c).await,
                    None => {}
                },
            }
        }
    }

    async fn ended(&mut self, c: &mut Conn) -> Next {
        let code = c.closed.clone().flatten().map(|(code, _)| code);
        *self
            .seen
            .lock()
            .unwrap()
            .close_codes
            .entry(code)
            .or_default() += 1;
        if let Some(code) = code
            && code >= 4100
        {
            self.note(format!("{}: closed with {code}", self.user));
        }
        Next::Reconnect
    }

    async fn run(mut self, urls: Urls, sending: Arc<AtomicBool>, done: Arc<AtomicBool>) {
        while let Next::Reconnect = self.connection(&urls, &sending, &done).await {}
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

fn start_node(args: &[String], i: usize) -> Gateway {
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = format!("node-{i}");
    a.extend(["--node-id", &id, "--shutdown-grace-ms", "500"]);
    Gateway::start(&a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_reaches_every_member_once_through_node_and_redis_faults() {
    let seconds: u64 = std::env::var("CHAT_FAULTS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut redis = PrivateRedis::start_durable();
    let cluster = Cluster::start(0, &redis.url(), &[]).await;
    let args = cluster.args.clone();
    let mut nodes: Vec<Gateway> = (0..NODES).map(|i| start_node(&args, i)).collect();
    let urls: Urls = Arc::new(Mutex::new(nodes.iter().map(|n| Some(n.url())).collect()));
    nodes[0].wait_health("3 live nodes", |h| {
        h["cluster"]["live_nodes"]
            .as_array()
            .is_some_and(|n| n.len() == NODES)
    });

    let sending = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicBool::new(false));
    let mut members = Vec::new();
    for r in 0..ROOMS {
        for m in 0..MEMBERS_PER_ROOM {
            let seen = Arc::new(Mutex::new(Seen::default()));
            let member = Member {
                user: format!("j{r}-{m}"),
                room: format!("jepsen-{r}"),
                seen: seen.clone(),
                session: None,
                position: None,
                next_cid: 0,
                pending: None,
                awaiting: None,
                must_reload: false,
                backlog: Vec::new(),
                recent: Vec::new(),
                rid: 1,
            };
            let task = tokio::spawn(member.run(urls.clone(), sending.clone(), done.clone()));
            members.push((r, seen, task));
        }
    }

    // Faults, one after another, each followed by a quiet moment.
    let kinds = [
        "node SIGKILL",
        "node SIGTERM",
        "node SIGSTOP",
        "Redis kill, restart with its data",
        "Redis kill, restart without its data",
    ];
    let mut injected: BTreeMap<&str, u32> = BTreeMap::new();
    let started = Instant::now();
    let mut round = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let kind = kinds[round % kinds.len()];
        let k = round % NODES;
        round += 1;
        *injected.entry(kind).or_default() += 1;
        match kind {
            "node SIGKILL" | "node SIGTERM" => {
                urls.lock().unwrap()[k] = None;
                if kind == "node SIGKILL" {
                    let _ = nodes[k].child.kill();
                } else {
                    nodes[k].terminate();
                }
                let _ = nodes[k].child.wait();
                tokio::time::sleep(Duration::from_millis(300)).await;
                let node = tokio::task::block_in_place(|| start_node(&args, k));
                urls.lock().unwrap()[k] = Some(node.url());
                nodes[k] = node;
            }
            "node SIGSTOP" => {
                signal(nodes[k].pid(), "STOP");
                tokio::time::sleep(Duration::from_secs(2)).await;
                signal(nodes[k].pid(), "CONT");
            }
            "Redis kill, restart with its data" => {
                tokio::task::block_in_place(|| redis.restart());
            }
            _ => {
                // FLUSHALL is in the append-only file, so the restarted
                // server comes back empty: the data is lost.
                let ok = std::process::Command::new("redis-cli")
                    .args(["-p", &redis.port.to_string(), "FLUSHALL"])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(ok.success());
                tokio::task::block_in_place(|| redis.restart());
            }
        }
    }

    // No more new messages; what is pending gets acknowledged.
    sending.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while members.iter().any(|(_, s, _)| s.lock().unwrap().pending) {
        assert!(Instant::now() < deadline, "sends never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every member catches up with every acknowledged message of its room.
    let mut acked_by_room: HashMap<usize, HashSet<u64>> = HashMap::new();
    for (r, s, _) in &members {
        acked_by_room
            .entry(*r)
            .or_default()
            .extend(s.lock().unwrap().acked.iter().copied());
    }
    let has_all = |r: usize, s: &Seen| {
        acked_by_room[&r]
            .iter()
            .all(|id| s.covered.contains(id) || s.delivered.contains(id) || s.acked.contains(id))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !members
        .iter()
        .all(|(r, s, _)| has_all(*r, &s.lock().unwrap()))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.store(true, Ordering::Relaxed);
    for (_, _, task) in &mut members {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }

    let mut total_acked = 0;
    let mut expected = 0;
    let mut delivered = 0;
    let mut closes: BTreeMap<Option<u16>, u32> = BTreeMap::new();
    let (mut recovered, mut reloaded) = (0, 0);
    let mut problems = Vec::new();
    for (r, s, _) in &members {
        let s = s.lock().unwrap();
        total_acked += s.acked.len();
        expected += acked_by_room[r].len();
        delivered += s.delivered.len();
        recovered += s.resumes_recovered;
        reloaded += s.resumes_reloaded;
        for (code, n) in &s.close_codes {
            *closes.entry(*code).or_default() += n;
        }
        problems.extend(s.violations.iter().cloned());
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for id in &s.delivered {
            *counts.entry(*id).or_default() += 1;
        }
        // A member's own message may come as an event too: sent from a
        // connection that died, it reaches the member's next connection
        // like any other (PROTOCOL.md §9.6); still at most once.
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        if !twice.is_empty() {
            problems.push(format!("a member of room {r} got {twice:?} more than once"));
        }
        let missing: Vec<_> = acked_by_room[r]
            .iter()
            .filter(|id| {
                !s.covered.contains(id) && !counts.contains_key(id) && !s.acked.contains(id)
            })
            .collect();
        if !missing.is_empty() {
            problems.push(format!("a member of room {r} never got {missing:?}"));
        }
    }
    // History holds each acknowledged message once.
    let mut c = user(&nodes[0], "auditor").await;
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("jepsen-{r}")).collect();
    join(
        &mut c,
        &rooms.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    for r in 0..ROOMS {
        let mut ids = Vec::new();
        let mut before = None;
        loop {
            let page = c
                .request(
                    9,
                    ClientFrame::History(History {
                        room: format!("jepsen-{r}"),
                        before,
                        limit: 100,
                    }),
                )
                .await;
            let ServerFrame::HistoryPage(p) = page else {
                panic!("{page:?}")
            };
            ids.extend(p.messages.iter().map(|m| m.id));
            match p.next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        let unique: HashSet<u64> = ids.iter().copied().collect();
        if unique.len() != ids.len() {
            problems.push(format!("room {r}: History repeats a message"));
        }
        if !acked_by_room[&r].is_subset(&unique) {
            problems.push(format!(
                "room {r}: an acknowledged message is not in History"
            ));
        }
    }
    println!(
        "faults: {injected:?}; {total_acked} acknowledged messages, {expected} expected \
         deliveries, {delivered} live or replayed; resumes {recovered} recovered, {reloaded} \
         reloaded from History; closes {closes:?}"
    );
    assert!(total_acked > 0, "nothing was sent");
    assert!(
        problems.is_empty(),
        "{} problems, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(8)]
    );
}
