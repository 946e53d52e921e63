//! The partial file a backup is written to until it is complete
//! (`<name>.partial`): opening it under an exclusive lock (taking over one
//! left by a killed process), recognising confab's own, and removing the
//! stale ones at server start.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::format::{PARTIAL_SUFFIX, PERIODIC_PREFIX, PRE_MIGRATION_PREFIX, SUFFIX};

/// Where the backup to `to` is written until it is complete.
pub fn partial_path(to: &Path) -> PathBuf {
    let mut name = to.file_name().unwrap_or_default().to_os_string();
    name.push(PARTIAL_SUFFIX);
    to.with_file_name(name)
}

/// Takes an exclusive `flock` on `file` without waiting: Ok(true) when
/// taken, Ok(false) when another open file holds it (in this process or
/// another). The lock lives as long as the file is open, and dies with its
/// process, so a partial file whose lock can be taken has no live writer.
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor owned by `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether `file` (open) is still the file at `path`: a file can be
/// unlinked (by [`remove_stale_partials`]) between being opened and locked.
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Opens `partial` for a new backup, holding its lock for as long as the
/// backup writes it. A partial left by a backup that did not finish (its
/// process was killed) is taken over and emptied, and the takeover logged;
/// one that a running backup holds is refused rather than overwritten.
pub(super) fn open_partial(partial: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let busy = || {
        format!(
            "{} is being written by another backup that is still running; wait for it, or choose another file",
            partial.display()
        )
    };
    // A few tries: a start-up cleanup may hold the lock for a moment, or
    // unlink the file between our open and our lock.
    for _ in 0..20 {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(partial)
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        match try_lock(&file) {
            Ok(true) if still_at(&file, partial) => {
                let stale = file.metadata().map(|m| m.len()).unwrap_or(0);
                if stale > 0 {
                    tracing::warn!(path = %partial.display(), bytes = stale, "replacing a partial backup left by a backup that did not finish");
                }
                file.set_len(0)
                    .map_err(|e| format!("cannot empty {}: {e}", partial.display()))?;
                return Ok(file);
            }
            Ok(true) => continue,
            Ok(false) => std::thread::sleep(std::time::Duration::from_millis(5)),
            // A file system without flock: write as before, unguarded.
            Err(e) => {
                tracing::debug!(path = %partial.display(), error = %e, "cannot lock a partial backup");
                file.set_len(0)
                    .map_err(|e| format!("cannot empty {}: {e}", partial.display()))?;
                return Ok(file);
            }
        }
    }
    Err(busy())
}

/// Whether `name` is a partial file of a backup confab names itself
/// (periodic and pre-migration:
/// [`timestamped_name`](super::timestamped_name) + `.partial`), the only
/// partial files the start-up cleanup may delete: a partial next to an
/// operator's `--to FILE` is replaced when that file is next backed up to.
pub fn is_own_partial(name: &str) -> bool {
    let Some(stem) = name
        .strip_suffix(PARTIAL_SUFFIX)
        .and_then(|n| n.strip_suffix(SUFFIX))
    else {
        return false;
    };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let Some((rest, time)) = stem.rsplit_once('-') else {
        return false;
    };
    let Some((prefix, date)) = rest.rsplit_once('-') else {
        return false;
    };
    let schema = prefix.strip_prefix(PRE_MIGRATION_PREFIX);
    digits(date, 8)
        && digits(time, 6)
        && (prefix == PERIODIC_PREFIX
            || schema.is_some_and(|v| !v.is_empty() && digits(v, v.len())))
}

/// Removes the partial files of confab's own backups in `dir` that no
/// running backup holds (see [`try_lock`]): left by a process killed while
/// writing one, they would otherwise stay for ever. Returns what it removed.
/// Called at server start, before any backup of its own runs.
pub fn remove_stale_partials(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if !entry.file_name().to_str().is_some_and(is_own_partial)
            || !entry.file_type().is_ok_and(|t| t.is_file())
        {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match try_lock(&file) {
            Ok(true) if still_at(&file, &path) => {
                if std::fs::remove_file(&path).is_ok() {
                    removed.push(path);
                }
            }
            Ok(_) => {
                tracing::info!(path = %path.display(), "a partial backup is being written by a running backup; left alone")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot tell whether a partial backup is still being written; left alone")
            }
        }
    }
    removed.sort();
    removed
}

pub(super) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::timestamped_name;
    use super::*;

    #[test]
    fn only_partials_of_backups_confab_names_itself_are_its_own() {
        for own in [
            "confab-20260101-000000.cfbk.partial",
            "pre-migration-schema2-20261231-235959.cfbk.partial",
            "pre-migration-schema12-20261231-235959.cfbk.partial",
        ] {
            assert!(is_own_partial(own), "{own}");
        }
        for other in [
            "confab-20260101-000000.cfbk",
            "mine.cfbk.partial",
            "confab-latest.cfbk.partial",
            "confab-2026011-000000.cfbk.partial",
            "confab-20260101-00000x.cfbk.partial",
            "pre-migration-schema-20260101-000000.cfbk.partial",
            "pre-migration-schemax-20260101-000000.cfbk.partial",
            "other-20260101-000000.cfbk.partial",
            "confab-20260101-000000.partial",
        ] {
            assert!(!is_own_partial(other), "{other}");
        }
        let name = timestamped_name(PERIODIC_PREFIX) + PARTIAL_SUFFIX;
        assert!(is_own_partial(&name), "{name}");
        let name = timestamped_name(&format!("{PRE_MIGRATION_PREFIX}2")) + PARTIAL_SUFFIX;
        assert!(is_own_partial(&name), "{name}");
    }

    #[test]
    fn stale_partials_are_removed_but_not_one_a_backup_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("confab-20260101-000000.cfbk.partial");
        let held = dir.path().join("confab-20260102-000000.cfbk.partial");
        let foreign = dir.path().join("notes.cfbk.partial");
        for p in [&stale, &held, &foreign] {
            std::fs::write(p, b"x").expect("write");
        }
        let writer = open_partial(&held).expect("open");
        assert_eq!(remove_stale_partials(dir.path()), vec![stale.clone()]);
        assert!(!stale.exists() && held.exists() && foreign.exists());
        // The same partial cannot be opened twice for writing.
        assert!(
            open_partial(&held)
                .expect_err("held")
                .contains("another backup")
        );
        drop(writer);
        assert_eq!(remove_stale_partials(dir.path()), vec![held.clone()]);
    }
}
