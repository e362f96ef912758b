//! Who gets a socket, before anyone is identified.
//!
//! Every socket of the public listener holds a [`Ticket`] from `accept` to
//! close (HTTP phase, upgraded, identified). The ticket carries:
//!
//! - a **socket permit**: sessions plus unidentified sockets never exceed
//!   `max_connections + max_pending_connections`, which start-up keeps
//!   inside the open-files limit together with the database and Redis
//!   pools (see [`crate::config::Config::fd_budget`]), so `accept` cannot
//!   take the descriptors a backend needs;
//! - a **pending permit** until Identify succeeds: HTTP-phase and
//!   upgraded-but-unidentified sockets have their own small pool, so
//!   sockets that never identify cannot take session slots (a session
//!   slot is claimed only once the token checks out);
//! - the **source address**, counted per address: unidentified sockets
//!   (`max_pending_per_ip`), all sockets (`max_connections_per_ip`) and
//!   new sockets per second (`new_connections_per_ip`). IPv6 addresses
//!   count by /64, what one host usually holds. Behind a proxy listed in
//!   `trusted_proxies`, the address is the one the proxy appends to
//!   `X-Forwarded-For`, read from the first request's complete head
//!   *before* the socket is admitted (at most [`MAX_PEEKS`] at a time, for
//!   [`PEEK_WAIT`] each; beyond, or without a complete head, the upgrade
//!   attributes it), so a client over its caps behind the proxy is
//!   refused without evicting anyone. An upgrade naming another client
//!   than the socket's first request (a proxy reusing its connection)
//!   moves the count to it. The header from anyone else is ignored.
//!
//! When the pending pool is full, the **oldest** unidentified socket is
//! closed to make room (4004 if it was upgraded): a real client upgrades
//! and identifies in milliseconds, so sockets that sit there unidentified
//! (from however many addresses) are the ones that go, and a new client
//! gets in. A socket refused at the door is answered `503` with
//! `Retry-After` and closed at once, never left to wait in the backlog.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Trusted proxies' requests read ahead at once, and for how long at
/// most: a silent socket from a trusted address must not hold descriptors
/// the door cannot take back.
pub const MAX_PEEKS: usize = 64;
/// See [`MAX_PEEKS`].
pub const PEEK_WAIT: Duration = Duration::from_secs(1);

/// How long a new socket waits for the pending slot an eviction frees.
const EVICTION_WAIT: Duration = Duration::from_millis(500);

/// One unidentified socket's place in the eviction order.
#[derive(Default)]
struct Slot {
    evict: Notify,
    /// Set when evicted; stays set, so every owner that waits (the HTTP
    /// task, then the WebSocket task after an upgrade) sees it.
    evicted: AtomicBool,
    /// Identified, closed, or already picked for eviction.
    done: AtomicBool,
}

/// Resolves when the door closes this socket to make room (see
/// [`Door::admit`]); owners select on it while the socket is unidentified.
#[derive(Clone)]
pub struct Eviction(Arc<Slot>);

impl Eviction {
    /// Waits until this socket is evicted (at once if it already was).
    pub async fn wait(&self) {
        loop {
            let notified = self.0.evict.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0.evicted.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Whether this socket was evicted.
    pub fn is_evicted(&self) -> bool {
        self.0.evicted.load(Ordering::Acquire)
    }

    /// Takes this socket out of the eviction order (it is identifying:
    /// busy, not idle) while it keeps its pending slot.
    pub fn spare(&self) {
        self.0.done.store(true, Ordering::Relaxed);
    }
}

use crate::config::Config;

/// Why a socket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every pending slot is taken (`max_pending_connections`).
    Pending,
    /// This source address is over one of its caps.
    Source,
}

/// A source address as counted: IPv4 whole, IPv6 by its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SourceKey(u128);

impl SourceKey {
    fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey(u32::from(v4) as u128),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(u32::from(v4) as u128),
                None => SourceKey((u128::from(v6) >> 64) << 64 | 1 << 32),
            },
        }
    }
}

/// What one source address holds now.
struct Source {
    open: u32,
    pending: u32,
    /// New-connection tokens and when they were last refilled.
    tokens: f32,
    at: Instant,
}

