//! Shared harness for the confab integration tests: start the real server
//! binary on a random port, talk to it over real sockets (HTTP/1.1 and
//! WebSocket), and assert on what a client sees.
//!
//! Everything here follows `docs/PROTOCOL.md`; nothing peeks into the server.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod pg;

use std::collections::VecDeque;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, WebSocketWrite,
};
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::upgrade::Upgraded;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

/// Default bound for "this frame should arrive now" waits.
pub const WAIT: Duration = Duration::from_secs(10);
/// Password used for every test account.
pub const PASSWORD: &str = "correct horse battery";

// ---------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------

/// A running `confab serve` process with its own data directory.
pub struct Server {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: TempDir,
    settings: Vec<String>,
    log: Arc<Mutex<VecDeque<String>>>,
}

const LOG_TAIL: usize = 200;

impl Server {
    /// Starts a server in a fresh temporary data directory. `settings` are
    /// `key=value` config overrides, each passed as `--set key=value`.
    pub fn start(settings: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("confab-test-")
            .tempdir()
            .expect("create temp data dir");
        Server::start_in(dir, settings)
    }

    /// Starts a server on an existing data directory (kept alive by the
    /// returned `Server`).
    pub fn start_in(dir: TempDir, settings: &[&str]) -> Server {
        let settings: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (child, addr) = spawn_server(dir.path(), &settings, &log, "127.0.0.1:0");
        Server {
            addr,
            child: Some(child),
            dir,
            settings,
            log,
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server is not running").id() as i32
    }

    pub fn api(&self) -> Api {
        Api(self.addr)
    }

    /// The last lines the server printed (stdout + stderr), for diagnostics.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for the process to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is not running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "server did not exit within 20 s of SIGTERM\n--- server log ---\n{}",
                        self.log_tail()
                    );
                }
            }
        }
    }

    /// Starts the server again on the same data directory (after `stop` or
    /// `kill9`), with the same settings. The address changes.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() while the server is running"
        );
        let (child, addr) = spawn_server(self.dir.path(), &self.settings, &self.log, "127.0.0.1:0");
        self.child = Some(child);
        self.addr = addr;
    }

    /// Like [`Server::restart`], with other settings.
    pub fn restart_with(&mut self, settings: &[&str]) {
        self.settings = settings.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Like [`Server::restart`], on the same address: clients that reconnect
    /// by themselves (the browser UI) find the server again.
    pub fn restart_same_port(&mut self) {
        assert!(
            self.child.is_none(),
            "restart_same_port() while the server is running"
        );
        let listen = self.addr.to_string();
        let (child, addr) = spawn_server(self.dir.path(), &self.settings, &self.log, &listen);
        self.child = Some(child);
        self.addr = addr;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn push_log(log: &Arc<Mutex<VecDeque<String>>>, line: String) {
    if std::env::var_os("CONFAB_TEST_LOG").is_some() {
        eprintln!("[server] {line}");
    }
    let mut log = log.lock().expect("log lock");
    if log.len() >= LOG_TAIL {
        log.pop_front();
    }
    log.push_back(line);
}

pub fn drain_lines<R: Read + Send + 'static>(
    reader: R,
    log: Arc<Mutex<VecDeque<String>>>,
    ready: Option<std::sync::mpsc::Sender<SocketAddr>>,
) {
    std::thread::spawn(move || {
        let mut ready = ready;
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if let Some(tx) = &ready
                && let Some(rest) = line
                    .strip_prefix("confab listening on http://")
                    .or_else(|| line.strip_prefix("confab proxy listening on http://"))
                && let Ok(addr) = rest.trim().trim_end_matches('/').parse::<SocketAddr>()
            {
                let _ = tx.send(addr);
                ready = None;
            }
            push_log(&log, line);
        }
    });
}

/// Settings that lift the send and frame budgets, for tests that load the
/// server on purpose.
pub const UNLIMITED: [&str; 6] = [
    "send_rate_per_sec=100000",
    "send_burst=100000",
    "user_send_rate_per_sec=100000",
    "user_send_burst=100000",
    "frame_rate_per_sec=100000",
    "frame_burst=100000",
];

