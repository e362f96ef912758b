//! PostgreSQL engine (tokio-postgres + deadpool-postgres).
//!
//! Every operation is one statement, one round trip, prepared once per
//! pooled connection. A send is an autocommitted INSERT, so it is durable
//! when it returns; concurrent sends (and their sequence updates) are
//! group-committed: whatever queued while earlier batches ran leaves as
//! one multi-row statement ([`crate::batch`]). A message with attachments
//! is inserted alone, attachments in the same statement. A history page
//! is one query that joins the sender's profile and aggregates
//! attachments and reactions per message (no query per message).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::config::SslMode;
use tokio_postgres::{NoTls, Row};

use chatgate_protocol::payload::ReactionCount;

use crate::batch::Batcher;
use crate::migrate::migrate;
use crate::model::{
    Attachment, Cursor, Grant, Inserted, Member, Membership, Message, NewMessage, Page,
    ReactionChange, ReactionOutcome, User,
};
use crate::{Store, StoreError};

/// Connection settings for [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user@host:port/db?options=...` URL.
    pub url: String,
    /// Pooled connections. Default 16: enough to keep a 2-4 core database
    /// busy; more only adds contention.
    pub pool_size: usize,
    /// Waiting for a pooled connection, and connecting. Default 2 s: a
    /// send should fail fast with a retryable error, not hang.
    pub timeout: Duration,
    /// Server-side statement timeout. Default 5 s.
    pub statement_timeout: Duration,
    /// TLS settings for `sslmode=require` (default: Mozilla's and the system's roots; see
    /// [`chatgate_protocol::tls`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl PgConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            pool_size: 16,
            timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// The connection string with `sslmode=verify-full` or `verify-ca` read
/// as `require` (tokio-postgres knows only disable/prefer/require; with
/// rustls, `require` verifies the chain and the host name: `verify-full`),
/// after [`check_url_tls`].
fn tls_url(url: &str) -> Result<String, StoreError> {
    check_url_tls(url)?;
    let rewrite = |v: &str| match v {
        "verify-full" | "verify-ca" => "require".to_owned(),
        other => other.to_owned(),
    };
    Ok(map_sslmode(url, rewrite))
}

/// Refuses a connection string (URL or `key=value` form) whose TLS mode
/// could fall back to plaintext (`prefer`, `allow`) or is given more than
/// once (the last would win, silently), then parses it, so configuration
/// checks stop a start at once rather than retry a typo forever.
pub fn check_url_tls(url: &str) -> Result<(), StoreError> {
    let mut modes = Vec::new();
    map_sslmode(url, |v| {
        modes.push(v.to_owned());
        v.to_owned()
    });
    let refuse = |why: String| Err(StoreError::Internal(why));
    if modes.len() > 1 {
        return refuse(format!(
            "sslmode is given {} times: give it once",
            modes.len()
        ));
    }
    if let Some(mode) = modes.first()
        && matches!(mode.as_str(), "prefer" | "allow")
    {
        return refuse(format!(
            "sslmode={mode} may fall back to plaintext: use sslmode=require \
             (TLS, certificate verified) or sslmode=disable"
        ));
    }
    let rewritten = map_sslmode(url, |v| match v {
        "verify-full" | "verify-ca" => "require".to_owned(),
        other => other.to_owned(),
    });
    rewritten
        .parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| StoreError::Internal(format!("database URL: {e}")))
}