impl Source {
    /// New-connection tokens now, at `rate` a second (burst twice that).
    fn tokens_now(&self, rate: u32) -> f32 {
        let rate = rate as f32;
        (self.tokens + self.at.elapsed().as_secs_f32() * rate).min(2.0 * rate)
    }
}

/// A CIDR block (`10.0.0.0/8`, `fd00::/8`, or a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/BITS`.
    pub fn parse(text: &str) -> anyhow::Result<Cidr> {
        let (addr, bits) = match text.trim().split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text.trim(), None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| anyhow::anyhow!("{text:?} is not an address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| anyhow::anyhow!("{text:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { net, bits })
    }

    /// Whether `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let prefix = |a: u128, width: u8| {
            if self.bits == 0 {
                0
            } else {
                a >> (width - self.bits)
            }
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix(u32::from(n) as u128, 32) == prefix(u32::from(a) as u128, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                prefix(u128::from(n), 128) == prefix(u128::from(a), 128)
            }
            _ => false,
        }
    }
}

/// The door of the public listener; one per process.
pub struct Door {
    sockets: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    pending_size: usize,
    /// Unidentified sockets, oldest first (entries already done are
    /// skipped and dropped lazily).
    order: Mutex<VecDeque<Arc<Slot>>>,
    sources: Mutex<HashMap<SourceKey, Source>>,
    pending_per_ip: u32,
    connections_per_ip: u32,
    new_per_ip: u32,
    trusted: Vec<Cidr>,
    /// Sockets from trusted proxies whose first request is being read
    /// ahead (they hold a descriptor permit and nothing the door can
    /// evict, so only a few at a time).
    peeks: Arc<Semaphore>,
}

impl Door {
    /// A door with the configuration's limits.
    pub fn new(config: &Config) -> Arc<Door> {
        Arc::new(Door {
            sockets: Arc::new(Semaphore::new(
                config.max_connections + config.max_pending_connections,
            )),
            pending: Arc::new(Semaphore::new(config.max_pending_connections)),
            pending_size: config.max_pending_connections,
            order: Mutex::new(VecDeque::new()),
            sources: Mutex::new(HashMap::new()),
            pending_per_ip: config.max_pending_per_ip,
            connections_per_ip: config.max_connections_per_ip,
            new_per_ip: config.new_connections_per_ip,
            trusted: config.trusted_proxies.clone(),
            peeks: Arc::new(Semaphore::new(MAX_PEEKS)),
        })
    }

