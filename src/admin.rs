//! The local admin channel: a unix socket `<data_dir>/admin.sock` (mode
//! 0600, and the peer's uid must be ours) through which `confab wallet …`,
//! `confab backup` and `confab export` reach a running server. One JSON
//! request line in; out come JSON lines: for `backup`, `{"progress": …}`
//! lines then the answer; for `export`, the export's own JSON Lines (or one
//! `{"error": …}` line); otherwise one answer line. When no server runs, the
//! same commands open the store themselves.
//!
//! Faults: the accept loop backs off when accepting fails (out of file
//! descriptors); a request whose client has already gone (it gave up after
//! its `--timeout`) is not run; an online backup whose client goes away is
//! cancelled. The client side bounds every wait for the server (connection,
//! answer, next progress line or export data) and says which one failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};

use crate::api::AppState;
use crate::error::ApiError;
use crate::storage::Storage;
use crate::writes::{Op, WalletOp};

/// How long a client has to send its request line: a connection that sends
/// nothing would otherwise hold a task and a file descriptor for ever.
const REQUEST_WAIT: Duration = Duration::from_secs(30);
/// The longest request line read (requests are a few hundred bytes).
const MAX_REQUEST: u64 = 64 << 10;
/// How often a running online backup checks that its client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(100);
/// At most one progress line per this interval.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(crate::config::ADMIN_SOCKET)
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
        let mut backoff = crate::limits::AcceptBackoff::new("admin socket");
        // Whether a `confab check` runs now (one at a time).
        let checking = Arc::new(AtomicBool::new(false));
        loop {
            if let Some((stream, _)) = backoff.accepted(listener.accept().await).await {
                let (state, checking) = (state.clone(), checking.clone());
                tokio::spawn(async move {
                    let _ = serve(state, &checking, stream).await;
                });
            }
        }
    }))
}

