//! A private Redis Cluster for one test: redis-server processes in
//! cluster mode on spare ports, joined by `redis-cli --cluster create`,
//! stopped (by PID) and removed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{PrivateRedis, private_dir};

/// One server of the cluster.
pub struct ClusterServer {
    pub child: Child,
    pub port: u16,
    pub seat: Seat,
}

/// Where a server runs: enough to start it again in its place (same
/// ports, same cluster config file), as an operator restarts a failed
/// node.
#[derive(Clone, Debug)]
pub struct Seat {
    pub port: u16,
    bus: u16,
    dir: std::path::PathBuf,
}

impl Seat {
    fn args(&self) -> Vec<String> {
        [
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "2000",
            "--cluster-port",
            &self.bus.to_string(),
            "--cluster-config-file",
            &self.dir.join("nodes.conf").display().to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    /// Starts the server again (its data is gone; the cluster makes it a
    /// replica of whoever took its slots).
    pub fn restart(&self) -> ClusterServer {
        let child = PrivateRedis::spawn(self.port, &self.dir, false, &self.args())
            .expect("the server starts again in its place");
        ClusterServer {
            child,
            port: self.port,
            seat: self.clone(),
        }
    }
}

/// `masters` masters with `replicas` replicas each.
pub struct PrivateRedisCluster {
    pub servers: Vec<ClusterServer>,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PrivateRedisCluster {
    pub fn start(masters: usize, replicas: usize) -> PrivateRedisCluster {
        let dir = private_dir("redis-cluster");
        let mut servers = Vec::new();
        while servers.len() < masters * (1 + replicas) {
            servers.push(Self::spawn(&dir, servers.len()));
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(servers.iter().map(|s| format!("127.0.0.1:{}", s.port)));
        create.extend([
            "--cluster-replicas".to_owned(),
            replicas.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        let out = Command::new("redis-cli")
            .args(&create)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        let cluster = PrivateRedisCluster { servers, dir };
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        cluster.wait_replicas(masters * replicas);
        cluster
    }

    /// Waits until `n` replicas have copied their master (a full sync
    /// after `cluster create`): before that, a write that waits for a
    /// replica (`WAIT`) times out.
    pub fn wait_replicas(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self
                .servers
                .iter()
                .filter(|s| cli(s.port, &["info", "replication"]).contains("master_link_status:up"))
                .count();
            if up >= n {
                return;
            }
            assert!(Instant::now() < deadline, "{up} of {n} replicas in sync");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one server in cluster mode, in a directory of its own, as
    /// [`PrivateRedis`] starts its servers; its bus port is chosen too
    /// (the default, port + 10000, may not exist).
    fn spawn(dir: &std::path::Path, i: usize) -> ClusterServer {
        let dir = dir.join(format!("s{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut failures = Vec::new();
        for _ in 0..10 {
            let seat = Seat {
                port: free_port(),
                bus: free_port(),
                dir: dir.clone(),
            };
            match PrivateRedis::spawn(seat.port, &dir, false, &seat.args()) {
                Ok(child) => {
                    return ClusterServer {
                        child,
                        port: seat.port,
                        seat,
                    };
                }
                Err(e) => failures.push(e),
            }
        }
        panic!("cluster redis-server did not start: {failures:#?}");
    }

    /// Waits until every live server says the cluster is whole.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &self.servers {
            loop {
                if cli(s.port, &["cluster", "info"]).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The URL a gateway is given: every server as a seed.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.servers[0].port);
        for (i, s) in self.servers.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", s.port));
        }
        url
    }

    /// Ports of the servers that are masters now.
    pub fn masters(&self) -> Vec<u16> {
        self.servers
            .iter()
            .filter(|s| cli(s.port, &["role"]).starts_with("master"))
            .map(|s| s.port)
            .collect()
    }

    /// The PID of the server on `port` (to kill it by) and its seat (to
    /// start it again).
    pub fn server(&self, port: u16) -> (u32, Seat) {
        self.servers
            .iter()
            .find(|s| s.port == port)
            .map(|s| (s.child.id(), s.seat.clone()))
            .expect("a server of this cluster")
    }

    /// Takes a server started again in its seat back (stopped with the rest).
    pub fn adopt(&mut self, server: ClusterServer) {
        if let Some(old) = self.servers.iter_mut().find(|s| s.port == server.port) {
            let _ = old.child.kill();
            let _ = old.child.wait();
            *old = server;
        } else {
            self.servers.push(server);
        }
    }

    /// Whether the server on `port` is a replica now.
    pub fn is_replica(port: u16) -> bool {
        cli(port, &["role"]).starts_with("slave")
    }

    /// The hash slot of `key`.
    pub fn keyslot(&self, key: &str) -> u16 {
        cli(self.servers[0].port, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot number")
    }

    /// The master (port) serving `slot` now.
    pub fn master_of(&self, slot: u16) -> u16 {
        let slot = slot.to_string();
        self.masters()
            .into_iter()
            .find(|port| {
                cli(*port, &["cluster", "nodes"])
                    .lines()
                    .find(|l| l.contains("myself"))
                    .is_some_and(|me| owns(me, &slot))
            })
            .expect("a master owns the slot")
    }

    /// Moves `slot` from the master on `from` to the master on `to` as
    /// `redis-cli --cluster reshard` does (IMPORTING / MIGRATING, keys
    /// moved with MIGRATE, then the new owner told to everyone), one key
    /// at a time with `pause` between keys, so traffic meets the slot in
    /// every state of the move.
    pub fn move_slot(&self, slot: u16, from: u16, to: u16, pause: Duration) {
        let id = |port: u16| cli(port, &["cluster", "myid"]).trim().to_owned();
        let (from_id, to_id) = (id(from), id(to));
        let slot = slot.to_string();
        let ok = |port: u16, args: &[&str]| {
            let out = cli(port, args);
            assert!(out.trim() == "OK", "{args:?} on {port}: {out}");
        };
        ok(to, &["cluster", "setslot", &slot, "importing", &from_id]);
        ok(from, &["cluster", "setslot", &slot, "migrating", &to_id]);
        loop {
            let keys = cli(from, &["cluster", "getkeysinslot", &slot, "1"]);
            let Some(key) = keys.lines().next().filter(|k| !k.is_empty()) else {
                break;
            };
            let to_port = to.to_string();
            let out = cli(
                from,
                &[
                    "migrate",
                    "127.0.0.1",
                    &to_port,
                    key,
                    "0",
                    "5000",
                    "REPLACE",
                ],
            );
            assert!(
                out.contains("OK") || out.contains("NOKEY"),
                "migrate {key}: {out}"
            );
            std::thread::sleep(pause);
        }
        ok(to, &["cluster", "setslot", &slot, "node", &to_id]);
        ok(from, &["cluster", "setslot", &slot, "node", &to_id]);
        for port in self.masters() {
            if port != to && port != from {
                ok(port, &["cluster", "setslot", &slot, "node", &to_id]);
            }
        }
    }

    /// Keys matching `pattern`, by the master holding them.
    pub fn keys_by_master(&self, pattern: &str) -> Vec<(u16, Vec<String>)> {
        self.masters()
            .into_iter()
            .map(|port| {
                let keys = cli(port, &["--scan", "--pattern", pattern])
                    .lines()
                    .map(str::to_owned)
                    .collect();
                (port, keys)
            })
            .collect()
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a `CLUSTER NODES` line lists `slot` among its ranges.
fn owns(line: &str, slot: &str) -> bool {
    let Ok(slot) = slot.parse::<u16>() else {
        return false;
    };
    line.split_whitespace().skip(8).any(|range| {
        let mut ends = range.split('-').map(str::parse::<u16>);
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
            (Some(Ok(a)), None) => a == slot,
            _ => false,
        }
    })
}
