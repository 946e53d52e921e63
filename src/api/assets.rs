//! The browser UI, embedded in the binary with rust-embed.

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use rust_embed::RustEmbed;

use super::shared::Body;

#[derive(RustEmbed)]
#[folder = "web/"]
struct Assets;

/// Serves `path` from `web/`; unknown paths get `index.html` (client routing).
pub fn serve(path: &str) -> Response<Body> {
    let path = path.trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    let (file, name) = match Assets::get(path) {
        Some(f) => (f, path),
        None if !path.contains('.') => match Assets::get("index.html") {
            Some(f) => (f, "index.html"),
            None => return not_found(),
        },
        None => return not_found(),
    };
    let mut resp = Response::new(Body::full(Bytes::from(file.data.into_owned())));
    let mime = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn not_found() -> Response<Body> {
    let mut resp = Response::new(Body::full(Bytes::from_static(b"not found")));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}
