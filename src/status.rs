//! The live status: a one-second sampler that keeps the last 15 minutes
//! of the server's live totals ([`LiveStats`]) and gauges, the totals for
//! `/api/v1/status`, and the access rule for the status (page, JSON,
//! stream) and for `/metrics`. The endpoints themselves are the API's
//! (`api/status.rs`); what the sampler reads it gets from a [`Source`]
//! (the application state).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Request;
use hyper::body::Incoming;
use serde::Serialize;

use crate::error::ApiError;
use crate::store::now_ms;
use crate::telemetry::{LiveStats, ProcessStats};

/// Samples kept: 15 minutes at one per second.
pub const HISTORY: usize = 900;

/// One second of the server's life.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Sample {
    /// Unix ms at the end of the second.
    pub t: i64,
    pub msgs_in: u64,
    pub msgs_stored: u64,
    pub msgs_out: u64,
    /// Send→deliver latency of this second's messages, ms (None: no messages).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub connections: u64,
    pub sessions: u64,
    pub commits: u64,
    pub batch_avg: f64,
    pub commit_ms_avg: f64,
    pub cpu_percent: f64,
    pub rss_bytes: u64,
    /// Rejected messages plus HTTP 5xx answers.
    pub errors: u64,
    pub http_requests: u64,
    pub search_lag_messages: u64,
    pub search_lag_seconds: f64,
    /// The store: "ok", "full" or "failing".
    pub storage: &'static str,
}

/// The sampler's ring of samples plus listeners.
pub struct StatusBoard {
    pub started: Instant,
    pub started_ms: i64,
    samples: Mutex<VecDeque<Sample>>,
    /// New samples for `/api/v1/status/ws` listeners.
    pub updates: tokio::sync::broadcast::Sender<Sample>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            started: Instant::now(),
            started_ms: now_ms(),
            samples: Mutex::new(VecDeque::with_capacity(HISTORY)),
            updates: tokio::sync::broadcast::channel(16).0,
        }
    }
}

impl StatusBoard {
    pub fn history(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn push(&self, s: Sample) {
        if let Ok(mut q) = self.samples.lock() {
            if q.len() >= HISTORY {
                q.pop_front();
            }
            q.push_back(s.clone());
        }
        let _ = self.updates.send(s);
    }
}

/// What the sampler reads each second besides the live totals.
pub struct Gauges {
    pub connections: u64,
    pub sessions: u64,
    pub search_lag_messages: u64,
    pub search_lag_seconds: f64,
    /// The store: "ok", "full" or "failing".
    pub storage: &'static str,
}

/// What is sampled: the server's board, its live totals and its gauges
/// (the application state is one).
pub trait Source: Send + Sync + 'static {
    fn board(&self) -> &StatusBoard;
    fn live(&self) -> &LiveStats;
    fn gauges(&self) -> Gauges;
}

/// Takes one sample a second until shutdown.
pub async fn sample_every_second<S: Source>(
    source: Arc<S>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let l = source.live();
    let read = || {
        [
            l.received.load(Relaxed),
            l.stored.load(Relaxed),
            l.delivered.load(Relaxed),
            l.commits.load(Relaxed),
            l.commit_ops.load(Relaxed),
            l.commit_micros.load(Relaxed),
            l.rejected.load(Relaxed) + l.http_errors.load(Relaxed),
            l.http_requests.load(Relaxed),
        ]
    };
    let mut prev = read();
    let mut prev_cpu = ProcessStats::of("self")
        .map(|p| p.cpu_seconds)
        .unwrap_or(0.0);
    let mut prev_at = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = read();
        let d = |i: usize| now[i].saturating_sub(prev[i]);
        let (p50, p99) = l.take_latency();
        let proc_ = ProcessStats::of("self").unwrap_or_default();
        let secs = prev_at.elapsed().as_secs_f64().max(0.001);
        let commits = d(3);
        let g = source.gauges();
        source.board().push(Sample {
            t: now_ms(),
            msgs_in: d(0),
            msgs_stored: d(1),
            msgs_out: d(2),
            p50_ms: p50,
            p99_ms: p99,
            connections: g.connections,
            sessions: g.sessions,
            commits,
            batch_avg: if commits == 0 {
                0.0
            } else {
                d(4) as f64 / commits as f64
            },
            commit_ms_avg: if commits == 0 {
                0.0
            } else {
                d(5) as f64 / commits as f64 / 1000.0
            },
            cpu_percent: ((proc_.cpu_seconds - prev_cpu) / secs * 100.0).max(0.0),
            rss_bytes: proc_.rss_bytes,
            errors: d(6),
            http_requests: d(7),
            search_lag_messages: g.search_lag_messages,
            search_lag_seconds: g.search_lag_seconds,
            storage: g.storage,
        });
        prev = now;
        prev_cpu = proc_.cpu_seconds;
        prev_at = Instant::now();
    }
}

