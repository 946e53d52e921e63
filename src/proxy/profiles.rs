//! The public profile a new WebSocket session starts with (its `ready`
//! frame), read from the node that serves the user and cached (profiles
//! never change).

use bytes::Bytes;
use hyper::{Method, StatusCode};

use super::link::read_all;
use super::state::Proxy;
use crate::cluster::link::USER_HEADER;
use crate::error::ApiError;
use crate::ids::UserId;

impl Proxy {
    /// A user's public profile (JSON) from their node; None if unknown.
    pub async fn profile(&self, user: UserId) -> Result<Option<Bytes>, ApiError> {
        if let Some(p) = self
            .profiles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&user)
        {
            return Ok(Some(p.clone()));
        }
        let resp = self
            .nodes
            .link(self.nodes.user_node(user))
            .request(
                Method::GET,
                &format!("/api/v1/users/{user}"),
                &[(USER_HEADER, user.to_string())],
                Bytes::new(),
            )
            .await?;
        let (status, _, body) = read_all(resp).await?;
        match status {
            StatusCode::OK => {
                let mut cache = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() > 100_000 {
                    cache.clear();
                }
                cache.insert(user, body.clone());
                Ok(Some(body))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(ApiError::new(
                s,
                "node_error",
                format!("the user's node answered {s}"),
            )),
        }
    }
}
