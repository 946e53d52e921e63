//! `/api/v1/wallet…`: balance, history, transfers (now, scheduled,
//! recurring) and cancelling. Every change goes through the writer.
//!
//! Transfer ids come and go in their public form only
//! ([`wallet::TransferIds`]); a transfer the caller may not see answers
//! exactly like one that does not exist (404 `transfer_not_found`), so an
//! id tells a stranger nothing.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::shared::{AppState, Body, caller, json, query, read_json};
use crate::error::ApiError;
use crate::store::now_ms;
use crate::wallet;
use crate::writes::{Op, WalletOp};

/// The one answer for a transfer that is missing, malformed or not the
/// caller's to see (the writers' cancel answers the same).
fn not_found() -> ApiError {
    wallet::rules::transfer_not_found()
}

/// The stored id behind a public transfer id.
fn stored_id(state: &AppState, id: &str) -> Result<u64, ApiError> {
    state.storage.transfer_ids().parse(id).ok_or_else(not_found)
}

fn currency(state: &AppState) -> &str {
    &state.config.wallet.wallet_currency
}

/// `GET /api/v1/wallet` → `{balance, currency}`.
pub async fn get(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let me = caller(state, &req).await?;
    let balance = state.storage.balance(me.user).await?;
    json(
        StatusCode::OK,
        &serde_json::json!({"balance": balance, "currency": currency(state)}),
    )
}

/// `GET /api/v1/wallet/transactions?before=ID&limit=N` → newest first.
pub async fn transactions(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let me = caller(state, &req).await?;
    let mut before = None;
    let mut limit = 50usize;
    for (k, v) in query(&req) {
        match k.as_str() {
            "before" => {
                before = Some(state.storage.transfer_ids().parse(&v).ok_or_else(|| {
                    ApiError::bad_request("bad_request", "before must be a transfer id")
                })?)
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=200).contains(l))
                    .ok_or_else(|| ApiError::bad_request("bad_request", "limit must be 1–200"))?
            }
            _ => {}
        }
    }
    let (items, next) = state
        .storage
        .transactions(me.user, before, limit, currency(state))
        .await?;
    json(
        StatusCode::OK,
        &serde_json::json!({"transactions": items, "next_before": next}),
    )
}

/// `POST /api/v1/wallet/transfers`.
pub async fn create(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let me = caller(state, &req).await?;
    let body: serde_json::Value = read_json(state, req).await?;
    let request = wallet::parse_request(&body, me.user, currency(state), now_ms())?;
    let (view, replay) = state
        .storage
        .call(|reply| {
            Op::Wallet(WalletOp::Transfer {
                from: me.user,
                req: request,
                reply,
            })
        })
        .await?;
    json(
        if replay {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        &view,
    )
}

/// `GET /api/v1/wallet/transfers/{id}`.
pub async fn get_transfer(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let me = caller(state, &req).await?;
    let id = stored_id(state, id)?;
    let view = state
        .storage
        .transfer(id, me.user, currency(state))
        .await?
        .ok_or_else(not_found)?;
    json(StatusCode::OK, &view)
}

/// `DELETE /api/v1/wallet/transfers/{id}`: cancels a scheduled transfer.
pub async fn cancel(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let me = caller(state, &req).await?;
    let id = stored_id(state, id)?;
    let view = state
        .storage
        .call(|reply| {
            Op::Wallet(WalletOp::Cancel {
                by: me.user,
                id,
                reply,
            })
        })
        .await?;
    json(StatusCode::OK, &view)
}
