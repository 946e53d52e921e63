//! Reads that survive a damaged page: [`guard`] turns a redb panic into a
//! `storage_damaged` answer, [`catch_panic`] and the per-thread state the
//! process's panic hook consults while one is being caught.

use crate::error::ApiError;

/// Runs a read that serves a request (or a check) so that a panic inside
/// redb — what a damaged page can cause (`btree_cursor.rs`: unreachable) —
/// becomes a `storage_damaged` answer instead of unwinding through the
/// caller's task and dropping its connection. The panic is logged and
/// counted (`confab_store_read_failures_total{kind="panic"}`). The release
/// profile unwinds (Cargo.toml), so this catches it; the read transaction
/// the closure holds is dropped on the way out.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    match catch_panic(f) {
        Ok(r) => r,
        Err(why) => {
            tracing::error!(what, panic = %why, "the store failed reading damaged data");
            metrics::counter!("confab_store_read_failures_total", "kind" => "panic").increment(1);
            Err(ApiError::damaged(format!(
                "the store could not read {what}: its file is damaged there (the operator has been told; `confab check` names the damage)"
            )))
        }
    }
}

// Per thread, and about the panic this thread is catching: not state that
// threads share, so these may stay statics (the architecture's "no global
// mutable state" is about shared counters and flags).
thread_local! {
    /// How deep this thread is in [`catch_panic`].
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// What the panic hook saw of the last panic caught there.
    static CAUGHT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Whether this thread is inside [`catch_panic`]: the process's panic hook
/// then hands the panic's place and message over ([`note_panic`]) instead
/// of printing it, and the caller logs it once, as one line.
pub fn in_guarded_read() -> bool {
    GUARDED.with(|g| g.get() > 0)
}

/// Called by the panic hook for a panic inside [`catch_panic`].
pub fn note_panic(what: String) {
    CAUGHT.with(|c| *c.borrow_mut() = Some(what));
}

/// Runs `f`, catching a panic (inside redb, on a damaged page) as
/// Err(where and why).
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    GUARDED.with(|g| g.set(g.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
    r.map_err(|p| {
        CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| panic_message(&*p))
    })
}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".to_string()
    }
}
