//! Prometheus metrics, registered once per process and served at
//! `/metrics`. Hot-path counters are resolved to handles up front (no
//! label lookup per frame).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use chatgate_protocol::close::ALL_CLOSE_CODES;
use chatgate_protocol::error_code::ALL_ERROR_CODES;
use chatgate_protocol::{CloseCode, ErrorCode, Opcode};

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket sessions (upgraded, identified or not).
    pub connections: IntGauge,
    /// `max_connections`: sessions this process admits (from its
    /// open-files limit and memory unless set), for capacity alerts.
    pub max_connections: IntGauge,
    /// Sessions accepted since start.
    pub connections_total: IntCounter,
    /// Upgrades refused because the process was at `max_connections`.
    pub refused_overload: IntCounter,
    /// Identify refused because the user was at the per-user cap.
    pub refused_user_limit: IntCounter,
    /// Sockets refused at the door because every pending slot was taken.
    pub refused_pending: IntCounter,
    /// Sockets refused at the door by a per-address cap.
    pub refused_source: IntCounter,
    /// Unidentified sockets closed to make room for newer ones.
    pub evicted: IntCounter,
    /// Rooms with at least one local member.
    pub rooms: IntGauge,
    frames_in: Vec<IntCounter>,
    frames_out: Vec<IntCounter>,
    /// Bytes received in binary frames.
    pub bytes_in: IntCounter,
    /// Bytes written in binary frames.
    pub bytes_out: IntCounter,
    /// Room events enqueued to a recipient connection.
    pub deliveries: IntCounter,
    /// Ephemeral events shed for connections whose queue was filling.
    pub ephemeral_dropped: IntCounter,
    /// Typing events not sent on because the same user's typing in the
    /// same room went out less than an interval ago.
    pub typing_coalesced: IntCounter,
    /// Rooms of a resume answered "not recovered" because their replay
    /// would have passed what one outbox holds.
    pub replays_cut: IntCounter,
    /// Queue wait of the oldest frame of each wake-up, until the
    /// connection task takes it.
    pub delivery_latency: Histogram,
    request_latency: HistogramVec,
    /// Requests refused by the per-user rate limit.
    pub rate_limited: IntCounter,
    /// Connections closed with 4001 (slow consumer).
    pub slow_consumers: IntCounter,
    /// Identify attempts with a bad token.
    pub auth_failures: IntCounter,
    closes: IntCounterVec,
    errors: IntCounterVec,
    /// Store calls that failed.
    pub store_errors: IntCounter,
    /// Retried sends answered "stored, reachable through History only":
    /// the room stream they may have been published in was lost.
    pub history_only_sends: IntCounter,
    /// Fan-out calls that failed.
    pub fanout_errors: IntCounter,
    /// 1 when a backend answered its last probe, by backend.
    pub backend_up: IntGaugeVec,
    /// Age of the last stream entry when this node delivered it (ms).
    pub fanout_lag_ms: IntGauge,
    /// Fan-out reader errors since start.
    pub fanout_read_errors: IntGauge,
    /// Fan-out reader recoveries (reconnects) since start.
    pub fanout_reconnects: IntGauge,
    /// Times this node found the Redis streams emptied (and closed its
    /// sessions with 4005) since start.
    pub fanout_streams_lost: IntGauge,
    /// Events this node could neither receive live nor read from a room's
    /// log (trimmed or expired first, or lost with Redis) since start.
    pub fanout_overruns: IntGauge,
    /// Membership lookups by this node's cache, by result (`hit`, `miss`).
    pub membership_cache: IntCounterVec,
    /// Requests refused by a room's policy, by opcode.
    pub forbidden: IntCounterVec,
    /// Connections taken out of a room because their membership ended
    /// or the room was deleted.
    pub memberships_revoked: IntCounter,
    /// Server API requests, by method and HTTP status.
    pub api_requests: IntCounterVec,
}

fn labelled(registry: &Registry, name: &str, help: &str, label: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), label)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(vec.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    vec
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
}

