//! A minimal HTTP/1.1 keep-alive client for the search benchmark (hyper's
//! client connection API), a FIFO pool of such connections, and URL
//! percent-encoding; WebSockets come from the `confab bench` client.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// No request may take longer than this (a stuck server fails the run).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One keep-alive connection.
pub struct Conn {
    addr: SocketAddr,
    send: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn { addr, send })
    }

    /// One request; the body of the answer, whatever its status.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            self.send
                .ready()
                .await
                .map_err(|e| format!("{path}: connection not ready: {e}"))?;
            let resp = self
                .send
                .send_request(req)
                .await
                .map_err(|e| format!("{path}: {e}"))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{path}: reading the body: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{path}: no answer in {REQUEST_TIMEOUT:?}"))?
    }

    /// A request whose answer must be a success with a JSON body.
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let (status, bytes) = self
            .request(method, path, token, body.map(|b| b.to_string()))
            .await?;
        if !status.is_success() {
            return Err(format!(
                "{path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("{path}: bad JSON: {e}"))
    }
}

/// Keep-alive connections taken and given back in FIFO order, so every one
/// stays in use (the server closes a connection idle for 30 s); a new one is
/// opened when none is free.
#[derive(Clone)]
pub struct Pool {
    addr: SocketAddr,
    free: Arc<Mutex<VecDeque<Conn>>>,
}

impl Pool {
    pub fn new(addr: SocketAddr) -> Pool {
        Pool {
            addr,
            free: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    pub async fn take(&self) -> Result<Conn, String> {
        let conn = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        match conn {
            Some(c) => Ok(c),
            None => Conn::open(self.addr).await,
        }
    }

    pub fn put(&self, conn: Conn) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(conn);
    }
}

pub use confab::bench::client::Ws;

/// Opens a WebSocket, authenticates with `token` and waits for `ready`
/// (the `confab bench` client's handshake).
pub async fn websocket(addr: SocketAddr, token: &str) -> Result<Ws, String> {
    let target = confab::bench::client::Target::at(addr, 1);
    tokio::time::timeout(REQUEST_TIMEOUT, target.ws(0, token))
        .await
        .map_err(|_| "no ready frame".to_string())?
}

/// Percent-encodes a query-string value (everything but RFC 3986's unreserved).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
