//! The listener: accepts TCP connections (bounded by `max_connections`),
//! serves HTTP/1.1 with upgrades on each, and runs the graceful shutdown:
//! stop accepting, close sessions with 1001, let the writer commit what it
//! holds, wait for connections up to `shutdown_grace_secs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::api::{self, AppState};
use crate::auth::{self, Auth};
use crate::config::Config;
use crate::hub::{Hub, close};
use crate::search::{Indexer, SearchIndex, Source};
use crate::storage::Storage;
use crate::storage::embedded::Embedded;
use crate::storage::postgres::{PgOptions, Postgres};
use crate::store::Store;
use crate::wallet::WalletSettings;
use crate::writes::{GroupCommitWriter, Op, WalletOp, WalletWiring};

const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(mut config: Config, metrics: PrometheusHandle) -> Result<(), String> {
    let cluster = crate::cluster::Cluster::from_config(&config.cluster)?.map(Arc::new);
    if let Some(c) = &cluster {
        // A node listens on its address from the list and signs tokens with
        // the cluster's secret, so that every node and proxy accepts them.
        let node = c.this_node().ok_or(
            "this config has a [cluster] node list: start a node with `--node ID` (or run `confab proxy`)",
        )?;
        config.server.listen = node.addr;
        config.auth.jwt_secret = config.token_secret().to_string();
        tracing::info!(node = %node.id, nodes = c.nodes.len(), "cluster node");
    }
    let data_dir = config.server.data_dir.clone();
    let on_postgres = !config.store.database_url.is_empty();
    if cluster.is_some() && !on_postgres {
        return Err("a cluster's nodes keep everything in one PostgreSQL database: set [store] database_url (or CONFAB_DATABASE_URL) for every node (docs/SCALEOUT.md)".into());
    }
    // The embedded store, unless everything is in PostgreSQL.
    let store = if on_postgres {
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        None
    } else {
        Some(Store::open_with(
            &data_dir,
            config.store.cache_mb.saturating_mul(1 << 20),
            Some(&crate::backup::before_migration(&data_dir)),
        )?)
    };
    if store.is_some() {
        // Partial backups left by a process that stopped while writing one
        // (a killed server's periodic or pre-migration backup) would stay
        // for ever. Only confab's own names, and none that a running backup
        // holds; the store is ours now, so no other server of this data
        // directory runs.
        let mut partial_dirs = vec![data_dir.join("backups")];
        if !config.backup.backup_dir.is_empty() {
            partial_dirs.push(PathBuf::from(&config.backup.backup_dir));
        }
        for dir in partial_dirs {
            for path in crate::backup::remove_stale_partials(&dir) {
                tracing::warn!(path = %path.display(), "removed a partial backup left by a process that stopped while writing it");
            }
        }
    }
    let secret = auth::load_secret(&config.auth, &data_dir)?;
    // Public transfer ids under a key from the token secret: the same on
    // every node of a cluster (they share it) and after a restore that
    // brings the `jwt_secret` file back. Set before the store is cloned.
    let transfer_ids =
        crate::wallet::TransferIds::new(&secret).with_currency(&config.wallet.wallet_currency);
    let store = store.map(|s| s.with_transfer_ids(transfer_ids.clone()));
    // The live totals for `/status`: counted by the hub's sessions, the
    // writer and the request handlers (the application state's).
    let live = Arc::new(crate::telemetry::LiveStats::default());
    let hub = Arc::new(Hub::new(live.clone()));
    let wallet = WalletWiring {
        settings: WalletSettings {
            currency: config.wallet.wallet_currency.clone(),
            signup_bonus: config.wallet.signup_bonus,
            max_scheduled: config.wallet.max_scheduled_transfers,
        },
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    // The storage behind the interface, its writer thread, and the message
    // stream the search indexer follows.
    let (storage, writer_thread, source): (Arc<dyn Storage>, _, Arc<dyn Source>) = match &store {
        Some(store) => {
            let (writer, join) = GroupCommitWriter::spawn_with(
                store.clone(),
                hub.clone(),
                live.clone(),
                config.store.clone(),
                config.limits.max_group_members,
                wallet.clone(),
            )
            .map_err(|e| format!("cannot start the writer thread: {e}"))?;
            store.health.set(crate::store::db::StorageState::Ok, "");
            (
                Arc::new(Embedded::new(store.clone(), writer)),
                join,
                Arc::new(store.clone()),
            )
        }
        None => {
            let opts = PgOptions {
                url: config.store.database_url.clone(),
                hub: hub.clone(),
                live: live.clone(),
                store: config.store.clone(),
                max_group_members: config.limits.max_group_members,
                wallet: wallet.clone(),
                transfer_ids: transfer_ids.clone(),
                pool_size: config.store.database_pool,
            };
            let (pg, join) = open_postgres(opts).await?;
            tokio::spawn(pg.watch_replication());
            let storage: Arc<dyn Storage> = Arc::new(pg);
            let source = Arc::new(crate::search::Polled::new(
                storage.clone(),
                tokio::runtime::Handle::current(),
            ));
            (storage, join, source)
        }
    };
    let revoked = storage
        .revoked_tokens(auth::now_secs())
        .await
        .map_err(|e| format!("cannot load revoked tokens: {}", e.message))?;
    let auth = Auth::new(&config.auth, &secret, revoked);

    // Search: open (or rebuild) the index and start the indexer, which first
    // catches up with whatever the store has that the index lacks.
    let search = if config.search.search_enabled {
        let head = storage
            .head()
            .await
            .map_err(|e| format!("cannot read the message stream: {}", e.message))?;
        let index = Arc::new(SearchIndex::open(&data_dir, head)?);
        let indexer = Indexer::new(
            index.clone(),
            source.clone(),
            Duration::from_millis(config.search.index_commit_ms.max(1)),
        )
        .spawn()
        .map_err(|e| format!("cannot start the indexer thread: {e}"))?;
        // The periodic checksum scrub (0: off).
        let scrub = match config.search.index_scrub_secs {
            0 => None,
            secs => Some(
                crate::search::spawn_scrub(
                    index.clone(),
                    source.clone(),
                    Duration::from_secs(secs),
                )
                .map_err(|e| format!("cannot start the index scrub thread: {e}"))?,
            ),
        };
        Some((index, indexer, scrub))
    } else {
        None
    };

    let (soft, hard) = crate::telemetry::raise_nofile_limit();
    tracing::info!(soft, hard, "open-file limit");
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let config_max = (
        config.server.max_connections,
        config.server.max_connections_per_ip,
    );
    let reads = Arc::new(api::reads::ReadMerger::default());
    let budgets = api::UserBudgets::new(&config.limits, reads.clone());
    // The background scrub's status (`/status`), when it runs (only the
    // embedded store has one).
    let scrub = match config.store.store_scrub_secs {
        _ if store.is_none() => None,
        0 => None,
        secs => Some(Arc::new(crate::store::integrity::Scrub::new(
            Duration::from_secs(secs),
        ))),
    };
    let exports = crate::export::Exports::new(
        config.limits.export_concurrency,
        Duration::from_secs(config.limits.export_stall_secs),
    );
    let state = Arc::new(AppState {
        config,
        storage: storage.clone(),
        store,
        hub: hub.clone(),
        auth,
        metrics,
        shutdown: shutdown_rx,
        next_session: AtomicU64::new(1),
        next_request: AtomicU64::new(1),
        next_link: AtomicU64::new(1),
        connections: crate::limits::Connections::new(config_max.0, config_max.1),
        search: search.as_ref().map(|(index, _, _)| index.clone()),
        live,
        status: Default::default(),
        cluster,
        budgets,
        exports,
        backups: Default::default(),
        scrub,
    });
    let reads_task = tokio::spawn(reads.run(storage.clone(), state.shutdown.clone()));
    if state.cluster.is_some() {
        tokio::spawn(absorb_revocations(state.clone()));
    }
    tokio::spawn(crate::status::sample_every_second(
        state.clone(),
        state.shutdown.clone(),
    ));

    // Scheduled transfers: runs what is due now (missed while stopped), then
    // sleeps until the next one.
    let run_due = {
        let storage = storage.clone();
        move |now: i64| {
            let storage = storage.clone();
            async move {
                storage
                    .call(|reply| Op::Wallet(WalletOp::RunDue { now, reply }))
                    .await
            }
        }
    };
    let scheduler = tokio::spawn(crate::wallet::scheduler::run(
        run_due,
        wallet.wake.clone(),
        state.shutdown.clone(),
        state.config.wallet.scheduler_clock_offset_ms,
        if state.cluster.is_some() {
            crate::wallet::scheduler::MAX_SLEEP_CLUSTER
        } else {
            crate::wallet::scheduler::MAX_SLEEP
        },
    ));
    let admin = crate::admin::listen(state.clone(), &data_dir)?;
    // The background scrub: every record's checksum, now and then, at the
    // lowest priority (docs/STORAGE.md).
    let scrub_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store_scrub = match (&state.scrub, &state.store) {
        (Some(status), Some(store)) => Some(
            crate::store::integrity::spawn_scrub(
                store.db.clone(),
                Duration::from_secs(state.config.store.store_scrub_secs),
                status.clone(),
                scrub_stop.clone(),
            )
            .map_err(|e| format!("cannot start the scrub thread: {e}"))?,
        ),
        _ => None,
    };
    if state.store.is_none() && !state.config.backup.backup_dir.is_empty() {
        tracing::warn!(
            "backup_dir is ignored: the storage is PostgreSQL (back it up with pg_basebackup and WAL archiving, docs/SCALEOUT.md)"
        );
    }
    let backups = match &state.store {
        Some(store) if !state.config.backup.backup_dir.is_empty() => Some(store.db.clone()),
        _ => None,
    }
    .map(|db| {
        let dir = PathBuf::from(&state.config.backup.backup_dir);
        tracing::info!(dir = %dir.display(), every_secs = state.config.backup.backup_interval_secs, keep = state.config.backup.backup_keep, "periodic backups on");
        tokio::spawn(crate::backup::periodic(
            db,
            data_dir.clone(),
            dir,
            Duration::from_secs(state.config.backup.backup_interval_secs),
            state.config.backup.backup_keep,
            state.backups.clone(),
            state.shutdown.clone(),
        ))
    });

    let signal = shutdown_signal();
    tokio::pin!(signal);
    // The one line tests and scripts wait for.
    say(&format!("confab listening on http://{local}"));
    if state.storage.has_no_users().await.unwrap_or(false) {
        // First start: say where to go (a wildcard address is reachable
        // locally on loopback).
        let mut open = local;
        if open.ip().is_unspecified() {
            open.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        say(&format!(
            "first start: open http://{open}/ in a browser and sign up to create the first user"
        ));
    }
    tracing::info!(%local, data_dir = %data_dir.display(), "confab ready");

    let mut backoff = crate::limits::AcceptBackoff::new("listener");
    // Every log line of a connection (and of its WebSocket session) carries
    // `conn`: its number here.
    let mut next_conn = 0u64;
    loop {
        tokio::select! {
            _ = &mut signal => break,
            accepted = listener.accept() => {
                let Some((stream, peer)) = backoff.accepted(accepted).await else {
                    continue;
                };
                let Some(slot) = state.connections.try_take(peer.ip()) else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                next_conn += 1;
                let span = tracing::info_span!("conn", id = next_conn, %peer);
                tokio::spawn(
                    async move {
                        connection(state, stream, peer).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        }
    }

    tracing::info!("shutting down: closing sessions and flushing the writer");
    drop(listener);
    let _ = shutdown_tx.send(true);
    hub.close_all(close::GOING_AWAY);
    // Everything below ends within the grace period, whatever state the
    // storage is in: connections get most of it, the rest (the scheduler,
    // read positions, a running backup, the writer's last
    // commit, the indexer) what is left, and what is not done by then is
    // left (everything acknowledged is already durable).
    let deadline = tokio::time::Instant::now() + grace;
    let drained = deadline - (grace / 4).min(Duration::from_secs(1));
    while state.connections.open() > 0 && tokio::time::Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let finish = async {
        let _ = scheduler.await;
        let _ = reads_task.await;
        if let Some(b) = backups {
            let _ = b.await;
        }
        admin.abort();
        scrub_stop.store(true, Ordering::Release);
        if let Some(t) = store_scrub {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // An operator's online backup runs on its own thread: let it finish
        // (as the runtime used to wait for it on its blocking pool), so a
        // shutdown does not leave its file half-written.
        if state.backups.taken() {
            tracing::info!("waiting for the running backup to finish");
            while state.backups.taken() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        crate::admin::remove_socket(&data_dir);
        let _ = storage.submit(Op::Stop).await;
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
        if let Some((index, indexer, scrub)) = search {
            // Index what was committed, so the next start has nothing to catch
            // up; the scrub stops between two files.
            index.status.stop.store(true, Ordering::Release);
            source.nudge();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = indexer.join();
                if let Some(s) = scrub {
                    let _ = s.join();
                }
            })
            .await;
        }
    };
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_millis(500));
    if tokio::time::timeout(left, finish).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "shutdown did not finish within the grace period; exiting anyway (everything acknowledged is on disk)"
        );
        crate::admin::remove_socket(&data_dir);
    }
    tracing::info!("bye");
    Ok(())
}

/// Opens the PostgreSQL storage: an unreachable database is waited for
/// (saying which, retrying with back-off up to 5 s apart) rather than a
/// crash loop; a refusal (a newer schema, wrong credentials, a bad
/// connection string) ends the start with its reason.
/// A cluster node: the logouts other nodes recorded in the shared store,
/// read back every [`REVOCATIONS_EVERY`], so that this node refuses those
/// tokens too (the proxies hear of each logout from the node that took it).
async fn absorb_revocations(state: Arc<AppState>) {
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REVOCATIONS_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if let Ok(list) = state.storage.revoked_tokens(auth::now_secs()).await {
            state.auth.absorb(list);
        }
    }
}

const REVOCATIONS_EVERY: Duration = Duration::from_secs(1);

async fn open_postgres(opts: PgOptions) -> Result<(Postgres, std::thread::JoinHandle<()>), String> {
    let mut wait = Duration::from_millis(500);
    let opts = Arc::new(opts);
    loop {
        let attempt = opts.clone();
        let opened = tokio::task::spawn_blocking(move || Postgres::open(attempt.as_ref().clone()))
            .await
            .map_err(|e| format!("opening the database: {e}"))?;
        match opened {
            Ok(pg) => return Ok(pg),
            Err(crate::storage::postgres::OpenError::Unreachable(why)) => {
                tracing::warn!(error = %why, retry_in_ms = wait.as_millis() as u64, "waiting for the database");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(crate::storage::postgres::OpenError::Refused(why)) => return Err(why),
        }
    }
}

async fn connection(state: Arc<AppState>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let shutdown = state.shutdown.clone();
    let cluster = state.cluster.is_some();
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(api::handle(state, req, peer).await) }
    });
    let io = TokioIo::new(stream);
    // A client has HEADER_TIMEOUT to send each request's headers, so idle or
    // trickling connections cannot hold connection slots forever.
    if cluster {
        // A cluster node also speaks HTTP/2 with prior knowledge on the same
        // port: the proxies' multiplexed links (docs/SCALEOUT.md). The
        // first bytes tell the two apart.
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        drive(conn, shutdown, peer, |c| c.graceful_shutdown()).await;
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        drive(conn, shutdown, peer, |c| c.graceful_shutdown()).await;
    }
}

/// Runs a connection to its end; on shutdown, lets it finish gracefully.
async fn drive<C, E>(
    mut conn: std::pin::Pin<&mut C>,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "connection error");
            }
        }
        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
            graceful(conn.as_mut());
            let _ = conn.await;
        }
    }
}

/// A line on standard output for the operator (and the tests and scripts
/// that wait for it). A closed stdout is not a reason to stop serving, so
/// write errors are ignored (`println!` would panic on them).
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// SIGTERM or Ctrl-C. The handlers are installed when this is called (not
/// when the future is first polled), so a signal that arrives right after
/// the "listening" line is a graceful stop, not the default kill.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
