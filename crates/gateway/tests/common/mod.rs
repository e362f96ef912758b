//! Test harness: runs the real `chatgate` binary on an ephemeral port and
//! talks to it over real sockets.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // shared by several test files

pub mod hooked;
pub mod redis_cluster;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatgate_client::{Incoming, RawConnection};
use chatgate_gateway::auth::{Claims, Verifier, unix_now};
use chatgate_gateway::config::DEV_SECRET;
use chatgate_protocol::payload::*;
use chatgate_protocol::{ClientFrame, ServerFrame};

/// A gateway process, killed on drop.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    /// The server API address, when it runs (started with a key).
    pub api: Option<SocketAddr>,
}

/// The server API key the tests give gateways started with [`API_ARGS`].
pub const API_KEY: &str = "test-api-key-0123456789";

/// Flags that turn the server API on, on an ephemeral loopback port.
pub const API_ARGS: [&str; 4] = ["--admin-listen", "127.0.0.1:0", "--admin-api-key", API_KEY];

impl Gateway {
    /// Starts the gateway with extra flags, waiting for its "listening"
    /// line (no sleeps).
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_on("127.0.0.1:0", args)
    }

    pub fn start_on(listen: &str, args: &[&str]) -> Gateway {
        Self::start_waiting_on(listen, args).ready()
    }

    /// Starts the gateway and returns at its "starting" line: the port is
    /// bound, the backends perhaps not reached yet.
    pub fn start_waiting(args: &[&str]) -> Starting {
        Self::start_waiting_on("127.0.0.1:0", args)
    }

    fn start_waiting_on(listen: &str, args: &[&str]) -> Starting {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .arg("--listen")
            .arg(listen)
            .args(args)
            .env("CHAT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chatgate");
        // Lines go through a thread, so every wait on them is bounded (a
        // gateway that never gets ready fails its test, not hangs it), and
        // stdout is drained for as long as the process writes.
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no starting line from the gateway: {e}"));
        let addr = line
            .strip_prefix("chatgate starting on http://")
            .unwrap_or_else(|| panic!("expected the starting line, got {line:?}"))
            .trim()
            .parse()
            .unwrap();
        Starting {
            child: Some(child),
            lines,
            addr,
        }
    }

    /// Calls a server API method with `key`; returns (status, JSON body).
    pub fn api_with_key(
        &self,
        method: &str,
        body: serde_json::Value,
        key: &str,
    ) -> (u16, serde_json::Value) {
        let addr = self.api.expect("started with API_ARGS");
        http_call(
            addr,
            "POST",
            &format!("/api/{method}"),
            Some(key),
            &body.to_string(),
        )
    }

    /// Calls a server API method with the right key; panics unless 200.
    pub fn api(&self, method: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, reply) = self.api_with_key(method, body, API_KEY);
        assert_eq!(status, 200, "{method}: {reply}");
        reply
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a WebSocket upgrade for `/ws` offering `chat.v1` and reads
    /// the response head; returns (status, headers with lower-case names).
    /// For answers a client library reports only as an error (a 503 and
    /// its `Retry-After`).
    pub fn upgrade_response(&self) -> (u16, Vec<(String, String)>) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: {}\r\n\r\n",
            chatgate_protocol::SUBPROTOCOL
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).unwrap() {
                0 => panic!("connection closed inside the response head: {head:?}"),
                _ => head.push(byte[0]),
            }
        }
        let head = String::from_utf8(head).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap()[9..12].parse().unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers)
    }

    /// GET a path; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_raw(self.addr, "GET", path, None, "")
    }

    pub fn health(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/health").1).unwrap()
    }

    /// Value of one metric line (exact name with labels), 0 if absent.
    pub fn metric(&self, name: &str) -> f64 {
        metric_in(&self.get("/metrics").1, name)
    }

    /// A metric read on the server API's listener: a probe on the public
    /// port would take (or make) room in the pending pool itself.
    pub fn api_metric(&self, name: &str) -> f64 {
        let api = self.api.expect("started with API_ARGS");
        metric_in(&http_raw(api, "GET", "/metrics", None, "").1, name)
    }

    /// Polls `/health` until `check` holds (or panics after 20 s).
    pub fn wait_health(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let h = self.health();
            if check(&h) {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {h}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM to this process (by its PID).
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway process between its "starting" and "listening" lines.
pub struct Starting {
    /// Taken by [`Starting::ready`]; killed on drop otherwise.
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    /// The bound port (answering `/livez`, `/readyz`, `/health`).
    pub addr: SocketAddr,
}

impl Starting {
    /// Waits for the "listening" line (the node is built and serving).
    pub fn ready(mut self) -> Gateway {
        let addr = self.addr;
        let mut api = None;
        let line = loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(90))
                .unwrap_or_else(|e| panic!("the gateway at {addr} never got ready: {e}"));
            match line.strip_prefix("chatgate server API on http://") {
                Some(at) => api = Some(at.trim().parse().unwrap()),
                None => break line,
            }
        };
        assert!(
            line.starts_with(&format!("chatgate listening on http://{addr}")),
            "expected the listening line, got {line:?}"
        );
        let Some(child) = self.child.take() else {
            unreachable!("taken only here")
        };
        Gateway { child, addr, api }
    }

    /// This process's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits up to `limit` for the process to exit; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One GET on the starting port: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_raw(self.addr, "GET", path, None, "")
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A token that lets `user` join every room (`rooms: ["*"]`): what the
/// tests of everything but authorization use.
/// The value of `name` in a Prometheus text page (0 when absent).
pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// One HTTP/1.1 request; returns (status, body as JSON, or as a JSON
/// string when it is not JSON).
pub fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, body) = http_raw(addr, method, path, key, body);
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, json)
}