/// `confab ARGS` run in `cwd`, hermetic: no ./config.toml from the
/// repository (unless `cwd` has one), no CONFAB_* variables from the
/// caller's environment, no stdin.
pub fn confab_command(args: &[&str], cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONFAB_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// With `CONFAB_TEST_STORAGE=postgres`, the database a server of this
/// data directory stores everything in: a fresh one on the test binary's
/// PostgreSQL server (`pg.rs`) the first time, the same one when a test
/// starts a server on the directory again (its name is kept in the
/// directory). None otherwise, or when the test chose its own storage.
fn test_database(dir: &Path, settings: &[String]) -> Option<String> {
    if std::env::var("CONFAB_TEST_STORAGE").ok().as_deref() != Some("postgres")
        || settings.iter().any(|s| s.starts_with("database_url="))
    {
        return None;
    }
    let kept = dir.join(".test-database-url");
    if let Ok(url) = std::fs::read_to_string(&kept) {
        return Some(url);
    }
    let server = pg::server();
    let conn = server.fresh_database("node");
    let dbname = conn
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .expect("dbname");
    let url = format!("postgresql://postgres@127.0.0.1:{}/{dbname}", server.port());
    std::fs::write(&kept, &url).expect("keep the test database's name");
    Some(url)
}

fn spawn_server(
    data_dir: &Path,
    settings: &[String],
    log: &Arc<Mutex<VecDeque<String>>>,
    listen: &str,
) -> (Child, SocketAddr) {
    // Documented defaults plus `settings`.
    let mut cmd = confab_command(&["serve", "--listen", listen, "--data-dir"], data_dir);
    cmd.arg(data_dir);
    for s in settings {
        cmd.arg("--set").arg(s);
    }
    if let Some(url) = test_database(data_dir, settings) {
        cmd.arg("--set").arg(format!("database_url={url}"));
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn confab binary");
    let (tx, rx) = std::sync::mpsc::channel();
    drain_lines(child.stdout.take().expect("stdout"), log.clone(), Some(tx));
    drain_lines(child.stderr.take().expect("stderr"), log.clone(), None);
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(addr) => (child, addr),
        Err(_) => {
            let status = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            let tail = log
                .lock()
                .expect("log lock")
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "server did not print `confab listening on http://…` within 20 s (exit status: {status:?}); args: {settings:?}\n--- server log ---\n{tail}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Unique names
// ---------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique, valid username (3–32 chars of `[a-z0-9_]`) starting with `prefix`.
pub fn uname(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    let mut s = format!("{prefix}_{r:08x}{n}");
    s.truncate(32);
    s
}

/// A unique client_id.
pub fn cid(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u64 = rand::random();
    format!("{tag}-{r:016x}-{n}")
}

// ---------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------

/// A full HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body parsed as JSON; `Value::Null` for an empty body, a JSON
    /// string holding the text for a non-JSON body.
    pub json: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ascii>").to_string())
    }
}

/// One HTTP/1.1 request on its own connection.
pub async fn try_http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, addr.to_string());
        if !token.is_empty() {
            b = b.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            b = b.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("build request: {e}"))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send_request: {e}"))?;
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("read body: {e}"))?
            .to_bytes();
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
            json,
        })
    };
    match tokio::time::timeout(Duration::from_secs(20), fut).await {
        Ok(r) => r,
        Err(_) => Err("HTTP request timed out after 20 s".into()),
    }
}

/// Asserts an error response: status plus `{"error":{"code":C,"message":string}}`.
#[track_caller]
pub fn assert_err(got: &(StatusCode, Value), status: u16, code: &str) {
    assert_eq!(
        got.0.as_u16(),
        status,
        "expected HTTP {status} `{code}`, got {} {}",
        got.0,
        got.1
    );
    assert_eq!(
        got.1["error"]["code"], code,
        "expected error code `{code}`, got body {}",
        got.1
    );
    assert!(
        got.1["error"]["message"].is_string(),
        "error body must carry a string `message`: {}",
        got.1
    );
}

#[track_caller]
pub fn assert_status(got: &(StatusCode, Value), status: u16) {
    assert_eq!(
        got.0.as_u16(),
        status,
        "expected HTTP {status}, got {} {}",
        got.0,
        got.1
    );
}

/// A registered test user.
#[derive(Clone, Debug)]
pub struct User {
    pub token: String,
    pub id: String,
    pub username: String,
}

