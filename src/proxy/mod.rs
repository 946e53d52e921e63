//! `confab proxy`: the front of a cluster (docs/SCALEOUT.md). It terminates
//! client HTTP and WebSockets, serves the UI, checks tokens, and sends each
//! operation to the node that owns its user or room over one multiplexed
//! HTTP/2 link per node ([`link`]). Lists and searches are asked of every
//! node and merged; WebSocket sessions are in [`session`].

pub mod link;
pub mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;

use crate::api::{Body, json, method_not_allowed, no_such_endpoint};
use crate::auth::{Auth, Caller};
use crate::cluster::Cluster;
use crate::cluster::link::USER_HEADER;
use crate::config::Config;
use crate::error::ApiError;
use crate::hub::close;
use crate::ids::{RoomId, UserId};
use link::{AttachCmd, Link, node_unavailable, read_all};
use session::PSession;

/// How long a scatter-gather waits for each node.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Proxy {
    pub config: Config,
    pub cluster: Arc<Cluster>,
    pub links: Vec<Arc<Link>>,
    pub auth: Auth,
    /// This proxy's name on its links (unique per process).
    pub name: String,
    link_token: RwLock<(String, Instant)>,
    sessions: RwLock<HashMap<UserId, Vec<Arc<PSession>>>>,
    /// Public profiles by id (they never change), for room creation.
    profiles: Mutex<HashMap<UserId, Bytes>>,
    metrics: PrometheusHandle,
    started: Instant,
    next_group_node: AtomicUsize,
    /// Open client connections (`max_connections`, `max_connections_per_ip`).
    pub(crate) connections: Arc<crate::limits::Connections>,
}

impl Proxy {
    /// A link token, renewed every minute.
    pub fn link_token(&self) -> String {
        {
            let t = self.link_token.read().unwrap_or_else(|e| e.into_inner());
            if t.1.elapsed() < Duration::from_secs(60) {
                return t.0.clone();
            }
        }
        let fresh = crate::cluster::link::issue(&self.cluster.secret, &self.name);
        *self.link_token.write().unwrap_or_else(|e| e.into_inner()) =
            (fresh.clone(), Instant::now());
        fresh
    }

    fn node_index(&self, id: &str) -> usize {
        self.cluster
            .nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or(0)
    }

    pub fn room_node(&self, room: RoomId) -> usize {
        self.cluster.ring.owner_index(room.0)
    }

    pub fn user_node(&self, user: UserId) -> usize {
        self.cluster.ring.owner_index(user.0)
    }

    fn wallet_node(&self) -> usize {
        self.cluster
            .ring
            .owner_index(crate::cluster::ring::wallet_key())
    }

    pub fn revoke(&self, jti: String, exp: i64) {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        for s in sessions.values().flatten().filter(|s| s.jti == jti) {
            s.outbox.kick(close::UNAUTHORIZED);
        }
        drop(sessions);
        self.auth.revoke(jti, exp);
    }

    /// Delivers one node event to the local sessions of `to`.
    pub fn fan_out(
        self: &Arc<Self>,
        to: &[UserId],
        skip: Option<u64>,
        frame: Bytes,
        room_seq: Option<(RoomId, u64)>,
    ) {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        let mut n = 0u64;
        for u in to {
            for s in sessions.get(u).into_iter().flatten() {
                if Some(s.id) == skip {
                    continue;
                }
                n += 1;
                match room_seq {
                    Some((room, seq)) => s.deliver(self, room, seq, Some(frame.clone())),
                    None => s.push_other(frame.clone()),
                }
            }
        }
        metrics::counter!("confab_proxy_frames_delivered_total").increment(n);
    }

    /// A node's answer to the frame of one session (`session`, a user of `to`).
    pub fn answer(self: &Arc<Self>, to: &[UserId], session: u64, frame: Bytes) {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        for u in to {
            if let Some(s) = sessions
                .get(u)
                .into_iter()
                .flatten()
                .find(|s| s.id == session)
            {
                s.answer(self, frame);
                return;
            }
        }
    }