/// A request written as given (`request`: head and body) on its own
/// connection; returns (status, body).
pub fn http_raw_with(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One HTTP/1.1 request on its own connection; returns (status, body).
pub fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_raw_with(addr, &request)
}

/// Connects and sends Identify (request id 1) with `token` and an
/// optional resume; reading the answer is the caller's.
pub async fn send_identify(gw: &Gateway, token: String, resume: Option<Resume>) -> RawConnection {
    let mut raw = RawConnection::connect(&gw.url()).await.unwrap();
    raw.send(1, &ClientFrame::Identify(Identify { token, resume }))
        .await
        .unwrap();
    raw
}

/// Identifies as `user` with a token allowing `rooms` (patterns) and an
/// optional resume; returns the connection and Ready.
pub async fn identify_as(
    gw: &Gateway,
    user: &str,
    rooms: &[&str],
    resume: Option<Resume>,
) -> (Conn, Ready) {
    let mut c = Conn::new(send_identify(gw, token_for(user, rooms), resume).await);
    match c.expect().await {
        (1, ServerFrame::Ready(r)) => (c, r),
        other => panic!("expected Ready, got {other:?}"),
    }
}

/// The room names of a Ready's or Joined's list.
pub fn rooms_of(list: &[RoomPosition]) -> Vec<&str> {
    list.iter().map(|r| r.room.as_str()).collect()
}

pub fn token(user: &str) -> String {
    token_for(user, &["*"])
}

/// A token for `user` that allows `rooms` (patterns) beyond grants.
pub fn token_for(user: &str, rooms: &[&str]) -> String {
    Verifier::new(DEV_SECRET.as_bytes()).mint(&Claims {
        sub: user.into(),
        name: Some(format!("{user} (name)")),
        picture: Some(format!("https://i.example/{user}.png")),
        exp: unix_now() + 3600,
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
    })
}

/// Connects raw and identifies as `user`; returns the connection and Ready.
pub async fn identified(gw: &Gateway, user: &str) -> (RawConnection, Ready) {
    let mut c = send_identify(gw, token(user), None).await;
    match next_frame(&mut c).await {
        (1, ServerFrame::Ready(r)) => (c, r),
        other => panic!("expected Ready, got {other:?}"),
    }
}

/// Buffered frames: a batch arrives as several frames at once.
pub struct Conn {
    pub raw: RawConnection,
    pending: std::collections::VecDeque<(u32, ServerFrame)>,
    pub closed: Option<Option<(u16, String)>>,
}

impl Conn {
    pub fn new(raw: RawConnection) -> Conn {
        Conn {
            raw,
            pending: Default::default(),
            closed: None,
        }
    }

    /// Next frame within `limit`, `None` on timeout or close.
    pub async fn next(&mut self, limit: Duration) -> Option<(u32, ServerFrame)> {
        if let Some(f) = self.pending.pop_front() {
            return Some(f);
        }
        if self.closed.is_some() {
            return None;
        }
        match self.raw.recv_timeout(limit).await.unwrap() {
            None => None,
            Some(Incoming::Frames(frames)) => {
                self.pending.extend(frames);
                self.pending.pop_front()
            }
            Some(Incoming::Closed(c)) => {
                self.closed = Some(c);
                None
            }
        }
    }

