//! Public profiles for rooms across nodes: a room's node must know its
//! members, and a transfer's or a contact's node both users. The proxy
//! reads a profile from its user's node (cached: profiles never change),
//! finds a user by name on the node that owns the name, and puts the
//! profiles on the node that is about to need them.

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::Value;

use super::link::{read_all, upstream_error};
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
        let resp = self.nodes.links[self.nodes.user_node(user)]
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

    /// The id of the user named `name` (any case), from the node that owns
    /// the name.
    pub(super) async fn user_by_name(
        &self,
        asker: UserId,
        name: &str,
    ) -> Result<Option<UserId>, ApiError> {
        if !crate::api::valid_username(name) {
            return Ok(None);
        }
        let node = self
            .nodes
            .node_index(self.nodes.cluster.ring.username_owner(name));
        let resp = self.nodes.links[node]
            .request(
                Method::GET,
                &format!("/api/v1/users?q={name}&limit=50"),
                &[(USER_HEADER, asker.to_string())],
                Bytes::new(),
            )
            .await?;
        let (status, _, body) = read_all(resp).await?;
        if !status.is_success() {
            return Err(upstream_error(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(ApiError::internal)?;
        let lower = name.to_lowercase();
        Ok(v["users"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["username"].as_str() == Some(lower.as_str()))
            .and_then(|u| u["id"].as_str()?.parse().ok()))
    }

    /// Makes sure node `target` has the profiles of `users` (members of a
    /// room it is about to hold). 404 if one does not exist.
    pub(super) async fn put_profiles(
        &self,
        target: usize,
        users: &[UserId],
    ) -> Result<(), ApiError> {
        let mut list = Vec::with_capacity(users.len());
        for &u in users {
            let p = self
                .profile(u)
                .await?
                .ok_or_else(ApiError::user_not_found)?;
            let v: Value = serde_json::from_slice(&p).map_err(ApiError::internal)?;
            list.push(v);
        }
        let body = serde_json::to_vec(&serde_json::json!({ "users": list }))
            .map_err(ApiError::internal)?;
        let resp = self.nodes.links[target]
            .request(Method::POST, "/cluster/v1/profiles", &[], Bytes::from(body))
            .await?;
        let (status, _, body) = read_all(resp).await?;
        if !status.is_success() {
            return Err(upstream_error(status, &body));
        }
        Ok(())
    }
}
