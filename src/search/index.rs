//! The open index (`SearchIndex`): opening `<data_dir>/search`, checking
//! it (payload, message count, checksums) and rebuilding it when unusable,
//! the tantivy objects of one directory's life (`Live`, with its cached
//! fast-field columns), and the status JSON, gauges and size on disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use tantivy::tokenizer::TextAnalyzer;
use tantivy::{Index, IndexReader, ReloadPolicy};

use super::analyzer::{ANALYZER, ConfabTokenizer};
use super::checksums::check_files;
use super::schema::{Fields, committed_position, err, schema};
use super::status::IndexStatus;

/// The open index: searched by API handlers, fed by the [`Indexer`],
/// checked by the scrub ([`spawn_scrub`]).
pub struct SearchIndex {
    /// Replaced whole when the index is rebuilt while the server runs; a
    /// search holds the `Live` it started with until it ends.
    pub(super) live: RwLock<Arc<Live>>,
    pub(super) fields: Fields,
    pub(super) tokenizer: ConfabTokenizer,
    pub(super) dir: PathBuf,
    pub status: Arc<IndexStatus>,
}

/// Why an existing index cannot be used as it is.
pub(super) struct Unusable {
    pub(super) why: String,
    /// Damage (checksums, a wrong message count) rather than an index that
    /// is missing or of another kind: searches wait for the rebuild.
    pub(super) damaged: bool,
}

impl From<String> for Unusable {
    fn from(why: String) -> Unusable {
        Unusable {
            why,
            damaged: false,
        }
    }
}

impl From<&str> for Unusable {
    fn from(why: &str) -> Unusable {
        why.to_string().into()
    }
}

impl Unusable {
    /// Damage found at open: logged and counted here.
    pub(super) fn damaged(status: &IndexStatus, why: String) -> Unusable {
        tracing::error!(damage = %why, "search index damaged");
        status.damage_found.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_damage_total").increment(1);
        Unusable { why, damaged: true }
    }
}

/// The tantivy objects of one index directory's life.
pub(super) struct Live {
    pub(super) index: Index,
    pub(super) reader: IndexReader,
    pub(super) columns: ColumnCache,
}

/// One segment's fast-field columns. Opening a column reads its whole block
/// index (thousands of blocks in a large segment), so each segment's are
/// opened once and shared by every search until the segment goes away.
pub(super) struct SegmentColumns {
    pub(super) room: Arc<dyn tantivy::columnar::ColumnValues<u64>>,
    pub(super) seq: Arc<dyn tantivy::columnar::ColumnValues<u64>>,
    pub(super) ts: Arc<dyn tantivy::columnar::ColumnValues<i64>>,
}

#[derive(Clone, Default)]
pub(super) struct ColumnCache(Arc<Mutex<HashMap<tantivy::index::SegmentId, Arc<SegmentColumns>>>>);

impl ColumnCache {
    pub(super) fn get(&self, seg: &tantivy::SegmentReader) -> tantivy::Result<Arc<SegmentColumns>> {
        let id = seg.segment_id();
        if let Some(c) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(c.clone());
        }
        let ff = seg.fast_fields();
        let c = Arc::new(SegmentColumns {
            room: ff.u64("room")?.first_or_default_col(0),
            seq: ff.u64("seq")?.first_or_default_col(0),
            ts: ff.i64("ts")?.first_or_default_col(0),
        });
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, c.clone());
        Ok(c)
    }

    /// Forgets segments the current searcher no longer has (merged away).
    pub(super) fn retain(&self, searcher: &tantivy::Searcher) {
        let live: HashSet<_> = searcher
            .segment_readers()
            .iter()
            .map(|s| s.segment_id())
            .collect();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| live.contains(id));
    }
}

impl SearchIndex {
    /// Opens `<data_dir>/search`, creating or rebuilding it when needed.
    /// `store_pos` is the store's last logged position: an index that claims
    /// more (an older store put back) is rebuilt, and so is one whose files
    /// fail their checksums or that holds another number of messages than
    /// its last commit says. A rebuilt index is filled by the [`Indexer`];
    /// after damage, searches are refused until it has caught up with
    /// `store_pos`.
    pub fn open(data_dir: &Path, store_pos: u64) -> Result<SearchIndex, String> {
        let dir = data_dir.join("search");
        let status = Arc::new(IndexStatus::default());
        let live = match Self::open_live(&dir, store_pos, &status) {
            Ok((live, pos)) => {
                status.indexed.store(pos, Ordering::Release);
                live
            }
            Err(Unusable { why, damaged }) => {
                let existed = dir.exists();
                if existed {
                    tracing::warn!(reason = %why, "search index unusable; rebuilding it from the store");
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
                }
                if existed || store_pos > 0 {
                    status.begin_rebuild(&why, store_pos, damaged);
                }
                Self::create_live(&dir)?
            }
        };
        Ok(SearchIndex {
            live: RwLock::new(Arc::new(live)),
            fields: schema().1,
            tokenizer: ConfabTokenizer::default(),
            dir,
            status,
        })
    }