    /// The link to node `node` went down: every send on its way there is
    /// answered `node_unavailable` (it may have been stored: a resend with
    /// the same client_id answers its seq).
    pub fn fail_inflight(&self, node: usize) {
        let sessions: Vec<Arc<PSession>> = {
            let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            map.values().flatten().cloned().collect()
        };
        for s in sessions {
            s.fail_inflight(self, node);
        }
    }

    /// `user`'s sessions on this proxy now.
    fn sessions_of(&self, user: UserId) -> usize {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.get(&user).map_or(0, Vec::len)
    }

    fn register(&self, s: &Arc<PSession>) {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        map.entry(s.user).or_default().push(s.clone());
        metrics::gauge!("confab_sessions_online").increment(1.0);
    }

    /// Forgets a session; the user's last here is detached on every node.
    fn unregister(&self, s: &PSession) {
        let last = {
            let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
            let Some(list) = map.get_mut(&s.user) else {
                return;
            };
            let before = list.len();
            list.retain(|x| x.id != s.id);
            if list.len() < before {
                metrics::gauge!("confab_sessions_online").decrement(1.0);
            }
            if list.is_empty() {
                map.remove(&s.user);
                true
            } else {
                false
            }
        };
        if last {
            for l in &self.links {
                l.attach(AttachCmd {
                    ops: vec![(false, s.user)],
                    reply: None,
                });
            }
        }
    }

    /// Users with a session here.
    pub fn attached_users(&self) -> Vec<UserId> {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.keys().copied().collect()
    }

    /// Attaches `user` on every node; returns what the nodes that answered
    /// within 2 s said: presence frames of their peers, and their rooms'
    /// highest seqs.
    async fn attach_everywhere(&self, user: UserId) -> Vec<link::Attached> {
        let mut waits = Vec::new();
        for l in &self.links {
            let (tx, rx) = tokio::sync::oneshot::channel();
            l.attach(AttachCmd {
                ops: vec![(true, user)],
                reply: Some(tx),
            });
            waits.push(rx);
        }
        let mut out = Vec::new();
        for rx in waits {
            if let Ok(Ok(lines)) = tokio::time::timeout(GATHER_TIMEOUT, rx).await {
                out.extend(lines.into_iter().map(|(_, a)| a));
            }
        }
        out
    }

    /// After node `index` came back: every session fetches what it missed.
    pub fn catch_up_node(self: &Arc<Self>, index: usize) {
        let sessions: Vec<Arc<PSession>> = {
            let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            map.values().flatten().cloned().collect()
        };
        for s in sessions {
            s.catch_up_node(self, index);
        }
    }

    /// A user's public profile (JSON) from their node; None if unknown.
    pub async fn profile(&self, user: UserId) -> Result<Option<Bytes>, ApiError> {
        if let Some(p) = self
            .profiles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&user)
        {
            return Ok(Some(p.clone()));
        }
        let resp = self.links[self.user_node(user)]
            .request(
                self,
                Method::GET,
                &format!("/api/v1/users/{user}"),
                &[(USER_HEADER, user.to_string())],
                Bytes::new(),
            )
            .await?;
        let (status, _, body) = read_all(resp).await?;
        match status {
            StatusCode::OK => {
                let mut cache = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() > 100_000 {
                    cache.clear();
                }
                cache.insert(user, body.clone());
                Ok(Some(body))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(ApiError::new(
                s,
                "node_error",
                format!("the user's node answered {s}"),
            )),
        }
    }