    /// Waits for a socket permit: taken *before* `accept`, so the process
    /// never accepts its way into the open-files limit.
    pub async fn socket_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.sockets.clone().acquire_owned().await.ok()
    }

    /// Admits an accepted socket from `peer`, or says why not.
    /// `forwarded_for` is the `X-Forwarded-For` of its first request (read
    /// ahead, for a trusted proxy only): behind a proxy the client it
    /// names is counted, and a proxy's own requests without one (health
    /// checks) are not. With the pending pool full, the oldest
    /// unidentified socket is evicted and its slot taken (waiting up to
    /// half a second for it); an address over its own caps evicts nobody.
    pub async fn admit(
        self: &Arc<Door>,
        socket: OwnedSemaphorePermit,
        peer: IpAddr,
        forwarded_for: &[&str],
    ) -> Result<Ticket, Refusal> {
        let client = self.client_addr(peer, forwarded_for);
        let counted = (client != peer || !self.is_trusted(peer)).then_some(client);
        if let Some(ip) = counted
            && !self.source_allows(ip)
        {
            return Err(Refusal::Source);
        }
        let pending = match self.pending.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !self.evict_oldest() {
                    return Err(Refusal::Pending);
                }
                match tokio::time::timeout(EVICTION_WAIT, self.pending.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    _ => return Err(Refusal::Pending),
                }
            }
        };
        let slot = Arc::new(Slot::default());
        {
            let mut order = self.order.lock();
            if order.len() > 2 * self.pending_size {
                order.retain(|s| !s.done.load(Ordering::Relaxed));
            }
            order.push_back(slot.clone());
        }
        let mut ticket = Ticket {
            door: self.clone(),
            _socket: socket,
            pending: Some(pending),
            source: None,
            slot,
            admitted: Instant::now(),
        };
        if let Some(ip) = counted {
            ticket.count(ip)?;
        }
        Ok(ticket)
    }

    /// Tells the oldest unidentified socket to close; false when there is
    /// none.
    fn evict_oldest(&self) -> bool {
        let mut order = self.order.lock();
        while let Some(slot) = order.pop_front() {
            if !slot.done.swap(true, Ordering::Relaxed) {
                slot.evicted.store(true, Ordering::Release);
                slot.evict.notify_waiters();
                return true;
            }
        }
        false
    }

    /// Whether `ip` is within its caps now (a check, nothing counted).
    fn source_allows(&self, ip: IpAddr) -> bool {
        let sources = self.sources.lock();
        let Some(s) = sources.get(&SourceKey::of(ip)) else {
            return true;
        };
        let over_pending = self.pending_per_ip > 0 && s.pending >= self.pending_per_ip;
        let over_open = self.connections_per_ip > 0 && s.open >= self.connections_per_ip;
        // Out of new-connection tokens: no eviction on its behalf either.
        let over_rate = self.new_per_ip > 0 && s.tokens_now(self.new_per_ip) < 1.0;
        !(over_pending || over_open || over_rate)
    }

    /// A permit to read ahead a trusted proxy's request, if fewer than
    /// [`MAX_PEEKS`] are under way; without one, the socket is admitted
    /// uncounted and attributed at its upgrade.
    pub fn peek_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.peeks.clone().try_acquire_owned().ok()
    }

    /// Whether `peer` is a proxy whose `X-Forwarded-For` is believed.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(peer))
    }

    /// The client's address: `peer` itself, or, when `peer` is a trusted
    /// proxy, the right-most `X-Forwarded-For` entry that is not one
    /// (the left part of the header is whatever the client sent).
    pub fn client_addr(&self, peer: IpAddr, forwarded_for: &[&str]) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops = forwarded_for
            .iter()
            .flat_map(|h| h.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.is_trusted(ip) => continue,
                Ok(ip) => return ip,
                // Garbage where an address should be: stop believing the
                // rest; the proxy itself is the last address known.
                Err(_) => break,
            }
        }
        peer
    }

    /// Unidentified sockets now (for `/health` and tests).
    pub fn pending(&self) -> usize {
        self.pending_size
            .saturating_sub(self.pending.available_permits())
    }

    /// Forgets addresses with nothing open and a full bucket (called from
    /// the node's maintenance).
    pub fn sweep(&self) {
        let rate = self.new_per_ip;
        self.sources
            .lock()
            .retain(|_, s| s.open > 0 || (rate > 0 && s.tokens_now(rate) < 2.0 * rate as f32));
    }
}

/// What one socket holds while it is open; dropping it gives it all back.
pub struct Ticket {
    door: Arc<Door>,
    _socket: OwnedSemaphorePermit,
    pending: Option<OwnedSemaphorePermit>,
    source: Option<SourceKey>,
    slot: Arc<Slot>,
    admitted: Instant,
}

impl Ticket {
    /// When the socket was admitted: its HTTP phase and its wait for
    /// Identify share one connect timeout from here.
    pub fn admitted(&self) -> Instant {
        self.admitted
    }

    /// Resolves if the door evicts this socket while it is unidentified.
    pub fn eviction(&self) -> Eviction {
        Eviction(self.slot.clone())
    }

    /// Counts this socket against `client`, the one its upgrade names
    /// behind a trusted proxy. A socket counted for another client (a
    /// proxy reusing its connection for several clients' requests) moves
    /// to this one; the same client is counted once.
    pub fn attribute(&mut self, client: IpAddr) -> Result<(), Refusal> {
        match self.source {
            Some(key) if key == SourceKey::of(client) => Ok(()),
            Some(_) => {
                self.release();
                self.count(client)
            }
            None => self.count(client),
        }
    }

    /// Gives back what this socket counts against its address.
    fn release(&mut self) {
        let Some(key) = self.source.take() else {
            return;
        };
        let mut sources = self.door.sources.lock();
        if let Some(s) = sources.get_mut(&key) {
            s.open = s.open.saturating_sub(1);
            if self.pending.is_some() {
                s.pending = s.pending.saturating_sub(1);
            }
            if s.open == 0 && self.door.new_per_ip == 0 {
                sources.remove(&key);
            }
        }
    }

