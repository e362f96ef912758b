//! The shipped nginx configuration (`deploy/nginx/chatgate.conf`), run by
//! Debian's nginx with only addresses, ports and a test certificate
//! substituted, in front of three cluster nodes; clients speak `wss://`
//! through it with the native client library: delivery across nodes,
//! new sockets balanced by least connections over nginx's workers, and a
//! node's SIGTERM survived by every client (resumed through nginx on
//! another node) with every message delivered exactly once, in order.
#![allow(clippy::unwrap_used)] // a panic here is a failed test

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatgate_client::{Client, ClientConfig, Event};
use common::tls::TestCa;
use common::*;
use tokio::sync::mpsc::Receiver;

/// nginx with the shipped site configuration, killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM (by PID): the master stops its workers, then exits. A
        // SIGKILL would leave the workers running on their own.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shipped site file with this test's upstreams, listener and
/// certificate; nothing else changes.
fn site(shipped: &str, nodes: &[SocketAddr], port: u16, ca: &TestCa) -> String {
    let mut out = Vec::new();
    let mut upstreams = nodes.iter();
    let mut in_upstream = false;
    for line in shipped.lines() {
        let t = line.trim_start();
        if t.starts_with("upstream ") {
            in_upstream = true;
        } else if in_upstream && t.starts_with('}') {
            in_upstream = false;
            assert!(
                upstreams.next().is_none(),
                "fewer upstream servers than nodes"
            );
        }
        if in_upstream && t.starts_with("server ") {
            let node = upstreams.next().expect("more upstream servers than nodes");
            // `server ADDR params;` -> this node, same parameters.
            let params = t.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
            let params = if params.is_empty() {
                ";".into()
            } else {
                format!(" {params}")
            };
            out.push(format!("    server {node}{params}"));
        } else if t.starts_with("listen ") {
            // The TLS listener on this test's port; no others.
            if t.contains(" ssl") {
                out.push(format!("    listen 127.0.0.1:{port} ssl;"));
            }
        } else if t.starts_with("ssl_certificate_key ") {
            out.push(format!("    ssl_certificate_key {};", ca.key.display()));
        } else if t.starts_with("ssl_certificate ") {
            out.push(format!("    ssl_certificate {};", ca.cert.display()));
        } else {
            out.push(line.to_owned());
        }
    }
    out.join("\n")
}

/// The shipped main file with this test's site file, logs and open-files
/// limit (the machine's hard limit may be lower than production's).
fn main_conf(shipped: &str, site_file: &Path, dir: &Path) -> String {
    let mut out = Vec::new();
    for line in shipped.lines() {
        let t = line.trim_start();
        if t.starts_with("include ") && t.contains("chatgate.conf") {
            out.push(format!("    include {};", site_file.display()));
        } else if t.starts_with("access_log ") {
            out.push("    access_log off;".into());
        } else if t.starts_with("worker_rlimit_nofile ") {
            out.push("worker_rlimit_nofile 4096;".into());
        } else if t.starts_with("worker_connections ") {
            out.push("    worker_connections 1024;".into());
        } else {
            out.push(line.to_owned());
        }
    }
    out.push(format!("pid {}/nginx.pid;", dir.display()));
    out.push(format!("error_log {}/error.log warn;", dir.display()));
    out.join("\n")
}

/// Starts nginx with the shipped main and site files in front of
/// `nodes` (2 workers, so balancing across workers counts), and waits
/// until it accepts.
fn start_nginx(nodes: &[SocketAddr], ca: &TestCa) -> Nginx {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx");
    let shipped_site = std::fs::read_to_string(deploy.join("chatgate.conf")).unwrap();
    let shipped_main = std::fs::read_to_string(deploy.join("nginx.conf")).unwrap();
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx is not installed (scripts/services installs it)");
    let dir = std::env::temp_dir().join(format!("chatgate-nginx-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let site_file = dir.join("chatgate.conf");
    std::fs::write(&site_file, site(&shipped_site, nodes, port, ca)).unwrap();
    let main = main_conf(&shipped_main, &site_file, &dir)
        .replace("worker_processes auto;", "worker_processes 2;");
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    let mut nginx = Nginx { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = nginx.child.try_wait() {
            let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
            panic!("nginx exited with {status}: {log}");
        }
        assert!(Instant::now() < deadline, "nginx did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    nginx
}

async fn next(events: &mut Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("an event in time")
        .expect("the client is running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_behind_the_shipped_nginx_config_over_wss() {
    let ca = TestCa::new();
    let cluster = Cluster::start(3, &shared_redis_url(), &["--trusted-proxy", "127.0.0.1"]).await;
    let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
    let nginx = start_nginx(&addrs, &ca);
    let url = format!("wss://127.0.0.1:{}/ws", nginx.port);

    // Nine clients, one after another: least connections, shared by the
    // workers (`zone`), puts three on each node; without the zone each
    // worker balances its own and the first node gets more.
    let mut clients = Vec::new();
    for i in 0..9 {
        let mut config = ClientConfig::new(&url, token(&format!("u{i}")));
        config.tls = Some(ca.client_config());
        config.backoff_base = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(500);
        let (client, events) = Client::connect(config).await.unwrap();
        client.join(&["proxied"]).await.unwrap();
        clients.push((client, events));
    }
    let per_node: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.health()["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(
        per_node,
        [3, 3, 3],
        "least connections across nginx's workers"
    );

    // The sender sends while a node stops (SIGTERM: its clients are told
    // to reconnect, and come back through nginx to the other two).
    let (sender, _sender_events) = clients.remove(0);
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(
            sender
                .send("proxied", &format!("m{i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    let victim = 0;
    cluster.nodes[victim].terminate();
    for i in 10..40 {
        let ack = tokio::time::timeout(
            Duration::from_secs(30),
            sender.send("proxied", &format!("m{i}")),
        )
        .await
        .expect("acknowledged in time")
        .unwrap();
        sent.push(ack.message_id);
    }

    // Every other client has every message, once, in order; the two on
    // the stopped node went through a reconnect and resume.
    let mut reconnected = 0;
    let mut held = vec![sender];
    for (client, mut events) in clients {
        let mut got = Vec::new();
        let mut resumed = false;
        while got.len() < sent.len() {
            match next(&mut events).await {
                Event::Message(m) => got.push(m.message.id),
                Event::Resumed(r) => {
                    assert!(r.rooms.iter().all(|room| room.recovered), "{r:?}");
                    resumed = true;
                }
                Event::StreamLost { room, .. } => panic!("stream of {room} lost"),
                _ => {}
            }
        }
        assert_eq!(got, sent, "every message once, in order");
        let extra = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(
            !matches!(extra, Ok(Some(Event::Message(_)))),
            "nothing twice: {extra:?}"
        );
        reconnected += usize::from(resumed);
        held.push(client);
    }
    assert!(
        reconnected >= 1,
        "the stopped node's clients resumed elsewhere"
    );
    let survivors: u64 = (1..3)
        .map(|i| cluster.nodes[i].health()["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(survivors, 9, "every client is back, on the other two nodes");
    drop(held);
}
