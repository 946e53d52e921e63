//! The bench's users and rooms, created over the public API (signup, or
//! login when a previous run left the user behind) and kept between
//! steps: each step adds only what it is missing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;

use super::args::BenchArgs;
use super::client::Target;

const PASSWORD: &str = "bench-password-1";

#[derive(Clone)]
pub(super) struct BenchUser {
    pub(super) token: String,
    pub(super) id: String,
}

/// Users and rooms created so far; steps reuse them and add what is missing.
#[derive(Default)]
pub(super) struct Seed {
    pub(super) users: Vec<BenchUser>,
    /// Rooms over consecutive users: room j holds users [j*k, (j+1)*k).
    pub(super) rooms: Vec<String>,
}

impl Seed {
    pub(super) async fn ensure(
        &mut self,
        target: &Target,
        args: &BenchArgs,
        n: usize,
    ) -> Result<(), String> {
        if self.users.len() < n {
            let started = Instant::now();
            let from = self.users.len();
            let mut tasks = tokio::task::JoinSet::new();
            let gate = Arc::new(tokio::sync::Semaphore::new(16));
            for i in from..n {
                let (target, gate) = (target.clone(), gate.clone());
                let name = format!("{}{i}", args.prefix);
                tasks.spawn(async move {
                    let _permit = gate.acquire().await;
                    (i, sign_up_or_in(&target, &name).await)
                });
            }
            let mut got: Vec<(usize, BenchUser)> = Vec::new();
            while let Some(r) = tasks.join_next().await {
                let (i, u) = r.map_err(|e| e.to_string())?;
                got.push((i, u?));
            }
            got.sort_by_key(|(i, _)| *i);
            self.users.extend(got.into_iter().map(|(_, u)| u));
            if !args.quiet {
                eprintln!(
                    "seeded users {from}..{n} in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let k = args.room_size;
        for j in self.rooms.len()..n / k {
            let members = &self.users[j * k..(j + 1) * k];
            let body = if k == 2 {
                json!({"kind": "direct", "user_id": members[1].id})
            } else {
                let ids: Vec<&str> = members[1..].iter().map(|m| m.id.as_str()).collect();
                json!({"kind": "group", "name": format!("bench group {j}"), "member_ids": ids})
            };
            let (status, v) = target
                .http(
                    Method::POST,
                    "/api/v1/rooms",
                    Some(&members[0].token),
                    Some(&body),
                )
                .await?;
            let id = v["id"]
                .as_str()
                .filter(|_| status.is_success())
                .ok_or_else(|| format!("creating room {j} failed: {status} {v}"))?;
            self.rooms.push(id.to_string());
        }
        Ok(())
    }
}

pub(super) async fn sign_up_or_in(target: &Target, name: &str) -> Result<BenchUser, String> {
    let body = json!({"username": name, "password": PASSWORD});
    // The server's admission limits (hashes per address, the hash queue)
    // answer 429/503 when the seeding runs ahead of its password hasher:
    // wait and try again, for up to a minute.
    let mut tries = 0;
    let (status, v) = loop {
        let (status, v) = target
            .http(Method::POST, "/api/v1/signup", None, Some(&body))
            .await?;
        let (status, v) = if status == StatusCode::CONFLICT {
            target
                .http(Method::POST, "/api/v1/login", None, Some(&body))
                .await?
        } else {
            (status, v)
        };
        let busy =
            status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
        tries += 1;
        if !busy || tries >= 600 {
            break (status, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match (v["token"].as_str(), v["user"]["id"].as_str()) {
        (Some(token), Some(id)) if status.is_success() => Ok(BenchUser {
            token: token.to_string(),
            id: id.to_string(),
        }),
        _ => Err(format!("cannot sign up or log in {name}: {status} {v}")),
    }
}
