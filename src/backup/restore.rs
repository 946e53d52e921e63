//! Reading a backup file: the full read that checks its checksum, its
//! structure and every record, [`verify`], and [`restore`], which loads it
//! into a fresh store beside the target and moves it into place once
//! checked.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use redb::{Database, TableDefinition, TableHandle};
use serde::Serialize;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::format::{Col, FORMAT_VERSION, MAGIC, Progress, check_value, for_each_table};
use super::partial::sync_dir;
use crate::store::{self, SCHEMA_VERSION};

// ---------------------------------------------------------------------------
// Reading and restoring
// ---------------------------------------------------------------------------

/// Records per write transaction when restoring.
const RESTORE_BATCH: u64 = 100_000;
/// Largest single record or header we accept (a record is at most a few KiB).
const MAX_CHUNK: usize = 64 << 20;

struct HashReader {
    inp: BufReader<File>,
    hash: Sha256,
    bytes: u64,
}

impl HashReader {
    fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        if n > MAX_CHUNK {
            return Err(format!("corrupt backup: a {n}-byte field"));
        }
        let mut buf = vec![0u8; n];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.inp.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the backup is truncated (it ends early)".to_string()
            } else {
                format!("cannot read the backup: {e}")
            }
        })?;
        self.hash.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.fill(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let mut b = [0u8; 2];
        self.fill(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn name(&mut self) -> Result<String, String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.exact(n)?).map_err(|_| "corrupt backup: a name is not UTF-8".into())
    }
}

/// What a backup file holds, from a full read.
#[derive(Debug, Clone, Serialize)]
pub struct Contents {
    pub header: Json,
    pub schema_version: u64,
    pub tables: std::collections::BTreeMap<String, u64>,
    pub messages: u64,
    pub bytes: u64,
    pub with_secret: bool,
    /// Damaged records the backup left out (`confab backup --skip-damaged`),
    /// and the tables they were in.
    pub damaged: u64,
    pub damaged_tables: Vec<String>,
}

/// Where records go while reading: nowhere (verification) or a database.
struct Sink<'a> {
    db: Option<&'a Database>,
    on_progress: &'a mut dyn FnMut(Progress),
    progress: Progress,
    /// The schema of the store in the backup (how its values are checked).
    schema: u64,
}

