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
    /// or page (logged and counted where it was found).
    pub fn storage(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", message)
    }

    /// Whether this is a [`ApiError::storage`] answer.
    pub fn is_storage(&self) -> bool {
        self.code == "storage_error"
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

impl From<redb::Error> for ApiError {
    fn from(e: redb::Error) -> ApiError {
        ApiError::internal(e)
    }
}

/// redb's own report of a damaged file (it verified something and it did
/// not match) as a `storage_error`; anything else is internal.
fn from_storage(e: redb::StorageError) -> ApiError {
    match e {
        redb::StorageError::Corrupted(what) => {
            tracing::error!(error = %what, "the store file is damaged");
            metrics::counter!("confab_store_read_failures_total", "kind" => "corrupted")
                .increment(1);
            ApiError::storage(
                "the store could not read this: its file is damaged there (the operator has been told)",
            )
        }
        e => ApiError::internal(e),
    }
}

impl From<redb::StorageError> for ApiError {
    fn from(e: redb::StorageError) -> ApiError {
        from_storage(e)
    }
}

impl From<redb::TableError> for ApiError {
    fn from(e: redb::TableError) -> ApiError {
        match e {
            redb::TableError::Storage(s) => from_storage(s),
            e => ApiError::internal(e),
        }
    }
}

impl From<redb::TransactionError> for ApiError {
    fn from(e: redb::TransactionError) -> ApiError {
        match e {
            redb::TransactionError::Storage(s) => from_storage(s),
            e => ApiError::internal(e),
        }
    }
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> ApiError {
                ApiError::internal(e)
            }
        }
    )*};
}
redb_errors!(redb::CommitError, redb::DatabaseError);