/// Small typed wrapper over the HTTP API (copyable into tasks).
#[derive(Clone, Copy, Debug)]
pub struct Api(pub SocketAddr);

impl Api {
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Resp {
        try_http(self.0, method.clone(), path, token, body, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|v| serde_json::to_vec(v).expect("serialize body"));
        let r = self.raw(method, path, token, body, &[]).await;
        (r.status, r.json)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, token, Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, token, None).await
    }

    /// POST /api/v1/signup with the shared test password; must be 201.
    pub async fn signup(&self, username: &str) -> User {
        let r = self
            .post(
                "/api/v1/signup",
                "",
                &json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(
            r.0,
            StatusCode::CREATED,
            "signup {username}: {} {}",
            r.0,
            r.1
        );
        let token = r.1["token"]
            .as_str()
            .expect("signup: token string")
            .to_string();
        let id = r.1["user"]["id"]
            .as_str()
            .expect("signup: user.id string")
            .to_string();
        User {
            token,
            id,
            username: username.to_lowercase(),
        }
    }

    /// Signs up a fresh user whose name starts with `prefix`.
    pub async fn new_user(&self, prefix: &str) -> User {
        self.signup(&uname(prefix)).await
    }

    pub async fn direct_room(&self, token: &str, peer_id: &str) -> Value {
        let r = self
            .post(
                "/api/v1/rooms",
                token,
                &json!({"kind": "direct", "user_id": peer_id}),
            )
            .await;
        assert!(
            r.0 == StatusCode::CREATED || r.0 == StatusCode::OK,
            "create direct room: {} {}",
            r.0,
            r.1
        );
        r.1
    }

    pub async fn group_room(&self, token: &str, name: &str, member_ids: &[&str]) -> Value {
        let r = self
            .post(
                "/api/v1/rooms",
                token,
                &json!({"kind": "group", "name": name, "member_ids": member_ids}),
            )
            .await;
        assert_eq!(
            r.0,
            StatusCode::CREATED,
            "create group room: {} {}",
            r.0,
            r.1
        );
        r.1
    }

    /// POST a message over HTTP; returns (status, body).
    pub async fn post_message(
        &self,
        token: &str,
        room: &str,
        client_id: &str,
        text: &str,
    ) -> (StatusCode, Value) {
        self.post(
            &format!("/api/v1/rooms/{room}/messages"),
            token,
            &json!({"text": text, "client_id": client_id}),
        )
        .await
    }

    /// The whole history of a room, paging with `after`.
    pub async fn history_all(&self, token: &str, room: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut after = 0u64;
        loop {
            let r = self
                .get(
                    &format!("/api/v1/rooms/{room}/messages?after={after}&limit=200"),
                    token,
                )
                .await;
            assert_eq!(
                r.0,
                StatusCode::OK,
                "history of {room} after {after}: {} {}",
                r.0,
                r.1
            );
            let page = r.1["messages"].as_array().expect("messages array").clone();
            if page.is_empty() {
                return out;
            }
            assert!(
                page.len() <= 200,
                "limit=200 returned {} messages",
                page.len()
            );
            after = page
                .last()
                .and_then(|m| m["seq"].as_u64())
                .expect("message has a numeric seq");
            let full = page.len() == 200;
            out.extend(page);
            if !full {
                return out;
            }
        }
    }

    /// The `GET /rooms` entry for `room` as seen by `token`.
    pub async fn room_entry(&self, token: &str, room: &str) -> Value {
        let r = self.get("/api/v1/rooms", token).await;
        assert_eq!(r.0, StatusCode::OK, "GET /rooms: {} {}", r.0, r.1);
        r.1["rooms"]
            .as_array()
            .expect("rooms array")
            .iter()
            .find(|x| x["id"] == room)
            .cloned()
            .unwrap_or_else(|| panic!("room {room} missing from GET /rooms: {}", r.1))
    }
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

/// Runs hyper's background connection tasks on tokio (shared with `browser`).
pub(crate) struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::task::spawn(fut);
    }
}

type Stream = TokioIo<Upgraded>;
type Writer = WebSocketWrite<tokio::io::WriteHalf<Stream>>;

