//! Rooms: direct chats and groups, membership.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::shared::{AppState, Body, caller, json, no_content, parse_id, read_json};
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};
use crate::writes::Op;

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum CreateBody {
    Direct {
        user_id: UserId,
    },
    Group {
        name: String,
        member_ids: Vec<UserId>,
    },
}

#[derive(Deserialize)]
struct AddMemberBody {
    user_id: UserId,
}

pub async fn list(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let rooms = state.storage.rooms_of(c.user).await?;
    json(StatusCode::OK, &serde_json::json!({"rooms": rooms}))
}

pub async fn create(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let body: CreateBody = read_json(state, req).await?;
    match body {
        CreateBody::Direct { user_id } => {
            let (room, created) = state
                .storage
                .call(|reply| Op::CreateDirect {
                    a: c.user,
                    b: user_id,
                    reply,
                })
                .await?;
            json(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &room,
            )
        }
        CreateBody::Group { name, member_ids } => {
            let name = name.trim().to_string();
            if !(1..=64).contains(&name.chars().count()) || name.chars().any(char::is_control) {
                return Err(ApiError::bad_request(
                    "invalid_name",
                    "group names are 1–64 characters without control characters",
                ));
            }
            if member_ids.len() > state.config.limits.max_group_members {
                return Err(ApiError::bad_request(
                    "too_many_members",
                    "too many members for one group",
                ));
            }
            let room = state
                .storage
                .call(|reply| Op::CreateGroup {
                    owner: c.user,
                    name,
                    members: member_ids,
                    reply,
                })
                .await?;
            json(StatusCode::CREATED, &room)
        }
    }
}

pub async fn get(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let room: RoomId = parse_id(id)?;
    json(StatusCode::OK, &state.storage.room_for(room, c.user).await?)
}

pub async fn add_member(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let room: RoomId = parse_id(id)?;
    let body: AddMemberBody = read_json(state, req).await?;
    let view = state
        .storage
        .call(|reply| Op::AddMember {
            room,
            by: c.user,
            user: body.user_id,
            reply,
        })
        .await?;
    json(StatusCode::OK, &view)
}

pub async fn remove_member(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
    uid: &str,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let room: RoomId = parse_id(id)?;
    let user: UserId = parse_id(uid)?;
    state
        .storage
        .call(|reply| Op::RemoveMember {
            room,
            by: c.user,
            user,
            reply,
        })
        .await?;
    no_content()
}
