//! The one error type of the API: an HTTP status, a stable snake_case code
//! and a human message. HTTP handlers return `Result<_, ApiError>` and the
//! router renders it as `{"error":{"code":…,"message":…}}`; WebSocket
//! sessions render the same code and message as an `error` frame.

use hyper::StatusCode;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (rate limits).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn bad_id() -> ApiError {
        ApiError::bad_request("bad_id", "ids are 16 hexadecimal digits")
    }

    /// A room that does not exist and one the caller is not in get the same
    /// answer, so that nobody learns which rooms exist (a direct room's id
    /// is computed from its two members' public ids).
    pub fn room_not_found() -> ApiError {
        ApiError::not_found(
            "room_not_found",
            "no such room, or you are not a member of it",
        )
    }

    pub fn user_not_found() -> ApiError {
        ApiError::not_found("user_not_found", "no such user")
    }

    pub fn internal(what: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %what, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the operation was not applied",
        )
    }

    /// The store could not read what the request needs: a damaged record
    /// or page (logged and counted where it was found). Not retryable, and
    /// not `storage_error` (a write that failed now and may work shortly).
    pub fn damaged(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_damaged",
            message,
        )
    }

    /// Whether this is a [`ApiError::damaged`] answer.
    pub fn is_damaged(&self) -> bool {
        self.code == "storage_damaged"
    }

    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
    }

    /// The JSON body `{"error":{"code","message"}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

/// A storage failure as clients see it: a full disk is 507 `storage_full`,
/// another I/O failure (or redb refusing after one) 503 `storage_error` —
/// both retryable, nothing was applied. None: not a storage failure.
fn storage_failure(e: &redb::StorageError) -> Option<ApiError> {
    match e {
        redb::StorageError::Io(io) => Some(io_failure(io)),
        redb::StorageError::PreviousIo | redb::StorageError::DatabaseClosed => {
            Some(storage_error())
        }
        // redb's own report of a damaged file (it verified something and it
        // did not match).
        redb::StorageError::Corrupted(what) => {
            tracing::error!(error = %what, "the store file is damaged");
            metrics::counter!("confab_store_read_failures_total", "kind" => "corrupted")
                .increment(1);
            Some(ApiError::damaged(
                "the store could not read this: its file is damaged there (the operator has been told)",
            ))
        }
        _ => None,
    }
}

fn io_failure(io: &std::io::Error) -> ApiError {
    if is_disk_full(io) {
        storage_full()
    } else {
        storage_error()
    }
}

impl From<redb::StorageError> for ApiError {
    fn from(e: redb::StorageError) -> ApiError {
        storage_failure(&e).unwrap_or_else(|| ApiError::internal(e))
    }
}

impl From<redb::Error> for ApiError {
    fn from(e: redb::Error) -> ApiError {
        match &e {
            redb::Error::Io(io) => io_failure(io),
            redb::Error::PreviousIo | redb::Error::DatabaseClosed => storage_error(),
            _ => ApiError::internal(e),
        }
    }
}

macro_rules! redb_errors {
    ($($t:ident),*) => {$(
        impl From<redb::$t> for ApiError {
            fn from(e: redb::$t) -> ApiError {
                match &e {
                    redb::$t::Storage(s) => storage_failure(s).unwrap_or_else(|| ApiError::internal(e)),
                    _ => ApiError::internal(e),
                }
            }
        }
    )*};
}
redb_errors!(TransactionError, TableError, CommitError, DatabaseError);

/// 507 `storage_full`: retryable once the operator frees space.
pub fn storage_full() -> ApiError {
    let mut e = ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        "storage_full",
        "the server's disk is full; nothing was stored; try again later",
    );
    e.retry_after = Some(5);
    e
}

/// 503 `storage_error`: retryable; the server is recovering its storage.
pub fn storage_error() -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_error",
        "the server cannot write to its storage right now; nothing was stored; try again shortly",
    );
    e.retry_after = Some(2);
    e
}

/// Whether `e` (or what caused it) is a full disk or quota.
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::StorageFull
                || matches!(
                    io.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
                );
        }
        cur = err.source();
    }
    false
}
