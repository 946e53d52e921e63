//! `--idle N`: N idle authenticated connections spread over enough users,
//! and the server's memory per connection (its resident size before and
//! after, from `/metrics`), stopping near the open-file limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::args::BenchArgs;
use super::client::{Target, Ws};
use super::results::{IdleResult, server_sample};
use super::seed::sign_up_or_in;

/// Idle connections per seeded user (below the server's default
/// `max_sessions_per_user`).
const IDLE_SESSIONS_PER_USER: usize = 16;

pub(super) async fn idle(
    target: &Target,
    args: &BenchArgs,
    n: usize,
    limits: (u64, u64),
) -> Result<IdleResult, String> {
    if n as u64 + 32 > limits.1 {
        eprintln!(
            "note: {n} connections need {n} file descriptors here and on a local server, but this \
             process's hard open-file limit is {}: expect the run to stop near it",
            limits.1
        );
    }
    // The server allows `max_sessions_per_user` (default 32) sessions per
    // account: the connections are spread over enough users.
    let users = n.div_ceil(IDLE_SESSIONS_PER_USER).max(1);
    let mut tokens = Vec::with_capacity(users);
    {
        let mut signups = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(16));
        for k in 0..users {
            let (target, gate) = (target.clone(), gate.clone());
            let name = format!("{}idle{k}", args.prefix);
            signups.spawn(async move {
                let _permit = gate.acquire().await;
                sign_up_or_in(&target, &name).await
            });
        }
        while let Some(r) = signups.join_next().await {
            tokens.push(r.map_err(|e| e.to_string())??.token);
        }
    }
    let before = server_sample(target)
        .await
        .ok_or("the server's /metrics has no process figures")?;
    let started = Instant::now();
    let mut open: Vec<Ws> = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first_error = None;
    let mut tasks = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..n {
        let (target, gate, token) = (
            target.clone(),
            gate.clone(),
            tokens[i / IDLE_SESSIONS_PER_USER].clone(),
        );
        tasks.spawn(async move {
            let _permit = gate.acquire().await;
            tokio::time::timeout(Duration::from_secs(10), target.ws(i, &token))
                .await
                .unwrap_or_else(|_| Err("connect timed out".into()))
        });
        // Reap as we go so memory and fds are bounded by what is open.
        while let Some(r) = tasks.try_join_next() {
            match r.map_err(|e| e.to_string())? {
                Ok(ws) => open.push(ws),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if !args.quiet && i % 1000 == 999 {
            eprint!("\ridle: {} open, {failed} failed", open.len());
        }
    }
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| e.to_string())? {
            Ok(ws) => open.push(ws),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if !args.quiet {
        eprintln!(
            "\ridle: {} open, {failed} failed in {:.1} s",
            open.len(),
            started.elapsed().as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Reading /metrics needs one more socket: at the open-file limit, give
    // back a few connections first (and count only those still open).
    let mut after = server_sample(target).await;
    while after.is_none() && !open.is_empty() {
        open.truncate(open.len().saturating_sub(16));
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = server_sample(target).await;
    }
    let after = after.unwrap_or(before);
    let opened = open.len();
    let per = if opened == 0 {
        0.0
    } else {
        (after.rss_bytes - before.rss_bytes) / opened as f64 / 1024.0
    };
    let note = if failed > 0 && (opened as u64 + 64) >= limits.1 {
        format!(
            "stopped near the open-file hard limit ({}): each connection is a file descriptor on both sides",
            limits.1
        )
    } else if failed > 0 {
        "some connections failed; see first_error (the server's own open-file limit may be lower)"
            .to_string()
    } else {
        "all connections opened".to_string()
    };
    drop(open);
    Ok(IdleResult {
        requested: n,
        opened,
        failed,
        first_error,
        rss_before_mb: before.rss_bytes / 1e6,
        rss_after_mb: after.rss_bytes / 1e6,
        rss_per_connection_kb: per,
        server_open_fds: after.open_fds,
        bench_open_files: limits,
        note,
    })
}