/// Options for opening a WebSocket.
#[derive(Default, Clone)]
pub struct WsOpts {
    /// `Origin` header to send (none by default).
    pub origin: Option<String>,
    /// SO_RCVBUF for the client socket (disables receive autotuning).
    pub recv_buffer: Option<u32>,
}

/// The sending half of a WebSocket client; cheap to clone into tasks.
#[derive(Clone)]
pub struct WsSender {
    writer: Arc<tokio::sync::Mutex<Writer>>,
}

impl WsSender {
    pub async fn try_send_frame(&self, frame: Frame<'static>) -> Result<(), WebSocketError> {
        let mut w = self.writer.lock().await;
        match tokio::time::timeout(WAIT, w.write_frame(frame)).await {
            Ok(r) => r,
            Err(_) => Err(WebSocketError::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            ))),
        }
    }

    pub async fn try_send_json(&self, v: &Value) -> Result<(), WebSocketError> {
        let bytes = serde_json::to_vec(v).expect("serialize frame");
        self.try_send_frame(Frame::text(Payload::Owned(bytes)))
            .await
    }

    pub async fn send_json(&self, v: &Value) {
        self.try_send_json(v)
            .await
            .unwrap_or_else(|e| panic!("WebSocket send of {v} failed: {e}"));
    }

    /// A text frame with arbitrary bytes (may be invalid UTF-8).
    pub async fn send_raw_text(&self, bytes: Vec<u8>) {
        self.try_send_frame(Frame::new(true, OpCode::Text, None, Payload::Owned(bytes)))
            .await
            .expect("WebSocket send of raw text frame");
    }

    pub async fn send_binary(&self, bytes: Vec<u8>) {
        self.try_send_frame(Frame::binary(Payload::Owned(bytes)))
            .await
            .expect("WebSocket send of binary frame");
    }

    /// `{"type":"send",...}`
    pub async fn send_msg(&self, room: &str, client_id: &str, text: &str) {
        self.send_json(
            &json!({"type": "send", "room": room, "client_id": client_id, "text": text}),
        )
        .await;
    }
}

/// A WebSocket client. A background task reads frames into a queue (answering
/// pings and echoing close frames); reading can be paused to simulate a slow
/// client.
pub struct Ws {
    tx: WsSender,
    rx: mpsc::UnboundedReceiver<Value>,
    pause: watch::Sender<bool>,
    reader: tokio::task::JoinHandle<()>,
    /// Frames skipped by `recv_until`, newest last (for diagnostics).
    pub skipped: VecDeque<Value>,
    ended: bool,
}

/// Marker types the reader puts in the queue for non-JSON events.
pub const CLOSE: &str = "__close";
pub const EOF: &str = "__eof";

pub fn is_end(v: &Value) -> bool {
    v["type"] == CLOSE || v["type"] == EOF
}

pub fn is_type(v: &Value, ty: &str) -> bool {
    v["type"] == ty
}

impl Ws {
    pub async fn connect(addr: SocketAddr) -> Ws {
        Ws::connect_with(addr, WsOpts::default())
            .await
            .unwrap_or_else(|e| panic!("WebSocket connect to {addr}: {e}"))
    }