    /// The id of the user named `name` (any case), from the node that owns
    /// the name.
    async fn user_by_name(&self, asker: UserId, name: &str) -> Result<Option<UserId>, ApiError> {
        if !crate::api::valid_username(name) {
            return Ok(None);
        }
        let node = self.node_index(self.cluster.ring.username_owner(name));
        let resp = self.links[node]
            .request(
                self,
                Method::GET,
                &format!("/api/v1/users?q={name}&limit=50"),
                &[(USER_HEADER, asker.to_string())],
                Bytes::new(),
            )
            .await?;
        let (status, _, body) = read_all(resp).await?;
        if !status.is_success() {
            return Err(upstream_error(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(ApiError::internal)?;
        let lower = name.to_lowercase();
        Ok(v["users"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["username"].as_str() == Some(lower.as_str()))
            .and_then(|u| u["id"].as_str()?.parse().ok()))
    }

    /// Makes sure node `target` has the profiles of `users` (members of a
    /// room it is about to hold). 404 if one does not exist.
    async fn put_profiles(&self, target: usize, users: &[UserId]) -> Result<(), ApiError> {
        let mut list = Vec::with_capacity(users.len());
        for &u in users {
            let p = self
                .profile(u)
                .await?
                .ok_or_else(ApiError::user_not_found)?;
            let v: Value = serde_json::from_slice(&p).map_err(ApiError::internal)?;
            list.push(v);
        }
        let body = serde_json::to_vec(&serde_json::json!({ "users": list }))
            .map_err(ApiError::internal)?;
        let resp = self.links[target]
            .request(
                self,
                Method::POST,
                "/cluster/v1/profiles",
                &[],
                Bytes::from(body),
            )
            .await?;
        let (status, _, body) = read_all(resp).await?;
        if !status.is_success() {
            return Err(upstream_error(status, &body));
        }
        Ok(())
    }

    fn caller(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        self.auth.verify(token.trim())
    }
}

/// A node's error answer, passed on as it was.
fn upstream_error(status: StatusCode, body: &[u8]) -> ApiError {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let code = match v["error"].as_str().or(v["code"].as_str()) {
        Some("user_not_found") => "user_not_found",
        Some("room_not_found") => "room_not_found",
        Some("forbidden") => "forbidden",
        Some("bad_request") => "bad_request",
        _ => "node_error",
    };
    let message = v["message"]
        .as_str()
        .unwrap_or("the node refused the request");
    ApiError::new(status, code, message.to_string())
}

pub async fn serve(config: Config, metrics: PrometheusHandle) -> Result<(), String> {
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
    let mut links = Vec::new();
    let mut attach_rxs = Vec::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        let (l, rx) = Link::new(i, n.clone());
        links.push(l);
        attach_rxs.push(rx);
    }
    let name = format!("proxy-{local}-{:08x}", rand::random::<u32>());
    let config_max = (
        config.server.max_connections,
        config.server.max_connections_per_ip,
    );
    let proxy = Arc::new(Proxy {
        link_token: RwLock::new((
            crate::cluster::link::issue(&cluster.secret, &name),
            Instant::now(),
        )),
        name,
        config,
        cluster,
        links,
        auth,
        sessions: RwLock::new(HashMap::new()),
        profiles: Mutex::new(HashMap::new()),
        metrics,
        started: Instant::now(),
        next_group_node: AtomicUsize::new(0),
        connections: crate::limits::Connections::new(config_max.0, config_max.1),
    });
    for (l, rx) in proxy.links.iter().zip(attach_rxs) {
        tokio::spawn(link::run(proxy.clone(), l.clone()));
        tokio::spawn(link::attach_loop(proxy.clone(), l.clone(), rx));
    }
    let signal = crate::server::shutdown_signal();
    tokio::pin!(signal);
    crate::server::say(&format!("confab proxy listening on http://{local}"));
    tracing::info!(%local, nodes = proxy.links.len(), name = %proxy.name, "confab proxy ready");
    let mut backoff = crate::limits::AcceptBackoff::new("proxy listener");
    loop {
        tokio::select! {
            _ = &mut signal => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => {
                        backoff.succeeded();
                        x
                    }
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        tokio::time::sleep(backoff.failed(&e)).await;
                        continue;
                    }
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

async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let (route, result) = route(&proxy, req, peer).await;
    crate::api::finish(route, &method, started, result)
}

async fn route(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let m = req.method().clone();
    let get = m == Method::GET || m == Method::HEAD;
    let post = m == Method::POST;
    macro_rules! on {
        ($name:literal, $ok:expr, $call:expr) => {
            if $ok {
                ($name, $call.await)
            } else {
                ($name, Err(method_not_allowed()))
            }
        };
    }
    match segs.as_slice() {
        ["healthz"] => on!("/healthz", get, async {
            json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "role": "proxy"}),
            )
        }),
        ["metrics"] => on!("/metrics", get, async {
            crate::status::check_metrics_access(&p.config.server, &req, peer)?;
            Ok(metrics_page(p))
        }),
        ["status"] => on!("/status", get, async {
            crate::status::check_access_with(&p.config.server, &req, peer)?;
            Ok(status_page(p))
        }),
        ["api", "v1", rest @ ..] => match rest {
            ["status"] => on!("/status", get, async {
                crate::status::check_access_with(&p.config.server, &req, peer)?;
                json(StatusCode::OK, &status_json(p))
            }),
            ["ws"] => on!("/ws", get, session::upgrade(p, req)),
            ["signup"] => on!("/signup", post, by_username(p, req, peer)),
            ["login"] => on!("/login", post, by_username(p, req, peer)),
            ["users"] => on!("/users", get, gather(p, req, Merge::Users)),
            ["search"] => on!("/search", get, gather(p, req, Merge::Search)),
            ["rooms"] if get => ("/rooms", gather(p, req, Merge::Rooms).await),
            ["rooms"] => on!("/rooms", post, create_room(p, req)),
            ["rooms", id, "members"] if post => {
                ("/rooms/{id}/members", add_member(p, req, id).await)
            }
            ["rooms", id, rest @ ..] => {
                let stream = rest == ["export"];
                (
                    "/rooms/{id}",
                    match id.parse::<RoomId>() {
                        Ok(room) => forward_checked(p, p.room_node(room), req, stream).await,
                        Err(_) => Err(ApiError::bad_id()),
                    },
                )
            }
            ["users", id] => (
                "/users/{id}",
                match id.parse::<UserId>() {
                    Ok(u) => forward_checked(p, p.user_node(u), req, false).await,
                    Err(_) => Err(ApiError::bad_id()),
                },
            ),
            ["wallet", "transfers"] if post => ("/wallet/transfers", transfer(p, req).await),
            ["contacts"] if post => ("/contacts", add_contact(p, req).await),
            ["wallet", ..] => (
                "/wallet",
                forward_checked(p, p.wallet_node(), req, false).await,
            ),
            ["logout"] | ["me"] | ["me", "export" | "privacy"] | ["contacts", ..] => {
                let stream = rest == ["me", "export"];
                (
                    "/me",
                    match p.caller(&req) {
                        Ok(c) => forward(p, p.user_node(c.user), req, stream).await,
                        Err(e) => Err(e),
                    },
                )
            }
            _ => ("other", Err(no_such_endpoint(&path))),
        },
        ["api", ..] | ["cluster", ..] => ("other", Err(no_such_endpoint(&path))),
        _ => on!("/ui", get, async { Ok(crate::api::assets::serve(&path)) }),
    }
}

