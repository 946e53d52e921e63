//! `confab proxy` starting and stopping: the cluster settings checked, the
//! listener bound, one link per node (with its task that keeps it up and
//! its attach queue), then the accept loop — connection limits, back-off on
//! accept errors, one HTTP/1.1 connection task each (with upgrades) — until
//! the shutdown signal closes every session (going away). SIGHUP reloads
//! the node list: added nodes get a link (and their share of the rooms once
//! it is up), removed ones hand their share on at once and their link is
//! closed after [`DRAIN`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;

use super::link::{self, LinkToken};
use super::placement::Nodes;
use super::routes::handle;
use super::state::Proxy;
use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::hub::close;

/// How long the link to a node removed from the list stays open, so that
/// the answers to what was sent to it still arrive.
const DRAIN: Duration = Duration::from_secs(5);

/// `reload`: the configuration as it is now (file, environment, command
/// line), read again on SIGHUP.
pub async fn serve(
    config: Config,
    metrics: PrometheusHandle,
    reload: impl Fn() -> Result<Config, String>,
) -> Result<(), String> {
    let cluster = Cluster::from_config(&config.cluster)?
        .ok_or("`confab proxy` needs a [cluster] table with `cluster_nodes`")?;
    if cluster.secret.is_empty() {
        return Err("`confab proxy` needs `cluster_secret` (the nodes' shared secret)".into());
    }
    let cluster = Arc::new(cluster);
    let mut auth_cfg = config.auth.clone();
    auth_cfg.hash_concurrency = 1;
    auth_cfg.hash_queue = 1;
    let auth = Auth::new(&auth_cfg, cluster.secret.as_bytes(), Vec::new());
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let name = format!("proxy-{local}-{:08x}", rand::random::<u32>());
    let token = Arc::new(LinkToken::new(&cluster.secret, &name));
    let (nodes, links) = Nodes::new(&cluster, token);
    let config_max = (
        config.server.max_connections,
        config.server.max_connections_per_ip,
    );
    let proxy = Arc::new(Proxy {
        name,
        config,
        nodes: Arc::new(nodes),
        auth,
        sessions: RwLock::new(HashMap::new()),
        profiles: Mutex::new(HashMap::new()),
        metrics,
        started: Instant::now(),
        connections: crate::limits::Connections::new(config_max.0, config_max.1),
    });
    start_links(&proxy, links);
    let signal = crate::server::shutdown_signal();
    tokio::pin!(signal);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    crate::server::say(&format!("confab proxy listening on http://{local}"));
    tracing::info!(%local, nodes = cluster.nodes.len(), name = %proxy.name, "confab proxy ready");
    let mut backoff = crate::limits::AcceptBackoff::new("proxy listener");
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = hangup.recv() => reload_nodes(&proxy, &cluster, &reload),
            accepted = listener.accept() => {
                let Some((stream, peer)) = backoff.accepted(accepted).await else {
                    continue;
                };
                let Some(slot) = proxy.connections.try_take(peer.ip()) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let p2 = proxy.clone();
                    let service = service_fn(move |req| {
                        let p = p2.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(p, req, peer).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(30))
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    let _ = conn.await;
                    drop(slot);
                });
            }
        }
    }
    tracing::info!("proxy shutting down: closing sessions");
    {
        let sessions = proxy.sessions.read().unwrap_or_else(|e| e.into_inner());
        for s in sessions.values().flatten() {
            s.outbox.kick(close::GOING_AWAY);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

fn start_links(proxy: &Arc<Proxy>, links: super::placement::NewLinks) {
    for (l, rx) in links {
        tokio::spawn(link::run(proxy.clone(), l.clone()));
        tokio::spawn(link::attach_loop(l, rx));
    }
}

/// SIGHUP: the node list from the configuration as it is now. A bad one
/// (or another secret, which cannot change while serving) is logged and
/// the list in force stays.
fn reload_nodes(proxy: &Arc<Proxy>, first: &Cluster, reload: &impl Fn() -> Result<Config, String>) {
    let cluster = match reload().and_then(|c| Cluster::from_config(&c.cluster)) {
        Ok(Some(c)) if c.secret == first.secret => c,
        Ok(Some(_)) => {
            tracing::error!(
                "node list not reloaded: `cluster_secret` cannot change while the proxy runs (restart it)"
            );
            return;
        }
        Ok(None) => {
            tracing::error!("node list not reloaded: the configuration has no `cluster_nodes`");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "node list not reloaded: the configuration is not valid");
            return;
        }
    };
    let (added, removed) = proxy.nodes.set_list(&cluster);
    let names = |ids: Vec<&str>| ids.join(", ");
    tracing::info!(
        nodes = %names(cluster.nodes.iter().map(|n| n.id.as_str()).collect()),
        added = %names(added.iter().map(|(l, _)| l.node.id.as_str()).collect()),
        removed = %names(removed.iter().map(|l| l.node.id.as_str()).collect()),
        "node list reloaded"
    );
    start_links(proxy, added);
    for l in removed {
        tokio::spawn(async move {
            tokio::time::sleep(DRAIN).await;
            l.retire();
        });
    }
}