    /// Deletes the index directory (for `confab reindex`).
    pub fn remove(data_dir: &Path) -> Result<(), String> {
        let dir = data_dir.join("search");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// The index as it is now.
    pub(super) fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens an existing index and checks it: schema, payload, position,
    /// every segment file's checksum, the number of messages. Returns it
    /// with its position, or why it cannot be used.
    pub(super) fn open_live(
        dir: &Path,
        store_pos: u64,
        status: &IndexStatus,
    ) -> Result<(Live, u64), Unusable> {
        if !dir.join("meta.json").exists() {
            return Err("no index yet".into());
        }
        let index = Index::open_in_dir(dir).map_err(err)?;
        let (expected, _) = schema();
        if index.schema() != expected {
            return Err("schema differs".into());
        }
        let metas = index.load_metas().map_err(err)?;
        let (pos, docs) = committed_position(&metas)?;
        if pos > store_pos {
            return Err(format!("index is ahead of the store ({pos} > {store_pos})").into());
        }
        // Before anything reads the files: tantivy trusts their contents,
        // and damage inside one (a flipped byte in a `.fast` file) silently
        // changes answers instead of failing.
        let check =
            check_files(&index, dir, None).map_err(|e| format!("cannot check the files: {e}"))?;
        if !check.damaged.is_empty() {
            return Err(Unusable::damaged(
                status,
                format!("damaged files: {}", check.describe()),
            ));
        }
        tracing::debug!(
            files = check.files,
            bytes = check.bytes,
            ms = check.ms,
            "search index checksums verified"
        );
        let live = Self::wrap(index)?;
        let held = live.reader.searcher().num_docs();
        if held != docs {
            return Err(Unusable::damaged(
                status,
                format!("the index holds {held} messages, its last commit claims {docs}"),
            ));
        }
        Ok((live, pos))
    }

    pub(super) fn create_live(dir: &Path) -> Result<Live, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (schema, _) = schema();
        let index = Index::create_in_dir(dir, schema).map_err(err)?;
        Self::wrap(index)
    }

    pub(super) fn wrap(index: Index) -> Result<Live, String> {
        // Tokenizers are not persisted: register on every open.
        index
            .tokenizers()
            .register(ANALYZER, TextAnalyzer::from(ConfabTokenizer::default()));
        // Opening the reader opens every segment.
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(err)?;
        Ok(Live {
            index,
            reader,
            columns: ColumnCache::default(),
        })
    }

    /// Deletes the index and starts an empty one in its place, while the
    /// server runs; the [`Indexer`] (the caller, its writer dropped) then
    /// fills it from the store. Searches are refused until it has caught up
    /// with `store_pos`; searches already running finish on the old files
    /// (their memory maps outlive the deletion).
    pub(super) fn rebuild(&self, why: &str, store_pos: u64) -> Result<(), String> {
        tracing::warn!(reason = %why, messages = store_pos, "rebuilding the search index from the store");
        self.status.begin_rebuild(why, store_pos, true);
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| format!("cannot remove {}: {e}", self.dir.display()))?;
        }
        let live = Self::create_live(&self.dir)?;
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
        Ok(())
    }

    /// The `search` object of `/api/v1/status`: progress, and when the
    /// index is failing or being rebuilt, why.
    pub fn status_json(&self, committed: u64) -> serde_json::Value {
        let st = &self.status;
        let (lag, lag_secs) = st.lag(committed);
        let rebuilding = st.rebuilding();
        let d = st.detail();
        let state = if d.failing.is_some() {
            "failing"
        } else if rebuilding.is_some() || d.damage.is_some() {
            "rebuilding"
        } else {
            "ok"
        };
        let mut v = serde_json::json!({
            "indexed": st.indexed.load(Ordering::Acquire),
            "lag_messages": lag,
            "lag_seconds": lag_secs,
            "index_bytes": self.size_bytes(),
            "healthy": state == "ok",
            "state": state,
            "failures": st.failures.load(Ordering::Relaxed),
            "rebuilds": st.rebuilds.load(Ordering::Relaxed),
            "damage_found": st.damage_found.load(Ordering::Relaxed),
        });
        if let Some(f) = &d.failing {
            v["error"] = serde_json::json!(f);
        }
        if let (Some((done, of)), Some((why, since, _))) = (rebuilding, &d.rebuild) {
            v["rebuild"] = serde_json::json!({
                "reason": why,
                "since": since,
                "done": done,
                "of": of,
                "searches_refused": st.refuse_during_rebuild.load(Ordering::Acquire),
            });
        }
        if let Some(s) = &d.last_scrub {
            v["last_scrub"] = serde_json::json!(s);
        }
        v
    }

    /// Sets the gauges that depend on the store's position; called at each
    /// `/metrics` scrape, so they are current even while the indexer waits
    /// out a back-off.
    pub fn update_gauges(&self, committed: u64) {
        let (lag, lag_secs) = self.status.lag(committed);
        metrics::gauge!("confab_search_index_lag_messages").set(lag as f64);
        metrics::gauge!("confab_search_index_lag_seconds").set(lag_secs);
        metrics::gauge!("confab_search_index_healthy").set(if self.status.healthy() {
            1.0
        } else {
            0.0
        });
    }

    /// Bytes on disk.
    pub fn size_bytes(&self) -> u64 {
        crate::telemetry::dir_size(&self.dir)
    }
}
