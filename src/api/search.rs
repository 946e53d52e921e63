//! `GET /api/v1/search`: full-text search over the caller's rooms.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::shared::{AppState, Body, caller, json, query};
use crate::error::ApiError;
use crate::search::{MAX_WINDOW, SearchRequest};

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("bad_request", message)
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ApiError> {
    v.parse()
        .map_err(|_| bad(format!("{name} must be a number, got {v:?}")))
}

pub async fn search(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let me = caller(state, &req).await?;
    let Some(index) = state.search.clone() else {
        return Err(ApiError::busy("search is not available on this server"));
    };
    let mut r = SearchRequest {
        q: String::new(),
        room: None,
        from: None,
        after: None,
        before: None,
        by_time: false,
        limit: 20,
        offset: 0,
    };
    for (k, v) in query(&req) {
        match k.as_str() {
            "q" => r.q = v,
            "room" => r.room = Some(v.parse().map_err(|_| ApiError::bad_id())?),
            "from" => r.from = Some(v.parse().map_err(|_| ApiError::bad_id())?),
            "after" => r.after = Some(number("after", &v)?),
            "before" => r.before = Some(number("before", &v)?),
            "sort" => {
                r.by_time = match v.as_str() {
                    "relevance" => false,
                    "time" => true,
                    _ => return Err(bad("sort must be \"relevance\" or \"time\"")),
                }
            }
            "limit" => r.limit = number("limit", &v)?,
            "offset" => r.offset = number("offset", &v)?,
            _ => {}
        }
    }
    if r.q.trim().is_empty() {
        return Err(bad("q (what to search for) is required"));
    }
    if r.q.chars().count() > 256 {
        return Err(bad("q is longer than 256 characters"));
    }
    if !(1..=50).contains(&r.limit) {
        return Err(bad("limit must be between 1 and 50"));
    }
    if r.offset + r.limit > MAX_WINDOW {
        return Err(bad(format!("offset + limit may not exceed {MAX_WINDOW}")));
    }
    let storage = state.storage.clone();
    let user = me.user;
    // Searching is CPU work: off the async threads, reading the store from
    // there (a blocking thread may wait for the storage's answers).
    let rt = tokio::runtime::Handle::current();
    let resp = tokio::task::spawn_blocking(move || {
        let rooms = rt.block_on(storage.room_ids_of(user))?;
        index.search(&|keys| rt.block_on(storage.messages_at(keys)), &r, &rooms)
    })
    .await
    .map_err(ApiError::internal)??;
    json(StatusCode::OK, &resp)
}
