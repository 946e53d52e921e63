//! A proxy's link to one node: one HTTP/2 connection (prior knowledge, on the
//! node's own port) multiplexing every forwarded request, plus the node's
//! event stream and the stream of client frames on it, and the queue of
//! attach/detach operations. Reconnects with back-off (100 ms doubling to
//! 5 s); the event stream's lines go up to the proxy ([`NodeEvents`],
//! `events.rs`), which after each reconnect re-attaches its users and
//! catches every session up on the node's rooms (docs/SCALEOUT.md,
//! "Failures"). The bottom of the proxy: it knows nothing of sessions.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::client::conn::http2;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::{Node, link};
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};

/// What the proxy does with what a link hears (`events.rs`).
pub trait NodeEvents: Send + Sync + 'static {
    /// One line of the node's event stream.
    fn line(self: &Arc<Self>, link: &Arc<Link>, line: Bytes);
    /// The link to node `node` went down.
    fn down(self: &Arc<Self>, node: usize);
}

type Sender = http2::SendRequest<crate::api::Body>;

/// A user attached (true) or detached (false) on the node, with an answer
/// channel for what the node says about an attached user.
pub struct AttachCmd {
    pub ops: Vec<(bool, UserId)>,
    pub reply: Option<oneshot::Sender<Vec<(UserId, Attached)>>>,
}

/// One line of a node's answer to an attach.
#[derive(Clone)]
pub enum Attached {
    /// A presence frame for the user's sessions.
    Presence(Bytes),
    /// One of the user's rooms on the node, with its highest seq.
    Head(RoomId, u64),
}

pub struct Link {
    pub index: usize,
    pub node: Node,
    /// The proxy's link token, sent with every request.
    token: Arc<LinkToken>,
    sender: RwLock<Option<Sender>>,
    pub up: AtomicBool,
    pub in_flight: AtomicUsize,
    /// Round-trip time of the last request, in microseconds.
    pub rtt_us: AtomicU64,
    pub events: AtomicU64,
    pub reconnects: AtomicU64,
    pub last_error: Mutex<String>,
    attach_tx: mpsc::UnboundedSender<AttachCmd>,
    /// The open stream of client frames to the node (see
    /// [`crate::cluster::node`], `/cluster/v1/frames`).
    frames: Mutex<Option<mpsc::Sender<Bytes>>>,
    /// The node was removed from the list: once the connection is closed,
    /// it is not made again.
    retired: AtomicBool,
    /// Closes the current connection (retired, or the node refused).
    stop: tokio::sync::Notify,
}

/// How long a forwarded request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// An event stream silent for this long (pings come every second) is dead:
/// a node that stopped (SIGSTOP, a frozen VM) loses its rooms to the others
/// after this, one that died as soon as its connection closes.
const SILENCE: Duration = Duration::from_secs(3);
/// How long a request waits for a link that is (re)connecting.
const LINK_WAIT: Duration = Duration::from_secs(2);

pub fn node_unavailable(node: &str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "node_unavailable",
        format!("node {node} is unavailable; try again shortly"),
    );
    e.retry_after = Some(1);
    e
}

/// The token this proxy names itself with on its links: HS256 under the
/// cluster secret, renewed every minute.
pub struct LinkToken {
    secret: String,
    name: String,
    current: RwLock<(String, Instant)>,
}

impl LinkToken {
    pub fn new(secret: &str, name: &str) -> LinkToken {
        LinkToken {
            secret: secret.to_string(),
            name: name.to_string(),
            current: RwLock::new((link::issue(secret, name), Instant::now())),
        }
    }

    /// A link token, renewed every minute.
    pub fn get(&self) -> String {
        {
            let t = self.current.read().unwrap_or_else(|e| e.into_inner());
            if t.1.elapsed() < Duration::from_secs(60) {
                return t.0.clone();
            }
        }
        let fresh = link::issue(&self.secret, &self.name);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (fresh.clone(), Instant::now());
        fresh
    }
}