/// A request with its whole body (within `max_body_bytes`).
async fn whole_request(
    p: &Proxy,
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes), ApiError> {
    let (parts, incoming) = req.into_parts();
    Ok((
        parts,
        crate::api::read_body(&p.config.server, incoming).await?,
    ))
}

/// [`whole_request`] whose body must be JSON (400 `invalid_json`).
async fn json_request(
    p: &Proxy,
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes, Value), ApiError> {
    let (parts, body) = whole_request(p, req).await?;
    let v = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?;
    Ok((parts, body, v))
}

/// Forwards after checking the caller's token here (the nodes trust the
/// proxy's check of revocations).
async fn forward_checked(
    p: &Arc<Proxy>,
    node: usize,
    req: Request<Incoming>,
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    p.caller(&req)?;
    forward(p, node, req, stream).await
}

/// Sends the request to node `node` as it is and answers with its answer.
async fn forward(
    p: &Arc<Proxy>,
    node: usize,
    req: Request<Incoming>,
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = whole_request(p, req).await?;
    forward_parts(p, node, &parts, body, stream).await
}

async fn forward_parts(
    p: &Arc<Proxy>,
    node: usize,
    parts: &hyper::http::request::Parts,
    body: Bytes,
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    let path = parts
        .uri
        .path_and_query()
        .map(|x| x.as_str())
        .unwrap_or("/");
    let mut headers = Vec::new();
    if let Some(a) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        headers.push(("authorization", a.to_string()));
    }
    if let Some(a) = parts
        .headers
        .get(crate::cluster::link::CLIENT_IP_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        headers.push((crate::cluster::link::CLIENT_IP_HEADER, a.to_string()));
    }
    let resp = p.links[node]
        .request(p, parts.method.clone(), path, &headers, body)
        .await?;
    let status = resp.status();
    let mut out_headers = hyper::HeaderMap::new();
    for h in [
        header::CONTENT_TYPE,
        header::CONTENT_DISPOSITION,
        header::RETRY_AFTER,
        header::CACHE_CONTROL,
    ] {
        if let Some(v) = resp.headers().get(&h) {
            out_headers.insert(h, v.clone());
        }
    }
    let body = if stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let mut upstream = resp.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = upstream.frame().await {
                if let Ok(data) = frame.into_data()
                    && tx.send(data).await.is_err()
                {
                    return;
                }
            }
        });
        Body::stream(rx)
    } else {
        let (_, _, bytes) = read_all(resp).await?;
        Body::full(bytes)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = out_headers;
    Ok(r)
}

