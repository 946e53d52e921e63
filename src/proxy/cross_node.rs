//! Requests whose node the proxy must work out, or prepare, first: signup
//! and login go to the node that owns the username; a direct chat to the
//! node its id names, a group to the next node in turn; a transfer to the
//! wallet node; a contact or a new member to the node that will hold them —
//! each after that node got the profiles of the users involved.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use serde_json::Value;

use super::forward::{forward_parts, json_request, whole_request};
use super::placement::pick_node;
use super::state::Proxy;
use crate::api::Body;
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};

/// Signup and login go to the node that owns the username.
pub(super) async fn by_username(
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
    let node = p
        .nodes
        .node_index(p.nodes.cluster.ring.username_owner(name));
    forward_parts(p, node, &parts, body, false).await
}

fn parse_user(v: &Value) -> Result<UserId, ApiError> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::bad_request("invalid_json", "user ids are 16 hex digits"))
}

/// `POST /rooms`: a direct chat goes to the node its id (derived from the
/// pair) names, a group to the next node in turn (which picks an id it
/// owns); that node first gets the members' profiles.
pub(super) async fn create_room(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let caller = p.caller(&req)?;
    let (parts, body, v) = json_request(p, req).await?;
    let (target, mut members) = match v["kind"].as_str() {
        Some("direct") => {
            let peer = parse_user(&v["user_id"])?;
            (
                p.nodes.room_node(RoomId::direct(caller.user, peer)),
                vec![peer],
            )
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
            (pick_node(&p.nodes)?, ids)
        }
        // Anything else: the caller's node explains what is wrong.
        _ => (p.nodes.user_node(caller.user), Vec::new()),
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
pub(super) async fn transfer(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let caller = p.caller(&req)?;
    let (parts, body) = whole_request(p, req).await?;
    let target = p.nodes.wallet_node();
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
pub(super) async fn add_contact(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let caller = p.caller(&req)?;
    let (parts, body) = whole_request(p, req).await?;
    let target = p.nodes.user_node(caller.user);
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

pub(super) async fn add_member(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    p.caller(&req)?;
    let room: RoomId = id.parse().map_err(|_| ApiError::bad_id())?;
    let (parts, body, v) = json_request(p, req).await?;
    let user = parse_user(&v["user_id"])?;
    let target = p.nodes.room_node(room);
    p.put_profiles(target, &[user]).await?;
    forward_parts(p, target, &parts, body, false).await
}
