//! What a bench run measured, as the report and `--json` show it: a
//! step's result (rates, latency percentiles, loss, the server's CPU and
//! memory, the verdict per latency tier) and an idle run's; the server's
//! own figures read from its `/metrics`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::client::Target;

/// Latency tiers of the seed project, in milliseconds.
pub const TIERS_MS: [u64; 2] = [1000, 2000];

/// Server figures read from its `/metrics` (the server reads its own /proc).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerSample {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub open_fds: f64,
}

pub(super) async fn server_sample(target: &Target) -> Option<ServerSample> {
    let text = target.metrics_text().await.ok()?;
    let get = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(ServerSample {
        cpu_seconds: get("confab_process_cpu_seconds_total")?,
        rss_bytes: get("confab_process_resident_memory_bytes")?,
        open_fds: get("confab_process_open_fds").unwrap_or(0.0),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

pub(super) fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        count: h.len(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub users: usize,
    pub rate: u64,
    pub duration_secs: f64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    /// Deliveries expected: every acked message at every other member connection.
    pub expected_deliveries: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub error_rate: f64,
    /// Acked messages that did not reach a member connection.
    pub lost: u64,
    /// Acked messages missing from, or duplicated in, the room history.
    pub history_mismatches: u64,
    pub achieved_rate: f64,
    pub ack_ms: Percentiles,
    pub deliver_ms: Percentiles,
    /// (second, p50 ms, p99 ms, max ms, deliveries)
    pub per_second: Vec<(u64, f64, f64, f64, u64)>,
    /// (percentile, ms) of send→deliver.
    pub deliver_curve: Vec<(f64, f64)>,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_mb: Option<f64>,
    pub server_rss_peak_mb: Option<f64>,
    /// Pass at the 1,000 ms and 2,000 ms tiers: no error, nothing lost, and
    /// the slowest delivery within the tier.
    pub pass: [bool; 2],
}

#[derive(Debug, Serialize)]
pub struct IdleResult {
    pub requested: usize,
    pub opened: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub rss_before_mb: f64,
    pub rss_after_mb: f64,
    pub rss_per_connection_kb: f64,
    pub server_open_fds: f64,
    /// The bench process's open-file limit (soft, hard) after raising it.
    pub bench_open_files: (u64, u64),
    pub note: String,
}