/// Signup and login go to the node that owns the username.
async fn by_username(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let (mut parts, body, v) = json_request(p, req).await?;
    if let Ok(ip) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts
            .headers
            .insert(crate::cluster::link::CLIENT_IP_HEADER, ip);
    }
    let name = v["username"].as_str().unwrap_or("");
    let node = p.node_index(p.cluster.ring.username_owner(name));
    forward_parts(p, node, &parts, body, false).await
}

#[derive(Clone, Copy)]
enum Merge {
    Rooms,
    Users,
    Search,
}

fn parse_user(v: &Value) -> Result<UserId, ApiError> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::bad_request("invalid_json", "user ids are 16 hex digits"))
}

/// `POST /rooms`: a direct chat goes to the node its id (derived from the
/// pair) names, a group to the next node in turn (which picks an id it
/// owns); that node first gets the members' profiles.
async fn create_room(p: &Arc<Proxy>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let caller = p.caller(&req)?;
    let (parts, body, v) = json_request(p, req).await?;
    let (target, mut members) = match v["kind"].as_str() {
        Some("direct") => {
            let peer = parse_user(&v["user_id"])?;
            (p.room_node(RoomId::direct(caller.user, peer)), vec![peer])
        }
        Some("group") => {
            let ids = v["member_ids"]
                .as_array()
                .ok_or_else(|| ApiError::bad_request("invalid_json", "member_ids is required"))?;
            if ids.len() > p.config.limits.max_group_members {
                return Err(ApiError::bad_request(
                    "too_many_members",
                    "too many members for one group",
                ));
            }
            let ids = ids.iter().map(parse_user).collect::<Result<Vec<_>, _>>()?;
            (pick_node(p)?, ids)
        }
        // Anything else: the caller's node explains what is wrong.
        _ => (p.user_node(caller.user), Vec::new()),
    };
    if !members.is_empty() {
        members.push(caller.user);
        members.sort();
        members.dedup();
        p.put_profiles(target, &members).await?;
    }
    forward_parts(p, target, &parts, body, false).await
}

/// `POST /wallet/transfers`: the wallet node (which holds the whole ledger)
/// first gets both users' profiles.
async fn transfer(p: &Arc<Proxy>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let caller = p.caller(&req)?;
    let (parts, body) = whole_request(p, req).await?;
    let target = p.wallet_node();
    let to = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v["to_user_id"]
            .as_str()
            .and_then(|s| s.parse::<UserId>().ok())
    });
    // A malformed request goes on as it is: the wallet node explains.
    if let Some(to) = to {
        let mut users = vec![caller.user, to];
        users.dedup();
        p.put_profiles(target, &users).await?;
    }
    forward_parts(p, target, &parts, body, false).await
}

