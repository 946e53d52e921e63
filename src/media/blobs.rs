//! The blob directory: `<data_dir>/blobs/<first 2 hex digits>/<64 hex
//! digits of the SHA-256>`, and `<data_dir>/blobs/tmp/` for blobs being
//! written.
//!
//! A blob is written to a temporary file while its hash is computed, then
//! synced, renamed to its name and the directory synced: after
//! [`BlobWriter::finish`] returns, the blob survives a crash, and a blob
//! file that exists is whole (never a torn write under its final name).
//! The same bytes uploaded twice are stored once. Temporary files left by
//! a crash are removed when the store is opened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes of an upload kept for sniffing its type.
pub const SNIFF_BYTES: usize = 8192;

/// A blob's name: the SHA-256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 lower-case hex digits; anything else (a path, upper case,
    /// another length) is refused.
    pub fn parse(s: &str) -> Option<BlobId> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(BlobId(id))
    }
}

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobId({})", self.hex())
    }
}

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// A stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    pub id: BlobId,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// More bytes came than the limit allows; nothing is kept.
    #[error("the file is larger than the limit of {max} bytes")]
    TooLarge { max: u64 },
    #[error("cannot store the file: {0}")]
    Io(#[from] io::Error),
}

/// The blob directory of a data directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// Opens (creating) `<data_dir>/blobs`, private to its owner, and
    /// removes the temporary files a crash left behind.
    pub fn open(data_dir: &Path) -> io::Result<BlobStore> {
        let dir = data_dir.join("blobs");
        fs::create_dir_all(dir.join("tmp"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
        for e in fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        Ok(BlobStore { dir })
    }

    /// Where the blob `id` is (or would be).
    pub fn path_of(&self, id: &BlobId) -> PathBuf {
        let hex = id.hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.path_of(id).is_file()
    }

    /// Opens the blob `id` to read it.
    pub fn open_blob(&self, id: &BlobId) -> io::Result<File> {
        File::open(self.path_of(id))
    }

    /// Removes the blob `id` (no error if it is not there).
    pub fn remove(&self, id: &BlobId) -> io::Result<()> {
        match fs::remove_file(self.path_of(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Starts a blob of at most `max` bytes.
    pub fn writer(&self, max: u64) -> io::Result<BlobWriter> {
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{:016x}", rand::random::<u64>()));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        Ok(BlobWriter {
            store: self.clone(),
            file: Some(io::BufWriter::with_capacity(1 << 16, file)),
            tmp,
            hash: Sha256::new(),
            size: 0,
            max,
            head: Vec::new(),
        })
    }

    /// Stores everything `from` gives (at most `max` bytes).
    pub fn put(&self, from: &mut impl Read, max: u64) -> Result<(Blob, Vec<u8>), BlobError> {
        let mut w = self.writer(max)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        let head = w.head().to_vec();
        Ok((w.finish()?, head))
    }
}

/// A blob being written; dropped unfinished, it leaves nothing behind.
pub struct BlobWriter {
    store: BlobStore,
    file: Option<io::BufWriter<File>>,
    tmp: PathBuf,
    hash: Sha256,
    size: u64,
    max: u64,
    head: Vec<u8>,
}

impl BlobWriter {
    /// Appends `chunk`; past the limit the blob is abandoned.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        if self.size + chunk.len() as u64 > self.max {
            return Err(BlobError::TooLarge { max: self.max });
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the blob is finished"))?;
        file.write_all(chunk)?;
        self.hash.update(chunk);
        self.size += chunk.len() as u64;
        if self.head.len() < SNIFF_BYTES {
            let take = (SNIFF_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        Ok(())
    }

    /// The first bytes written (up to [`SNIFF_BYTES`]).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the bytes and puts the blob under its name (or keeps the copy
    /// already there): durable when this returns.
    pub fn finish(mut self) -> Result<Blob, BlobError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("the blob is finished"))?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        let id = BlobId(self.hash.clone().finalize().into());
        let to = self.store.path_of(&id);
        let parent = to
            .parent()
            .ok_or_else(|| io::Error::other("a blob path without a directory"))?
            .to_path_buf();
        fs::create_dir_all(&parent)?;
        if to.is_file() {
            // The same bytes are there already (and were synced then).
            let _ = fs::remove_file(&self.tmp);
        } else {
            fs::rename(&self.tmp, &to)?;
            File::open(&parent)?.sync_all()?;
            if let Some(top) = parent.parent() {
                File::open(top)?.sync_all()?;
            }
        }
        Ok(Blob {
            id,
            size: self.size,
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_files(dir: &Path) -> usize {
        fs::read_dir(dir.join("blobs/tmp")).map_or(0, |d| d.count())
    }

    #[test]
    fn a_blob_is_stored_under_its_hash_once_and_read_back() {
        let dir = tempfile::tempdir().expect("dir");
        let store = BlobStore::open(dir.path()).expect("open");
        let bytes = b"hello, photo".repeat(10_000);
        let (a, head) = store.put(&mut bytes.as_slice(), 1 << 20).expect("put");
        assert_eq!(a.size, bytes.len() as u64);
        assert_eq!(a.id.hex(), hex::encode(Sha256::digest(&bytes)));
        assert_eq!(head.len(), SNIFF_BYTES);
        assert_eq!(&head[..], &bytes[..SNIFF_BYTES]);
        let mut back = Vec::new();
        store
            .open_blob(&a.id)
            .expect("open")
            .read_to_end(&mut back)
            .expect("read");
        assert_eq!(back, bytes);
        // The same bytes again: the same blob, one file.
        let (b, _) = store.put(&mut bytes.as_slice(), 1 << 20).expect("put");
        assert_eq!(a, b);
        let files = fs::read_dir(store.path_of(&a.id).parent().expect("dir"))
            .expect("list")
            .count();
        assert_eq!(files, 1);
        assert_eq!(tmp_files(dir.path()), 0);
        store.remove(&a.id).expect("remove");
        assert!(!store.contains(&a.id));
        store.remove(&a.id).expect("removing again is fine");
    }

    #[test]
    fn over_the_limit_nothing_is_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let store = BlobStore::open(dir.path()).expect("open");
        let bytes = vec![7u8; 1000];
        let r = store.put(&mut bytes.as_slice(), 999);
        assert!(matches!(r, Err(BlobError::TooLarge { max: 999 })), "{r:?}");
        assert_eq!(tmp_files(dir.path()), 0);
        let exactly = store
            .put(&mut bytes.as_slice(), 1000)
            .expect("at the limit");
        assert_eq!(exactly.0.size, 1000);
    }

    #[test]
    fn an_unfinished_blob_leaves_nothing_and_a_crash_leftover_is_cleaned_on_open() {
        let dir = tempfile::tempdir().expect("dir");
        let store = BlobStore::open(dir.path()).expect("open");
        let mut w = store.writer(100).expect("writer");
        w.write(b"half").expect("write");
        drop(w);
        assert_eq!(tmp_files(dir.path()), 0);
        // What a killed process leaves: a temporary file.
        fs::write(dir.path().join("blobs/tmp/0123456789abcdef"), b"torn").expect("write");
        BlobStore::open(dir.path()).expect("reopen");
        assert_eq!(tmp_files(dir.path()), 0);
    }

    #[test]
    fn only_a_hash_parses_as_a_blob_id() {
        let id = BlobId([0xab; 32]);
        assert_eq!(BlobId::parse(&id.hex()), Some(id));
        for bad in [
            "",
            "../../etc/passwd",
            &"A".repeat(64),
            &"a".repeat(63),
            &"a".repeat(65),
            &format!("{}/", "a".repeat(63)),
        ] {
            assert_eq!(BlobId::parse(bad), None, "{bad:?}");
        }
    }
}
