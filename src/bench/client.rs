//! The bench's own client side: a small HTTP/1.1 client and WebSocket
//! connections spread over several loopback source addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};

pub type Ws = WebSocket<TokioIo<Upgraded>>;

/// Where the server is, and how to reach it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Spread connections over 127.0.0.1..=127.0.0.N (loopback IPv4 only),
    /// so more than one ephemeral port range's worth of sockets fit (and
    /// the server's per-address limits see N clients, not one).
    pub source_ips: u8,
    /// Turns of the HTTP requests over the source addresses.
    http_turn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Target {
    /// A server at `addr`, reached from `source_ips` loopback addresses.
    pub fn at(addr: SocketAddr, source_ips: u8) -> Target {
        Target {
            addr,
            source_ips: source_ips.max(1),
            http_turn: Default::default(),
        }
    }

    pub async fn resolve(url: &str, source_ips: u8) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--url must start with http:// (got {url})"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let addr = tokio::net::lookup_host(&hostport)
            .await
            .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport} has no address"))?;
        Ok(Target::at(addr, source_ips))
    }

    async fn connect(&self, n: usize) -> std::io::Result<TcpStream> {
        let stream = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && self.source_ips > 1 => {
                let last = 1 + (n % usize::from(self.source_ips)) as u8;
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
                    0,
                ))?;
                socket.connect(self.addr).await?
            }
            _ => TcpStream::connect(self.addr).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// One request on a fresh connection; returns status and JSON body.
    pub async fn http(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), String> {
        let turn = self
            .http_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stream = self
            .connect(turn)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(60), send.send_request(req))
            .await
            .map_err(|_| format!("{path}: no answer in 60 s"))?
            .map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, value))
    }

    pub async fn metrics_text(&self) -> Result<String, String> {
        match self.http(Method::GET, "/metrics", None, None).await? {
            (s, Value::String(text)) if s.is_success() => Ok(text),
            (s, v) => Err(format!("/metrics answered {s}: {v}")),
        }
    }

    /// Opens a WebSocket from source address number `n`, authenticates and
    /// waits for `ready`.
    pub async fn ws(&self, n: usize, token: &str) -> Result<Ws, String> {
        let stream = self.connect(n).await.map_err(|e| format!("connect: {e}"))?;
        let req = Request::builder()
            .uri("/api/v1/ws")
            .header("host", self.addr.to_string())
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let (mut ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        let auth = json!({"type": "auth", "token": token}).to_string();
        ws.write_frame(Frame::text(Payload::Owned(auth.into_bytes())))
            .await
            .map_err(|e| format!("auth: {e}"))?;
        loop {
            let f = ws.read_frame().await.map_err(|e| format!("auth: {e}"))?;
            match f.opcode {
                OpCode::Text => {
                    let v: Value = serde_json::from_slice(&f.payload).unwrap_or(Value::Null);
                    match v["type"].as_str() {
                        Some("ready") => return Ok(ws),
                        Some("error") => return Err(format!("auth refused: {v}")),
                        _ => {}
                    }
                }
                OpCode::Close => return Err("closed during auth".into()),
                _ => {}
            }
        }
    }
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}