/// `POST /contacts`: the contact may live on another node. Their profile
/// (found by id, or by name on the name's node) is stored on the caller's
/// node, which then adds the contact by id.
async fn add_contact(p: &Arc<Proxy>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let caller = p.caller(&req)?;
    let (parts, body) = whole_request(p, req).await?;
    let target = p.user_node(caller.user);
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = if let Some(id) = v["user_id"].as_str() {
        Some(
            id.parse::<UserId>()
                .map_err(|_| ApiError::bad_request("invalid_json", "user ids are 16 hex digits"))?,
        )
    } else if let Some(name) = v["username"].as_str() {
        Some(
            p.user_by_name(caller.user, name)
                .await?
                .ok_or_else(ApiError::user_not_found)?,
        )
    } else {
        None
    };
    let Some(id) = id else {
        // Neither: the caller's node explains.
        return forward_parts(p, target, &parts, body, false).await;
    };
    if id != caller.user {
        p.put_profiles(target, &[id]).await?;
    }
    let body =
        serde_json::to_vec(&serde_json::json!({ "user_id": id })).map_err(ApiError::internal)?;
    forward_parts(p, target, &parts, Bytes::from(body), false).await
}

/// The next node that is up, in turn (where a new group goes).
fn pick_node(p: &Proxy) -> Result<usize, ApiError> {
    let n = p.links.len();
    for _ in 0..n {
        let i = p.next_group_node.fetch_add(1, Ordering::Relaxed) % n;
        if p.links[i].is_up() {
            return Ok(i);
        }
    }
    Err(ApiError::busy("no node is available"))
}

async fn add_member(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    p.caller(&req)?;
    let room: RoomId = id.parse().map_err(|_| ApiError::bad_id())?;
    let (parts, body, v) = json_request(p, req).await?;
    let user = parse_user(&v["user_id"])?;
    let target = p.room_node(room);
    p.put_profiles(target, &[user]).await?;
    forward_parts(p, target, &parts, body, false).await
}

/// One node's answer to a scatter-gather: Ok(body) or the node is out.
type Gathered = Result<Value, ApiError>;

