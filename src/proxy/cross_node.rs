//! Requests whose node the proxy works out from their body: signup and
//! login go to the node that serves the username (spreading the password
//! hashing over the nodes); a direct chat to the node that serves the room
//! its id (derived from the pair) names, a group to the next node in turn.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};

use super::forward::{forward_parts, json_request};
use super::placement::pick_node;
use super::state::Proxy;
use crate::api::Body;
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};

/// Signup and login go to the node that serves the username, with the
/// client's address (what the login and signup limits count).
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
    let node = p.nodes.name_node(v["username"].as_str().unwrap_or(""));
    forward_parts(p, node, &parts, body, false).await
}

/// `POST /rooms`: a direct chat goes to the node that serves the room its
/// id (derived from the pair) names, so that two proxies creating it at
/// once ask the same node; a group to the next node in turn.
pub(super) async fn create_room(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let caller = p.caller(&req)?;
    let (parts, body, v) = json_request(p, req).await?;
    let peer = v["user_id"].as_str().and_then(|s| s.parse::<UserId>().ok());
    let target = match (v["kind"].as_str(), peer) {
        (Some("direct"), Some(peer)) => p.nodes.room_node(RoomId::direct(caller.user, peer)),
        (Some("group"), _) => pick_node(&p.nodes)?,
        // Anything else: the caller's node explains what is wrong.
        _ => p.nodes.user_node(caller.user),
    };
    forward_parts(p, target, &parts, body, false).await
}
