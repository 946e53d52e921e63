//! The Prometheus recorder behind the `metrics` facade, and the names and
//! buckets of confab's histograms. `/metrics` renders the handle. Beside
//! it, the server's live totals for `/status` ([`LiveStats`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets from 0.25 ms to 5 s, fine enough to read p50/p99.
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// The git commit this binary was built from (build.rs).
pub const GIT_HASH: &str = env!("CONFAB_GIT_HASH");

/// `confab --version`: the package version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("CONFAB_GIT_HASH"),
    ")"
);

/// Running totals and this second's send→deliver latencies, kept beside
/// the Prometheus metrics for `/status` (Prometheus histograms cannot be
/// read back per second). One per server: the application state owns it and
/// hands it to the hub and the writer when it builds them. The hot path
/// records a handful of relaxed atomics and one small HDR histogram that the
/// status sampler swaps out ([`LiveStats::take_latency`]).
pub struct LiveStats {
    pub received: AtomicU64,
    pub stored: AtomicU64,
    pub delivered: AtomicU64,
    pub rejected: AtomicU64,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub http_requests: AtomicU64,
    pub http_errors: AtomicU64,
    pub commits: AtomicU64,
    pub commit_ops: AtomicU64,
    pub commit_micros: AtomicU64,
    pub slow_disconnects: AtomicU64,
    /// Send→deliver latencies (µs) since the last sample.
    latency: Mutex<hdrhistogram::Histogram<u64>>,
}

fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    // 1 µs .. 60 s, 2 significant digits: a few KB.
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2)
        .unwrap_or_else(|_| hdrhistogram::Histogram::new(2).expect("a 2-digit histogram"))
}

impl Default for LiveStats {
    fn default() -> Self {
        LiveStats {
            received: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
            http_errors: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_ops: AtomicU64::new(0),
            commit_micros: AtomicU64::new(0),
            slow_disconnects: AtomicU64::new(0),
            latency: Mutex::new(latency_histogram()),
        }
    }
}

impl LiveStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// One message's send→deliver latency.
    pub fn deliver_latency(&self, d: Duration) {
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.record((d.as_micros() as u64).clamp(1, 60_000_000));
        }
    }

    /// p50 and p99 (ms) of the latencies since the last call, which starts
    /// the next period (None: no messages).
    pub fn take_latency(&self) -> (Option<f64>, Option<f64>) {
        match self.latency.lock() {
            Ok(mut h) => {
                let r = if h.is_empty() {
                    (None, None)
                } else {
                    (
                        Some(h.value_at_quantile(0.5) as f64 / 1000.0),
                        Some(h.value_at_quantile(0.99) as f64 / 1000.0),
                    )
                };
                h.reset();
                r
            }
            Err(_) => (None, None),
        }
    }
}

