//! Attachments' bytes in a cluster's database (issue 22): a blob is the
//! row `blobs(id, size)` — its id the SHA-256 of its bytes, as in the
//! single node's blob directory (`crate::media::BlobStore`) — and its
//! bytes as 1 MiB rows of `blob_chunks`. Every node can read what any node
//! stored, and the bytes are replicated (and backed up by
//! `pg_basebackup`) with everything else: no other store to run.
//!
//! A blob is stored whole in one transaction, after the node has written
//! the upload to a local temporary file and synced it (so the upload is
//! never read twice from the client): once committed it is complete.
//! Storing the same bytes again (another upload, another node at the same
//! moment) stores nothing new. Reads take one chunk at a time, so memory
//! stays bounded however large the blob.

use std::io::Read;
use std::path::Path;

use tokio_postgres::Client;

use super::rows::{db_err, describe_error};
use crate::error::ApiError;
use crate::media::BlobId;

/// Bytes per `blob_chunks` row.
pub const CHUNK: usize = 1 << 20;

/// Stores the file at `path` (whose SHA-256 is `id`) as the blob `id`;
/// true when it was new, false when the database had it already.
pub async fn store_file(c: &mut Client, id: &BlobId, path: &Path) -> Result<bool, ApiError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| ApiError::internal(format!("cannot read the upload: {e}")))?;
    let size = file
        .metadata()
        .map_err(|e| ApiError::internal(format!("cannot read the upload: {e}")))?
        .len();
    let key = id.0.as_slice();
    let txn = c.transaction().await.map_err(db_err)?;
    let inserted = txn
        .execute(
            "INSERT INTO blobs (id, size, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
            &[&key, &(size as i64), &crate::store::now_ms()],
        )
        .await
        .map_err(db_err)?;
    if inserted == 0 {
        // Already there, whole (it was committed whole); or being stored
        // by another transaction, which this insert waited for.
        txn.rollback().await.map_err(db_err)?;
        return Ok(false);
    }
    let insert = txn
        .prepare("INSERT INTO blob_chunks (id, n, data) VALUES ($1, $2, $3)")
        .await
        .map_err(db_err)?;
    let mut buf = vec![0u8; CHUNK];
    let mut n: i32 = 0;
    loop {
        let got = read_full(&mut file, &mut buf)
            .map_err(|e| ApiError::internal(format!("cannot read the upload: {e}")))?;
        if got == 0 {
            break;
        }
        txn.execute(&insert, &[&key, &n, &&buf[..got]])
            .await
            .map_err(db_err)?;
        n += 1;
    }
    txn.commit().await.map_err(|e| {
        tracing::warn!(error = %describe_error(&e), "storing a blob");
        crate::error::storage_error()
    })?;
    Ok(true)
}

/// Fills `buf` as far as the file goes.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// The blob's size, if the database has it.
pub async fn size(c: &Client, id: &BlobId) -> Result<Option<u64>, ApiError> {
    let row = c
        .query_opt("SELECT size FROM blobs WHERE id = $1", &[&id.0.as_slice()])
        .await
        .map_err(db_err)?;
    Ok(row.map(|r| r.get::<_, i64>(0) as u64))
}

/// The `n`-th chunk of the blob (bytes `n × CHUNK` onwards).
pub async fn chunk(c: &Client, id: &BlobId, n: u32) -> Result<Option<Vec<u8>>, ApiError> {
    let n = i32::try_from(n).map_err(|_| ApiError::internal("a chunk number out of range"))?;
    let row = c
        .query_opt(
            "SELECT data FROM blob_chunks WHERE id = $1 AND n = $2",
            &[&id.0.as_slice(), &n],
        )
        .await
        .map_err(db_err)?;
    Ok(row.map(|r| r.get(0)))
}

/// Removes the blob (its chunks go with it); false when it was not there.
pub async fn remove(c: &Client, id: &BlobId) -> Result<bool, ApiError> {
    let n = c
        .execute("DELETE FROM blobs WHERE id = $1", &[&id.0.as_slice()])
        .await
        .map_err(db_err)?;
    Ok(n > 0)
}