// ---------------------------------------------------------------------------
// Access
// ---------------------------------------------------------------------------

/// Whether `peer` with these headers may see the status (page, JSON, stream):
/// from an allowed address (`status_allowed_ips`, loopback by default), or
/// anywhere with `Authorization: Bearer <status_token>` when a token is set.
/// For a node's and a proxy's server config alike.
pub fn check_access_with(
    server: &crate::config::ServerConfig,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<(), ApiError> {
    if token_or_address(&server.status_token, &server.status_allowed_ips, req, peer) {
        return Ok(());
    }
    Err(ApiError::forbidden(
        "status_forbidden",
        "the status is only shown to allowed addresses (status_allowed_ips) or with the status token",
    ))
}

/// `/metrics` (node and proxy): from `metrics_allowed_ips`, or anywhere with
/// `Authorization: Bearer <metrics_token>` when a token is set. Its own
/// rule, not the status page's: a Prometheus server is usually elsewhere
/// than the people who watch `/status`.
pub fn check_metrics_access(
    server: &crate::config::ServerConfig,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<(), ApiError> {
    if token_or_address(
        &server.metrics_token,
        &server.metrics_allowed_ips,
        req,
        peer,
    ) {
        return Ok(());
    }
    Err(ApiError::forbidden(
        "metrics_forbidden",
        "metrics are only served to allowed addresses (metrics_allowed_ips) or with the metrics token",
    ))
}

/// Whether the request presents `token` (when one is set) or comes from an
/// address in `allowed`.
fn token_or_address(
    token: &str,
    allowed: &[String],
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> bool {
    if !token.is_empty() {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| {
                // The page's WebSocket cannot set headers: it sends the token
                // as the `Sec-WebSocket-Protocol` value "status.<token>".
                req.headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        v.split(',')
                            .map(str::trim)
                            .find_map(|p| p.strip_prefix("status."))
                    })
            });
        if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return true;
        }
    }
    allowed_ip(allowed, peer.ip())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `ip` is in one of `cidrs` ("127.0.0.0/8", "::1/128", "10.1.2.3").
pub fn allowed_ip(cidrs: &[String], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    cidrs.iter().any(|c| {
        let (net, bits) = match c.split_once('/') {
            Some((n, b)) => (n, b.parse::<u32>().ok()),
            None => (c.as_str(), None),
        };
        let Ok(net) = net.trim().parse::<IpAddr>() else {
            return false;
        };
        match (net, ip) {
            // A /0 mask shifts by the whole width: checked_shl gives 0.
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let bits = bits.unwrap_or(32).min(32);
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let bits = bits.unwrap_or(128).min(128);
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    })
}

// ---------------------------------------------------------------------------
// Totals
// ---------------------------------------------------------------------------

/// Totals since start, for `/api/v1/status`.
#[derive(Serialize)]
pub struct Totals {
    messages_received: u64,
    messages_stored: u64,
    messages_delivered: u64,
    messages_rejected: u64,
    logins_ok: u64,
    logins_failed: u64,
    http_requests: u64,
    http_errors: u64,
    slow_client_disconnects: u64,
}

impl Totals {
    pub fn of(l: &LiveStats) -> Totals {
        Totals {
            messages_received: l.received.load(Relaxed),
            messages_stored: l.stored.load(Relaxed),
            messages_delivered: l.delivered.load(Relaxed),
            messages_rejected: l.rejected.load(Relaxed),
            logins_ok: l.logins_ok.load(Relaxed),
            logins_failed: l.logins_failed.load(Relaxed),
            http_requests: l.http_requests.load(Relaxed),
            http_errors: l.http_errors.load(Relaxed),
            slow_client_disconnects: l.slow_disconnects.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::allowed_ip;

    #[test]
    fn cidr_masks_cover_their_whole_range() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ip = |s: &str| s.parse().expect("ip");
        assert!(allowed_ip(&list(&["127.0.0.0/8"]), ip("127.9.8.7")));
        assert!(!allowed_ip(&list(&["127.0.0.0/8"]), ip("128.0.0.1")));
        assert!(allowed_ip(&list(&["0.0.0.0/0"]), ip("203.0.113.9")));
        assert!(allowed_ip(&list(&["10.1.2.3"]), ip("10.1.2.3")));
        assert!(!allowed_ip(&list(&["10.1.2.3"]), ip("10.1.2.4")));
        assert!(allowed_ip(&list(&["::/0"]), ip("2001:db8::1")));
        assert!(allowed_ip(&list(&["::1/128"]), ip("::1")));
        assert!(!allowed_ip(&list(&["::1/128"]), ip("127.0.0.1")));
    }
}
