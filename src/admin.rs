//! The local admin channel: a unix socket `<data_dir>/admin.sock` (mode
//! 0600, and the peer's uid must be ours) through which `confab wallet …`,
//! `confab backup` and `confab export` reach a running server. One JSON
//! request line in; out come JSON lines: for `backup`, `{"progress": …}`
//! lines then the answer; for `export`, the export's own JSON Lines (or one
//! `{"error": …}` line); otherwise one answer line. When no server runs, the
//! same commands open the store themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::ReadableDatabase;

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
            Ok(req) if req["cmd"] == "backup" => backup(&state, &req, &mut write).await?,
            Ok(req) if req["cmd"] == "check" => check(&state, &mut write).await?,
            Ok(req) if req["cmd"] == "export" => {
                // The operator's exports count against `export_concurrency`
                // (each is a thread and a snapshot too), not per user.
                match crate::export::scope_of(&req)
                    .and_then(|scope| {
                        let txn = state.store.db.begin_read()?;
                        crate::export::check(&txn, &scope).map(|_| scope)
                    })
                    .and_then(|scope| {
                        let slot = state.exports.admit(None)?;
                        crate::export::spawn(
                            state.store.db.clone(),
                            scope,
                            state.store.transfer_ids.clone(),
                            slot,
                        )
                    }) {
                    Ok(mut rx) => {
                        metrics::counter!("confab_exports_total").increment(1);
                        while let Some(chunk) = rx.recv().await {
                            write.write_all(&chunk).await?;
                        }
                        return write.shutdown().await;
                    }
                    Err(e) => json!({"error": e.message, "code": e.code}),
                }
            }
            Ok(req) => handle(&state.store, &state.writer, &req).await,
            Err(e) => json!({"error": format!("bad request: {e}")}),
        }
    } else {
        json!({"error": "permission denied: not the data directory's owner"})
    };
    write.write_all(format!("{answer}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Takes a backup from a snapshot while the server keeps serving; sends a
/// progress line about every 100 ms. The backup runs on its own thread
/// (see [`crate::backup::run_on_thread`]); while one runs, another is
/// refused.
async fn backup(
    state: &AppState,
    req: &Value,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<Value> {
    let Some(to) = req["to"].as_str().map(PathBuf::from) else {
        return Ok(json!({"error": "backup needs `to`"}));
    };
    if !to.is_absolute() {
        return Ok(json!({"error": "backup needs an absolute path"}));
    }
    let Some(slot) = crate::backup::BackupSlot::try_take() else {
        return Ok(json!({
            "error": "a backup is already running; try again when it has finished",
            "code": "busy",
        }));
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let db = state.store.db.clone();
    let secret = crate::backup::secret_file(&state.config.server.data_dir);
    let on_damage = if req["skip_damaged"] == true {
        crate::backup::OnDamage::Skip
    } else {
        crate::backup::OnDamage::Refuse
    };
    let job = crate::backup::run_on_thread(slot, move || {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let mut last = std::time::Instant::now();
        crate::backup::write(&txn, secret.as_deref(), &to, on_damage, |p| {
            if last.elapsed().as_millis() >= 100 {
                last = std::time::Instant::now();
                let _ = tx.send(p);
            }
        })
    });
    while let Some(p) = rx.recv().await {
        let line = json!({ "progress": p });
        write.write_all(format!("{line}\n").as_bytes()).await?;
    }
    let result = job.await;
    crate::backup::record(result.as_ref());
    Ok(match result {
        Ok(summary) => {
            if summary.damaged_total > 0 {
                tracing::warn!(path = %summary.path, damaged = summary.damaged_total, "backup written without the damaged records (--skip-damaged)");
            } else {
                tracing::info!(path = %summary.path, bytes = summary.bytes, messages = summary.messages, "backup written");
            }
            json!({"ok": true, "backup": summary})
        }
        Err(e) => {
            tracing::error!(error = %e, "backup failed");
            json!({ "error": e })
        }
    })
}

/// Whether a `confab check` is running in this server.
static CHECKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `confab check` while the server runs: the whole store in one snapshot,
/// on its own thread, with progress lines; one at a time. redb's own page
/// checksums are not verified (the server's pages move under a second
/// reader of the file); the answer says so.
async fn check(
    state: &AppState,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<Value> {
    use std::sync::atomic::Ordering;
    if CHECKING
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Ok(
            json!({"error": "a check is already running; try again when it has finished", "code": "busy"}),
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let db = state.store.db.clone();
    let spawned = std::thread::Builder::new()
        .name("confab-check".into())
        .spawn(move || {
            let result = db.begin_read().map_err(|e| e.to_string()).map(|txn| {
                let mut report = crate::store::integrity::check(&txn, &mut |p| {
                    let _ = tx.send(p);
                });
                report.engine = "not checked: the server is running (stop it and run `confab check` for redb's page checksums too)".into();
                report
            });
            CHECKING.store(false, Ordering::Release);
            let _ = done_tx.send(result);
        });
    if let Err(e) = spawned {
        CHECKING.store(false, Ordering::Release);
        return Ok(json!({"error": format!("cannot start a check thread: {e}")}));
    }
    let mut last = std::time::Instant::now();
    while let Some(p) = rx.recv().await {
        if last.elapsed().as_millis() >= 100 {
            last = std::time::Instant::now();
            let line = json!({ "progress": p });
            write.write_all(format!("{line}\n").as_bytes()).await?;
        }
    }
    Ok(match done_rx.await {
        Ok(Ok(report)) => {
            if !report.clean() {
                tracing::warn!(damage = report.damage_total, "confab check: damage found");
            }
            json!({"ok": true, "report": report})
        }
        Ok(Err(e)) => json!({"error": e}),
        Err(_) => json!({"error": "the check thread failed"}),
    })
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
                    .call(|reply| {
                        Op::Wallet(WalletOp::Credit {
                            user,
                            amount,
                            key: None,
                            reply,
                        })
                    })
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
/// `{"progress": …}` lines go to `on_progress`; the first other line is the
/// answer.
pub async fn request(
    data_dir: &Path,
    req: &Value,
    mut on_progress: impl FnMut(&Value),
) -> Option<Result<Value, String>> {
    let stream = UnixStream::connect(socket_path(data_dir)).await.ok()?;
    let (read, mut write) = stream.into_split();
    let exchange = async {
        write
            .write_all(format!("{req}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        write.shutdown().await.map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(read).lines();
        while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
            let v = serde_json::from_str::<Value>(&line)
                .map_err(|e| format!("bad answer from the server: {e}"))?;
            match v.get("progress") {
                Some(p) => on_progress(p),
                None => return Ok(v),
            }
        }
        Err("the server closed the admin connection without an answer".to_string())
    };
    Some(exchange.await)
}

/// Sends an `export` request to a running server and copies its output to
/// `out`; None when none is listening.
pub async fn export_to(
    data_dir: &Path,
    req: &Value,
    out: &mut (dyn std::io::Write + Send),
) -> Option<Result<(), String>> {
    use tokio::io::AsyncReadExt;
    let stream = UnixStream::connect(socket_path(data_dir)).await.ok()?;
    let (mut read, mut write) = stream.into_split();
    let exchange = async {
        write
            .write_all(format!("{req}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        write.shutdown().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 64 << 10];
        let mut first = true;
        loop {
            let n = read.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            // An export starts with its `{"type":"export",…}` line; anything
            // else first is the server's error answer.
            if first && !buf[..n].starts_with(b"{\"type\"") {
                let v: Value = serde_json::from_slice(buf[..n].trim_ascii_end())
                    .map_err(|e| format!("bad answer from the server: {e}"))?;
                return Err(v["error"].as_str().unwrap_or("export failed").to_string());
            }
            first = false;
            out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        }
    };
    Some(exchange.await)
}