/// Lists and searches: every node answers for what it holds; the answers
/// are merged. Nodes that do not answer in 2 s are left out and named
/// (`"partial": true, "unavailable_nodes": [...]`).
async fn gather(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    merge: Merge,
) -> Result<Response<Body>, ApiError> {
    p.caller(&req)?;
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = req.uri().path().to_string();
    let query: Vec<(String, String)> = crate::api::query(&req);
    let raw: Vec<String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect();
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let num = |k: &str, d: usize| -> Result<usize, ApiError> {
        match get(k) {
            None => Ok(d),
            Some(v) => v.parse().map_err(|_| {
                ApiError::bad_request("bad_request", format!("{k} must be a number, got {v:?}"))
            }),
        }
    };
    let (limit, offset) = match merge {
        Merge::Search => {
            let (limit, offset) = (num("limit", 20)?, num("offset", 0)?);
            if !(1..=50).contains(&limit) {
                return Err(ApiError::bad_request(
                    "bad_request",
                    "limit must be between 1 and 50",
                ));
            }
            if offset + limit > crate::search::MAX_WINDOW {
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!(
                        "offset + limit may not exceed {}",
                        crate::search::MAX_WINDOW
                    ),
                ));
            }
            (limit, offset)
        }
        Merge::Users => (num("limit", 20)?.clamp(1, 50), 0),
        Merge::Rooms => (0, 0),
    };
    // Each node is asked for the first offset + limit hits, 50 at a time.
    let keep: Vec<String> = raw
        .into_iter()
        .filter(|kv| !kv.starts_with("offset=") && !kv.starts_with("limit="))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..p.links.len() {
        let (p, auth, path, keep) = (p.clone(), auth.clone(), path.clone(), keep.clone());
        tasks.push(tokio::spawn(async move {
            let want = offset + limit;
            let mut acc: Option<Value> = None;
            let mut from = 0usize;
            loop {
                let mut q = keep.clone();
                match merge {
                    Merge::Search => {
                        q.push(format!("offset={from}"));
                        q.push(format!("limit={}", (want - from).min(50)));
                    }
                    Merge::Users => q.push(format!("limit={limit}")),
                    Merge::Rooms => {}
                }
                let url = if q.is_empty() {
                    path.clone()
                } else {
                    format!("{path}?{}", q.join("&"))
                };
                let headers = [("authorization", auth.clone())];
                let call = p.links[i].request(&p, Method::GET, &url, &headers, Bytes::new());
                let (status, _, body) = match tokio::time::timeout(GATHER_TIMEOUT, call).await {
                    Ok(Ok(resp)) => {
                        match tokio::time::timeout(GATHER_TIMEOUT, read_all(resp)).await {
                            Ok(r) => r?,
                            Err(_) => return Err(node_unavailable(&p.links[i].node.id)),
                        }
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(node_unavailable(&p.links[i].node.id)),
                };
                if status.is_server_error() {
                    return Err(node_unavailable(&p.links[i].node.id));
                }
                if !status.is_success() {
                    return Ok(Err(upstream_error(status, &body)));
                }
                let v: Value = serde_json::from_slice(&body).map_err(ApiError::internal)?;
                let Merge::Search = merge else {
                    return Ok(Ok(v));
                };
                let got = v["hits"].as_array().map(Vec::len).unwrap_or(0);
                let next = v["next_offset"].as_u64();
                match &mut acc {
                    None => acc = Some(v),
                    Some(a) => {
                        if let (Some(hits), Some(more)) =
                            (a["hits"].as_array_mut(), v["hits"].as_array())
                        {
                            hits.extend(more.iter().cloned());
                        }
                    }
                }
                from += got;
                if next.is_none() || from >= want || got == 0 {
                    return Ok(Ok(acc.unwrap_or_default()));
                }
            }
        }));
    }
    let mut answers: Vec<Value> = Vec::new();
    let mut unavailable = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r: Result<Result<Gathered, ApiError>, _> = t.await;
        match r {
            Ok(Ok(Ok(v))) => answers.push(v),
            // A client error (bad query) is the same on every node.
            Ok(Ok(Err(e))) => return Err(e),
            _ => unavailable.push(p.links[i].node.id.clone()),
        }
    }
    if answers.is_empty() && !unavailable.is_empty() {
        return Err(node_unavailable(&unavailable.join(", ")));
    }
    let mut out = match merge {
        Merge::Rooms => {
            let mut rooms: Vec<Value> = answers
                .iter_mut()
                .flat_map(|a| {
                    a["rooms"]
                        .as_array_mut()
                        .map(std::mem::take)
                        .unwrap_or_default()
                })
                .collect();
            let activity = |r: &Value| {
                r["last_message"]["ts"]
                    .as_i64()
                    .or(r["created_at"].as_i64())
                    .unwrap_or(0)
            };
            rooms.sort_by_key(|r| std::cmp::Reverse(activity(r)));
            serde_json::json!({ "rooms": rooms })
        }
        Merge::Users => {
            let mut users: Vec<Value> = answers
                .iter_mut()
                .flat_map(|a| {
                    a["users"]
                        .as_array_mut()
                        .map(std::mem::take)
                        .unwrap_or_default()
                })
                .collect();
            users.sort_by(|a, b| a["username"].as_str().cmp(&b["username"].as_str()));
            users.dedup_by(|a, b| a["id"] == b["id"]);
            users.truncate(limit);
            serde_json::json!({ "users": users })
        }
        Merge::Search => {
            let by_time = get("sort").as_deref() == Some("time");
            let total: u64 = answers
                .iter()
                .map(|a| a["total"].as_u64().unwrap_or(0))
                .sum();
            let mut hits: Vec<Value> = answers
                .iter_mut()
                .flat_map(|a| {
                    a["hits"]
                        .as_array_mut()
                        .map(std::mem::take)
                        .unwrap_or_default()
                })
                .collect();
            let ts = |h: &Value| h["ts"].as_i64().unwrap_or(0);
            if by_time {
                hits.sort_by_key(|h| std::cmp::Reverse(ts(h)));
            } else {
                hits.sort_by(|a, b| {
                    let (sa, sb) = (
                        a["score"].as_f64().unwrap_or(0.0),
                        b["score"].as_f64().unwrap_or(0.0),
                    );
                    sb.total_cmp(&sa).then(ts(b).cmp(&ts(a)))
                });
            }
            let page: Vec<Value> = hits.into_iter().skip(offset).take(limit).collect();
            let next = offset + page.len();
            let mut v = serde_json::json!({ "hits": page, "total": total });
            if (next as u64) < total && next < crate::search::MAX_WINDOW && page_len_is(&v, limit) {
                v["next_offset"] = next.into();
            }
            v
        }
    };
    if !unavailable.is_empty() {
        out["partial"] = true.into();
        out["unavailable_nodes"] = unavailable.into();
    }
    json(StatusCode::OK, &out)
}

