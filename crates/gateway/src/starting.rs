//! The port before the node is ready.
//!
//! The listener is bound first, then the backends are reached (Postgres,
//! Redis, an identity provider's keys), retrying with backoff for as long
//! as it takes. Meanwhile the port answers: `/livez` 200 (the process is
//! alive: an orchestrator must not restart it for waiting), `/readyz`
//! and `/health` 503 with what is awaited (no traffic yet), anything else
//! 503 with `Retry-After`. A gateway that cannot reach its database thus
//! says so where operators look, instead of being a closed port with a
//! silent log.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Sockets answered at once while starting (probes and early clients);
/// more wait in the backlog.
const MAX_SOCKETS: usize = 64;

/// How long one socket may take while starting.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// What start-up is waiting for, shown by `/health` and `/readyz`.
pub struct Progress {
    since: Instant,
    waiting_for: Mutex<String>,
    attempts: Mutex<u32>,
}

impl Progress {
    /// Start-up begins.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            since: Instant::now(),
            waiting_for: Mutex::new("backends".into()),
            attempts: Mutex::new(0),
        })
    }

    /// An attempt failed: `what` (the outermost step, e.g. "connecting to
    /// the database": no addresses or credentials) is what is awaited now.
    pub fn failed(&self, what: String) {
        *self.waiting_for.lock() = what;
        *self.attempts.lock() += 1;
    }

    fn body(&self) -> String {
        serde_json::json!({
            "status": "starting",
            "waiting_for": *self.waiting_for.lock(),
            "failed_attempts": *self.attempts.lock(),
            "starting_secs": self.since.elapsed().as_secs(),
        })
        .to_string()
    }
}

/// Runs `work` (building the node) while answering on `listener`;
/// returns its output once done. The listener is left to the server.
pub async fn serve_until<T>(
    listener: &TcpListener,
    progress: Arc<Progress>,
    work: impl Future<Output = T>,
) -> T {
    let sockets = Arc::new(Semaphore::new(MAX_SOCKETS));
    let answer = async {
        loop {
            let Ok(permit) = sockets.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let progress = progress.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| respond(req, progress.clone()));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(SOCKET_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(SOCKET_TIMEOUT, conn).await;
                drop(permit);
            });
        }
    };
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => out,
        // The semaphore is never closed; should it be, only the work is left.
        () = answer => work.await,
    }
}

async fn respond(
    req: Request<Incoming>,
    progress: Arc<Progress>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, kind, body) = match req.uri().path() {
        "/livez" => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/health" | "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            progress.body(),
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "starting\n".into(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    if status != StatusCode::OK {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(r)
}