    /// Next frame or panic.
    pub async fn expect(&mut self) -> (u32, ServerFrame) {
        match self.next(Duration::from_secs(10)).await {
            Some(f) => f,
            None => panic!("no frame (closed: {:?})", self.closed),
        }
    }

    /// Waits for the close and returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.closed.is_none() {
            assert!(Instant::now() < deadline, "connection did not close");
            self.pending.clear();
            let _ = self.next(Duration::from_secs(1)).await;
        }
        self.closed.clone().unwrap().map(|(c, _)| c)
    }

    /// Sends a request and returns the reply with the same request id,
    /// keeping other frames queued.
    pub async fn request(&mut self, rid: u32, frame: ClientFrame) -> ServerFrame {
        self.raw.send(rid, &frame).await.unwrap();
        let mut others = Vec::new();
        let reply = loop {
            let (r, f) = self.expect().await;
            if r == rid {
                break f;
            }
            others.push((r, f));
        };
        for f in others.into_iter().rev() {
            self.pending.push_front(f);
        }
        reply
    }

    /// True when a heartbeat is answered (the connection is alive).
    pub async fn alive(&mut self) -> bool {
        matches!(
            self.request(0xFFFF, ClientFrame::Heartbeat).await,
            ServerFrame::HeartbeatAck(_)
        )
    }

    /// Asserts that nothing arrives within `wait` and that the connection
    /// is alive afterwards: a closed or stuck connection receives nothing
    /// too, so silence alone proves nothing. The heartbeat is answered
    /// after everything the server queued before it, so a frame already
    /// on its way is caught however slowly it travels.
    pub async fn assert_quiet(&mut self, wait: Duration, what: &str) {
        if let Some(f) = self.next(wait).await {
            panic!("{what}: got {f:?}");
        }
        assert!(
            self.closed.is_none(),
            "{what}: the connection closed ({:?})",
            self.closed
        );
        self.raw
            .send(0xFFFF, &ClientFrame::Heartbeat)
            .await
            .unwrap();
        match self.expect().await {
            (0xFFFF, ServerFrame::HeartbeatAck(_)) => {}
            other => panic!("{what}: got {other:?} before the heartbeat's answer"),
        }
    }
}

pub async fn next_frame(c: &mut RawConnection) -> (u32, ServerFrame) {
    match c.recv_timeout(Duration::from_secs(10)).await.unwrap() {
        Some(Incoming::Frames(mut f)) => f.remove(0),
        other => panic!("expected a frame, got {other:?}"),
    }
}

pub async fn user(gw: &Gateway, name: &str) -> Conn {
    let (raw, _) = identified(gw, name).await;
    Conn::new(raw)
}

pub async fn join(c: &mut Conn, rooms: &[&str]) -> Joined {
    match c
        .request(
            2,
            ClientFrame::Join(Rooms {
                rooms: rooms.iter().map(|r| r.to_string()).collect(),
            }),
        )
        .await
    {
        ServerFrame::Joined(j) => j,
        other => panic!("expected Joined, got {other:?}"),
    }
}

pub fn send_frame(room: &str, cid: &str, body: &str) -> ClientFrame {
    ClientFrame::Send(Send {
        room: room.into(),
        client_msg_id: cid.into(),
        body: body.into(),
        attachments: vec![],
    })
}

/// A directory of its own under the temp dir for a private server.
fn private_dir(kind: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("chatgate-{kind}-{}-{n}", std::process::id()));
    // A leftover of an earlier process with the same PID.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn pg_bin(name: &str) -> String {
    // Debian keeps the server tools out of PATH.
    for dir in std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = dir.path().join("bin").join(name);
        if p.exists() {
            return p.to_string_lossy().into_owned();
        }
    }
    name.to_owned()
}

/// A private PostgreSQL server in a temp dir, for tests that stop and
/// start it. Never touches the shared server. It listens on a Unix socket
/// in its own directory and on no TCP port at all, so no other process
/// can take its address between a stop and a start (or before the first).
pub struct PrivatePostgres {
    pub dir: std::path::PathBuf,
    /// The socket's number (part of its file name; not a TCP port unless
    /// started with [`PrivatePostgres::start_tls`]).
    pub port: u16,
    /// Server options for TLS on 127.0.0.1:`port` ([`PrivatePostgres::start_tls`]).
    tls: Option<String>,
}