fn page_len_is(v: &Value, n: usize) -> bool {
    v["hits"].as_array().map(Vec::len) == Some(n)
}

fn status_json(p: &Proxy) -> Value {
    let nodes: Vec<Value> = p
        .links
        .iter()
        .map(|l| {
            serde_json::json!({
                "id": l.node.id,
                "addr": l.node.addr.to_string(),
                "up": l.is_up(),
                "rtt_ms": l.rtt_us.load(Ordering::Relaxed) as f64 / 1000.0,
                "in_flight": l.in_flight.load(Ordering::Relaxed),
                "events": l.events.load(Ordering::Relaxed),
                "connects": l.reconnects.load(Ordering::Relaxed),
                "last_error": l.last_error(),
            })
        })
        .collect();
    let sessions = p.sessions.read().unwrap_or_else(|e| e.into_inner());
    serde_json::json!({
        "role": "proxy",
        "name": p.name,
        "version": crate::telemetry::VERSION,
        "uptime_secs": p.started.elapsed().as_secs(),
        "sessions": sessions.values().map(Vec::len).sum::<usize>(),
        "users_online_here": sessions.len(),
        "connections": p.connections.open(),
        "nodes": nodes,
    })
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn status_page(p: &Proxy) -> Response<Body> {
    let s = status_json(p);
    let mut rows = String::new();
    for n in s["nodes"].as_array().into_iter().flatten() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(n["id"].as_str().unwrap_or("")),
            html_escape(n["addr"].as_str().unwrap_or("")),
            if n["up"].as_bool() == Some(true) { "up" } else { "down" },
            if n["up"].as_bool() == Some(true) { "up" } else { "down" },
            n["rtt_ms"].as_f64().unwrap_or(0.0),
            n["in_flight"],
            n["events"],
            html_escape(n["last_error"].as_str().unwrap_or("")),
        ));
    }
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>confab proxy status</title></head><body>\
         <h1>confab proxy {}</h1><p>up {} s · {} sessions · {} users · {} connections</p>\
         <table><thead><tr><th>node</th><th>address</th><th>link</th><th>rtt ms</th><th>in flight</th><th>events</th><th>last error</th></tr></thead><tbody>{rows}</tbody></table>\
         <p>JSON: <a href=\"/api/v1/status\">/api/v1/status</a> · metrics: <a href=\"/metrics\">/metrics</a></p></body></html>",
        html_escape(&p.name),
        s["uptime_secs"],
        s["sessions"],
        s["users_online_here"],
        s["connections"],
    );
    let mut resp = Response::new(Body::full(html));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn metrics_page(p: &Proxy) -> Response<Body> {
    use std::fmt::Write;
    let mut out = p.metrics.render();
    out.push_str("# HELP confab_proxy_node_link_up Whether the proxy's link to the node is up.\n# TYPE confab_proxy_node_link_up gauge\n");
    for l in &p.links {
        let _ = writeln!(
            out,
            "confab_proxy_node_link_up{{node=\"{}\"}} {}",
            l.node.id,
            u8::from(l.is_up())
        );
    }
    out.push_str("# HELP confab_proxy_node_rtt_seconds The last request's round trip to the node.\n# TYPE confab_proxy_node_rtt_seconds gauge\n");
    for l in &p.links {
        let _ = writeln!(
            out,
            "confab_proxy_node_rtt_seconds{{node=\"{}\"}} {}",
            l.node.id,
            l.rtt_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
    out.push_str("# HELP confab_proxy_node_in_flight Requests to the node awaiting an answer.\n# TYPE confab_proxy_node_in_flight gauge\n");
    for l in &p.links {
        let _ = writeln!(
            out,
            "confab_proxy_node_in_flight{{node=\"{}\"}} {}",
            l.node.id,
            l.in_flight.load(Ordering::Relaxed)
        );
    }
    let mut resp = Response::new(Body::full(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