/// Whether the client at the other end has closed its socket. Every
/// `confab` client shuts down its sending side after its request, which
/// only ends our reading (POLLRDHUP); POLLHUP comes when it has closed the
/// socket altogether — exited, been killed, or given up after its timeout.
fn client_gone(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: poll(2) on one descriptor that `stream` owns for the whole
    // call, without waiting; POLLHUP and POLLERR are reported unasked.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

async fn serve(
    state: Arc<AppState>,
    checking: &Arc<AtomicBool>,
    stream: UnixStream,
) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let allowed = stream.peer_cred().map(|c| c.uid() == me).unwrap_or(false);
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    match tokio::time::timeout(REQUEST_WAIT, reader.read_line(&mut line)).await {
        Ok(read) => read?,
        Err(_) => return Ok(()),
    };
    let answer = if allowed {
        match serde_json::from_str::<Value>(&line) {
            // A client that gave up waiting (`--timeout`) is not there to
            // hear the answer: a credit run now would be one its operator
            // was told is unconfirmed, and may well repeat.
            Ok(req) if client_gone(write.as_ref()) => {
                tracing::warn!(cmd = %req["cmd"], "admin request not run: its client went away before it ran (a `confab` command that timed out?)");
                return Ok(());
            }
            Ok(req) if req["cmd"] == "backup" => backup(&state, &req, &mut write).await?,
            Ok(req) if req["cmd"] == "check" => check(&state, checking, &mut write).await?,
            Ok(req) if req["cmd"] == "export" => return export(&state, &req, &mut write).await,
            Ok(req) => handle(&*state.storage, &req).await,
            Err(e) => json!({"error": format!("bad request: {e}")}),
        }
    } else {
        json!({"error": "permission denied: not the data directory's owner"})
    };
    write.write_all(format!("{answer}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Streams an export's JSON Lines to the client (or answers its error).
async fn export(state: &AppState, req: &Value, write: &mut OwnedWriteHalf) -> std::io::Result<()> {
    // The operator's exports count against `export_concurrency` (each is a
    // thread and a snapshot too), not per user.
    let started = match crate::export::scope_of(req) {
        Ok(scope) => match state.exports.admit(None) {
            Ok(slot) => state.storage.export(scope, slot).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let mut rx = match started {
        Ok(rx) => rx,
        Err(e) => {
            let answer = json!({"error": e.message, "code": e.code});
            write.write_all(format!("{answer}\n").as_bytes()).await?;
            return write.shutdown().await;
        }
    };
    metrics::counter!("confab_exports_total").increment(1);
    // A client that takes nothing for the stall time loses its export, as
    // over HTTP; without the limit this task (and its descriptor) would
    // wait on a stopped client for ever after the export thread gave up.
    let stall = Duration::from_secs(state.config.limits.export_stall_secs);
    while let Some(chunk) = rx.recv().await {
        tokio::time::timeout(stall, write.write_all(&chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    }
    write.shutdown().await
}

/// Takes a backup from a snapshot while the server keeps serving; sends a
/// progress line when the backup starts, then at most every 100 ms. The
/// backup runs on its own thread (see [`crate::backup::run_on_thread`]);
/// while one runs, another is refused. When the client goes away (killed,
/// or gave up after its `--timeout`), the backup is cancelled: nobody would
/// receive it, its snapshot keeps redb from reusing pages and its slot
/// would refuse the operator's next try. Its partial file is removed.
async fn backup(
    state: &AppState,
    req: &Value,
    write: &mut OwnedWriteHalf,
) -> std::io::Result<Value> {
    let Some(to) = req["to"].as_str().map(PathBuf::from) else {
        return Ok(json!({"error": "backup needs `to`"}));
    };
    if !to.is_absolute() {
        return Ok(json!({"error": "backup needs an absolute path"}));
    }
    let db = match state.embedded("a backup") {
        Ok(store) => store.db.clone(),
        Err(e) => return Ok(json!({"error": e.message, "code": e.code})),
    };
    let Some(slot) = state.backups.try_take() else {
        return Ok(json!({
            "error": "a backup is already running; try again when it has finished",
            "code": "busy",
        }));
    };
    // The latest progress only: the backup thread never waits for the
    // client, and nothing piles up behind a slow one.
    let (tx, mut rx) = tokio::sync::watch::channel(None::<crate::backup::Progress>);
    let cancel = Arc::new(AtomicBool::new(false));
    let secret = crate::backup::secret_file(&state.config.server.data_dir);
    let on_damage = if req["skip_damaged"] == true {
        crate::backup::OnDamage::Skip
    } else {
        crate::backup::OnDamage::Refuse
    };
    let job = {
        let (cancel, to) = (cancel.clone(), to.clone());
        crate::backup::run_on_thread(slot, move || {
            db.damage().scope(|| {
                let txn = db.begin_read().map_err(|e| e.to_string())?;
                crate::backup::write_cancellable(
                    &txn,
                    secret.as_deref(),
                    &to,
                    on_damage,
                    &cancel,
                    |p| {
                        tx.send_replace(Some(p));
                    },
                )
            })
        })
    };
    tokio::pin!(job);
    let mut check = tokio::time::interval(CLIENT_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_line = tokio::time::Instant::now();
    let mut gone: Option<String> = None;
    let result = loop {
        let (progress_rx, at) = (&mut rx, next_line);
        // Waits first, then for a change: `changed` marks the value seen
        // only as it completes, which ends this future, so a change is
        // never lost when another branch wins.
        let progress = async move {
            tokio::time::sleep_until(at).await;
            if progress_rx.changed().await.is_err() {
                // The thread has ended; its result is on its way.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = &mut job => {
                // The last figures (the bar ends at 100%); a failed write
                // shows again in the answer's.
                let latest = *rx.borrow_and_update();
                if let (Ok(_), Some(p)) = (&r, latest) {
                    let line = json!({ "progress": p });
                    let _ = write.write_all(format!("{line}\n").as_bytes()).await;
                }
                break r;
            }
            _ = check.tick() => {
                if client_gone(write.as_ref()) {
                    gone = Some("its connection closed".into());
                }
            }
            () = progress => {
                let latest = *rx.borrow_and_update();
                if let Some(p) = latest {
                    let line = json!({ "progress": p });
                    if let Err(e) = write.write_all(format!("{line}\n").as_bytes()).await {
                        gone = Some(format!("a progress line could not be written: {e}"));
                    }
                    next_line = tokio::time::Instant::now() + PROGRESS_EVERY;
                }
            }
        }
        if gone.is_some() {
            cancel.store(true, Ordering::Relaxed);
            break (&mut job).await;
        }
    };
    if let Some(why) = gone {
        match &result {
            Err(e) if e == crate::backup::CANCELLED => {
                metrics::counter!("confab_backups_total", "outcome" => "cancelled").increment(1);
                tracing::warn!(path = %to.display(), why = %why, "backup cancelled: its `confab backup` client went away; the partial file is removed");
            }
            Ok(summary) => {
                crate::backup::record(Ok(summary));
                tracing::info!(path = %summary.path, why = %why, "backup written, but its client went away before the answer");
            }
            Err(e) => {
                crate::backup::record(Err(e));
                tracing::warn!(error = %e, "backup failed");
            }
        }
        return Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the backup's client went away",
        ));
    }
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

/// `confab check` while the server runs: the whole store in one snapshot,
/// on its own thread, with progress lines; one at a time (`checking`: one
/// runs now). redb's own page checksums are not verified (the server's
/// pages move under a second reader of the file); the answer says so.
async fn check(
    state: &AppState,
    checking: &Arc<AtomicBool>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<Value> {
    let db = match state.embedded("`confab check`") {
        Ok(store) => store.db.clone(),
        Err(e) => return Ok(json!({"error": e.message, "code": e.code})),
    };
    if checking
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Ok(
            json!({"error": "a check is already running; try again when it has finished", "code": "busy"}),
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let running = checking.clone();
    let spawned = std::thread::Builder::new()
        .name("confab-check".into())
        .spawn(move || {
            let result = db.damage().scope(|| {
                db.begin_read().map_err(|e| e.to_string()).map(|txn| {
                    let mut report = crate::store::integrity::check(&txn, &crate::storage::embedded::ledger_check, &mut |p| {
                        let _ = tx.send(p);
                    });
                    report.engine = "not checked: the server is running (stop it and run `confab check` for redb's page checksums too)".into();
                    report
                })
            });
            running.store(false, Ordering::Release);
            let _ = done_tx.send(result);
        });
    if let Err(e) = spawned {
        checking.store(false, Ordering::Release);
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

/// Runs one admin command against a storage.
pub async fn handle(storage: &dyn Storage, req: &Value) -> Value {
    let result: Result<Value, ApiError> = async {
        match req["cmd"].as_str() {
            Some("credit") => {
                let name = req["user"].as_str().unwrap_or("");
                let Some((user, _)) = storage.user_by_name(name).await? else {
                    return Err(ApiError::user_not_found());
                };
                let amount = crate::wallet::parse_amount(req.get("amount"))?;
                let user = crate::ids::UserId(user.0);
                let balance = storage
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
            Some("verify") => Ok(serde_json::to_value(storage.verify_ledger().await?).map_err(ApiError::internal)?),
            _ => Err(ApiError::bad_request("bad_request", "unknown command")),
        }
    }
    .await;
    result.unwrap_or_else(|e| json!({"error": e.message, "code": e.code}))
}

/// Why a command through the admin socket got no answer.
#[derive(Debug)]
pub enum AdminError {
    /// The socket took no connection within this time: the server is not
    /// accepting (stopped, or out of file descriptors) and its queue is full.
    NotAccepting(Duration),
    /// Connected, but nothing came for this long: no answer, no progress
    /// line, no export data.
    Silent(Duration),
    /// Anything else, as a sentence.
    Failed(String),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::NotAccepting(t) => write!(
                f,
                "the server's admin socket accepted no connection within {} s",
                t.as_secs()
            ),
            AdminError::Silent(t) => write!(f, "the server sent nothing for {} s", t.as_secs()),
            AdminError::Failed(e) => f.write_str(e),
        }
    }
}

/// Connects to the server's admin socket. Ok(None) when no server listens
/// (no socket, or nobody behind it: a server that was killed leaves its
/// socket file), so that the command may open the store itself. A server
/// whose accept queue is full (it stopped accepting) is retried until
/// `wait` is up: opening the store it holds would only fail less clearly.
async fn connect(data_dir: &Path, wait: Duration) -> Result<Option<UnixStream>, AdminError> {
    use std::io::ErrorKind;
    let path = socket_path(data_dir);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match UnixStream::connect(&path).await {
            Ok(stream) => return Ok(Some(stream)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                return Ok(None);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(AdminError::NotAccepting(wait));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(AdminError::Failed(format!(
                    "cannot connect to {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

/// Sends the request line and ends our sending side, within `wait`.
async fn send_request(
    write: &mut OwnedWriteHalf,
    req: &Value,
    wait: Duration,
) -> Result<(), AdminError> {
    tokio::time::timeout(wait, async {
        write.write_all(format!("{req}\n").as_bytes()).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| AdminError::Silent(wait))?
    .map_err(|e| AdminError::Failed(format!("cannot send the request to the server: {e}")))
}

/// Sends one request to a running server; None when none is listening.
/// `{"progress": …}` lines go to `on_progress`; the first other line is the
/// answer. `wait` bounds every wait for the server — the connection, and
/// each line (an answer, or the next progress line) — so a command waits
/// as long as the server makes progress, and no longer than `wait` for a
/// server that has stopped answering.
pub async fn request(
    data_dir: &Path,
    req: &Value,
    wait: Duration,
    mut on_progress: impl FnMut(&Value),
) -> Option<Result<Value, AdminError>> {
    let stream = match connect(data_dir, wait).await {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    let (read, mut write) = stream.into_split();
    let exchange = async {
        send_request(&mut write, req, wait).await?;
        let mut lines = BufReader::new(read).lines();
        loop {
            let line = tokio::time::timeout(wait, lines.next_line())
                .await
                .map_err(|_| AdminError::Silent(wait))?
                .map_err(|e| AdminError::Failed(e.to_string()))?;
            let Some(line) = line else {
                return Err(AdminError::Failed(
                    "the server closed the admin connection without an answer; see its log".into(),
                ));
            };
            let v = serde_json::from_str::<Value>(&line)
                .map_err(|e| AdminError::Failed(format!("bad answer from the server: {e}")))?;
            match v.get("progress") {
                Some(p) => on_progress(p),
                None => return Ok(v),
            }
        }
    };
    Some(exchange.await)
}

/// Sends an `export` request to a running server and copies its output to
/// `out`; None when none is listening. Fails when the server sends nothing
/// for `wait` (see [`request`]).
pub async fn export_to(
    data_dir: &Path,
    req: &Value,
    wait: Duration,
    out: &mut (dyn std::io::Write + Send),
) -> Option<Result<(), AdminError>> {
    let stream = match connect(data_dir, wait).await {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    let (mut read, mut write) = stream.into_split();
    let exchange = async {
        send_request(&mut write, req, wait).await?;
        let mut buf = vec![0u8; 64 << 10];
        let mut first = true;
        loop {
            let n = tokio::time::timeout(wait, read.read(&mut buf))
                .await
                .map_err(|_| AdminError::Silent(wait))?
                .map_err(|e| AdminError::Failed(e.to_string()))?;
            if n == 0 {
                return Ok(());
            }
            // An export starts with its `{"type":"export",…}` line; anything
            // else first is the server's error answer.
            if first && !buf[..n].starts_with(b"{\"type\"") {
                let v: Value = serde_json::from_slice(buf[..n].trim_ascii_end())
                    .map_err(|e| AdminError::Failed(format!("bad answer from the server: {e}")))?;
                return Err(AdminError::Failed(
                    v["error"].as_str().unwrap_or("export failed").to_string(),
                ));
            }
            first = false;
            out.write_all(&buf[..n])
                .map_err(|e| AdminError::Failed(e.to_string()))?;
        }
    };
    Some(exchange.await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_closed_is_gone_but_not_one_that_only_finished_sending() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        assert!(!client_gone(&ours));
        let (theirs_read, mut theirs_write) = theirs.into_split();
        theirs_write.shutdown().await.expect("shutdown");
        assert!(!client_gone(&ours), "a half-closed client is still there");
        drop(theirs_write);
        drop(theirs_read);
        assert!(client_gone(&ours));
    }

    #[tokio::test]
    async fn a_server_that_accepts_but_never_answers_is_reported_silent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _listener = UnixListener::bind(socket_path(dir.path())).expect("bind");
        let started = std::time::Instant::now();
        let r = request(
            dir.path(),
            &json!({"cmd": "verify"}),
            Duration::from_millis(300),
            |_| {},
        )
        .await;
        assert!(matches!(r, Some(Err(AdminError::Silent(_)))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // No socket at all: no server, the command opens the store itself.
        let none = tempfile::tempdir().expect("tempdir");
        assert!(
            request(none.path(), &json!({}), Duration::from_secs(1), |_| {})
                .await
                .is_none()
        );
    }
}