fn per_opcode(registry: &Registry, name: &str, help: &str) -> Vec<IntCounter> {
    let vec = IntCounterVec::new(Opts::new(name, help), &["opcode"])
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(vec.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    (0..=u8::MAX)
        .map(|b| {
            let label = Opcode::from_u8(b).map(Opcode::name).unwrap_or("unknown");
            vec.with_label_values(&[label])
        })
        .collect()
}

impl Metrics {
    /// Creates and registers every metric (plus process metrics: RSS,
    /// CPU, open files).
    // Metric construction only fails on a programming error (duplicate or
    // malformed name), caught by any test that starts a gateway.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("chat".into()), None)
            .unwrap_or_else(|e| panic!("registry: {e}"));
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            registry
                .register(Box::new(pc))
                .unwrap_or_else(|e| panic!("process collector: {e}"));
        }
        let r = &registry;
        let buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ];
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "delivery_latency_seconds",
                "Wait of the oldest queued frame until its connection task took it",
            )
            .buckets(buckets.clone()),
        )
        .unwrap_or_else(|e| panic!("histogram: {e}"));
        r.register(Box::new(delivery_latency.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let request_latency = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time to handle a request, by opcode",
            )
            .buckets(buckets),
            &["opcode"],
        )
        .unwrap_or_else(|e| panic!("histogram: {e}"));
        r.register(Box::new(request_latency.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let closes = IntCounterVec::new(
            Opts::new(
                "closes_total",
                "Connections closed by the server, by close code",
            ),
            &["code"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(closes.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        for c in ALL_CLOSE_CODES {
            closes.with_label_values(&[c.name()]);
        }
        let errors = IntCounterVec::new(
            Opts::new("errors_total", "Error frames sent, by error code"),
            &["code"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(errors.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        for c in ALL_ERROR_CODES {
            errors.with_label_values(&[c.name()]);
        }
        Metrics {
            connections: gauge(r, "connections", "Open WebSocket sessions"),
            max_connections: gauge(
                r,
                "max_connections",
                "Sessions this process admits (max_connections)",
            ),
            connections_total: counter(r, "connections_total", "WebSocket sessions accepted"),
            refused_overload: counter(
                r,
                "connections_refused_overload_total",
                "Upgrades refused with 503 at max_connections",
            ),
            refused_user_limit: counter(
                r,
                "connections_refused_user_limit_total",
                "Sessions closed with 4105 (per-user cap)",
            ),
            refused_pending: counter(
                r,
                "connections_refused_pending_total",
                "Sockets refused with 503 at max_pending_connections (not identified yet)",
            ),
            evicted: counter(
                r,
                "connections_evicted_total",
                "Unidentified sockets closed to make room in a full pending pool",
            ),
            refused_source: counter(
                r,
                "connections_refused_source_total",
                "Sockets refused with 503 by a per-address cap",
            ),
            rooms: gauge(r, "rooms", "Rooms with local members"),
            frames_in: per_opcode(r, "frames_in_total", "Frames received, by opcode"),
            frames_out: per_opcode(
                r,
                "frames_out_total",
                "Frames sent, by opcode (batch members counted)",
            ),
            bytes_in: counter(r, "bytes_in_total", "Bytes received in binary messages"),
            bytes_out: counter(r, "bytes_out_total", "Bytes sent in binary messages"),
            deliveries: counter(r, "deliveries_total", "Room events enqueued to recipients"),
            replays_cut: counter(
                r,
                "replays_cut_total",
                "Resumed rooms not replayed (recovered = false) because the replay passed the outbox bounds",
            ),
            typing_coalesced: counter(
                r,
                "typing_coalesced_total",
                "Typing events coalesced (same user and room within 2 s)",
            ),
            ephemeral_dropped: counter(
                r,
                "ephemeral_dropped_total",
                "Typing events shed for connections falling behind",
            ),
            delivery_latency,
            request_latency,
            rate_limited: counter(
                r,
                "rate_limited_total",
                "Requests refused by the rate limit",
            ),
            slow_consumers: counter(
                r,
                "slow_consumer_disconnects_total",
                "Connections closed because their outbound queue filled",
            ),
            auth_failures: counter(r, "auth_failures_total", "Identify with an invalid token"),
            history_only_sends: counter(
                r,
                "history_only_sends_total",
                "Retried sends whose room stream was lost since they were stored",
            ),
            closes,
            errors,
            store_errors: counter(r, "store_errors_total", "Failed store calls"),
            fanout_errors: counter(r, "fanout_errors_total", "Failed fan-out calls"),
            fanout_lag_ms: gauge(
                r,
                "fanout_lag_ms",
                "How long the oldest gap in a room's numbers has waited for its event, ms",
            ),
            fanout_read_errors: gauge(
                r,
                "fanout_read_errors",
                "Fan-out live path Redis errors since start",
            ),
            fanout_reconnects: gauge(
                r,
                "fanout_reconnects",
                "Fan-out Pub/Sub reconnects since start (each re-reads every subscribed room's head)",
            ),
            fanout_streams_lost: gauge(
                r,
                "fanout_streams_lost",
                "Times the Redis streams were found emptied (sessions closed with 4005) since start",
            ),
            fanout_overruns: gauge(
                r,
                "fanout_overruns",
                "Events this node could neither receive live nor read from a room's log, since start",
            ),
            membership_cache: labelled(
                r,
                "membership_cache_total",
                "Membership lookups by the node's cache, by result",
                &["result"],
            ),
            forbidden: labelled(
                r,
                "forbidden_total",
                "Requests refused by a room policy, by opcode",
                &["opcode"],
            ),
            memberships_revoked: counter(
                r,
                "memberships_revoked_total",
                "Connections taken out of a room whose membership ended or which was deleted",
            ),
            api_requests: labelled(
                r,
                "api_requests_total",
                "Server API requests, by method and status",
                &["method", "status"],
            ),
            backend_up: {
                let g = IntGaugeVec::new(
                    Opts::new("backend_up", "1 when the backend answered its last probe"),
                    &["backend"],
                )
                .unwrap_or_else(|e| panic!("{e}"));
                r.register(Box::new(g.clone()))
                    .unwrap_or_else(|e| panic!("{e}"));
                g
            },
            registry,
        }
    }

    /// Counts a received frame.
    pub fn frame_in(&self, opcode: u8) {
        self.frames_in[opcode as usize].inc();
    }

    /// Counts a sent frame.
    pub fn frame_out(&self, opcode: u8) {
        self.frames_out[opcode as usize].inc();
    }

    /// Records a request's handling time.
    pub fn request(&self, opcode: Opcode, seconds: f64) {
        self.request_latency
            .with_label_values(&[opcode.name()])
            .observe(seconds);
    }

    /// Counts a socket refused at the door.
    pub fn refused(&self, why: crate::admission::Refusal) {
        match why {
            crate::admission::Refusal::Pending => self.refused_pending.inc(),
            crate::admission::Refusal::Source => self.refused_source.inc(),
        }
    }

    /// Counts a server-initiated close.
    pub fn close(&self, code: CloseCode) {
        self.closes.with_label_values(&[code.name()]).inc();
    }

    /// Counts an Error frame.
    pub fn error(&self, code: ErrorCode) {
        self.errors.with_label_values(&[code.name()]).inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Appends the store's statement counters (read from the store at each
/// scrape rather than mirrored into the registry).
pub fn render_statements(out: &mut String, counts: &[(&'static str, u64)]) {
    use std::fmt::Write;
    if counts.is_empty() {
        return;
    }
    out.push_str("# HELP chat_store_statements_total Statements sent to the store, by kind.\n");
    out.push_str("# TYPE chat_store_statements_total counter\n");
    for (name, n) in counts {
        let _ = writeln!(
            out,
            "chat_store_statements_total{{statement=\"{name}\"}} {n}"
        );
    }
}