fn load_table<K: Col + redb::Key, V: Col>(
    def: TableDefinition<K, V>,
    r: &mut HashReader,
    sink: &mut Sink<'_>,
) -> Result<u64, String> {
    let name = def.name().to_string();
    let messages = name == store::MESSAGES.name();
    let mut txn = None;
    let mut count = 0u64;
    let mut batch: Vec<(K::Owned, V::Owned)> = Vec::new();
    let flush = |batch: &mut Vec<(K::Owned, V::Owned)>,
                 txn: &mut Option<redb::WriteTransaction>|
     -> Result<(), String> {
        let Some(db) = sink.db else {
            batch.clear();
            return Ok(());
        };
        if txn.is_none() {
            let mut t = db.begin_write().map_err(|e| e.to_string())?;
            t.set_durability(redb::Durability::None)
                .map_err(|e| e.to_string())?;
            *txn = Some(t);
        }
        if let Some(t) = txn.as_ref() {
            let mut table = t.open_table(def).map_err(|e| e.to_string())?;
            for (k, v) in batch.drain(..) {
                table
                    .insert(K::borrow(&k), V::borrow(&v))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    };
    loop {
        match r.byte()? {
            0 => break,
            1 => {}
            b => {
                return Err(format!(
                    "corrupt backup: unexpected byte {b:#04x} in {name}"
                ));
            }
        }
        let n = r.u32()? as usize;
        let rec = r.exact(n)?;
        let mut cur = rec.as_slice();
        let bad = |e: String| format!("corrupt backup: table {name}, record {}: {e}", count + 1);
        let k = K::take(&mut cur).map_err(bad)?;
        let value_bytes = cur;
        let key_bytes = &rec[..rec.len() - value_bytes.len()];
        let v = V::take(&mut cur).map_err(bad)?;
        if !cur.is_empty() {
            return Err(bad("trailing bytes".into()));
        }
        // The verify pass checks every stored value (checksum, decoding);
        // the load pass reads the same bytes (the file's checksum is
        // compared again at the end).
        if sink.db.is_none() && value_bytes.len() >= 4 {
            check_value(&name, sink.schema, key_bytes, &value_bytes[4..]).map_err(bad)?;
        }
        count += 1;
        if messages {
            sink.progress.messages += 1;
        }
        if sink.db.is_some() {
            batch.push((k, v));
            if batch.len() >= 4096 {
                flush(&mut batch, &mut txn)?;
            }
            if count.is_multiple_of(RESTORE_BATCH) {
                flush(&mut batch, &mut txn)?;
                if let Some(t) = txn.take() {
                    t.commit().map_err(|e| e.to_string())?;
                }
            }
        }
        if count.is_multiple_of(4096) {
            sink.progress.bytes = r.bytes;
            (sink.on_progress)(sink.progress);
        }
    }
    flush(&mut batch, &mut txn)?;
    if let Some(t) = txn.take() {
        t.commit().map_err(|e| e.to_string())?;
    }
    let stated = r.u64()?;
    if stated != count {
        return Err(format!(
            "corrupt backup: table {name} has {count} records but says {stated}"
        ));
    }
    Ok(count)
}

/// Reads a whole backup: checks its structure, every record and the
/// checksum; loads the records into `db` when given. Returns what it holds
/// and the secret file, if any.
fn read(
    from: &Path,
    db: Option<&Database>,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<(Contents, Option<Vec<u8>>), String> {
    let file = File::open(from).map_err(|e| format!("cannot open {}: {e}", from.display()))?;
    let mut r = HashReader {
        inp: BufReader::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let magic = r
        .exact(8)
        .map_err(|_| format!("{} is not a confab backup", from.display()))?;
    if magic != MAGIC {
        return Err(format!("{} is not a confab backup", from.display()));
    }
    let version = r.u32()?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "the backup has format {version}; this confab reads format {FORMAT_VERSION}"
        ));
    }
    let n = r.u32()? as usize;
    let header: Json = serde_json::from_slice(&r.exact(n)?)
        .map_err(|e| format!("corrupt backup: bad header: {e}"))?;
    let schema = header["schema_version"].as_u64().unwrap_or(0);
    if schema > SCHEMA_VERSION {
        return Err(format!(
            "the backup holds a store of schema {schema}, written by a newer confab ({}); this confab understands schema {SCHEMA_VERSION} and older",
            header["confab"].as_str().unwrap_or("unknown version")
        ));
    }
    let mut sink = Sink {
        db,
        on_progress,
        progress: Progress {
            total_messages: header["snapshot_pos"].as_u64().unwrap_or(0),
            ..Default::default()
        },
        schema,
    };
    let mut tables = std::collections::BTreeMap::new();
    let mut secret = None;
    let summary: Json = loop {
        match r.byte()? {
            b'T' => {
                let name = r.name()?;
                if tables.contains_key(&name) {
                    return Err(format!("corrupt backup: table {name} twice"));
                }
                let mut count = None;
                macro_rules! load {
                    ($t:expr) => {
                        if count.is_none() && name == $t.name() {
                            count = Some(load_table($t, &mut r, &mut sink)?);
                        }
                    };
                }
                for_each_table!(load);
                let Some(count) = count else {
                    return Err(format!(
                        "the backup has a table `{name}` this confab does not know (written by a newer confab?)"
                    ));
                };
                tables.insert(name, count);
            }
            b'F' => {
                let name = r.name()?;
                let n = r.u32()? as usize;
                let data = r.exact(n)?;
                if name != "jwt_secret" {
                    return Err(format!("the backup has an unknown file `{name}`"));
                }
                secret = Some(data);
            }
            b'S' => {
                let n = r.u32()? as usize;
                break serde_json::from_slice(&r.exact(n)?)
                    .map_err(|e| format!("corrupt backup: bad summary: {e}"))?;
            }
            b => return Err(format!("corrupt backup: unexpected section {b:#04x}")),
        }
    };
    if r.byte()? != b'E' {
        return Err("corrupt backup: no end marker".into());
    }
    let computed = r.hash.clone().finalize();
    let mut stored = [0u8; 32];
    r.inp
        .read_exact(&mut stored)
        .map_err(|_| "the backup is truncated (no checksum)".to_string())?;
    if computed[..] != stored[..] {
        return Err("the backup's checksum does not match: the file is damaged".into());
    }
    let mut extra = [0u8; 1];
    if r.inp.read(&mut extra).map_err(|e| e.to_string())? != 0 {
        return Err("the backup has bytes after its end".into());
    }
    for (name, count) in &tables {
        if summary["tables"][name].as_u64() != Some(*count) {
            return Err(format!("corrupt backup: the summary disagrees on {name}"));
        }
    }
    let messages = tables.get(store::MESSAGES.name()).copied().unwrap_or(0);
    let damaged = summary["damaged"].as_u64().unwrap_or(0);
    let damaged_tables = summary["damaged_tables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    sink.progress.bytes = r.bytes + 32;
    (sink.on_progress)(sink.progress);
    Ok((
        Contents {
            schema_version: schema,
            header,
            tables,
            messages,
            bytes: r.bytes + 32,
            with_secret: secret.is_some(),
            damaged,
            damaged_tables,
        },
        secret,
    ))
}

/// Reads and checks a whole backup without writing anything.
pub fn verify(from: &Path, on_progress: &mut dyn FnMut(Progress)) -> Result<Contents, String> {
    read(from, None, on_progress).map(|(c, _)| c)
}

/// What `confab restore` did.
#[derive(Debug, Serialize)]
pub struct Restored {
    pub contents: Contents,
    pub wallet: Option<crate::wallet::Verification>,
    pub secret_restored: bool,
    pub seconds: f64,
}

/// Restores `from` into `data_dir`. Refuses a non-empty directory unless
/// `force`; verifies the whole file before creating anything, builds the
/// store beside the target and checks it (`wallet verify`) before moving it
/// into place. On any failure the directory is left as it was.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    force: bool,
    on_progress: &mut dyn FnMut(&str, Progress),
) -> Result<Restored, String> {
    let started = std::time::Instant::now();
    let existing: Vec<String> = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", data_dir.display())),
    };
    if !existing.is_empty() && !force {
        return Err(format!(
            "{} is not empty ({}); restore into an empty directory, or pass --force to replace its store",
            data_dir.display(),
            existing.join(", ")
        ));
    }
    let admin_socket = crate::config::ADMIN_SOCKET;
    if existing.iter().any(|n| n == admin_socket)
        && std::os::unix::net::UnixStream::connect(data_dir.join(admin_socket)).is_ok()
    {
        return Err(format!(
            "a confab server is running on {}; stop it before restoring",
            data_dir.display()
        ));
    }
    // Pass 1: the whole file, nothing written.
    let contents = verify(from, &mut |p| on_progress("verifying", p))?;

    // Pass 2: load into a fresh store beside the target.
    let created = !data_dir.exists();
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let tmp = data_dir.join(format!(".restore-{}", std::process::id()));
    let cleanup = |tmp: &Path| {
        let _ = std::fs::remove_dir_all(tmp);
        if created {
            let _ = std::fs::remove_dir(data_dir);
        }
    };
    let built = (|| -> Result<(Option<Vec<u8>>, Option<crate::wallet::Verification>), String> {
        std::fs::create_dir_all(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let db = Database::create(tmp.join("confab.redb")).map_err(|e| e.to_string())?;
        let (again, secret) = read(from, Some(&db), &mut |p| on_progress("restoring", p))?;
        if again.tables != contents.tables {
            return Err("the backup changed while it was being restored".into());
        }
        // One durable commit at the end makes the whole load durable.
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        drop(db);
        // Same schema: open it as the server would and check the ledger.
        // An older schema is migrated (and checked) by the server on start.
        let wallet = if contents.schema_version == SCHEMA_VERSION {
            let store = store::Store::open(&tmp)?;
            let v = crate::storage::embedded::verify(&store).map_err(|e| e.message)?;
            // A backup that left damaged ledger records out says so; its
            // ledger cannot balance, and that is reported, not refused.
            let incomplete = contents
                .damaged_tables
                .iter()
                .any(|t| t.starts_with("wallet_"));
            if !v.breaches.is_empty() && !incomplete {
                return Err(format!(
                    "the restored ledger fails `wallet verify`: {}",
                    v.breaches.join("; ")
                ));
            }
            Some(v)
        } else {
            None
        };
        Ok((secret, wallet))
    })();
    let (secret, wallet) = match built {
        Ok(x) => x,
        Err(e) => {
            cleanup(&tmp);
            return Err(e);
        }
    };
    // Move into place: only now is anything in the directory replaced. The
    // secret is staged beside the store, then each file is renamed over the
    // old one (atomic), so an interruption leaves either file whole. The
    // search index goes first: it is derived, and must never describe
    // another store than the one beside it.
    let replace = || -> Result<(), String> {
        let search = data_dir.join("search");
        if let Err(e) = std::fs::remove_dir_all(&search)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(format!("cannot remove {}: {e}", search.display()));
        }
        if let Some(s) = &secret {
            use std::os::unix::fs::OpenOptionsExt;
            let staged = tmp.join("jwt_secret");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&staged)
                .map_err(|e| format!("cannot write jwt_secret: {e}"))?;
            f.write_all(s)
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("cannot write jwt_secret: {e}"))?;
        }
        std::fs::rename(tmp.join("confab.redb"), data_dir.join("confab.redb"))
            .map_err(|e| format!("cannot move the restored store into place: {e}"))?;
        if secret.is_some() {
            std::fs::rename(tmp.join("jwt_secret"), data_dir.join("jwt_secret"))
                .map_err(|e| format!("cannot move jwt_secret into place: {e}"))?;
        }
        Ok(())
    };
    if let Err(e) = replace() {
        cleanup(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    sync_dir(&data_dir.join("confab.redb"));
    Ok(Restored {
        contents,
        wallet,
        secret_restored: secret.is_some(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