impl Link {
    pub fn new(
        index: usize,
        node: Node,
        token: Arc<LinkToken>,
    ) -> (Arc<Link>, mpsc::UnboundedReceiver<AttachCmd>) {
        let (attach_tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            index,
            node,
            token,
            sender: RwLock::new(None),
            up: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            rtt_us: AtomicU64::new(0),
            events: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            attach_tx,
            frames: Mutex::new(None),
            retired: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
        });
        (link, rx)
    }

    /// The node left the list: closes the link for good.
    pub fn retire(&self) {
        self.set_error("the node left the list");
        self.retired.store(true, Ordering::Release);
        self.stop.notify_one();
    }

    /// Drops the current connection (it reconnects after the back-off),
    /// saying why.
    pub fn refuse(&self, why: &str) {
        self.set_error(why);
        self.stop.notify_one();
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn sender(&self) -> Option<Sender> {
        if !self.is_up() {
            return None;
        }
        self.sender
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The connection, waiting up to `wait` for a link that is
    /// (re)connecting.
    async fn sender_within(&self, wait: Duration) -> Result<Sender, ApiError> {
        let until = Instant::now() + wait;
        loop {
            if let Some(s) = self.sender() {
                return Ok(s);
            }
            if Instant::now() >= until {
                return Err(node_unavailable(&self.node.id));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn set_error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string();
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues one client frame line for the node's frame stream; its answer
    /// comes back on the event stream.
    pub fn send_frame(&self, line: Bytes) -> Result<(), ApiError> {
        let frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        match frames.as_ref() {
            Some(tx) if self.is_up() => tx.try_send(line).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    ApiError::busy("the link to the node is full; try again")
                }
                mpsc::error::TrySendError::Closed(_) => node_unavailable(&self.node.id),
            }),
            _ => Err(node_unavailable(&self.node.id)),
        }
    }

    /// Queues attach/detach operations (applied on the node in order).
    pub fn attach(&self, cmd: AttachCmd) {
        let _ = self.attach_tx.send(cmd);
    }

    /// Sends one request over the link. `user`: act for this user
    /// (`x-confab-user`); `session`: the proxy session of a forwarded frame.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Response<hyper::body::Incoming>, ApiError> {
        let mut sender = self.sender_within(LINK_WAIT).await?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.node.addr, path))
            .header(link::HEADER, self.token.get());
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(crate::api::Body::full(body))
            .map_err(|e| ApiError::bad_request("bad_request", format!("bad request: {e}")))?;
        let started = Instant::now();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req)).await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let took = started.elapsed();
        self.rtt_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("confab_proxy_upstream_seconds", "node" => self.node.id.clone())
            .record(took.as_secs_f64());
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                self.set_error(&format!("request failed: {e}"));
                Err(node_unavailable(&self.node.id))
            }
            Err(_) => {
                self.set_error("request timed out");
                Err(node_unavailable(&self.node.id))
            }
        }
    }
}