    fn count(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        let door = &self.door;
        let key = SourceKey::of(ip);
        let mut sources = door.sources.lock();
        let burst = 2.0 * door.new_per_ip as f32;
        let s = sources.entry(key).or_insert_with(|| Source {
            open: 0,
            pending: 0,
            tokens: burst,
            at: Instant::now(),
        });
        if door.pending_per_ip > 0 && s.pending >= door.pending_per_ip {
            return Err(Refusal::Source);
        }
        if door.connections_per_ip > 0 && s.open >= door.connections_per_ip {
            return Err(Refusal::Source);
        }
        if door.new_per_ip > 0 {
            s.tokens = s.tokens_now(door.new_per_ip);
            s.at = Instant::now();
            if s.tokens < 1.0 {
                return Err(Refusal::Source);
            }
            s.tokens -= 1.0;
        }
        s.open += 1;
        if self.pending.is_some() {
            s.pending += 1;
        }
        self.source = Some(key);
        Ok(())
    }

    /// Identify succeeded: the socket is a session now, and gives its
    /// pending slot back.
    pub fn identified(&mut self) {
        self.slot.done.store(true, Ordering::Relaxed);
        if self.pending.take().is_some()
            && let Some(key) = self.source
            && let Some(s) = self.door.sources.lock().get_mut(&key)
        {
            s.pending = s.pending.saturating_sub(1);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.slot.done.store(true, Ordering::Relaxed);
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "x", "::/129", "1.2.3.4/"] {
            assert!(Cidr::parse(bad).is_err(), "{bad} parsed");
        }
    }

    fn door(config: Config) -> Arc<Door> {
        Door::new(&config)
    }

    fn permit(d: &Door) -> OwnedSemaphorePermit {
        d.sockets.clone().try_acquire_owned().unwrap()
    }

    /// `Door::admit`, run to completion (tests are synchronous).
    trait AdmitNow {
        fn admit_now(&self, socket: OwnedSemaphorePermit, peer: IpAddr) -> Result<Ticket, Refusal>;
    }

    impl AdmitNow for Arc<Door> {
        fn admit_now(&self, socket: OwnedSemaphorePermit, peer: IpAddr) -> Result<Ticket, Refusal> {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
                .block_on(self.admit(socket, peer, &[]))
        }
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_proxies_only() {
        let d = door(Config {
            trusted_proxies: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            ..Config::default()
        });
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        // The client's own claim (left) is ignored; the proxy's entry wins.
        assert_eq!(d.client_addr(proxy, &["6.6.6.6, 198.51.100.7"]), client);
        // Chained trusted proxies are skipped.
        assert_eq!(d.client_addr(proxy, &["198.51.100.7, 10.0.0.9"]), client);
        assert_eq!(d.client_addr(stranger, &["1.2.3.4"]), stranger);
        assert_eq!(d.client_addr(proxy, &["not-an-ip"]), proxy);
        assert_eq!(d.client_addr(proxy, &[]), proxy);
    }

