//! Test harness: runs the real `chatgate` binary on an ephemeral port and
//! talks to it over real sockets.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // shared by several test files

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
}

impl Gateway {
    /// Starts the gateway with extra flags, waiting for its "listening"
    /// line (no sleeps).
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_on("127.0.0.1:0", args)
    }

    pub fn start_on(listen: &str, args: &[&str]) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .arg("--listen")
            .arg(listen)
            .args(args)
            .env("CHAT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chatgate");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut line).unwrap();
        // Keep draining so a later write to stdout never hits a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .unwrap();
        Gateway { child, addr }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET a path; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    pub fn health(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/health").1).unwrap()
    }

    /// Value of one metric line (exact name with labels), 0 if absent.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
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

pub fn token(user: &str) -> String {
    Verifier::new(DEV_SECRET.as_bytes()).mint(&Claims {
        sub: user.into(),
        name: Some(format!("{user} (name)")),
        picture: Some(format!("https://i.example/{user}.png")),
        exp: unix_now() + 3600,
    })
}

/// Connects raw and identifies as `user`; returns the connection and Ready.
pub async fn identified(gw: &Gateway, user: &str) -> (RawConnection, Ready) {
    let mut c = RawConnection::connect(&gw.url()).await.unwrap();
    c.send(
        1,
        &ClientFrame::Identify(Identify {
            token: token(user),
            resume: None,
        }),
    )
    .await
    .unwrap();
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

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A private PostgreSQL server in a temp dir on a spare port, for tests
/// that stop and start it. Never touches the shared server.
pub struct PrivatePostgres {
    pub dir: std::path::PathBuf,
    pub port: u16,
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
        let dir = std::env::temp_dir().join(format!(
            "chatgate-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
        }
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
        };
        let data = pg.dir.join("data");
        let data = data.to_str().unwrap();
        assert!(
            pg.run(&["initdb", "-D", data, "-A", "trust", "-U", "postgres"])
                .success(),
            "initdb failed"
        );
        pg.resume();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts (again) and waits until it accepts connections.
    pub fn resume(&self) {
        let data = self.dir.join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
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
        assert!(ok.success(), "pg_ctl start failed");
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

/// A private redis-server on a spare port (killed by PID on drop).
pub struct PrivateRedis {
    pub child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
    durable: bool,
}

impl PrivateRedis {
    /// A throwaway Redis (no persistence).
    pub fn start() -> PrivateRedis {
        Self::launch(free_port(), false)
    }

    /// A Redis that keeps its data across restarts (append-only file,
    /// fsync on every write), as production runs it.
    pub fn start_durable() -> PrivateRedis {
        Self::launch(free_port(), true)
    }

    fn launch(port: u16, durable: bool) -> PrivateRedis {
        let dir =
            std::env::temp_dir().join(format!("chatgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn(port, &dir, durable);
        PrivateRedis {
            child,
            port,
            dir,
            durable,
        }
    }

    fn spawn(port: u16, dir: &std::path::Path, durable: bool) -> Child {
        let aof = if durable { "yes" } else { "no" };
        let child = Command::new("redis-server")
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
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// Kills the server (SIGKILL, by PID) and starts it again on the same
    /// port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.port, &self.dir, self.durable);
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
            "--messages-per-minute".into(),
            "100000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let nodes = (0..n).map(|i| Self::node(&args, i)).collect();
        Cluster { nodes, args }
    }

    fn node(args: &[String], i: usize) -> Gateway {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = format!("node-{i}");
        a.extend(["--node-id", &id]);
        Gateway::start(&a)
    }
}