/// HELP texts (and units) for every metric confab records.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "confab_build_info",
        "Always 1; labels carry the version and git commit."
    );
    describe_gauge!(
        "confab_process_start_time_seconds",
        Unit::Seconds,
        "Unix time the server started."
    );
    describe_gauge!(
        "confab_connections_open",
        "Open TCP connections (HTTP and WebSocket)."
    );
    describe_counter!(
        "confab_connections_refused_total",
        "Connections refused at max_connections."
    );
    describe_gauge!("confab_ws_connections", "Open WebSocket connections.");
    describe_gauge!(
        "confab_sessions_online",
        "Authenticated WebSocket sessions."
    );
    describe_counter!(
        "confab_sessions_authenticated_total",
        "WebSocket sessions that authenticated."
    );
    describe_counter!(
        "confab_messages_received_total",
        "Messages accepted from clients (WebSocket and HTTP) for storing; refused ones count in confab_messages_rejected_total."
    );
    describe_counter!("confab_messages_stored_total", "Messages durably stored.");
    describe_counter!(
        "confab_backups_total",
        "Backups taken by the server (admin socket and periodic), by result."
    );
    describe_gauge!(
        "confab_backup_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last successful backup taken by this server (0 = none yet)."
    );
    describe_counter!(
        "confab_exports_total",
        "Data exports served over HTTP (/me/export, /rooms/{id}/export)."
    );
    describe_counter!(
        "confab_messages_delivered_total",
        "Message frames handed to recipients' sessions."
    );
    describe_counter!(
        "confab_messages_deduplicated_total",
        "Sends answered from an earlier client_id (stored once)."
    );
    describe_counter!(
        "confab_messages_rejected_total",
        "Messages refused, by reason."
    );
    describe_histogram!(
        "confab_send_ack_seconds",
        Unit::Seconds,
        "From a send's arrival to its ack (after the durable commit)."
    );
    describe_histogram!(
        "confab_send_deliver_seconds",
        Unit::Seconds,
        "From a send's arrival to its frame in every recipient's outbox."
    );
    describe_histogram!("confab_commit_batch_size", "Operations per group commit.");
    describe_histogram!(
        "confab_commit_duration_seconds",
        Unit::Seconds,
        "Time to apply and durably commit one batch."
    );
    describe_counter!(
        "confab_commit_failures_total",
        "Group commits that failed (their batch was refused)."
    );
    describe_gauge!(
        "confab_db_pool_connections",
        "PostgreSQL storage: the read pool's connections, by state (in_use, idle)."
    );
    describe_gauge!(
        "confab_db_replication_lag_bytes",
        Unit::Bytes,
        "PostgreSQL storage: WAL the standby has not replayed yet, by standby."
    );
    describe_gauge!(
        "confab_db_replication_lag_seconds",
        Unit::Seconds,
        "PostgreSQL storage: the standby's replay lag, by standby."
    );
    describe_gauge!(
        "confab_db_sync_standbys",
        "PostgreSQL storage: standbys the primary's commits wait for (sync or quorum)."
    );
    describe_gauge!(
        "confab_storage_state",
        "The store's state: 0 ok, 1 full (only essential writes), 2 failing (writes refused, retrying)."
    );
    describe_counter!(
        "confab_store_damaged_records_total",
        "Stored records that failed their checksum or did not decode (each reported once per process), by table."
    );
    describe_counter!(
        "confab_store_damaged_pages_total",
        "Pages of the store that could not be read, found by exports, backups, checks or the scrub, by table."
    );
    describe_counter!(
        "confab_store_read_failures_total",
        "Reads that failed on damaged data: redb reporting corruption or panicking on a damaged page."
    );
    describe_counter!(
        "confab_store_scrub_passes_total",
        "Completed passes of the background store scrub."
    );
    describe_gauge!(
        "confab_store_scrub_damage",
        "Damaged records or pages the last store scrub pass found."
    );
    describe_histogram!(
        "confab_outbox_depth_frames",
        "Frames waiting in a session's outbox when its writer drains it."
    );
    describe_counter!(
        "confab_slow_client_disconnects_total",
        "Sessions closed (4008) because their outbox overflowed."
    );
    describe_counter!(
        "confab_http_requests_total",
        "HTTP requests by route, method and status."
    );
    describe_histogram!(
        "confab_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request handling time by route."
    );
    describe_counter!("confab_logins_total", "Login attempts by outcome.");
    describe_histogram!(
        "confab_search_duration_seconds",
        Unit::Seconds,
        "Search query time in the server."
    );
    describe_counter!(
        "confab_search_indexed_total",
        "Messages added to the search index."
    );
    describe_gauge!(
        "confab_search_index_lag_messages",
        "Stored messages not yet searchable."
    );
    describe_gauge!(
        "confab_search_index_lag_seconds",
        Unit::Seconds,
        "How long the index has been behind the store."
    );
    describe_gauge!(
        "confab_search_index_bytes",
        Unit::Bytes,
        "Size of the search index on disk."
    );
    describe_histogram!(
        "confab_search_commit_duration_seconds",
        Unit::Seconds,
        "Time of one search index commit and reload."
    );
    describe_counter!(
        "confab_search_index_failures_total",
        "Failed search indexer steps by stage (each is retried after a back-off)."
    );
    describe_gauge!(
        "confab_search_index_healthy",
        "1 while the search indexer works, 0 while it fails or the index is being rebuilt."
    );
    describe_counter!(
        "confab_search_index_damage_total",
        "Checks (at start, by the scrub, after a commit) that found the search index damaged."
    );
    describe_counter!(
        "confab_search_index_rebuilds_total",
        "Search index rebuilds from the store."
    );
    describe_counter!(
        "confab_search_index_scrubs_total",
        "Checksum scrubs of the search index files by outcome."
    );
    describe_counter!(
        "confab_wallet_transfers_total",
        "Wallet transfers by outcome."
    );
    describe_gauge!(
        "confab_wallet_scheduled",
        "Scheduled and recurring transfers waiting to run."
    );
    describe_histogram!(
        "confab_wallet_scheduler_lag_seconds",
        Unit::Seconds,
        "How late scheduled transfers ran after their due time."
    );
}