impl PrivatePostgres {
    fn run(&self, args: &[&str]) -> std::process::ExitStatus {
        let mut cmd = if is_root() {
            // initdb and postgres refuse to run as root.
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_bin(args[0]));
            c
        } else {
            Command::new(pg_bin(args[0]))
        };
        cmd.args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    }

    pub fn start() -> PrivatePostgres {
        let dir = private_dir("pg");
        if is_root() {
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
        }
        let pg = PrivatePostgres {
            dir,
            port: 5432,
            tls: None,
        };
        pg.init();
        pg.resume();
        pg
    }

    /// A private server that also listens on TCP (127.0.0.1, a free port)
    /// with TLS, presenting `ca`'s server certificate.
    pub fn start_tls(ca: &tls::TestCa) -> PrivatePostgres {
        let dir = private_dir("pg");
        // The server reads its key only if it owns it, mode 0600.
        for (from, to) in [(&ca.cert, "server.pem"), (&ca.key, "server.key")] {
            std::fs::copy(from, dir.join(to)).unwrap();
        }
        Command::new("chmod")
            .arg("600")
            .arg(dir.join("server.key"))
            .status()
            .unwrap();
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tls = format!(
            "-c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        );
        let pg = PrivatePostgres {
            dir,
            port,
            tls: Some(tls),
        };
        pg.init();
        pg.resume();
        pg
    }

    /// The TCP URL that requires TLS (for [`PrivatePostgres::start_tls`]).
    pub fn tls_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
            self.port
        )
    }

    fn init(&self) {
        let pg = self;
        let data = pg.dir.join("data");
        let data = data.to_str().unwrap();
        assert!(
            pg.run(&["initdb", "-D", data, "-A", "trust", "-U", "postgres"])
                .success(),
            "initdb failed"
        );
    }

    pub fn url(&self) -> String {
        // The socket's directory as the URL's host, percent-encoded.
        let socket_dir: String = self
            .dir
            .to_str()
            .unwrap()
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    char::from(b).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect();
        format!("postgres://postgres@{socket_dir}:{}/postgres", self.port)
    }

    /// Starts (again) and waits until it accepts connections.
    pub fn resume(&self) {
        let data = self.dir.join("data");
        let listen = self
            .tls
            .clone()
            .unwrap_or_else(|| "-c listen_addresses=''".into());
        let opts = format!(
            "-p {} -k {} {listen} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let ok = self.run(&[
            "pg_ctl",
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]);
        assert!(
            ok.success(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops immediately (like a crash or an operator's fast shutdown).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = self.run(&[
            "pg_ctl",
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private redis-server (killed by PID on drop).
///
/// Redis cannot bind port 0 and report the port (0 turns TCP off), so it
/// is offered a port the kernel just handed out and must prove it got
/// it: ready means a `PING` on that port is answered `PONG` by a server
/// whose `INFO` names this child's PID. If another process holds the
/// port, the child exits (or someone else answers) and another port is
/// tried; nothing is assumed from a port merely accepting connections.
pub struct PrivateRedis {
    pub child: Child,
    pub port: u16,
    /// The TLS port, when started with [`PrivateRedis::start_tls`].
    pub tls_port: Option<u16>,
    dir: std::path::PathBuf,
    durable: bool,
    /// Further redis-server arguments (TLS), kept for restarts.
    extra: Vec<String>,
}

impl PrivateRedis {
    /// A throwaway Redis (no persistence).
    pub fn start() -> PrivateRedis {
        Self::launch(false)
    }

    /// A Redis that keeps its data across restarts (append-only file,
    /// fsync on every write), as production runs it.
    pub fn start_durable() -> PrivateRedis {
        Self::launch(true)
    }

    /// A throwaway Redis that also serves TLS (with `ca`'s server
    /// certificate) on [`PrivateRedis::tls_port`].
    pub fn start_tls(ca: &tls::TestCa) -> PrivateRedis {
        Self::launch_with(false, Some(ca))
    }

    fn launch(durable: bool) -> PrivateRedis {
        Self::launch_with(durable, None)
    }

    fn launch_with(durable: bool, ca: Option<&tls::TestCa>) -> PrivateRedis {
        let dir = private_dir("redis");
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let mut failures = Vec::new();
        for _ in 0..10 {
            let port = free_port();
            let tls_port = ca.map(|_| free_port());
            let extra: Vec<String> = match (ca, tls_port) {
                (Some(ca), Some(tls_port)) => vec![
                    "--tls-port".into(),
                    tls_port.to_string(),
                    "--tls-cert-file".into(),
                    ca.cert.display().to_string(),
                    "--tls-key-file".into(),
                    ca.key.display().to_string(),
                    "--tls-ca-cert-file".into(),
                    ca.ca.display().to_string(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ],
                _ => Vec::new(),
            };
            match Self::spawn(port, &dir, durable, &extra) {
                Ok(child) => {
                    return PrivateRedis {
                        child,
                        port,
                        tls_port,
                        dir,
                        durable,
                        extra,
                    };
                }
                Err(e) => failures.push(e),
            }
        }
        panic!("redis-server did not start: {failures:#?}");
    }

    /// Runs redis-server on `port` and waits until it is the one that
    /// answers there; on failure the child is gone and the error says why.
    pub(crate) fn spawn(
        port: u16,
        dir: &std::path::Path,
        durable: bool,
        extra: &[String],
    ) -> Result<Child, String> {
        let aof = if durable { "yes" } else { "no" };
        let log = dir.join("redis.log");
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        let why = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("port {port}: exited with {status}");
            }
            match redis_pid(port) {
                Some(pid) if pid == child.id() => return Ok(child),
                Some(pid) => break format!("port {port}: answered by another redis (pid {pid})"),
                None if Instant::now() > deadline => break format!("port {port}: no PONG in 10 s"),
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        Err(format!("{why}; log: {}", log.trim_end()))
    }

    /// Kills the server (SIGKILL, by PID) and starts it again on the same
    /// port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        // The same port, since clients hold its URL. A port in use by
        // someone else now is an error here, not a silent wrong server.
        let mut failures = Vec::new();
        for _ in 0..5 {
            match Self::spawn(self.port, &self.dir, self.durable, &self.extra) {
                Ok(child) => {
                    self.child = child;
                    return;
                }
                Err(e) => failures.push(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server did not restart: {failures:#?}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PID of the Redis answering `PING` with `PONG` on `port`, if one
/// does.
fn redis_pid(port: u16) -> Option<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"PING\r\nINFO server\r\n").ok()?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    if line != "+PONG\r\n" {
        // Loading its data, say ("-LOADING ..."): not ready yet.
        return None;
    }
    // INFO's answer is one bulk string: "$<len>\r\n<text>\r\n".
    line.clear();
    reader.read_line(&mut line).ok()?;
    let len: usize = line.strip_prefix('$')?.trim_end().parse().ok()?;
    let mut text = vec![0; len];
    reader.read_exact(&mut text).ok()?;
    String::from_utf8(text)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// A fresh schema in the shared test database; returns a URL whose
/// connections use it.
pub async fn fresh_database_url() -> String {
    chatgate_storage::suite::fresh_schema().await.0
}

pub fn shared_redis_url() -> String {
    std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A running cluster: several gateway processes on one Postgres schema
/// and one Redis namespace.
pub struct Cluster {
    pub nodes: Vec<Gateway>,
    pub args: Vec<String>,
}

impl Cluster {
    pub async fn start(n: usize, redis_url: &str, extra: &[&str]) -> Cluster {
        let db = fresh_database_url().await;
        let ns = format!("t{:x}", rand::random::<u64>());
        let mut args: Vec<String> = vec![
            "--cluster".into(),
            "--redis-url".into(),
            redis_url.into(),
            "--redis-namespace".into(),
            ns,
            "--database-url".into(),
            db,
        ];
        if !extra.contains(&"--messages-per-minute") {
            args.extend(["--messages-per-minute".into(), "100000".into()]);
        }
        // Every frame costs the connection's request budget: tests that
        // send fast from one connection need it out of the way too.
        if !extra.contains(&"--requests-per-second") {
            args.extend(["--requests-per-second".into(), "100000".into()]);
        }
        if !extra.contains(&"--request-burst") {
            args.extend(["--request-burst".into(), "100000".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let nodes = (0..n).map(|i| Self::node(&args, i)).collect();
        Cluster { nodes, args }
    }

    /// Node `i` of a cluster started with `args` (again, after a restart).
    pub fn node(args: &[String], i: usize) -> Gateway {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = format!("node-{i}");
        a.extend(["--node-id", &id]);
        Gateway::start(&a)
    }
}

/// A listener on `addr` shared with SO_REUSEPORT that never accepts:
/// it keeps the address taken while no gateway holds it (between one
/// gateway stopping and the next, started with `--reuse-port`, binding).
pub fn hold_address(addr: std::net::SocketAddr) -> socket2::Socket {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(16).unwrap();
    socket
}
