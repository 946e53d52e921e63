//! Scatter-gather: lists (rooms, users) and searches are asked of every
//! node, each answering for what it holds, and merged here — rooms by
//! activity, users by name, search hits by score or time with the paging
//! redone over the merged list. Nodes that do not answer within
//! [`GATHER_TIMEOUT`] are left out and named (`"partial": true`,
//! `"unavailable_nodes"`).

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

use super::link::{node_unavailable, read_all, upstream_error};
use super::state::{GATHER_TIMEOUT, Proxy};
use crate::api::{Body, json};
use crate::error::ApiError;

#[derive(Clone, Copy)]
pub(super) enum Merge {
    Rooms,
    Users,
    Search,
}

/// One node's answer to a scatter-gather: Ok(body) or the node is out.
type Gathered = Result<Value, ApiError>;

/// Lists and searches: every node answers for what it holds; the answers
/// are merged. Nodes that do not answer in 2 s are left out and named
/// (`"partial": true, "unavailable_nodes": [...]`).
pub(super) async fn gather(
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
    for i in 0..p.nodes.links.len() {
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
                let call = p.nodes.links[i].request(Method::GET, &url, &headers, Bytes::new());
                let (status, _, body) = match tokio::time::timeout(GATHER_TIMEOUT, call).await {
                    Ok(Ok(resp)) => {
                        match tokio::time::timeout(GATHER_TIMEOUT, read_all(resp)).await {
                            Ok(r) => r?,
                            Err(_) => return Err(node_unavailable(&p.nodes.links[i].node.id)),
                        }
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(node_unavailable(&p.nodes.links[i].node.id)),
                };
                if status.is_server_error() {
                    return Err(node_unavailable(&p.nodes.links[i].node.id));
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
            _ => unavailable.push(p.nodes.links[i].node.id.clone()),
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