    pub async fn connect_with(addr: SocketAddr, opts: WsOpts) -> Result<Ws, String> {
        let fut = async {
            let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
            if let Some(n) = opts.recv_buffer {
                socket.set_recv_buffer_size(n).map_err(|e| e.to_string())?;
            }
            let stream = socket
                .connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let mut b = Request::builder()
                .method("GET")
                .uri(format!("http://{addr}/api/v1/ws"))
                .header(HOST, addr.to_string())
                .header(hyper::header::UPGRADE, "websocket")
                .header(hyper::header::CONNECTION, "upgrade")
                .header(
                    "Sec-WebSocket-Key",
                    fastwebsockets::handshake::generate_key(),
                )
                .header("Sec-WebSocket-Version", "13");
            if let Some(o) = &opts.origin {
                b = b.header(hyper::header::ORIGIN, o.as_str());
            }
            let req = b
                .body(http_body_util::Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let (ws, _resp) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            Ok::<_, String>(ws)
        };
        let ws = tokio::time::timeout(WAIT, fut)
            .await
            .map_err(|_| "WebSocket handshake timed out".to_string())??;
        let (rd, wr) = ws.split(tokio::io::split);
        let writer = Arc::new(tokio::sync::Mutex::new(wr));
        let (qtx, qrx) = mpsc::unbounded_channel();
        let (ptx, prx) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            FragmentCollectorRead::new(rd),
            writer.clone(),
            qtx,
            prx,
        ));
        Ok(Ws {
            tx: WsSender { writer },
            rx: qrx,
            pause: ptx,
            reader,
            skipped: VecDeque::new(),
            ended: false,
        })
    }

    /// Connects and authenticates; returns the `ready` frame.
    pub async fn connect_auth(addr: SocketAddr, token: &str) -> Ws {
        let mut ws = Ws::connect(addr).await;
        ws.auth(token, json!({})).await;
        ws
    }

    pub fn sender(&self) -> WsSender {
        self.tx.clone()
    }

    pub async fn send_json(&self, v: &Value) {
        self.tx.send_json(v).await
    }

    pub async fn send_raw_text(&self, bytes: Vec<u8>) {
        self.tx.send_raw_text(bytes).await
    }

    pub async fn send_binary(&self, bytes: Vec<u8>) {
        self.tx.send_binary(bytes).await
    }

    pub async fn send_msg(&self, room: &str, client_id: &str, text: &str) {
        self.tx.send_msg(room, client_id, text).await
    }

    pub async fn try_send_frame(&self, frame: Frame<'static>) -> Result<(), WebSocketError> {
        self.tx.try_send_frame(frame).await
    }

    /// Stop reading from the socket (at most one more frame is read).
    pub fn pause_reading(&self) {
        let _ = self.pause.send(true);
    }

    pub fn resume_reading(&self) {
        let _ = self.pause.send(false);
    }

    /// The next frame (JSON value, or a `__close`/`__eof` marker), or `None`
    /// if nothing arrived within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Value> {
        if self.ended {
            return Some(json!({"type": EOF, "error": "connection already ended"}));
        }
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(v)) => {
                if is_end(&v) {
                    self.ended = true;
                }
                Some(v)
            }
            Ok(None) => {
                self.ended = true;
                Some(json!({"type": EOF, "error": "reader ended"}))
            }
            Err(_) => None,
        }
    }

    /// The next frame, which must arrive within `WAIT`.
    pub async fn next(&mut self) -> Value {
        match self.recv(WAIT).await {
            Some(v) => v,
            None => panic!("no frame arrived within {WAIT:?}"),
        }
    }

    /// Skips frames until one matches `pred`. Returns `None` on timeout or when
    /// the connection ended without a match (skipped frames are kept in
    /// `self.skipped`).
    pub async fn recv_until(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.recv(left).await?;
            if pred(&v) {
                return Some(v);
            }
            let end = is_end(&v);
            self.skipped.push_back(v);
            if self.skipped.len() > 50 {
                self.skipped.pop_front();
            }
            if end {
                return None;
            }
        }
    }

    /// Like `recv_until` with `WAIT`, panicking (with the recently skipped
    /// frames) when no match arrives.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        match self.recv_until(pred, WAIT).await {
            Some(v) => v,
            None => panic!(
                "expected {what} within {WAIT:?}; recently skipped frames: {:?}",
                self.skipped
            ),
        }
    }

    /// Waits for a frame of the given type.
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let what = format!("a `{ty}` frame");
        self.expect(&what, |v| v["type"] == ty).await
    }

    /// Waits for an `error` frame; fails if an ack arrives first.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self
            .expect(&format!("error `{code}`"), |v| {
                v["type"] == "error" || v["type"] == "ack" || is_end(v)
            })
            .await;
        assert_eq!(v["type"], "error", "expected error `{code}`, got {v}");
        assert_eq!(v["code"], code, "expected error code `{code}`, got {v}");
        assert!(
            v["message"].is_string(),
            "error frame must have a string message: {v}"
        );
        v
    }

    /// Waits for an `error` frame with one of `codes`; fails if an ack arrives first.
    pub async fn expect_error_any(&mut self, codes: &[&str]) -> Value {
        let v = self
            .expect(&format!("error {codes:?}"), |v| {
                v["type"] == "error" || v["type"] == "ack" || is_end(v)
            })
            .await;
        assert_eq!(v["type"], "error", "expected error {codes:?}, got {v}");
        assert!(
            codes.iter().any(|c| v["code"] == *c),
            "expected one of {codes:?}, got {v}"
        );
        v
    }

    /// Waits for the server to close the connection; returns the close code
    /// (`None` if the connection ended without a close frame).
    pub async fn expect_close(&mut self) -> Option<u64> {
        let v = self.expect("the connection to close", is_end).await;
        if v["type"] == CLOSE {
            Some(v["code"].as_u64().unwrap_or(0))
        } else {
            None
        }
    }

    /// Sends `auth` and asserts the first frame back is `ready`.
    pub async fn auth(&mut self, token: &str, resume: Value) -> Value {
        self.send_json(&json!({"type": "auth", "token": token, "resume": resume}))
            .await;
        let v = self.next().await;
        assert_eq!(
            v["type"], "ready",
            "the first frame after auth must be `ready`, got {v}"
        );
        assert!(v["user"]["id"].is_string(), "ready.user.id missing: {v}");
        v
    }

    /// Sends a message and waits for its ack (panics on an error frame for it).
    pub async fn send_and_ack(&mut self, room: &str, client_id: &str, text: &str) -> Value {
        self.send_msg(room, client_id, text).await;
        self.expect_ack(client_id).await
    }

    pub async fn expect_ack(&mut self, client_id: &str) -> Value {
        let v = self
            .expect(&format!("ack for `{client_id}`"), |v| {
                (v["type"] == "ack" && v["client_id"] == client_id)
                    || v["type"] == "error"
                    || is_end(v)
            })
            .await;
        assert_eq!(v["type"], "ack", "expected ack for `{client_id}`, got {v}");
        v
    }

    /// `ping` → `pong` round trip (proves the connection still works and that
    /// every frame sent before it was processed).
    pub async fn ping(&mut self) {
        self.send_json(&json!({"type": "ping"})).await;
        self.expect_type("pong").await;
    }

    /// Sends a close frame (1000) and drops the connection.
    pub async fn close(self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.tx.try_send_frame(Frame::close(1000, b"bye")),
        )
        .await;
        drop(self);
    }
}

