//! The local admin channel: a unix socket `<data_dir>/admin.sock` (mode
//! 0600, and the peer's uid must be ours) through which `confab wallet …`
//! reaches a running server. One JSON request line in, one JSON answer line
//! out. When no server runs, the same commands open the store themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::AppState;
use crate::error::ApiError;
use crate::store::Store;
use crate::store::writer::{Op, WalletOp, WriterHandle};

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

pub fn remove_socket(data_dir: &Path) {
    let _ = std::fs::remove_file(socket_path(data_dir));
}

/// Starts listening on the admin socket (replacing a stale one).
pub fn listen(
    state: Arc<AppState>,
    data_dir: &Path,
) -> Result<tokio::task::JoinHandle<()>, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _ = serve(state, stream).await;
            });
        }
    }))
}

async fn serve(state: Arc<AppState>, stream: UnixStream) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let allowed = stream.peer_cred().map(|c| c.uid() == me).unwrap_or(false);
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let answer = if allowed {
        match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&state.store, &state.writer, &req).await,
            Err(e) => json!({"error": format!("bad request: {e}")}),
        }
    } else {
        json!({"error": "permission denied: not the data directory's owner"})
    };
    write.write_all(format!("{answer}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Runs one admin command against a store and its writer.
pub async fn handle(store: &Store, writer: &WriterHandle, req: &Value) -> Value {
    let result: Result<Value, ApiError> = async {
        match req["cmd"].as_str() {
            Some("credit") => {
                let name = req["user"].as_str().unwrap_or("");
                let Some((user, _)) = store.user_by_name(name)? else {
                    return Err(ApiError::user_not_found());
                };
                let amount = crate::wallet::parse_amount(req.get("amount"))?;
                let user = crate::ids::UserId(user.0);
                let balance = writer
                    .call(|reply| Op::Wallet(WalletOp::Credit { user, amount, reply }))
                    .await?;
                Ok(json!({"ok": true, "user": name.to_lowercase(), "credited": amount, "balance": balance}))
            }
            Some("verify") => Ok(serde_json::to_value(crate::wallet::verify(store)?).map_err(ApiError::internal)?),
            _ => Err(ApiError::bad_request("bad_request", "unknown command")),
        }
    }
    .await;
    result.unwrap_or_else(|e| json!({"error": e.message, "code": e.code}))
}

/// Sends one request to a running server; None when none is listening.
pub async fn request(data_dir: &Path, req: &Value) -> Option<Result<Value, String>> {
    let stream = UnixStream::connect(socket_path(data_dir)).await.ok()?;
    let (read, mut write) = stream.into_split();
    let exchange = async {
        write
            .write_all(format!("{req}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        write.shutdown().await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(read)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str::<Value>(&line).map_err(|e| format!("bad answer from the server: {e}"))
    };
    Some(exchange.await)
}