/// `url` with every `sslmode` value (percent-decoded in a URL, unquoted in
/// the `key=value` form) passed through `f`.
fn map_sslmode(url: &str, mut f: impl FnMut(&str) -> String) -> String {
    let lower = url.trim_start().to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return url.to_owned();
        };
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, v)) if percent_decode(k) == "sslmode" => {
                    format!("sslmode={}", f(&percent_decode(v)))
                }
                _ => p.to_owned(),
            })
            .collect();
        format!("{base}?{}", params.join("&"))
    } else {
        url.split_whitespace()
            .map(|t| match t.split_once('=') {
                Some(("sslmode", v)) => format!("sslmode={}", f(v.trim_matches('\''))),
                _ => t.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `%XX` decoded (invalid escapes kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Postgres [`Store`].
pub struct PgStore {
    exec: Exec,
    inserts: Batcher<NewMessage, Inserted>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Ends the task that writes positions no insert carried.
        self.exec.positions.close();
    }
}

/// How long a recorded stream position waits for a message insert to
/// carry it before it is written alone. A send is acknowledged when it is
/// delivered, not when its position is written, so nobody waits on this;
/// at any steady rate of sends the next insert comes much sooner.
pub const POSITION_DELAY: Duration = Duration::from_millis(250);

/// Positions waiting at most (each ~40 bytes); past it a Postgres outage
/// refuses new ones (`Unavailable`) instead of growing without bound.
const MAX_PENDING_POSITIONS: usize = 200_000;

/// Positions one statement carries at most.
const POSITIONS_PER_STATEMENT: usize = 4 * BATCH_ROWS;

/// Stream positions recorded by [`Store::set_seq`] and not yet written.
///
/// Writing each one in its own statement made every send two commits
/// (the insert, then the position). Instead each rides with the next
/// message insert, in the same statement, so a send costs one commit; a
/// position no insert picks up within [`POSITION_DELAY`] is written
/// alone. Reads that return a position (a retried send's original,
/// history) see pending ones too, so the delay is invisible to callers.
/// Positions still pending when the process dies are lost, as one whose
/// own statement had not committed was before: the record only spares a
/// retry, past the fan-out's memory, a redelivery.
#[derive(Default)]
struct Positions {
    pending: parking_lot::Mutex<HashMap<i64, PendingPosition>>,
    versions: AtomicU64,
    /// Statements that wrote positions, counted before their entries
    /// leave `pending` (see `Exec::original`).
    written: AtomicU64,
    wake: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct PendingPosition {
    epoch: i64,
    seq: i64,
    /// Bumped by every record of this id, so a statement carrying an
    /// older value neither removes nor releases a newer one.
    version: u64,
    /// The version a statement in flight carries.
    carried: Option<u64>,
    /// A statement carrying it failed (a lock, a deadlock with a room's
    /// deletion): only the background writer takes it now, so one stuck
    /// row never fails or stalls other people's sends again.
    alone: bool,
    /// When it was recorded: it is written alone only once
    /// [`POSITION_DELAY`] has passed.
    at: tokio::time::Instant,
}

/// Positions one statement carries, as its array parameters (by id, so
/// two statements never lock rows in opposite orders). Dropped without
/// [`Carried::written`] (the statement failed or was abandoned), its
/// positions are left to the background writer.
struct Carried {
    positions: Arc<Positions>,
    ids: Vec<i64>,
    epochs: Vec<i64>,
    seqs: Vec<i64>,
    versions: Vec<u64>,
    written: bool,
}

/// Who takes positions: a message insert leaves those that failed once.
#[derive(Clone, Copy, PartialEq)]
enum Taker {
    Insert,
    Writer,
}

impl Positions {
    fn add(&self, id: u64, epoch: u64, seq: u64) -> Result<(), StoreError> {
        // Ids come from the database (bigint): a larger one names no row.
        let Ok(id) = i64::try_from(id) else {
            return Ok(());
        };
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        let mut pending = self.pending.lock();
        if pending.len() >= MAX_PENDING_POSITIONS && !pending.contains_key(&id) {
            return Err(StoreError::Unavailable(
                "too many stream positions waiting for the database".into(),
            ));
        }
        let version = self.versions.fetch_add(1, Ordering::Relaxed);
        let carried = pending.get(&id).and_then(|p| p.carried);
        pending.insert(
            id,
            PendingPosition {
                epoch: clamp(epoch),
                seq: clamp(seq),
                version,
                carried,
                alone: false,
                at: tokio::time::Instant::now(),
            },
        );
        drop(pending);
        self.wake.notify_one();
        Ok(())
    }

    /// The pending position of message `id`, as (epoch, seq).
    fn get(&self, id: u64) -> Option<(u64, u64)> {
        let id = i64::try_from(id).ok()?;
        self.pending
            .lock()
            .get(&id)
            .map(|p| (p.epoch as u64, p.seq as u64))
    }

    fn is_empty(&self) -> bool {
        self.pending.lock().is_empty()
    }

    /// Up to `max` positions no statement carries yet (only those
    /// recorded before `due`, when given), now carried.
    fn take(
        self: &Arc<Self>,
        max: usize,
        due: Option<tokio::time::Instant>,
        taker: Taker,
    ) -> Carried {
        let mut taken: Vec<(i64, i64, i64, u64)> = Vec::new();
        {
            let mut pending = self.pending.lock();
            // An insert looks at a bounded number of entries: while an
            // outage leaves many pending, sends must not pay for scanning
            // them all (the background writer takes the rest).
            let scan = match taker {
                Taker::Insert => 4 * max,
                Taker::Writer => usize::MAX,
            };
            for (id, p) in pending.iter_mut().take(scan) {
                if taken.len() == max {
                    break;
                }
                let eligible = p.carried.is_none()
                    && !(p.alone && taker == Taker::Insert)
                    && due.is_none_or(|due| p.at <= due);
                if eligible {
                    p.carried = Some(p.version);
                    taken.push((*id, p.epoch, p.seq, p.version));
                }
            }
        }
        taken.sort_unstable();
        let mut carried = Carried::none(self);
        for (id, epoch, seq, version) in taken {
            carried.ids.push(id);
            carried.epochs.push(epoch);
            carried.seqs.push(seq);
            carried.versions.push(version);
        }
        carried
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

impl Carried {
    /// Carries nothing.
    fn none(positions: &Arc<Positions>) -> Carried {
        Carried {
            positions: positions.clone(),
            ids: Vec::new(),
            epochs: Vec::new(),
            seqs: Vec::new(),
            versions: Vec::new(),
            written: false,
        }
    }

    /// The statement carrying these committed: they are written.
    fn written(mut self) {
        self.written = true;
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        if self.written {
            self.positions.written.fetch_add(1, Ordering::Release);
        }
        let mut pending = self.positions.pending.lock();
        for (id, version) in self.ids.iter().zip(&self.versions) {
            let Some(p) = pending.get_mut(id) else {
                continue;
            };
            if self.written && p.version == *version {
                pending.remove(id);
                continue;
            }
            // Recorded again meanwhile: that newer value still needs
            // writing, by whoever carries it (maybe not this statement).
            if p.carried == Some(*version) {
                p.carried = None;
            }
            if !self.written {
                p.alone = true;
            }
        }
        let left = !self.written;
        drop(pending);
        if left {
            self.positions.wake.notify_one();
        }
    }
}

/// Most rows per group-committed statement.
const BATCH_ROWS: usize = 128;
/// Group-committed statements in flight per kind (of the pool's
/// connections; the rest stay free for reads and single writes).
const BATCHES_IN_FLIGHT: usize = 4;

// Rows go in key order: two batches that share keys (concurrent retries)
// then wait on each other in the same order instead of deadlocking.
// The carried positions' `m.id = ANY(ids)` keeps even a plan cached while
// the table was small to an index lookup of those ids.
const INSERT_MESSAGES: &str = "
WITH pos AS (
    UPDATE messages m SET epoch = v.epoch, seq = v.seq
    FROM unnest($7::bigint[], $8::bigint[], $9::bigint[]) AS v (id, epoch, seq)
    WHERE m.id = v.id AND m.id = ANY($7::bigint[])
)
INSERT INTO messages (channel, sender_id, sender_name, sender_image, client_msg_id, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
    AS t (channel, sender_id, sender_name, sender_image, client_msg_id, body)
ORDER BY sender_id, client_msg_id
ON CONFLICT (sender_id, client_msg_id) DO NOTHING
RETURNING id, sender_id, client_msg_id, (extract(epoch FROM created_at) * 1000)::bigint";

const SET_SEQS: &str = "
UPDATE messages m SET epoch = v.epoch, seq = v.seq
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS v (id, epoch, seq)
WHERE m.id = v.id AND m.id = ANY($1::bigint[])";

/// Attempts of a group-committed statement that Postgres chose as a
/// deadlock victim. Both statements are idempotent (insert-if-absent,
/// set to a value), so running one again is safe; the ordering above
/// makes the insert's deadlock impossible, the update's is left to this.
/// (Positions carried by an insert are disjoint from every other
/// statement's, so they add no lock cycle.)
const DEADLOCK_ATTEMPTS: usize = 3;

const INSERT_MESSAGE: &str = "
WITH pos AS (
    UPDATE messages m SET epoch = v.epoch, seq = v.seq
    FROM unnest($11::bigint[], $12::bigint[], $13::bigint[]) AS v (id, epoch, seq)
    WHERE m.id = v.id AND m.id = ANY($11::bigint[])
), ins AS (
    INSERT INTO messages (channel, sender_id, sender_name, sender_image, client_msg_id, body)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (sender_id, client_msg_id) DO NOTHING
    RETURNING id, created_at
), att AS (
    INSERT INTO attachments (message_id, position, url, name, mime, size)
    SELECT ins.id, a.ord - 1, a.url, a.name, a.mime, a.size
    FROM ins, unnest($7::text[], $8::text[], $9::text[], $10::bigint[])
         WITH ORDINALITY AS a (url, name, mime, size, ord)
)
SELECT id, (extract(epoch FROM created_at) * 1000)::bigint FROM ins";

/// Creates the user or refreshes a changed profile. An unchanged one
/// (every reconnect of a returning user) inserts no row and locks none,
/// so the statement writes nothing and its commit costs no WAL flush.
const UPSERT_USER: &str = "
INSERT INTO users (id, name, image)
SELECT $1, $2, $3
WHERE NOT EXISTS (
    SELECT 1 FROM users WHERE id = $1 AND name IS NOT DISTINCT FROM $2 AND image IS NOT DISTINCT FROM $3
)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, image = EXCLUDED.image, updated_at = now()";

fn memberships_of() -> &'static str {
    "SELECT channel, role, (extract(epoch FROM granted_at) * 1000)::bigint
     FROM channel_members WHERE user_id = $1 AND listed ORDER BY channel"
}

/// What an Identify needs in one round trip: the profile refreshed as
/// [`UPSERT_USER`] does, and the room list.
fn identify() -> String {
    format!("WITH up AS ({UPSERT_USER}) {}", memberships_of())
}

fn membership_from_row(r: &Row) -> Membership {
    Membership {
        room: r.get(0),
        grant: grant_from(r.get(1), r.get(2)),
    }
}

/// The columns every message query selects, in [`message_from_row`] order.
const MESSAGE_COLUMNS: &str = "
    m.id, m.channel, m.seq, m.sender_id,
    COALESCE(u.name, m.sender_name), COALESCE(u.image, m.sender_image),
    m.client_msg_id, m.body, (extract(epoch FROM m.created_at) * 1000)::bigint,
    a.urls, a.names, a.mimes, a.sizes, r.emojis, r.counts";

const MESSAGE_JOINS: &str = "
    LEFT JOIN users u ON u.id = m.sender_id
    LEFT JOIN LATERAL (
        SELECT array_agg(url ORDER BY position) AS urls, array_agg(name ORDER BY position) AS names,
               array_agg(mime ORDER BY position) AS mimes, array_agg(size ORDER BY position) AS sizes
        FROM attachments WHERE message_id = m.id
    ) a ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(emoji ORDER BY emoji) AS emojis, array_agg(n ORDER BY emoji) AS counts
        FROM (SELECT emoji, count(*)::int AS n FROM reactions WHERE message_id = m.id GROUP BY emoji) x
    ) r ON true";

fn history_newest() -> String {
    format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m {MESSAGE_JOINS}
         WHERE m.channel = $1
           AND m.created_at >= 'epoch'::timestamptz + $3::bigint * interval '1 millisecond'
         ORDER BY m.created_at DESC, m.id DESC LIMIT $2"
    )
}

fn history_before() -> String {
    format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m {MESSAGE_JOINS}
         WHERE m.channel = $1
           AND (m.created_at, m.id) < ('epoch'::timestamptz + $2::bigint * interval '1 millisecond', $3)
           AND m.created_at >= 'epoch'::timestamptz + $5::bigint * interval '1 millisecond'
         ORDER BY m.created_at DESC, m.id DESC LIMIT $4"
    )
}

/// Columns in [`MESSAGE_COLUMNS`]; a query may select more after them.
const MESSAGE_COLUMN_COUNT: usize = 15;

fn message_by_key() -> String {
    format!(
        "SELECT {MESSAGE_COLUMNS}, m.epoch FROM messages m {MESSAGE_JOINS}
         WHERE m.sender_id = $1 AND m.client_msg_id = $2"
    )
}

fn message_from_row(row: &Row) -> Message {
    let urls: Option<Vec<String>> = row.get(9);
    let names: Option<Vec<String>> = row.get(10);
    let mimes: Option<Vec<String>> = row.get(11);
    let sizes: Option<Vec<i64>> = row.get(12);
    let attachments = match (urls, names, mimes, sizes) {
        (Some(u), Some(n), Some(m), Some(s)) => u
            .into_iter()
            .zip(n)
            .zip(m)
            .zip(s)
            .map(|(((url, name), mime), size)| Attachment {
                url,
                name,
                mime,
                size: size.max(0) as u64,
            })
            .collect(),
        _ => Vec::new(),
    };
    let emojis: Option<Vec<String>> = row.get(13);
    let counts: Option<Vec<i32>> = row.get(14);
    let reactions = match (emojis, counts) {
        (Some(e), Some(c)) => e
            .into_iter()
            .zip(c)
            .map(|(emoji, n)| ReactionCount {
                emoji,
                count: n.max(0) as u32,
            })
            .collect(),
        _ => Vec::new(),
    };
    Message {
        id: row.get::<_, i64>(0) as u64,
        room: row.get(1),
        seq: row.get::<_, i64>(2) as u64,
        sender_id: row.get(3),
        sender_name: row.get(4),
        sender_image: row.get(5),
        client_msg_id: row.get(6),
        body: row.get(7),
        attachments,
        reactions,
        created_at_ms: row.get::<_, i64>(8).max(0) as u64,
    }
}

/// Maps driver errors to store errors: connection trouble, timeouts and
/// server shutdowns are retryable, anything else is a bug.
/// A grant from its columns (role set means granted).
fn grant_from(role: Option<String>, since_ms: Option<i64>) -> Option<Grant> {
    role.map(|role| Grant {
        role,
        since_ms: since_ms.unwrap_or(0).max(0) as u64,
    })
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // 08: connection exception, 53: insufficient resources,
            // 57P0x: server shutting down, 57014: statement timeout,
            // 40001/40P01: serialization failure / deadlock.
            if code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "57014"
                || code == "40001"
                || code == "40P01"
            {
                StoreError::Unavailable(db.to_string())
            } else {
                StoreError::Internal(db.to_string())
            }
        }
        None => {
            let detail = match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            };
            let transport = e.is_closed()
                || std::error::Error::source(&e).is_some_and(|c| c.is::<std::io::Error>())
                || detail.contains("timeout")
                || detail.contains("connect");
            if transport {
                StoreError::Unavailable(detail)
            } else {
                StoreError::Internal(detail)
            }
        }
    }
}