impl Drop for Ws {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    mut rd: FragmentCollectorRead<tokio::io::ReadHalf<Stream>>,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    q: mpsc::UnboundedSender<Value>,
    mut pause: watch::Receiver<bool>,
) {
    loop {
        while *pause.borrow_and_update() {
            if pause.changed().await.is_err() {
                return;
            }
        }
        let w = writer.clone();
        let mut send_fn = move |f: Frame<'static>| {
            let w = w.clone();
            let fut: Pin<Box<dyn Future<Output = Result<(), WebSocketError>> + Send>> =
                Box::pin(async move {
                    // Best effort (pong / close echo): if the server already
                    // reset the connection, still deliver the frame we read.
                    let _ = w.lock().await.write_frame(f).await;
                    Ok(())
                });
            fut
        };
        let ev = match rd.read_frame(&mut send_fn).await {
            Ok(frame) => match frame.opcode {
                OpCode::Text => match serde_json::from_slice::<Value>(&frame.payload) {
                    Ok(v) => v,
                    Err(_) => {
                        json!({"type": "__text", "text": String::from_utf8_lossy(&frame.payload)})
                    }
                },
                OpCode::Binary => json!({"type": "__binary", "len": frame.payload.len()}),
                OpCode::Close => {
                    let p = &frame.payload[..];
                    let code = if p.len() >= 2 {
                        Value::from(u16::from_be_bytes([p[0], p[1]]))
                    } else {
                        Value::Null
                    };
                    let reason = if p.len() > 2 {
                        String::from_utf8_lossy(&p[2..]).into_owned()
                    } else {
                        String::new()
                    };
                    let _ = q.send(json!({"type": CLOSE, "code": code, "reason": reason}));
                    return;
                }
                _ => continue,
            },
            Err(e) => {
                let _ = q.send(json!({"type": EOF, "error": e.to_string()}));
                return;
            }
        };
        if q.send(ev).is_err() {
            return;
        }
    }
}

/// Base64url (no padding) helpers for JWT tests.
pub fn b64url_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .expect("base64url decode")
}

pub fn b64url_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}