/// Registers every family at start, so dashboards and alerts find all of
/// them from the first scrape (counters at 0, histograms empty).
fn register_families() {
    for c in [
        "confab_connections_refused_total",
        "confab_sessions_authenticated_total",
        "confab_messages_received_total",
        "confab_messages_stored_total",
        "confab_messages_delivered_total",
        "confab_messages_deduplicated_total",
        "confab_commit_failures_total",
        "confab_slow_client_disconnects_total",
        "confab_search_indexed_total",
        "confab_search_index_damage_total",
        "confab_search_index_rebuilds_total",
        "confab_exports_total",
    ] {
        metrics::counter!(c).increment(0);
    }
    for stage in [
        "open", "read", "add", "commit", "reload", "check", "rebuild",
    ] {
        metrics::counter!("confab_search_index_failures_total", "stage" => stage).increment(0);
    }
    metrics::counter!("confab_store_scrub_passes_total").increment(0);
    metrics::counter!("confab_store_damaged_records_total", "table" => "messages").increment(0);
    metrics::counter!("confab_store_damaged_pages_total", "table" => "messages").increment(0);
    for kind in ["corrupted", "panic"] {
        metrics::counter!("confab_store_read_failures_total", "kind" => kind).increment(0);
    }
    metrics::gauge!("confab_store_scrub_damage").set(0.0);
    for outcome in ["ok", "damaged", "error"] {
        metrics::counter!("confab_search_index_scrubs_total", "outcome" => outcome).increment(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!("confab_backups_total", "outcome" => result).increment(0);
    }
    metrics::gauge!("confab_backup_last_success_timestamp_seconds").set(0.0);
    for outcome in ["ok", "invalid_credentials", "rate_limited"] {
        metrics::counter!("confab_logins_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["executed", "failed", "scheduled", "cancelled", "rejected"] {
        metrics::counter!("confab_wallet_transfers_total", "outcome" => outcome).increment(0);
    }
    for reason in ["message_too_long", "rate_limited", "room_not_found"] {
        metrics::counter!("confab_messages_rejected_total", "reason" => reason).increment(0);
    }
    for g in [
        "confab_connections_open",
        "confab_ws_connections",
        "confab_sessions_online",
        "confab_search_index_lag_messages",
        "confab_search_index_lag_seconds",
        "confab_search_index_bytes",
        "confab_wallet_scheduled",
        "confab_storage_state",
    ] {
        metrics::gauge!(g).increment(0.0);
    }
    for h in [
        "confab_send_ack_seconds",
        "confab_send_deliver_seconds",
        "confab_commit_batch_size",
        "confab_commit_duration_seconds",
        "confab_outbox_depth_frames",
        "confab_search_duration_seconds",
        "confab_search_commit_duration_seconds",
        "confab_wallet_scheduler_lag_seconds",
    ] {
        let _ = metrics::histogram!(h);
    }
}

pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("confab_commit_batch_size".into()),
                BATCH_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("confab_outbox_depth_frames".into()),
                BATCH_BUCKETS,
            )
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    metrics::gauge!("confab_build_info", "version" => env!("CARGO_PKG_VERSION"), "git" => GIT_HASH)
        .set(1.0);
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!("confab_process_start_time_seconds").set(start);
    register_families();
    // Histograms are kept in windows; upkeep drains them regularly.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("confab-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(handle)
}

/// The exporter's text plus process figures read from `/proc/self` at
/// scrape time (CPU seconds, resident memory, open fds, threads).
pub fn render(handle: &PrometheusHandle, data_dir: &std::path::Path) -> String {
    let mut out = handle.render();
    {
        use std::fmt::Write;
        let size = |p: std::path::PathBuf| dir_size(&p);
        let _ = write!(
            out,
            "# HELP confab_data_bytes Size of the data files on disk.\n\
             # TYPE confab_data_bytes gauge\n\
             confab_data_bytes{{file=\"store\"}} {}\n\
             confab_data_bytes{{file=\"search\"}} {}\n",
            size(data_dir.join("confab.redb")),
            size(data_dir.join("search"))
        );
    }
    if let Some(p) = ProcessStats::of("self") {
        use std::fmt::Write;
        let _ = write!(
            out,
            "# HELP confab_process_cpu_seconds_total User and system CPU time of the server.\n\
             # TYPE confab_process_cpu_seconds_total counter\n\
             confab_process_cpu_seconds_total {}\n\
             # HELP confab_process_resident_memory_bytes Resident set size.\n\
             # TYPE confab_process_resident_memory_bytes gauge\n\
             confab_process_resident_memory_bytes {}\n\
             # HELP confab_process_open_fds Open file descriptors.\n\
             # TYPE confab_process_open_fds gauge\n\
             confab_process_open_fds {}\n\
             # HELP confab_process_threads OS threads.\n\
             # TYPE confab_process_threads gauge\n\
             confab_process_threads {}\n",
            p.cpu_seconds, p.rss_bytes, p.open_fds, p.threads
        );
    }
    out
}

/// Bytes of the files directly in `dir` (or of `dir` itself if it is a
/// file): `confab_data_bytes`, the search index's size.
pub fn dir_size(dir: &std::path::Path) -> u64 {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(dir).map(|m| m.len()).unwrap_or(0),
    }
}

/// CPU, memory, fds and threads of a process, from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
}

impl ProcessStats {
    /// `pid` is a number or "self". None where /proc is not available.
    pub fn of(pid: &str) -> Option<ProcessStats> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name (which may hold spaces).
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state): utime=14, stime=15, num_threads=20, rss=24.
        let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        Some(ProcessStats {
            cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
            rss_bytes: num(24)? * page,
            open_fds,
            threads: num(20)?,
        })
    }
}

/// Raises the soft open-file limit to the hard one (every connection is a
/// file descriptor). Returns (soft, hard) after the change.
pub fn raise_nofile_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, 0);
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// Makes glibc serve large allocations (argon2's 19 MiB per hash, big
/// batches) straight from mmap and give them back on free. Without this its
/// adaptive threshold moves such blocks into per-thread heaps that are never
/// returned: a few logins left the server ~350 MB larger for good.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
