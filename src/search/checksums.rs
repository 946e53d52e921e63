//! Segment checksums: `check_files` verifies every file of the index's
//! committed segments against the CRC32 in its footer, on open and for the
//! scrub; what it found (`FileCheck`) or why it ended early (`CheckError`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tantivy::Index;

/// What a checksum pass over the index found.
pub(super) struct FileCheck {
    pub(super) files: usize,
    pub(super) bytes: u64,
    pub(super) ms: u64,
    /// Files that fail their checksum, are missing or are not segment files
    /// any more (a truncated footer), with why.
    pub(super) damaged: Vec<(PathBuf, String)>,
}

impl FileCheck {
    pub(super) fn describe(&self) -> String {
        self.damaged
            .iter()
            .map(|(p, why)| format!("{} ({why})", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a check ended without a verdict.
pub(super) enum CheckError {
    /// The server is stopping.
    Stopped,
    /// The operating system refused to read (too many open files, EIO):
    /// not damage, and a rebuild would not help.
    Io(String),
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckError::Stopped => f.write_str("stopped"),
            CheckError::Io(e) => f.write_str(e),
        }
    }
}

/// Verifies every file of the index's committed segments against the CRC32
/// tantivy writes into its footer. tantivy checks it on no read path of its
/// own: a flipped byte inside a `.fast` file changed relevance answers
/// silently. `pace` is for the background scrub: it stops the check when
/// set, and the check rests after each file as long as the file took, so
/// it never uses more than half a core.
pub(super) fn check_files(
    index: &Index,
    dir: &Path,
    pace: Option<&AtomicBool>,
) -> Result<FileCheck, CheckError> {
    use tantivy::directory::error::OpenReadError;
    let started = Instant::now();
    // While `metas` lives, tantivy's garbage collection keeps its segments'
    // files (it spares the files of every segment meta still referenced), so
    // a merge that ends during the check cannot delete a file under it.
    let metas = match index.load_metas() {
        Ok(m) => m,
        Err(e) if os_error(&e) => return Err(CheckError::Io(e.to_string())),
        // Unreadable as an index description (damaged `meta.json`).
        Err(e) => {
            return Ok(FileCheck {
                files: 0,
                bytes: 0,
                ms: started.elapsed().as_millis() as u64,
                damaged: vec![(PathBuf::from("meta.json"), e.to_string())],
            });
        }
    };
    // Every component a segment may have is listed; the managed list says
    // which of them were written.
    let managed = index.directory().list_managed_files();
    let mut files: Vec<PathBuf> = metas
        .list_segment_files()
        .into_iter()
        .filter(|p| managed.contains(p))
        .collect();
    files.sort();
    let mut check = FileCheck {
        files: files.len(),
        bytes: 0,
        ms: 0,
        damaged: Vec::new(),
    };
    for path in files {
        if pace.is_some_and(|stop| stop.load(Ordering::Acquire)) {
            return Err(CheckError::Stopped);
        }
        let t = Instant::now();
        match index.directory().validate_checksum(&path) {
            Ok(true) => {}
            Ok(false) => check
                .damaged
                .push((path.clone(), "checksum mismatch".into())),
            Err(OpenReadError::IoError { io_error, .. }) if io_error.raw_os_error().is_some() => {
                return Err(CheckError::Io(format!("{}: {io_error}", path.display())));
            }
            Err(e) => check.damaged.push((path.clone(), e.to_string())),
        }
        check.bytes += std::fs::metadata(dir.join(&path)).map_or(0, |m| m.len());
        if pace.is_some() {
            std::thread::sleep(t.elapsed());
        }
    }
    check.ms = started.elapsed().as_millis() as u64;
    Ok(check)
}

/// Whether a tantivy error is the operating system refusing to read (too
/// many open files, EIO, no permission) rather than bad contents.
pub(super) fn os_error(e: &tantivy::TantivyError) -> bool {
    use tantivy::TantivyError;
    use tantivy::directory::error::OpenReadError;
    match e {
        TantivyError::OpenReadError(OpenReadError::IoError { io_error, .. }) => {
            io_error.raw_os_error().is_some()
        }
        TantivyError::IoError(io_error) => io_error.raw_os_error().is_some(),
        _ => false,
    }
}
