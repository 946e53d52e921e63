//! The proxy's own health: `/status` (an HTML page) and `/api/v1/status`
//! (JSON) — its sessions, connections, and each node's link (up, round
//! trip, requests in flight, events, last error) — `/metrics`, the
//! recorder's metrics plus the per-node link gauges, and `/readyz`.

use std::sync::atomic::Ordering;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;

use super::state::Proxy;
use crate::api::Body;

/// `GET /readyz`: 200 only when every node's link is up; until then (at
/// start, or while a link reconnects) 503 naming the nodes that are down,
/// with `Retry-After`, so a load balancer sends nothing here that would
/// meet `node_unavailable`.
pub(super) fn readiness(p: &Proxy) -> Result<Response<Body>, crate::error::ApiError> {
    let links = p.nodes.current();
    let down: Vec<&str> = links
        .iter()
        .filter(|l| !l.is_up())
        .map(|l| l.node.id.as_str())
        .collect();
    let (status, body) = if down.is_empty() {
        (
            StatusCode::OK,
            serde_json::json!({"status": "ready", "role": "proxy", "nodes": links.len()}),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "role": "proxy", "down": down}),
        )
    };
    let mut r = crate::api::json(status, &body)?;
    if status != StatusCode::OK {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(r)
}

pub(super) fn status_json(p: &Proxy) -> Value {
    let nodes: Vec<Value> = p
        .nodes
        .current()
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

pub(super) fn status_page(p: &Proxy) -> Response<Body> {
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

pub(super) fn metrics_page(p: &Proxy) -> Response<Body> {
    use std::fmt::Write;
    let mut out = p.metrics.render();
    let links = p.nodes.current();
    out.push_str("# HELP confab_proxy_node_link_up Whether the proxy's link to the node is up.\n# TYPE confab_proxy_node_link_up gauge\n");
    for l in &links {
        let _ = writeln!(
            out,
            "confab_proxy_node_link_up{{node=\"{}\"}} {}",
            l.node.id,
            u8::from(l.is_up())
        );
    }
    out.push_str("# HELP confab_proxy_node_rtt_seconds The last request's round trip to the node.\n# TYPE confab_proxy_node_rtt_seconds gauge\n");
    for l in &links {
        let _ = writeln!(
            out,
            "confab_proxy_node_rtt_seconds{{node=\"{}\"}} {}",
            l.node.id,
            l.rtt_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
    out.push_str("# HELP confab_proxy_node_in_flight Requests to the node awaiting an answer.\n# TYPE confab_proxy_node_in_flight gauge\n");
    for l in &links {
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
