//! What the commands print: the progress line on stderr, sizes in MB,
//! pretty JSON, and the wording of an admin socket failure.

use confab::admin::AdminError;

/// One `\r`-refreshed progress line on stderr.
pub(super) fn progress_bar(label: &str, done: u64, total: u64, extra: &str) {
    let pct = if total == 0 {
        100.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0)
    };
    let width = 30usize;
    let filled = ((pct / 100.0) * width as f64) as usize;
    eprint!(
        "\r{label} [{}{}] {done}/{total} messages ({pct:.0}%){extra}   ",
        "#".repeat(filled),
        " ".repeat(width - filled.min(width))
    );
}

pub(super) fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub(super) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// The line for an admin socket failure other than a silent server (which
/// each command words for itself).
pub(super) fn not_accepting_or(e: AdminError) -> String {
    match e {
        AdminError::NotAccepting(t) => format!(
            "the server accepted no connection on its admin socket within {} s (nothing was sent to it); is it out of file descriptors or stopped? see its log",
            t.as_secs()
        ),
        e => e.to_string(),
    }
}