/// Why a statement did not run to its end.
enum Failure {
    /// No connection within the pool's wait.
    Pool(PoolError),
    /// Refused by the server, or the connection failed under it.
    Pg(tokio_postgres::Error),
}

impl Failure {
    fn into_store(self) -> StoreError {
        match self {
            Failure::Pool(e) => pool_error(e),
            Failure::Pg(e) => pg_error(e),
        }
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

impl PgStore {
    /// Connects, applies pending migrations and returns the store.
    pub async fn connect(config: PgConfig) -> Result<PgStore, StoreError> {
        let mut pg: tokio_postgres::Config = tls_url(&config.url)?
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Internal(e.to_string()))?;
        pg.connect_timeout(config.timeout);
        let existing = pg.get_options().unwrap_or("").to_owned();
        // Every statement the store sends is keyed by an index. A plan
        // Postgres caches for a prepared statement while a table is small
        // (a new deployment's first minutes, before autovacuum analyses
        // it) scans the whole table and keeps doing so as it grows: the
        // send insert then took 0.59 ms instead of 0.09. Without
        // sequential scans the cached plans stay index lookups. The URL's
        // own options come after, so an operator can still override it.
        pg.options(format!(
            "-c enable_seqscan=off {existing} -c statement_timeout={}",
            config.statement_timeout.as_millis()
        ));
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // TLS exactly when the URL requires it (the default, `prefer`
        // unwritten, stays plaintext as before).
        let manager = if pg.get_ssl_mode() == SslMode::Require {
            let tls = match &config.tls {
                Some(tls) => tls.clone(),
                None => chatgate_protocol::tls::client_config(None)
                    .map_err(|e| StoreError::Internal(e.to_string()))?,
            };
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            Manager::from_config(pg, tls, manager_config)
        } else {
            Manager::from_config(pg, NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .wait_timeout(Some(config.timeout))
            .create_timeout(Some(config.timeout))
            .recycle_timeout(Some(config.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let exec = Exec {
            pool,
            counts: Arc::new(std::array::from_fn(|_| AtomicU64::new(0))),
            positions: Arc::new(Positions::default()),
        };
        tokio::spawn(exec.clone().write_positions_left());
        let store = PgStore {
            inserts: Batcher::spawn(BATCH_ROWS, BATCHES_IN_FLIGHT, {
                let exec = exec.clone();
                move |batch| {
                    let exec = exec.clone();
                    async move { exec.insert_messages(batch).await }
                }
            }),
            exec,
        };
        let mut client = store.exec.pool.get().await.map_err(pool_error)?;
        let applied = migrate(&mut client).await.map_err(pg_error)?;
        if !applied.is_empty() {
            tracing::info!(?applied, "database migrations applied");
        }
        Ok(store)
    }

    /// Statements sent to the server since start (a test hook proving
    /// how many round trips an operation takes).
    pub fn statements(&self) -> u64 {
        self.exec
            .counts
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Stream positions recorded and not yet written (see
    /// [`POSITION_DELAY`]).
    pub fn positions_pending(&self) -> usize {
        self.exec.positions.pending.lock().len()
    }

    async fn query(
        &self,
        stmt: Stmt,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.exec.query(stmt, sql, params).await
    }
}

/// The pool and the statement counters: what the store and its batching
/// tasks run statements with (clones share them).
#[derive(Clone)]
struct Exec {
    pool: Pool,
    counts: Arc<[AtomicU64; Stmt::ALL.len()]>,
    positions: Arc<Positions>,
}

/// Every kind of statement the store sends, counted apart so that an
/// operator (and the load harness) can see what each chat action costs
/// the database: `chat_store_statements_total{statement}`.
#[derive(Debug, Clone, Copy)]
enum Stmt {
    Ping,
    Identify,
    UpsertUser,
    Memberships,
    Join,
    Leave,
    Grant,
    AddMembers,
    RemoveMembers,
    Members,
    CreateRoom,
    DeleteRoom,
    InsertMessage,
    InsertMessages,
    MessageByKey,
    SetSeqs,
    React,
    History,
}

impl Stmt {
    const ALL: [Stmt; 18] = [
        Stmt::Ping,
        Stmt::Identify,
        Stmt::UpsertUser,
        Stmt::Memberships,
        Stmt::Join,
        Stmt::Leave,
        Stmt::Grant,
        Stmt::AddMembers,
        Stmt::RemoveMembers,
        Stmt::Members,
        Stmt::CreateRoom,
        Stmt::DeleteRoom,
        Stmt::InsertMessage,
        Stmt::InsertMessages,
        Stmt::MessageByKey,
        Stmt::SetSeqs,
        Stmt::React,
        Stmt::History,
    ];

    fn name(self) -> &'static str {
        match self {
            Stmt::Ping => "ping",
            Stmt::Identify => "identify",
            Stmt::UpsertUser => "upsert_user",
            Stmt::Memberships => "memberships",
            Stmt::Join => "join",
            Stmt::Leave => "leave",
            Stmt::Grant => "grant",
            Stmt::AddMembers => "add_members",
            Stmt::RemoveMembers => "remove_members",
            Stmt::Members => "members",
            Stmt::CreateRoom => "create_room",
            Stmt::DeleteRoom => "delete_room",
            Stmt::InsertMessage => "insert_message",
            Stmt::InsertMessages => "insert_messages",
            Stmt::MessageByKey => "message_by_key",
            Stmt::SetSeqs => "set_seqs",
            Stmt::React => "react",
            Stmt::History => "history",
        }
    }
}

impl Exec {
    /// Inserts one message, with its attachments, in one statement.
    async fn insert_one(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        let urls: Vec<&str> = msg.attachments.iter().map(|a| a.url.as_str()).collect();
        let names: Vec<&str> = msg.attachments.iter().map(|a| a.name.as_str()).collect();
        let mimes: Vec<&str> = msg.attachments.iter().map(|a| a.mime.as_str()).collect();
        let sizes: Vec<i64> = msg
            .attachments
            .iter()
            .map(|a| a.size.min(i64::MAX as u64) as i64)
            .collect();
        let rows = self
            .carrying(
                Stmt::InsertMessage,
                INSERT_MESSAGE,
                &[
                    &msg.room,
                    &msg.sender_id,
                    &msg.sender_name,
                    &msg.sender_image,
                    &msg.client_msg_id,
                    &msg.body,
                    &urls,
                    &names,
                    &mimes,
                    &sizes,
                ],
                1,
            )
            .await?;
        match rows.first() {
            Some(row) => {
                let id: i64 = row.get(0);
                let created: i64 = row.get(1);
                Ok(Inserted {
                    message: msg.stored(id as u64, created.max(0) as u64),
                    duplicate: false,
                    epoch: 0,
                })
            }
            None => self.original(&msg).await,
        }
    }

    async fn query(
        &self,
        stmt: Stmt,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.query_attempts(stmt, sql, params, 1).await
    }

    /// Runs a statement; one Postgres picked as a deadlock victim runs again,
    /// up to `attempts` times in all (for idempotent statements only).
    async fn query_attempts(
        &self,
        name: Stmt,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        attempts: usize,
    ) -> Result<Vec<Row>, StoreError> {
        self.query_failing(name, sql, params, attempts)
            .await
            .map_err(Failure::into_store)
    }

    /// [`Exec::query_attempts`], telling a statement the server refused
    /// from a connection that could not be had or was lost.
    async fn query_failing(
        &self,
        name: Stmt,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        attempts: usize,
    ) -> Result<Vec<Row>, Failure> {
        let mut attempt = 1;
        loop {
            let client = self.pool.get().await.map_err(Failure::Pool)?;
            let stmt = client.prepare_cached(sql).await.map_err(Failure::Pg)?;
            self.counts[name as usize].fetch_add(1, Ordering::Relaxed);
            match client.query(&stmt, params).await {
                Err(e)
                    if attempt < attempts
                        && e.code()
                            == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
                {
                    attempt += 1;
                }
                result => return result.map_err(Failure::Pg),
            }
        }
    }

    /// The stored message a retried send's key points at.
    async fn original(&self, msg: &NewMessage) -> Result<Inserted, StoreError> {
        let mut reread = false;
        loop {
            let written_before = self.positions.written.load(Ordering::Acquire);
            let rows = self
                .query(
                    Stmt::MessageByKey,
                    &message_by_key(),
                    &[&msg.sender_id, &msg.client_msg_id],
                )
                .await?;
            let row = rows.first().ok_or_else(|| {
                StoreError::Internal("idempotency conflict without a stored message".into())
            })?;
            let epoch: i64 = row.get(MESSAGE_COLUMN_COUNT);
            let mut message = message_from_row(row);
            let mut epoch = epoch.max(0) as u64;
            if let Some((e, seq)) = self.positions.get(message.id) {
                (epoch, message.seq) = (e, seq);
            } else if message.seq == 0
                && !reread
                && self.positions.written.load(Ordering::Acquire) != written_before
            {
                // Neither in the row nor pending, and positions were
                // written meanwhile: this one may have been (and dropped
                // from the pending ones) after this read.
                reread = true;
                continue;
            }
            return Ok(Inserted {
                message,
                duplicate: true,
                epoch,
            });
        }
    }

    /// One INSERT for the whole batch; a key that already existed (a
    /// retry, or the same key twice in one batch) returns the original.
    async fn insert_messages(
        &self,
        mut batch: Vec<NewMessage>,
    ) -> Vec<Result<Inserted, StoreError>> {
        // Alone (light load), the plain single-row statement is cheaper
        // for Postgres than the array form.
        if batch.len() == 1
            && let Some(msg) = batch.pop()
        {
            return vec![self.insert_one(msg).await];
        }
        let col = |f: fn(&NewMessage) -> &str| batch.iter().map(f).collect::<Vec<&str>>();
        let (rooms, senders, names) = (
            col(|m| &m.room),
            col(|m| &m.sender_id),
            col(|m| &m.sender_name),
        );
        let (images, keys, bodies) = (
            col(|m| &m.sender_image),
            col(|m| &m.client_msg_id),
            col(|m| &m.body),
        );
        let rows = self
            .carrying(
                Stmt::InsertMessages,
                INSERT_MESSAGES,
                &[&rooms, &senders, &names, &images, &keys, &bodies],
                DEADLOCK_ATTEMPTS,
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            // Postgres refused the statement (not the connection): one
            // row it cannot hold must not fail the others' sends, so each
            // row goes again alone and only the bad one fails.
            Err(StoreError::Internal(e)) => {
                tracing::warn!(error = %e, rows = batch.len(), "batch insert refused; inserting rows one by one");
                let mut out = Vec::with_capacity(batch.len());
                for msg in batch {
                    out.push(self.insert_one(msg).await);
                }
                return out;
            }
            Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut stored: HashMap<(String, String), (i64, i64)> = rows
            .iter()
            .map(|r| ((r.get(1), r.get(2)), (r.get(0), r.get(3))))
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for msg in batch {
            match stored.remove(&(msg.sender_id.clone(), msg.client_msg_id.clone())) {
                Some((id, created)) => out.push(Ok(Inserted {
                    message: msg.stored(id as u64, created.max(0) as u64),
                    duplicate: false,
                    epoch: 0,
                })),
                None => out.push(self.original(&msg).await),
            }
        }
        out
    }

    /// Runs a message insert whose last three parameters carry pending
    /// positions (see [`Positions`]). If it fails while carrying some
    /// (a row locked past the statement timeout, a deadlock with a room's
    /// deletion), they are left to the background writer and the insert
    /// runs once more without them: positions never fail a message.
    async fn carrying(
        &self,
        stmt: Stmt,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        attempts: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let mut carried = self
            .positions
            .take(POSITIONS_PER_STATEMENT, None, Taker::Insert);
        loop {
            let mut all = params.to_vec();
            all.extend([
                &carried.ids as &(dyn tokio_postgres::types::ToSql + Sync),
                &carried.epochs,
                &carried.seqs,
            ]);
            match self.query_failing(stmt, sql, &all, attempts).await {
                Ok(rows) => {
                    carried.written();
                    return Ok(rows);
                }
                // Only what the server refused: a pool timeout or a lost
                // connection would fail the second run just the same.
                Err(Failure::Pg(e)) if e.as_db_error().is_some() && !carried.is_empty() => {
                    carried = Carried::none(&self.positions);
                }
                Err(e) => return Err(e.into_store()),
            }
        }
    }

    /// Writes carried positions in one statement of their own.
    async fn write_positions(&self, carried: Carried) -> Result<(), StoreError> {
        self.query_attempts(
            Stmt::SetSeqs,
            SET_SEQS,
            &[&carried.ids, &carried.epochs, &carried.seqs],
            DEADLOCK_ATTEMPTS,
        )
        .await?;
        carried.written();
        Ok(())
    }

    /// Writes what is pending (recorded before `due`, when given), in
    /// statements of their own.
    async fn write_all_positions(
        &self,
        due: Option<tokio::time::Instant>,
    ) -> Result<(), StoreError> {
        loop {
            let carried = self
                .positions
                .take(POSITIONS_PER_STATEMENT, due, Taker::Writer);
            if carried.ids.is_empty() {
                return Ok(());
            }
            self.write_positions(carried).await?;
        }
    }

    /// The task behind [`POSITION_DELAY`]: once positions wait, gives an
    /// insert that long to carry them, then writes what is left. Failures
    /// keep them pending and try again later. Ends with the store.
    async fn write_positions_left(self) {
        let mut backoff = POSITION_DELAY;
        loop {
            self.positions.wake.notified().await;
            if self.positions.closed.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(backoff).await;
            let due = tokio::time::Instant::now() - POSITION_DELAY;
            match self.write_all_positions(Some(due)).await {
                Ok(()) => {
                    backoff = POSITION_DELAY;
                    // Recorded too recently to write alone: look again.
                    if !self.positions.is_empty() {
                        self.positions.wake.notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not write stream positions; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    // Try again even if nothing new is recorded.
                    self.positions.wake.notify_one();
                }
            }
        }
    }
}

#[async_trait]
impl Store for PgStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.query(Stmt::Ping, "SELECT 1", &[]).await.map(|_| ())
    }

    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        self.query(
            Stmt::UpsertUser,
            UPSERT_USER,
            &[&user.id, &user.name, &user.image],
        )
        .await
        .map(|_| ())
    }

    async fn memberships(&self, user_id: &str) -> Result<Vec<Membership>, StoreError> {
        let rows = self
            .query(Stmt::Memberships, memberships_of(), &[&user_id])
            .await?;
        Ok(rows.iter().map(membership_from_row).collect())
    }

    async fn identify(&self, user: &User) -> Result<Vec<Membership>, StoreError> {
        let rows = self
            .query(
                Stmt::Identify,
                &identify(),
                &[&user.id, &user.name, &user.image],
            )
            .await?;
        Ok(rows.iter().map(membership_from_row).collect())
    }

    async fn join(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError> {
        // The user row exists (Identify upserts it). No channels row: a
        // room a client only joins is its list entries, gone once left.
        self.query(
            Stmt::Join,
            "INSERT INTO channel_members (user_id, channel)
             SELECT $1, r FROM (SELECT DISTINCT unnest($2::text[]) AS r) x
             WHERE NOT EXISTS (SELECT 1 FROM channel_members c
                               WHERE c.user_id = $1 AND c.channel = x.r AND c.listed)
             ON CONFLICT (user_id, channel) DO UPDATE SET listed = true",
            &[&user_id, &rooms],
        )
        .await
        .map(|_| ())
    }

    async fn leave(&self, user_id: &str, rooms: &[String]) -> Result<(), StoreError> {
        // A granted room stays granted (off the list); any other is gone.
        self.query(
            Stmt::Leave,
            "WITH d AS (DELETE FROM channel_members
                        WHERE user_id = $1 AND channel = ANY($2::text[]) AND role IS NULL)
             UPDATE channel_members SET listed = false
             WHERE user_id = $1 AND channel = ANY($2::text[]) AND role IS NOT NULL AND listed",
            &[&user_id, &rooms],
        )
        .await
        .map(|_| ())
    }

    async fn grant(&self, room: &str, user_id: &str) -> Result<Option<Grant>, StoreError> {
        let rows = self
            .query(
                Stmt::Grant,
                "SELECT role, (extract(epoch FROM granted_at) * 1000)::bigint
                 FROM channel_members WHERE user_id = $1 AND channel = $2 AND role IS NOT NULL",
                &[&user_id, &room],
            )
            .await?;
        Ok(rows.first().and_then(|r| grant_from(r.get(0), r.get(1))))
    }

    async fn add_members(&self, room: &str, members: &[Member]) -> Result<(), StoreError> {
        let users: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
        let roles: Vec<&str> = members.iter().map(|m| m.role.as_str()).collect();
        // One statement: the room, users never seen (named by their id
        // until they connect), then the grants.
        self.query(
            Stmt::AddMembers,
            "WITH ch AS (INSERT INTO channels (name) VALUES ($1) ON CONFLICT DO NOTHING),
                  u AS (INSERT INTO users (id, name) SELECT DISTINCT x, x FROM unnest($2::text[]) x
                        ON CONFLICT DO NOTHING)
             INSERT INTO channel_members (user_id, channel, listed, role, granted_at)
             SELECT DISTINCT ON (x.u) x.u, $1, true, x.r, now()
             FROM unnest($2::text[], $3::text[]) AS x(u, r)
             ON CONFLICT (user_id, channel) DO UPDATE
             SET role = EXCLUDED.role, listed = true,
                 granted_at = coalesce(channel_members.granted_at, EXCLUDED.granted_at)",
            &[&room, &users, &roles],
        )
        .await
        .map(|_| ())
    }

    async fn remove_members(
        &self,
        room: &str,
        user_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let rows = self
            .query(
                Stmt::RemoveMembers,
                "DELETE FROM channel_members WHERE channel = $1 AND user_id = ANY($2::text[])
                 RETURNING user_id",
                &[&room, &user_ids],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn members(
        &self,
        room: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Member>, StoreError> {
        let rows = self
            .query(
                Stmt::Members,
                "SELECT user_id, role, (extract(epoch FROM granted_at) * 1000)::bigint
                 FROM channel_members
                 WHERE channel = $1 AND role IS NOT NULL AND user_id > $2
                 ORDER BY user_id LIMIT $3",
                &[&room, &after.unwrap_or(""), &i64::from(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let since: Option<i64> = r.get(2);
                Member {
                    user_id: r.get(0),
                    role: r.get(1),
                    since_ms: since.unwrap_or(0).max(0) as u64,
                }
            })
            .collect())
    }

    async fn create_room(&self, room: &str) -> Result<bool, StoreError> {
        let rows = self
            .query(
                Stmt::CreateRoom,
                "INSERT INTO channels (name) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1",
                &[&room],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn delete_room(&self, room: &str) -> Result<bool, StoreError> {
        // Reactions and attachments go with their messages.
        let rows = self
            .query(
                Stmt::DeleteRoom,
                "WITH m AS (DELETE FROM messages WHERE channel = $1 RETURNING 1),
                      mm AS (DELETE FROM channel_members WHERE channel = $1 RETURNING 1),
                      c AS (DELETE FROM channels WHERE name = $1 RETURNING 1)
                 SELECT (SELECT count(*) FROM m) + (SELECT count(*) FROM mm)
                        + (SELECT count(*) FROM c)",
                &[&room],
            )
            .await?;
        let n: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
        Ok(n > 0)
    }

    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        if msg.attachments.is_empty() {
            self.inserts.submit(msg).await
        } else {
            self.exec.insert_one(msg).await
        }
    }

    async fn set_seq(&self, message_id: u64, epoch: u64, seq: u64) -> Result<(), StoreError> {
        self.exec.positions.add(message_id, epoch, seq)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Positions an insert in flight carries are written with it, or
        // left to us when it fails: wait for those too, a little.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            self.exec.write_all_positions(None).await?;
            if self.exec.positions.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn statement_counts(&self) -> Vec<(&'static str, u64)> {
        Stmt::ALL
            .iter()
            .map(|s| {
                (
                    s.name(),
                    self.exec.counts[*s as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    async fn react(&self, change: &ReactionChange) -> Result<ReactionOutcome, StoreError> {
        let sql = if change.remove {
            "WITH m AS (SELECT id FROM messages WHERE id = $1 AND channel = $2),
                  d AS (DELETE FROM reactions r USING m
                        WHERE r.message_id = m.id AND r.emoji = $4 AND r.user_id = $3 RETURNING 1)
             SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM d)"
        } else {
            "WITH m AS (SELECT id FROM messages WHERE id = $1 AND channel = $2),
                  i AS (INSERT INTO reactions (message_id, emoji, user_id)
                        SELECT id, $4, $3 FROM m ON CONFLICT DO NOTHING RETURNING 1)
             SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM i)"
        };
        let id = change.message_id.min(i64::MAX as u64) as i64;
        let rows = self
            .query(
                Stmt::React,
                sql,
                &[&id, &change.room, &change.user_id, &change.emoji],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Internal("no result row".into()))?;
        let (found, changed): (i64, i64) = (row.get(0), row.get(1));
        match (found, changed) {
            (0, _) => Err(StoreError::NotFound),
            (_, 0) => Ok(ReactionOutcome::Unchanged),
            _ => Ok(ReactionOutcome::Changed),
        }
    }

    async fn history(
        &self,
        room: &str,
        before: Option<Cursor>,
        limit: u32,
        since_ms: u64,
    ) -> Result<Page, StoreError> {
        let limit = i64::from(limit);
        let since = since_ms.min(i64::MAX as u64) as i64;
        // One extra row tells whether an older page exists.
        let fetch = limit + 1;
        let rows = match before {
            None => {
                self.query(Stmt::History, &history_newest(), &[&room, &fetch, &since])
                    .await?
            }
            Some(c) => {
                let at = c.created_at_ms.min(i64::MAX as u64) as i64;
                let id = c.message_id.min(i64::MAX as u64) as i64;
                self.query(
                    Stmt::History,
                    &history_before(),
                    &[&room, &at, &id, &fetch, &since],
                )
                .await?
            }
        };
        let more = rows.len() as i64 > limit;
        let mut messages: Vec<Message> = rows
            .iter()
            .take(limit as usize)
            .map(message_from_row)
            .collect();
        // Positions not written yet are still known here.
        for m in messages.iter_mut().filter(|m| m.seq == 0) {
            if let Some((_, seq)) = self.exec.positions.get(m.id) {
                m.seq = seq;
            }
        }
        let next = if more {
            messages.last().map(|m| Cursor {
                created_at_ms: m.created_at_ms,
                message_id: m.id,
            })
        } else {
            None
        };
        Ok(Page { messages, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_modes_that_verify_are_required_and_prefer_is_refused() {
        assert_eq!(tls_url("postgres://h/db").unwrap(), "postgres://h/db");
        assert_eq!(
            tls_url("postgres://h/db?sslmode=verify-full&application_name=x").unwrap(),
            "postgres://h/db?sslmode=require&application_name=x"
        );
        assert_eq!(
            tls_url("postgres://h/db?connect_timeout=3&sslmode=verify-ca").unwrap(),
            "postgres://h/db?connect_timeout=3&sslmode=require"
        );
        assert_eq!(
            tls_url("host=h sslmode=verify-full dbname=x").unwrap(),
            "host=h sslmode=require dbname=x"
        );
        assert_eq!(
            tls_url("postgres://h/db?sslmode=disable").unwrap(),
            "postgres://h/db?sslmode=disable"
        );
        for bad in [
            "postgres://h/db?sslmode=prefer",
            "postgres://h/db?sslmode=pr%65fer",
            "postgres://h/db?ssl%6dode=prefer",
            "postgres://h/db?sslmode=require&sslmode=disable",
            "host=h sslmode=prefer",
            "host=h sslmode='allow'",
            "postgres://h/db?sslmode=bogus",
            "not a url at all = =",
        ] {
            assert!(tls_url(bad).is_err(), "{bad} accepted");
        }
    }
}