    #[test]
    fn per_address_caps_hold_and_free() {
        let d = door(Config {
            max_pending_per_ip: 2,
            max_connections_per_ip: 3,
            ..Config::default()
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut t1 = d.admit_now(permit(&d), a).unwrap();
        let _t2 = d.admit_now(permit(&d), a).unwrap();
        assert_eq!(
            d.admit_now(permit(&d), a).err(),
            Some(Refusal::Source),
            "pending cap"
        );
        let _other = d.admit_now(permit(&d), b).unwrap();
        t1.identified();
        let mut t3 = d.admit_now(permit(&d), a).unwrap();
        t3.identified();
        assert_eq!(
            d.admit_now(permit(&d), a).err(),
            Some(Refusal::Source),
            "open cap"
        );
        drop(t1);
        let _t4 = d.admit_now(permit(&d), a).unwrap();
        // IPv6 counts by /64.
        let v6 = door(Config {
            max_pending_per_ip: 1,
            ..Config::default()
        });
        let _x = v6
            .admit_now(permit(&v6), "2001:db8::1".parse().unwrap())
            .unwrap();
        assert!(
            v6.admit_now(permit(&v6), "2001:db8::2".parse().unwrap())
                .is_err()
        );
        assert!(
            v6.admit_now(permit(&v6), "2001:db8:0:1::1".parse().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn new_connections_per_address_are_metered() {
        // One a second: a refill within this test would take a 1 s stall.
        let d = door(Config {
            new_connections_per_ip: 1,
            ..Config::default()
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        // A burst of twice the rate, then refusals.
        for i in 0..2 {
            assert!(d.admit_now(permit(&d), a).is_ok(), "connection {i}");
        }
        assert_eq!(d.admit_now(permit(&d), a).err(), Some(Refusal::Source));
        assert!(
            d.admit_now(permit(&d), "192.0.2.9".parse().unwrap())
                .is_ok()
        );
    }

    /// A full pending pool makes room by evicting its oldest socket; a
    /// socket taken out of the order (identifying) is never picked, and
    /// when the evicted one does not go the newcomer is refused after a
    /// short wait.
    #[tokio::test]
    async fn a_full_pending_pool_evicts_its_oldest_socket() {
        let d = door(Config {
            max_pending_connections: 2,
            ..Config::default()
        });
        let t1 = d
            .admit(permit(&d), "192.0.2.1".parse().unwrap(), &[])
            .await
            .unwrap();
        let t2 = d
            .admit(permit(&d), "192.0.2.2".parse().unwrap(), &[])
            .await
            .unwrap();
        let evicted = t1.eviction();
        let owner = tokio::spawn(async move {
            evicted.wait().await;
            drop(t1);
        });
        let t3 = d
            .admit(permit(&d), "192.0.2.3".parse().unwrap(), &[])
            .await
            .unwrap();
        owner.await.unwrap();
        // t2 is the oldest now, but identifying: spared. t3 is picked and
        // does not go: the next socket is refused once the wait is over.
        t2.eviction().spare();
        assert_eq!(
            d.admit(permit(&d), "192.0.2.4".parse().unwrap(), &[])
                .await
                .err(),
            Some(Refusal::Pending)
        );
        assert!(!t2.eviction().is_evicted(), "a spared socket was picked");
        assert!(t3.eviction().is_evicted(), "the oldest unspared was not");
        // Level-triggered: a wait that starts after the eviction returns.
        tokio::time::timeout(Duration::from_secs(1), t3.eviction().wait())
            .await
            .unwrap();
    }

    /// Behind a trusted proxy the forwarded client is counted at the door:
    /// one over its caps is refused there, with a full pool, without
    /// evicting anyone; the proxy's own requests are not counted.
    #[tokio::test]
    async fn a_forwarded_client_over_its_caps_evicts_nobody() {
        let d = door(Config {
            max_pending_connections: 3,
            max_pending_per_ip: 1,
            trusted_proxies: vec![Cidr::parse("10.0.0.1/32").unwrap()],
            ..Config::default()
        });
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let a = d.admit(permit(&d), proxy, &["192.0.2.1"]).await.unwrap();
        let b = d.admit(permit(&d), proxy, &["192.0.2.2"]).await.unwrap();
        let own = d.admit(permit(&d), proxy, &[]).await.unwrap();
        // The pool is full; the first client asks again.
        assert_eq!(
            d.admit(permit(&d), proxy, &["6.6.6.6, 192.0.2.1"])
                .await
                .err(),
            Some(Refusal::Source)
        );
        for t in [&a, &b, &own] {
            assert!(
                !t.eviction().is_evicted(),
                "a refused client evicted someone"
            );
        }
    }

    /// A proxy may carry several clients' requests on one connection: the
    /// upgrade's client is the one counted, not the first request's.
    #[tokio::test]
    async fn an_upgrade_moves_the_count_to_the_client_it_names() {
        let d = door(Config {
            max_connections_per_ip: 1,
            trusted_proxies: vec![Cidr::parse("10.0.0.1/32").unwrap()],
            ..Config::default()
        });
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let second: IpAddr = "192.0.2.60".parse().unwrap();
        let mut reused = d.admit(permit(&d), proxy, &["192.0.2.50"]).await.unwrap();
        reused.attribute(second).unwrap();
        // The first client holds nothing now; the second holds its one.
        assert!(d.admit(permit(&d), proxy, &["192.0.2.50"]).await.is_ok());
        assert_eq!(
            d.admit(permit(&d), proxy, &["192.0.2.60"]).await.err(),
            Some(Refusal::Source)
        );
        reused.attribute(second).unwrap();
        drop(reused);
        assert!(d.admit(permit(&d), proxy, &["192.0.2.60"]).await.is_ok());
    }
}