/// A whole upstream body (responses of the API are small; exports stream
/// through `forward.rs` instead).
pub async fn read_all(
    resp: Response<hyper::body::Incoming>,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ApiError> {
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| ApiError::busy(format!("the node's answer broke off: {e}")))?
        .to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

/// Keeps the link to one node up until the node leaves the list.
pub async fn run<E: NodeEvents>(events: Arc<E>, link: Arc<Link>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        if let Err(e) = connect_once(&events, &link).await {
            let e = if e.is_empty() { link.last_error() } else { e };
            link.set_error(&e);
            tracing::warn!(node = %link.node.id, error = %e, "link to node down");
        }
        link.up.store(false, Ordering::Release);
        *link.sender.write().unwrap_or_else(|e| e.into_inner()) = None;
        *link.frames.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Sends on their way to the node will get no answer: say so.
        events.down(link.index);
        metrics::gauge!("confab_proxy_node_up", "node" => link.node.id.clone()).set(0.0);
        if link.retired.load(Ordering::Acquire) {
            tracing::info!(node = %link.node.id, "link to node closed: the node left the list");
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect_once<E: NodeEvents>(events: &Arc<E>, link: &Arc<Link>) -> Result<(), String> {
    let addr = link.node.addr;
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/2 handshake with {addr} failed: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let _abort = AbortOnDrop(driver);
    let mut events_sender = sender.clone();
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{addr}/cluster/v1/events"))
        .header(link::HEADER, link.token.get())
        .body(crate::api::Body::empty())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), events_sender.send_request(req))
        .await
        .map_err(|_| "the event stream did not open in time".to_string())?
        .map_err(|e| format!("cannot open the event stream: {e}"))?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        return Err(format!(
            "node {} at {addr} refused this proxy's link token (401): it was started with another cluster_secret",
            link.node.id
        ));
    }
    if resp.status() != StatusCode::OK {
        return Err(format!("the event stream was refused: {}", resp.status()));
    }
    // The stream of client frames, one request body for the link's life
    // (opened after the event stream, which the node needs first).
    let (frames_tx, frames_rx) = mpsc::channel::<Bytes>(8192);
    let mut frames_sender = sender.clone();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/cluster/v1/frames"))
        .header(link::HEADER, link.token.get())
        .body(crate::api::Body::stream(frames_rx))
        .map_err(|e| e.to_string())?;
    let frames_resp = tokio::time::timeout(Duration::from_secs(5), frames_sender.send_request(req))
        .await
        .map_err(|_| "the frame stream did not open in time".to_string())?
        .map_err(|e| format!("cannot open the frame stream: {e}"))?;
    if frames_resp.status() != StatusCode::OK {
        return Err(format!(
            "the frame stream was refused: {}",
            frames_resp.status()
        ));
    }
    let _frames_open = frames_resp;
    *link.frames.lock().unwrap_or_else(|e| e.into_inner()) = Some(frames_tx);
    *link.sender.write().unwrap_or_else(|e| e.into_inner()) = Some(sender);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        if link.retired.load(Ordering::Acquire) {
            return Err("the node left the list".into());
        }
        let next = tokio::select! {
            next = tokio::time::timeout(SILENCE, body.frame()) => next,
            // The refusal or retirement says why (an empty error: see `run`).
            _ = link.stop.notified() => return Err(String::new()),
        };
        let frame = match next {
            Err(_) => return Err("the event stream went silent".into()),
            Ok(None) => return Err("the node ended the event stream".into()),
            Ok(Some(Err(e))) => return Err(format!("the event stream broke: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(nl + 1).freeze();
            events.line(link, line.slice(..nl));
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies queued attach/detach operations on the node, in order, batching
/// whatever queued up meanwhile into one request.
pub async fn attach_loop(link: Arc<Link>, mut rx: mpsc::UnboundedReceiver<AttachCmd>) {
    while let Some(first) = rx.recv().await {
        let mut cmds = vec![first];
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
            if cmds.len() >= 256 {
                break;
            }
        }
        let ops: Vec<(&str, UserId)> = cmds
            .iter()
            .flat_map(|c| c.ops.iter().map(|&(a, u)| (if a { "a" } else { "d" }, u)))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "ops": ops })).unwrap_or_default();
        let mut lines: Vec<(UserId, Attached)> = Vec::new();
        // A link that is down drops the batch (at once: a new session does
        // not wait for it): the users are re-attached when it comes back.
        if link.is_up()
            && let Ok(resp) = link
                .request(Method::POST, "/cluster/v1/attach", &[], Bytes::from(body))
                .await
            && let Ok((StatusCode::OK, _, bytes)) = read_all(resp).await
        {
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                if let Some(parsed) = parse_attached(&bytes, line) {
                    lines.push(parsed);
                }
            }
        }
        for c in cmds {
            if let Some(reply) = c.reply {
                let mine = lines
                    .iter()
                    .filter(|(u, _)| c.ops.iter().any(|(a, x)| *a && x == u))
                    .cloned()
                    .collect();
                let _ = reply.send(mine);
            }
        }
    }
}

/// `user\tP\tframe` or `user\tH\troom\tseq`.
fn parse_attached(all: &Bytes, line: &[u8]) -> Option<(UserId, Attached)> {
    let mut parts = line.splitn(3, |&b| b == b'\t');
    let user: UserId = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let kind = parts.next()?;
    let rest = parts.next()?;
    match kind {
        b"P" => Some((user, Attached::Presence(all.slice_ref(rest)))),
        b"H" => {
            let (room, seq) = std::str::from_utf8(rest).ok()?.split_once('\t')?;
            Some((user, Attached::Head(room.parse().ok()?, seq.parse().ok()?)))
        }
        _ => None,
    }
}
