//! Attachments' bytes in the database (`storage::postgres::blobs`): a file
//! of several chunks stored and read back byte for byte, the same bytes
//! stored once (also by two connections at the same moment), removal.

use confab::media::{BlobId, BlobStore};
use confab::storage::postgres::blobs::{CHUNK, chunk, remove, size, store_file};
use tokio_postgres::{Client, NoTls};

use crate::pg;

async fn client(url: &str) -> Client {
    let (mut c, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    confab::storage::postgres::schema::migrate(&mut c)
        .await
        .expect("schema");
    c
}

/// A file of `len` pseudo-random bytes, stored in a blob directory to get
/// its id the way a node does.
fn upload(dir: &std::path::Path, len: usize, seed: u8) -> (BlobId, std::path::PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect();
    let store = BlobStore::open(dir).expect("blobs");
    let (blob, _) = store.put(&mut bytes.as_slice(), u64::MAX).expect("put");
    let path = store.path_of(&blob.id);
    (blob.id, path, bytes)
}

async fn read_back(c: &Client, id: &BlobId) -> Vec<u8> {
    let mut out = Vec::new();
    let mut n = 0;
    while let Some(part) = chunk(c, id, n).await.expect("chunk") {
        assert!(part.len() <= CHUNK);
        out.extend_from_slice(&part);
        n += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_stored_in_chunks_once_and_read_back_whole() {
    let url = pg::server().fresh_database("blobs");
    let mut c = client(&url).await;
    let dir = tempfile::tempdir().expect("dir");
    let (id, path, bytes) = upload(dir.path(), 2 * CHUNK + 12_345, 7);
    assert_eq!(size(&c, &id).await.expect("size"), None);
    assert!(store_file(&mut c, &id, &path).await.expect("store"), "new");
    assert_eq!(size(&c, &id).await.expect("size"), Some(bytes.len() as u64));
    assert_eq!(read_back(&c, &id).await, bytes);
    let chunks = pg::server().psql(
        url.split_whitespace()
            .find_map(|kv| kv.strip_prefix("dbname="))
            .expect("dbname"),
        "SELECT count(*) FROM blob_chunks",
    );
    assert_eq!(chunks.trim(), "3");

    // The same bytes again: nothing new.
    assert!(!store_file(&mut c, &id, &path).await.expect("again"));
    assert_eq!(read_back(&c, &id).await, bytes);

    // An empty file is a blob too.
    let (empty, empty_path, _) = upload(dir.path(), 0, 0);
    assert!(
        store_file(&mut c, &empty, &empty_path)
            .await
            .expect("empty")
    );
    assert_eq!(size(&c, &empty).await.expect("size"), Some(0));
    assert_eq!(chunk(&c, &empty, 0).await.expect("chunk"), None);

    assert!(remove(&c, &id).await.expect("remove"));
    assert_eq!(size(&c, &id).await.expect("size"), None);
    assert_eq!(chunk(&c, &id, 0).await.expect("chunk"), None);
    assert!(!remove(&c, &id).await.expect("again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_storing_the_same_bytes_at_once_store_them_once() {
    let url = pg::server().fresh_database("blobs_race");
    let mut a = client(&url).await;
    let mut b = client(&url).await;
    let dir = tempfile::tempdir().expect("dir");
    let (id, path, bytes) = upload(dir.path(), CHUNK + 1, 3);
    let (ra, rb) = tokio::join!(
        store_file(&mut a, &id, &path),
        store_file(&mut b, &id, &path)
    );
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert!(ra ^ rb, "exactly one stored it: {ra} {rb}");
    assert_eq!(read_back(&a, &id).await, bytes);
}
