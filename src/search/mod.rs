//! Message search: a tantivy index in `<data_dir>/search/`, derived from the
//! store and never trusted over it.
//!
//! - **Feeding.** Every stored message has a `message_log` position. The
//!   [`Indexer`] thread waits on the store's [`CommitFeed`](crate::store::CommitFeed),
//!   reads newly committed messages from redb, adds them, and commits the
//!   index about every `index_commit_ms` (at once when it was idle), with the
//!   last indexed position in the commit payload; the reader is reloaded
//!   right after each commit (`ReloadPolicy::Manual`).
//! - **Recovery.** On open the payload says where to resume; a missing,
//!   unreadable or foreign index (or one ahead of the store, one whose files
//!   fail their checksums, one holding another number of messages than its
//!   payload says) is deleted and rebuilt from redb; after damage, searches
//!   answer 503 until the rebuild has caught up. `confab reindex` rebuilds
//!   on demand.
//! - **Failures.** The recorded position moves only with a successful
//!   commit of exactly the messages up to it. Any indexer failure drops the
//!   tantivy writer; a new one starts from the last commit on disk and the
//!   rest is read again from redb, retried for ever with back-off (100 ms to
//!   30 s). The state is in `/api/v1/status` and the metrics.
//! - **Damage.** Every segment file's checksum is verified on open and by a
//!   periodic low-priority scrub ([`spawn_scrub`], `index_scrub_secs`);
//!   damage makes the indexer rebuild the index while the server serves.
//! - **Authorization.** A query is always intersected with a
//!   `BooleanQuery` of `TermQuery`s on the caller's current rooms.
//! - **Scores see only the caller's rooms.** BM25 statistics (document
//!   count, document frequencies) and snippet term weights are computed over
//!   the caller's rooms (`RoomStats`), never the whole index: otherwise the
//!   `score` of one's own hits would tell whether anyone on the server wrote
//!   a word, even in a private room.
//! - **Analysis.** [`analyzer`] (Korean bigrams + first syllable, English
//!   stemming), registered on every open.

pub mod analyzer;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    Bm25StatisticsProvider, BooleanQuery, BoostQuery, Occur, PhraseQuery, Query, RangeQuery,
    TermQuery,
};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::snippet::SnippetGenerator;
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{
    BitSet, DocAddress, Index, IndexReader, IndexWriter, Order, ReloadPolicy, Searcher,
    TantivyDocument, Term,
};

use crate::error::ApiError;
use crate::ids::{RoomId, UserId};
use crate::store::{CommitFeed, Message, Store, now_ms};
use analyzer::{ANALYZER, ConfabTokenizer, Mode};

/// Written into every commit payload; a different value means "rebuild".
const FORMAT: &str = "confab-search-1";
/// Messages read from redb per indexing step.
const READ_CHUNK: usize = 5000;
/// Index writer memory budget.
const WRITER_BYTES: usize = 64 << 20;
/// Longest snippet, in characters.
const SNIPPET_CHARS: usize = 160;
/// Deepest page: offset + limit may not exceed this.
pub const MAX_WINDOW: usize = 1000;
/// The average number of `text` terms per message that BM25's length
/// normalisation compares each message with, in place of the true average.
/// The true average over the caller's rooms would need the field norm of
/// every message in them, per query; the index-wide one depends on
/// everyone's messages, i.e. would leak. A constant keeps the normalisation
/// (of two messages with the word, the shorter ranks higher) and leaks
/// nothing. 26 is the mean of the benchmark corpus (26.6 terms over 1.15 M
/// generated messages of 57 characters on average: a Korean word yields its
/// bigrams and its first syllable).
const AVG_TEXT_TERMS: u64 = 26;

#[derive(Clone, Copy)]
struct Fields {
    room: Field,
    seq: Field,
    from: Field,
    ts: Field,
    text: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let room = b.add_u64_field("room", INDEXED | FAST);
    let seq = b.add_u64_field("seq", FAST);
    let from = b.add_u64_field("from", INDEXED | FAST);
    let ts = b.add_i64_field("ts", INDEXED | FAST);
    let text_opts = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let text = b.add_text_field("text", text_opts);
    (
        b.build(),
        Fields {
            room,
            seq,
            from,
            ts,
            text,
        },
    )
}

/// Progress and health of the index, shared by the indexer, the scrub, the
/// API, the status page and metrics.
#[derive(Default)]
pub struct IndexStatus {
    /// Last `message_log` position searchable: committed to tantivy (its
    /// payload says so) and reloaded. Never ahead of what the index holds.
    pub indexed: AtomicU64,
    /// When the index last had everything committed in the store (ms).
    pub caught_up_at: AtomicI64,
    pub stop: AtomicBool,
    /// While `indexed` is below this, the index is being rebuilt from the
    /// store (0: no rebuild running).
    rebuild_until: AtomicU64,
    /// Whether searches are refused during the running rebuild: after
    /// damage, yes — the damaged index answered wrongly, and the new one is
    /// missing most messages until it catches up while its answers look
    /// complete. A rebuild for another reason (no index after a restore or
    /// an upgrade, another format) answers from what is indexed so far, as
    /// the lag after a restart does.
    refuse_during_rebuild: AtomicBool,
    /// Failed indexer steps since start (every stage).
    failures: AtomicU64,
    /// Rebuilds since start.
    rebuilds: AtomicU64,
    /// Checks (on open, scrubs, the document count after a commit) that
    /// found the index damaged.
    damage_found: AtomicU64,
    detail: Mutex<Detail>,
}

/// The parts of [`IndexStatus`] that are more than a number.
#[derive(Default)]
struct Detail {
    /// The failure streak in progress (None: the last step worked).
    failing: Option<Failing>,
    /// Damage found by the scrub, for the indexer to act on.
    damage: Option<String>,
    /// Why the index was last rebuilt, and when that began.
    rebuild: Option<(String, i64, Instant)>,
    last_scrub: Option<ScrubReport>,
}

/// What the status page says while the indexer fails.
#[derive(Clone, Serialize)]
struct Failing {
    stage: &'static str,
    message: String,
    /// When the streak began (ms).
    since: i64,
    attempts: u64,
    retry_in_ms: u64,
}

/// The outcome of the last checksum scrub.
#[derive(Clone, Serialize)]
struct ScrubReport {
    /// When it ended (ms).
    at: i64,
    /// `ok`, `damaged` or `error` (the files could not be read: not damage).
    outcome: &'static str,
    files: usize,
    bytes: u64,
    ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl IndexStatus {
    /// How far the index is behind a store committed up to `committed`:
    /// messages, and seconds since it last had everything.
    pub fn lag(&self, committed: u64) -> (u64, f64) {
        let lag = committed.saturating_sub(self.indexed.load(Ordering::Acquire));
        let secs = if lag == 0 {
            0.0
        } else {
            (now_ms() - self.caught_up_at.load(Ordering::Acquire)).max(0) as f64 / 1000.0
        };
        (lag, secs)
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(indexed, target)` while a rebuild runs.
    fn rebuilding(&self) -> Option<(u64, u64)> {
        let until = self.rebuild_until.load(Ordering::Acquire);
        let done = self.indexed.load(Ordering::Acquire);
        (until > 0 && done < until).then_some((done, until))
    }

    /// Neither failing nor damaged nor rebuilding.
    pub fn healthy(&self) -> bool {
        let d = self.detail();
        d.failing.is_none() && d.damage.is_none() && self.rebuilding().is_none()
    }

    /// The index is being rebuilt from a store committed up to `store_pos`.
    fn begin_rebuild(&self, why: &str, store_pos: u64, refuse_searches: bool) {
        self.refuse_during_rebuild
            .store(refuse_searches, Ordering::Release);
        self.indexed.store(0, Ordering::Release);
        self.rebuild_until.store(store_pos, Ordering::Release);
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_rebuilds_total").increment(1);
        self.detail().rebuild = Some((why.to_string(), now_ms(), Instant::now()));
    }

    /// Called after each commit: ends a rebuild that has caught up.
    fn check_rebuild_done(&self) {
        let until = self.rebuild_until.load(Ordering::Acquire);
        if until > 0 && self.indexed.load(Ordering::Acquire) >= until {
            self.rebuild_until.store(0, Ordering::Release);
            self.refuse_during_rebuild.store(false, Ordering::Release);
            if let Some((why, _, started)) = &self.detail().rebuild {
                tracing::info!(
                    messages = until,
                    secs = started.elapsed().as_secs_f64(),
                    reason = %why,
                    "search index rebuilt from the store; searches answered again"
                );
            }
        }
    }

    /// Damage found (by a check or the scrub): counted, logged, and left
    /// for the indexer, which rebuilds the index from the store.
    /// Searches are refused from here on (see [`SearchIndex::search`]).
    fn report_damage(&self, what: String) {
        tracing::error!(damage = %what, "search index damaged; rebuilding it from the store");
        self.detail().damage = Some(what);
        self.damage_found.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_damage_total").increment(1);
    }

    /// The damage waiting for a rebuild, if any (left in place: searches
    /// stay refused until the rebuild has begun).
    fn pending_damage(&self) -> Option<String> {
        self.detail().damage.clone()
    }

    fn damage_pending(&self) -> bool {
        self.detail().damage.is_some()
    }

    /// One failed step: counted, logged (once per back-off step, as the
    /// indexer waits `retry_in` before the next), shown on the status page.
    fn failed(&self, stage: &'static str, error: &str, retry_in: Duration) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_failures_total", "stage" => stage).increment(1);
        metrics::gauge!("confab_search_index_healthy").set(0.0);
        let mut d = self.detail();
        let (since, attempts) = match &d.failing {
            Some(f) => (f.since, f.attempts + 1),
            None => (now_ms(), 1),
        };
        tracing::error!(
            stage,
            error,
            attempt = attempts,
            retry_in_ms = retry_in.as_millis() as u64,
            indexed = self.indexed.load(Ordering::Acquire),
            "search index failing; will retry (nothing is lost: the store has every message)"
        );
        d.failing = Some(Failing {
            stage,
            message: error.to_string(),
            since,
            attempts,
            retry_in_ms: retry_in.as_millis() as u64,
        });
    }

    /// The step after a failure streak worked: logs the recovery once.
    fn recovered(&self) {
        let mut d = self.detail();
        if let Some(f) = d.failing.take() {
            tracing::info!(
                attempts = f.attempts,
                secs = (now_ms() - f.since).max(0) as f64 / 1000.0,
                indexed = self.indexed.load(Ordering::Acquire),
                "search index recovered"
            );
        }
    }

    fn scrubbed(&self, report: ScrubReport) {
        metrics::counter!("confab_search_index_scrubs_total", "outcome" => report.outcome)
            .increment(1);
        self.detail().last_scrub = Some(report);
    }
}

/// The open index: searched by API handlers, fed by the [`Indexer`],
/// checked by the scrub ([`spawn_scrub`]).
pub struct SearchIndex {
    /// Replaced whole when the index is rebuilt while the server runs; a
    /// search holds the `Live` it started with until it ends.
    live: RwLock<Arc<Live>>,
    fields: Fields,
    tokenizer: ConfabTokenizer,
    dir: PathBuf,
    pub status: Arc<IndexStatus>,
}

/// Why an existing index cannot be used as it is.
struct Unusable {
    why: String,
    /// Damage (checksums, a wrong message count) rather than an index that
    /// is missing or of another kind: searches wait for the rebuild.
    damaged: bool,
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
    fn damaged(status: &IndexStatus, why: String) -> Unusable {
        tracing::error!(damage = %why, "search index damaged");
        status.damage_found.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_damage_total").increment(1);
        Unusable { why, damaged: true }
    }
}

/// The tantivy objects of one index directory's life.
struct Live {
    index: Index,
    reader: IndexReader,
    columns: ColumnCache,
}

/// One segment's fast-field columns. Opening a column reads its whole block
/// index (thousands of blocks in a large segment), so each segment's are
/// opened once and shared by every search until the segment goes away.
struct SegmentColumns {
    room: Arc<dyn tantivy::columnar::ColumnValues<u64>>,
    seq: Arc<dyn tantivy::columnar::ColumnValues<u64>>,
    ts: Arc<dyn tantivy::columnar::ColumnValues<i64>>,
}

#[derive(Clone, Default)]
struct ColumnCache(Arc<Mutex<HashMap<tantivy::index::SegmentId, Arc<SegmentColumns>>>>);

impl ColumnCache {
    fn get(&self, seg: &tantivy::SegmentReader) -> tantivy::Result<Arc<SegmentColumns>> {
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
    fn retain(&self, searcher: &tantivy::Searcher) {
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

/// `GET /api/v1/search` parameters, validated.
pub struct SearchRequest {
    pub q: String,
    pub room: Option<RoomId>,
    pub from: Option<UserId>,
    pub after: Option<i64>,
    pub before: Option<i64>,
    pub by_time: bool,
    pub limit: usize,
    pub offset: usize,
}

#[derive(Serialize)]
pub struct Hit {
    pub room: RoomId,
    pub seq: u64,
    pub from: UserId,
    pub ts: i64,
    pub text: String,
    pub snippet: String,
    /// `[start, end)` character offsets in `snippet` of the matched terms.
    pub highlights: Vec<[usize; 2]>,
    /// The relevance score (absent when sorted by time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

#[derive(Serialize)]
pub struct SearchResponse {
    pub hits: Vec<Hit>,
    pub total: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// BM25 statistics over the rooms a caller can read, so that nothing in a
/// search answer (hits, order, scores, snippets) depends on messages in
/// other rooms. Used for scoring through
/// [`Searcher::search_with_statistics_provider`] and for the snippets' term
/// weights.
///
/// - documents: the messages in the rooms (read once per query from the
///   room terms' postings into a bit set per segment);
/// - a `text` term's document frequency: its postings counted against those
///   sets, once per distinct term of the query, before the search
///   ([`RoomStats::new`]);
/// - the `text` field's token total: documents × [`AVG_TEXT_TERMS`];
/// - other fields' terms (the room filter's and `from`, which carry boost 0
///   and add nothing to a score): the index's own frequency, capped at the
///   document count (BM25's idf requires df ≤ N), never a count of their own.
///
/// Counting against a set rather than with a `Count` of the term and the
/// room filter matters: that filter is a union of one `TermQuery` per room,
/// and seeking in it per candidate cost as much as the search itself.
struct RoomStats<'a> {
    searcher: &'a Searcher,
    text: Field,
    /// The rooms' live messages in each segment, in `searcher` order.
    segments: Vec<BitSet>,
    /// Messages in the rooms; at least 1 (no messages means no hits, and
    /// BM25 divides by it).
    docs: u64,
    /// Document frequency within the rooms of every `text` term of the query.
    doc_freqs: HashMap<Term, u64>,
}

impl<'a> RoomStats<'a> {
    fn new(
        searcher: &'a Searcher,
        fields: Fields,
        rooms: &[RoomId],
        text_q: &dyn Query,
    ) -> tantivy::Result<RoomStats<'a>> {
        let room_terms: BTreeSet<Term> = rooms
            .iter()
            .map(|r| Term::from_field_u64(fields.room, r.0))
            .collect();
        let mut segments = Vec::with_capacity(searcher.segment_readers().len());
        for seg in searcher.segment_readers() {
            let inverted = seg.inverted_index(fields.room)?;
            let alive = seg.alive_bitset();
            let max_doc = seg.max_doc();
            let mut set = BitSet::with_max_value(max_doc);
            for term in &room_terms {
                if let Some(mut postings) =
                    inverted.read_block_postings(term, IndexRecordOption::Basic)?
                {
                    while !postings.docs().is_empty() {
                        for &d in postings.docs() {
                            if d < max_doc && alive.is_none_or(|a| a.is_alive(d)) {
                                set.insert(d);
                            }
                        }
                        postings.advance();
                    }
                }
            }
            segments.push(set);
        }
        let docs = segments.iter().map(|s| s.len() as u64).sum::<u64>();
        let mut terms: HashSet<Term> = HashSet::new();
        text_q.query_terms(&mut |term, _| {
            if term.field() == fields.text {
                terms.insert(term.clone());
            }
        });
        let mut stats = RoomStats {
            searcher,
            text: fields.text,
            segments,
            docs: docs.max(1),
            doc_freqs: HashMap::with_capacity(terms.len()),
        };
        for term in terms {
            let n = stats.count_in_rooms(&term)?;
            stats.doc_freqs.insert(term, n);
        }
        Ok(stats)
    }

    /// Documents in the rooms that contain `term`: per segment, the term's
    /// postings tested against the rooms' set, or, when the term is far more
    /// common than the rooms' messages, each of those looked up in the
    /// postings (`seek` skips whole blocks).
    fn count_in_rooms(&self, term: &Term) -> tantivy::Result<u64> {
        use tantivy::DocSet;
        let mut n = 0u64;
        for (seg, rooms) in self.searcher.segment_readers().iter().zip(&self.segments) {
            if rooms.len() == 0 {
                continue;
            }
            let inverted = seg.inverted_index(term.field())?;
            let Some(info) = inverted.get_term_info(term)? else {
                continue;
            };
            let max = rooms.max_value();
            if (info.doc_freq as usize) <= rooms.len().saturating_mul(4) {
                let mut postings =
                    inverted.read_block_postings_from_terminfo(&info, IndexRecordOption::Basic)?;
                while !postings.docs().is_empty() {
                    n += postings
                        .docs()
                        .iter()
                        .filter(|&&d| d < max && rooms.contains(d))
                        .count() as u64;
                    postings.advance();
                }
            } else {
                let mut postings =
                    inverted.read_postings_from_terminfo(&info, IndexRecordOption::Basic)?;
                let mut at = postings.doc();
                let mut bucket = rooms.first_non_empty_bucket(0);
                'rooms: while let Some(b) = bucket {
                    let mut tiny = rooms.tinyset(b);
                    while let Some(low) = tiny.pop_lowest() {
                        let d = b * 64 + low;
                        if at < d {
                            at = postings.seek(d);
                        }
                        if at == tantivy::TERMINATED {
                            break 'rooms;
                        }
                        if at == d {
                            n += 1;
                        }
                    }
                    bucket = rooms.first_non_empty_bucket(b + 1);
                }
            }
        }
        Ok(n)
    }

    /// Snippet term weights as tantivy's `SnippetGenerator::create` makes
    /// them (`1 / (1 + doc_freq)`, terms found nowhere left out), but from
    /// the rooms' document frequencies.
    fn snippet_terms(&self) -> BTreeMap<String, tantivy::Score> {
        self.doc_freqs
            .iter()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(term, n)| {
                let text = term.value().as_str()?.to_string();
                Some((text, 1.0 / (1.0 + *n as tantivy::Score)))
            })
            .collect()
    }
}

impl Bm25StatisticsProvider for RoomStats<'_> {
    fn total_num_tokens(&self, field: Field) -> tantivy::Result<u64> {
        Ok(if field == self.text {
            self.docs * AVG_TEXT_TERMS
        } else {
            // `room` and `from` hold one value per message.
            self.docs
        })
    }

    fn total_num_docs(&self) -> tantivy::Result<u64> {
        Ok(self.docs)
    }

    fn doc_freq(&self, term: &Term) -> tantivy::Result<u64> {
        let n = if term.field() != self.text {
            self.searcher.doc_freq(term)?
        } else if let Some(n) = self.doc_freqs.get(term) {
            *n
        } else {
            // Every text term is counted in `new`; never reached, but a
            // term missed there must not fall back to index-wide figures.
            self.count_in_rooms(term)?
        };
        Ok(n.min(self.docs))
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
    fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens an existing index and checks it: schema, payload, position,
    /// every segment file's checksum, the number of messages. Returns it
    /// with its position, or why it cannot be used.
    fn open_live(
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

    fn create_live(dir: &Path) -> Result<Live, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (schema, _) = schema();
        let index = Index::create_in_dir(dir, schema).map_err(err)?;
        Self::wrap(index)
    }

    fn wrap(index: Index) -> Result<Live, String> {
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
    fn rebuild(&self, why: &str, store_pos: u64) -> Result<(), String> {
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

    /// The query for one word or quoted phrase (None: nothing searchable in it).
    fn clause(&self, text: &str, phrase: bool) -> Option<Box<dyn Query>> {
        let terms = self.tokenizer.analyze(text, Mode::Query);
        let f = self.fields.text;
        match terms.len() {
            0 => None,
            1 => Some(Box::new(TermQuery::new(
                Term::from_field_text(f, &terms[0].text),
                IndexRecordOption::WithFreqsAndPositions,
            ))),
            _ => {
                let base = terms[0].position;
                let list = terms
                    .iter()
                    .map(|t| (t.position - base, Term::from_field_text(f, &t.text)))
                    .collect();
                // Inside a word, bigrams must be adjacent; across the words of
                // a quoted phrase, allow a Korean particle's extra bigram.
                let slop = if phrase && text.split_whitespace().count() > 1 {
                    2
                } else {
                    0
                };
                Some(Box::new(PhraseQuery::new_with_offset_and_slop(list, slop)))
            }
        }
    }

    /// The text part of a query: every word and every quoted phrase must match.
    fn text_query(&self, q: &str) -> Option<BooleanQuery> {
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for (i, part) in q.split('"').enumerate() {
            let quoted = i % 2 == 1;
            if quoted {
                if let Some(c) = self.clause(part, true) {
                    clauses.push((Occur::Must, c));
                }
            } else {
                for word in part.split_whitespace() {
                    if let Some(c) = self.clause(word, false) {
                        clauses.push((Occur::Must, c));
                    }
                }
            }
        }
        if clauses.is_empty() {
            None
        } else {
            Some(BooleanQuery::new(clauses))
        }
    }

    /// Runs a search over `rooms` (the caller's rooms), reading texts from `store`.
    pub fn search(
        &self,
        store: &Store,
        req: &SearchRequest,
        rooms: &[RoomId],
    ) -> Result<SearchResponse, ApiError> {
        let started = Instant::now();
        // A partial index would answer as if it were complete, a damaged
        // one wrongly.
        let refusing = self.status.refuse_during_rebuild.load(Ordering::Acquire);
        let refuse = match self.status.rebuilding() {
            Some((done, of)) if refusing => Some(format!(
                "the search index is being rebuilt from the store ({done} of {of} messages); retry shortly"
            )),
            _ if self.status.damage_pending() => Some(
                "the search index is damaged and about to be rebuilt from the store; retry shortly"
                    .to_string(),
            ),
            _ => None,
        };
        if let Some(message) = refuse {
            let mut e = ApiError::busy(message);
            e.retry_after = Some(2);
            return Err(e);
        }
        let Some(text_q) = self.text_query(&req.q) else {
            return Err(ApiError::bad_request(
                "bad_request",
                "the query has no searchable words (only punctuation?)",
            ));
        };
        let searched: Vec<RoomId> = match req.room {
            Some(r) if rooms.contains(&r) => vec![r],
            Some(_) => return Err(ApiError::room_not_found()),
            None => rooms.to_vec(),
        };
        if searched.is_empty() {
            return Ok(SearchResponse {
                hits: Vec::new(),
                total: 0,
                next_offset: None,
            });
        }
        let f = self.fields;
        let room_filter = BooleanQuery::new(
            searched
                .iter()
                .map(|r| {
                    let q: Box<dyn Query> = Box::new(TermQuery::new(
                        Term::from_field_u64(f.room, r.0),
                        IndexRecordOption::Basic,
                    ));
                    (Occur::Should, q)
                })
                .collect(),
        );
        let mut all: Vec<(Occur, Box<dyn Query>)> = vec![
            (Occur::Must, Box::new(text_q.clone())),
            // Authorization filter: adds nothing to the score.
            (
                Occur::Must,
                Box::new(BoostQuery::new(Box::new(room_filter), 0.0)),
            ),
        ];
        if let Some(from) = req.from {
            let q = TermQuery::new(
                Term::from_field_u64(f.from, from.0),
                IndexRecordOption::Basic,
            );
            all.push((Occur::Must, Box::new(BoostQuery::new(Box::new(q), 0.0))));
        }
        if req.after.is_some() || req.before.is_some() {
            let lo = req.after.map_or(Bound::Unbounded, |t| {
                Bound::Included(Term::from_field_i64(f.ts, t))
            });
            let hi = req.before.map_or(Bound::Unbounded, |t| {
                Bound::Excluded(Term::from_field_i64(f.ts, t))
            });
            all.push((
                Occur::Must,
                Box::new(BoostQuery::new(Box::new(RangeQuery::new(lo, hi)), 0.0)),
            ));
        }
        let query = BooleanQuery::new(all);
        let live = self.live();
        let searcher = live.reader.searcher();
        // Statistics come from every room the caller reads (`rooms`, not
        // `searched`): a hit's score is the same with or without `room`.
        let room_stats =
            || RoomStats::new(&searcher, f, rooms, &text_q).map_err(ApiError::internal);
        // Made before a relevance search (it scores with them), after a
        // search by time only if there are snippets to make.
        let mut stats = None;
        let top = TopDocs::with_limit(req.limit).and_offset(req.offset);
        // Each hit's relevance score (None when sorted by time): a proxy
        // merges the hits of several nodes by it.
        let (addrs, total): (Vec<(Option<f32>, DocAddress)>, usize) = if req.by_time {
            let (docs, total) = searcher
                .search(
                    &query,
                    &(top.order_by_fast_field::<i64>("ts", Order::Desc), Count),
                )
                .map_err(ApiError::internal)?;
            (docs.into_iter().map(|(_, a)| (None, a)).collect(), total)
        } else {
            // Relevance first; among equal scores the newer message wins.
            let columns = live.columns.clone();
            let by_score = top.tweak_score(move |seg: &tantivy::SegmentReader| {
                let cols = columns.get(seg).ok();
                move |doc: tantivy::DocId, score: tantivy::Score| {
                    (score, cols.as_ref().map(|c| c.ts.get_val(doc)).unwrap_or(0))
                }
            });
            let st = stats.insert(room_stats()?);
            let (docs, total) = searcher
                .search_with_statistics_provider(&query, &(by_score, Count), st)
                .map_err(ApiError::internal)?;
            (
                docs.into_iter().map(|((s, _), a)| (Some(s), a)).collect(),
                total,
            )
        };
        let mut keys = Vec::with_capacity(addrs.len());
        let mut scores = HashMap::with_capacity(addrs.len());
        for (score, addr) in &addrs {
            let cols = live
                .columns
                .get(searcher.segment_reader(addr.segment_ord))
                .map_err(ApiError::internal)?;
            let key = (
                RoomId(cols.room.get_val(addr.doc_id)),
                cols.seq.get_val(addr.doc_id),
            );
            if let Some(s) = score {
                scores.insert(key, *s);
            }
            keys.push(key);
        }
        // A message damaged since it was indexed is not a hit: its text
        // cannot be shown (nor trusted to match).
        let mut messages = store.messages_at(&keys)?;
        messages.retain(|m| !m.unreadable);
        let mut hits = Vec::with_capacity(messages.len());
        if !messages.is_empty() {
            let stats = match stats {
                Some(st) => st,
                None => room_stats()?,
            };
            // What `SnippetGenerator::create` would build, but with term
            // weights from the caller's rooms (it would use the whole
            // index's, and the chosen fragment would leak them).
            let tokenizer = searcher
                .index()
                .tokenizer_for_field(f.text)
                .map_err(ApiError::internal)?;
            let snippets =
                SnippetGenerator::new(stats.snippet_terms(), tokenizer, f.text, SNIPPET_CHARS);
            hits.extend(messages.into_iter().map(|m| {
                let s = snippets.snippet(&m.text);
                let (snippet, highlights) = char_highlights(s.fragment(), s.highlighted());
                let (snippet, highlights) = if snippet.is_empty() {
                    let head: String = m.text.chars().take(SNIPPET_CHARS).collect();
                    (head, Vec::new())
                } else {
                    (snippet, highlights)
                };
                Hit {
                    score: scores.get(&(m.room, m.seq)).copied(),
                    room: m.room,
                    seq: m.seq,
                    from: m.from,
                    ts: m.ts,
                    text: m.text,
                    snippet,
                    highlights,
                }
            }));
        }
        let next = req.offset + hits.len();
        let next_offset =
            (next < total && next < MAX_WINDOW && hits.len() == req.limit).then_some(next);
        metrics::histogram!("confab_search_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(SearchResponse {
            hits,
            total,
            next_offset,
        })
    }
}

/// Byte ranges in `fragment` → merged `[start, end)` character ranges.
fn char_highlights(fragment: &str, ranges: &[std::ops::Range<usize>]) -> (String, Vec<[usize; 2]>) {
    let mut sorted: Vec<std::ops::Range<usize>> = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    let to_char = |b: usize| fragment.get(..b).map(|s| s.chars().count());
    let out = merged
        .iter()
        .filter_map(|r| Some([to_char(r.start)?, to_char(r.end)?]))
        .collect();
    (fragment.to_string(), out)
}

/// A commit payload's position and message count. `docs` was added to the
/// payload later; without it the index must hold one message per position
/// (the store numbers messages 1, 2, … without gaps and never deletes one),
/// so an index written before it is still checked.
fn parse_payload(p: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(p).ok()?;
    if v.get("format")?.as_str()? != FORMAT {
        return None;
    }
    let pos = v.get("pos")?.as_u64()?;
    let docs = match v.get("docs") {
        Some(d) => d.as_u64()?,
        None => pos,
    };
    Some((pos, docs))
}

fn payload(pos: u64, docs: u64) -> String {
    serde_json::json!({"format": FORMAT, "pos": pos, "docs": docs}).to_string()
}

/// The position and message count the index's last commit recorded.
fn committed_position(metas: &tantivy::IndexMeta) -> Result<(u64, u64), String> {
    match metas.payload.as_deref().map(parse_payload) {
        Some(Some(p)) => Ok(p),
        None if metas.segments.is_empty() => Ok((0, 0)),
        _ => Err("missing or foreign commit payload".into()),
    }
}

/// What a checksum pass over the index found.
struct FileCheck {
    files: usize,
    bytes: u64,
    ms: u64,
    /// Files that fail their checksum, are missing or are not segment files
    /// any more (a truncated footer), with why.
    damaged: Vec<(PathBuf, String)>,
}

impl FileCheck {
    fn describe(&self) -> String {
        self.damaged
            .iter()
            .map(|(p, why)| format!("{} ({why})", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a check ended without a verdict.
enum CheckError {
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
fn check_files(
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
fn os_error(e: &tantivy::TantivyError) -> bool {
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

/// Starts the background scrub (`index_scrub_secs`): every `every`, the
/// checksums of all of the index's files are verified ([`check_files`]) on
/// a thread of its own at the lowest CPU and I/O priority. Damage is handed
/// to the [`Indexer`] (woken through `wake`, its feed), which rebuilds the
/// index from the store while the server keeps serving. Ends when
/// `status.stop` is set.
pub fn spawn_scrub(
    index: Arc<SearchIndex>,
    wake: Arc<CommitFeed>,
    every: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("confab-index-scrub".into())
        .spawn(move || {
            lower_priority();
            loop {
                let until = Instant::now() + every;
                loop {
                    if index.status.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(100)));
                }
                index.scrub(&wake);
            }
        })
}

/// Nice 19 and the idle I/O class for the calling thread (on Linux both are
/// per thread), so a scrub of a large index yields to everything else.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority(2) and ioprio_set(2) with who = 0 change only the
    // calling thread's scheduling; no memory is passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        // IOPRIO_WHO_PROCESS = 1, IOPRIO_CLASS_IDLE = 3 (shifted by 13).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
    }
}

impl SearchIndex {
    /// One scrub pass over the index in use.
    fn scrub(&self, wake: &CommitFeed) {
        // A rebuild replaces these files anyway.
        if self.status.rebuilding().is_some() || self.status.damage_pending() {
            return;
        }
        let live = self.live();
        let result = check_files(&live.index, &self.dir, Some(&self.status.stop));
        let report = |outcome, check: Option<&FileCheck>, detail: Option<String>| ScrubReport {
            at: now_ms(),
            outcome,
            files: check.map_or(0, |c| c.files),
            bytes: check.map_or(0, |c| c.bytes),
            ms: check.map_or(0, |c| c.ms),
            detail,
        };
        match result {
            Err(CheckError::Stopped) => {}
            Err(CheckError::Io(e)) => {
                tracing::warn!(error = %e, "search index scrub could not read the index; trying again at the next scrub");
                self.status.scrubbed(report("error", None, Some(e)));
            }
            Ok(check) if check.damaged.is_empty() => {
                tracing::debug!(
                    files = check.files,
                    bytes = check.bytes,
                    ms = check.ms,
                    "search index scrub: checksums verified"
                );
                self.status.scrubbed(report("ok", Some(&check), None));
            }
            Ok(check) => {
                // Damage in files a rebuild already replaced does not matter.
                if !Arc::ptr_eq(&live, &self.live()) {
                    return;
                }
                let what = format!("damaged files: {}", check.describe());
                self.status
                    .scrubbed(report("damaged", Some(&check), Some(what.clone())));
                self.status.report_damage(what);
                wake.nudge();
            }
        }
    }
}

/// First wait after an indexer failure; it doubles with each failure in a
/// row, up to [`RETRY_MAX`], and the indexer never gives up.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why one indexer step failed.
struct Failure {
    stage: &'static str,
    error: String,
    /// The writer is not trusted any more: after a failed commit tantivy's
    /// memory can differ from its files, and a writer whose worker thread
    /// died ("An index writer was killed") drops documents without a word,
    /// then commits the rest. It is dropped, and a new one starts from the
    /// last commit on disk; the store replays the rest.
    drop_writer: bool,
    /// The index does not hold what its commit says: rebuild it.
    damage: bool,
}

impl Failure {
    fn writer(stage: &'static str, e: impl std::fmt::Display) -> Failure {
        Failure {
            stage,
            error: e.to_string(),
            drop_writer: true,
            damage: false,
        }
    }

    fn keep_writer(stage: &'static str, e: impl std::fmt::Display) -> Failure {
        Failure {
            drop_writer: false,
            ..Failure::writer(stage, e)
        }
    }

    fn damage(stage: &'static str, e: impl std::fmt::Display) -> Failure {
        Failure {
            damage: true,
            ..Failure::writer(stage, e)
        }
    }
}

/// The thread that keeps the index up with the store.
///
/// The index records a position only in a commit that holds exactly the
/// messages up to it (`durable`, the payload's `pos`, with their number,
/// `docs`); `status.indexed` follows only after that commit is searchable.
/// Any failure drops the writer; a new one starts from the last commit on
/// disk, and the messages after it are read again from the store, so none
/// is lost and none is indexed twice. Failures are retried for ever, with a
/// back-off from 100 ms doubling to 30 s.
pub struct Indexer {
    index: Arc<SearchIndex>,
    store: Store,
    /// None after a failure, until a new one is made.
    writer: Option<IndexWriter<TantivyDocument>>,
    commit_every: Duration,
    /// Last position committed to the index.
    durable: u64,
    /// Messages in the index at that commit.
    docs: u64,
    /// Last position added to the writer (at least `durable`).
    added: u64,
    /// Messages added to the writer since the last commit.
    pending: u64,
}

impl Indexer {
    pub fn new(index: Arc<SearchIndex>, store: Store, commit_every: Duration) -> Indexer {
        // Before the first catch-up: show the backlog from the first scrape
        // on, and count its age from this start (`caught_up_at` is 0, i.e.
        // 1970, until the index first catches up).
        index.status.caught_up_at.store(now_ms(), Ordering::Release);
        index.update_gauges(store.feed.committed());
        let start = index.status.indexed.load(Ordering::Acquire);
        Indexer {
            index,
            store,
            writer: None,
            commit_every,
            durable: start,
            docs: 0,
            added: start,
            pending: 0,
        }
    }

    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("confab-indexer".into())
            .spawn(move || {
                let _ = self.run(true, |_, _| {});
            })
    }

    /// Indexes everything in the store now, reporting `(done, total)`; for
    /// `confab reindex`, which gives up at the first failure (an operator
    /// is watching). Returns the number of messages indexed.
    pub fn catch_up(self, progress: impl FnMut(u64, u64)) -> Result<u64, String> {
        self.index.status.stop.store(true, Ordering::Release);
        let start = self.index.status.indexed.load(Ordering::Acquire);
        let end = self.run(false, progress)?;
        Ok(end.saturating_sub(start))
    }

    /// The loop: read what the store committed, add it, commit on schedule;
    /// after a failure, wait out the back-off and go on (`retry`) or return
    /// the error. With `stop` set it drains everything committed so far,
    /// commits and returns the last committed position.
    fn run(mut self, retry: bool, mut progress: impl FnMut(u64, u64)) -> Result<u64, String> {
        let status = self.index.status.clone();
        let mut backoff = RETRY_FIRST;
        let mut last_commit = Instant::now() - self.commit_every;
        let mut last_size = Instant::now() - Duration::from_secs(60);
        loop {
            let stopping = status.stop.load(Ordering::Acquire);
            match self.step(stopping, &mut last_commit, &mut progress) {
                Ok(committed) => {
                    if committed {
                        status.recovered();
                        backoff = RETRY_FIRST;
                    }
                }
                Err(f) => {
                    if f.drop_writer {
                        self.writer = None;
                    }
                    if f.damage {
                        status.report_damage(f.error.clone());
                    }
                    status.failed(f.stage, &f.error, backoff);
                    if !retry {
                        return Err(format!("search index {}: {}", f.stage, f.error));
                    }
                    if stopping {
                        tracing::warn!(
                            indexed = self.durable,
                            committed = self.store.feed.committed(),
                            "stopping with the search index behind the store; the next start indexes the rest"
                        );
                        return Ok(self.durable);
                    }
                    self.pause(backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            }
            let committed = self.store.feed.committed();
            let caught_up = self.added >= committed;
            let pending = self.added > self.durable;
            if caught_up && !pending {
                status.caught_up_at.store(now_ms(), Ordering::Release);
                status.recovered();
                backoff = RETRY_FIRST;
            }
            self.index.update_gauges(committed);
            if last_size.elapsed() >= Duration::from_secs(10) {
                metrics::gauge!("confab_search_index_bytes").set(self.index.size_bytes() as f64);
                last_size = Instant::now();
            }
            if stopping && caught_up && !pending {
                return Ok(self.durable);
            }
            if caught_up {
                let wait = if pending {
                    self.commit_every.saturating_sub(last_commit.elapsed())
                } else {
                    Duration::from_secs(1)
                };
                self.store
                    .feed
                    .wait_beyond(self.added, wait.max(Duration::from_millis(1)));
            }
        }
    }

    /// Sleeps `d`, or less if the server stops.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.index.status.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// One round: rebuild if damage was found, make a writer if there is
    /// none, add what the store has beyond `added`, commit when due.
    /// Returns whether it committed.
    fn step(
        &mut self,
        stopping: bool,
        last_commit: &mut Instant,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<bool, Failure> {
        if let Some(why) = self.index.status.pending_damage() {
            self.writer = None;
            // On an error the damage stays pending: tried again after the
            // back-off.
            self.index
                .rebuild(&why, self.store.feed.committed())
                .map_err(|e| Failure::keep_writer("rebuild", e))?;
            self.index.status.detail().damage = None;
            self.durable = 0;
            self.docs = 0;
            self.added = 0;
            self.pending = 0;
        }
        if self.writer.is_none() {
            self.reopen()?;
        }
        let target = self.store.feed.committed();
        if target > self.added {
            let batch = self
                .store
                .log_after(self.added, READ_CHUNK)
                .map_err(|e| Failure::keep_writer("read", e))?;
            let fields = self.index.fields;
            let Some(writer) = self.writer.as_ref() else {
                return Err(Failure::writer("add", "no index writer"));
            };
            for (p, m) in &batch {
                writer
                    .add_document(document(fields, m))
                    .map_err(|e| Failure::writer("add", e))?;
                self.added = *p;
                self.pending += 1;
            }
            metrics::counter!("confab_search_indexed_total").increment(batch.len() as u64);
            if batch.is_empty() {
                self.added = target;
            }
            progress(self.added, target);
        }
        let caught_up = self.added >= self.store.feed.committed();
        let due = last_commit.elapsed() >= self.commit_every;
        if self.added > self.durable && (due || (stopping && caught_up)) {
            *last_commit = Instant::now();
            self.commit()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A new writer, starting from the last commit on disk (what tantivy's
    /// `meta.json` says, not what a failed writer believed), and the reader
    /// reloaded to it. Adding resumes after the committed position.
    fn reopen(&mut self) -> Result<(), Failure> {
        let live = self.index.live();
        let writer = live
            .index
            .writer_with_num_threads(1, WRITER_BYTES)
            .map_err(|e| Failure::writer("open", e))?;
        let metas = live
            .index
            .load_metas()
            .map_err(|e| Failure::writer("open", e))?;
        let (pos, docs) = committed_position(&metas).map_err(|e| Failure::damage("open", e))?;
        live.reader
            .reload()
            .map_err(|e| Failure::writer("reload", e))?;
        let searcher = live.reader.searcher();
        let held = searcher.num_docs();
        if held != docs {
            return Err(Failure::damage(
                "check",
                format!("the index holds {held} messages, its last commit claims {docs}"),
            ));
        }
        live.columns.retain(&searcher);
        // The files of the failed writer's unfinished segments: without
        // this they would wait for the next successful commit, and on a
        // full disk every attempt would leave more of them.
        if let Err(e) = writer.garbage_collect_files().wait() {
            tracing::debug!(error = %e, "search index garbage collection failed");
        }
        self.durable = pos;
        self.docs = docs;
        self.added = pos;
        self.pending = 0;
        self.index.status.indexed.store(pos, Ordering::Release);
        self.index.status.check_rebuild_done();
        self.writer = Some(writer);
        Ok(())
    }

    /// Commits what was added, with its position and message count in the
    /// payload, and makes it searchable. The position becomes `indexed`
    /// only after both, and after the reader holds exactly the messages the
    /// commit says.
    fn commit(&mut self) -> Result<(), Failure> {
        let started = Instant::now();
        let docs = self.docs + self.pending;
        let Some(writer) = self.writer.as_mut() else {
            return Err(Failure::writer("commit", "no index writer"));
        };
        let mut prepared = writer
            .prepare_commit()
            .map_err(|e| Failure::writer("commit", e))?;
        prepared.set_payload(&payload(self.added, docs));
        prepared
            .commit()
            .map_err(|e| Failure::writer("commit", e))?;
        self.durable = self.added;
        self.docs = docs;
        self.pending = 0;
        let live = self.index.live();
        live.reader
            .reload()
            .map_err(|e| Failure::writer("reload", e))?;
        let searcher = live.reader.searcher();
        let held = searcher.num_docs();
        if held != docs {
            return Err(Failure::damage(
                "check",
                format!("after a commit the index holds {held} messages, not {docs}"),
            ));
        }
        live.columns.retain(&searcher);
        self.index
            .status
            .indexed
            .store(self.durable, Ordering::Release);
        self.index.status.check_rebuild_done();
        metrics::histogram!("confab_search_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// A message as an index document.
fn document(f: Fields, m: &Message) -> TantivyDocument {
    let mut d = TantivyDocument::default();
    d.add_u64(f.room, m.room.0);
    d.add_u64(f.seq, m.seq);
    d.add_u64(f.from, m.from.0);
    d.add_i64(f.ts, m.ts);
    d.add_text(f.text, &m.text);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use tantivy::collector::TopDocs;

    /// An index in a temporary directory holding `(room, from, text)` messages.
    fn index_with(msgs: &[(u64, u64, &str)]) -> (tempfile::TempDir, SearchIndex) {
        let dir = tempfile::tempdir().expect("temp dir");
        let ix = SearchIndex::open(dir.path(), 0).expect("open index");
        add(&ix, msgs);
        (dir, ix)
    }

    fn add(ix: &SearchIndex, msgs: &[(u64, u64, &str)]) {
        let f = ix.fields;
        let mut w: IndexWriter<TantivyDocument> = ix
            .live()
            .index
            .writer_with_num_threads(1, 15_000_000)
            .expect("writer");
        for (i, (room, from, text)) in msgs.iter().enumerate() {
            let mut d = TantivyDocument::default();
            d.add_u64(f.room, *room);
            d.add_u64(f.seq, i as u64 + 1);
            d.add_u64(f.from, *from);
            d.add_i64(f.ts, i as i64);
            d.add_text(f.text, text);
            w.add_document(d).expect("add");
        }
        w.commit().expect("commit");
        ix.live().reader.reload().expect("reload");
    }

    fn filter(ix: &SearchIndex, rooms: &[u64]) -> BooleanQuery {
        BooleanQuery::new(
            rooms
                .iter()
                .map(|r| {
                    let q: Box<dyn Query> = Box::new(TermQuery::new(
                        Term::from_field_u64(ix.fields.room, *r),
                        IndexRecordOption::Basic,
                    ));
                    (Occur::Should, q)
                })
                .collect(),
        )
    }

    fn text_term(ix: &SearchIndex, t: &str) -> Term {
        Term::from_field_text(ix.fields.text, t)
    }

    /// Commits `n` one-word messages with this payload (raw text).
    fn commit_with(ix: &SearchIndex, n: u64, payload: &str) {
        let f = ix.fields;
        let live = ix.live();
        let mut w: IndexWriter<TantivyDocument> = live
            .index
            .writer_with_num_threads(1, 15_000_000)
            .expect("writer");
        for i in 0..n {
            let mut d = TantivyDocument::default();
            d.add_u64(f.room, 1);
            d.add_u64(f.seq, i + 1);
            d.add_u64(f.from, 1);
            d.add_i64(f.ts, i as i64);
            d.add_text(f.text, "quokka");
            w.add_document(d).expect("add");
        }
        let mut c = w.prepare_commit().expect("prepare");
        c.set_payload(payload);
        c.commit().expect("commit");
    }

    #[test]
    fn payloads_record_position_and_count_and_old_ones_expect_one_per_position() {
        assert_eq!(parse_payload(&payload(7, 5)), Some((7, 5)));
        assert_eq!(
            parse_payload(r#"{"format":"confab-search-1","pos":66}"#),
            Some((66, 66))
        );
        assert_eq!(parse_payload(r#"{"format":"other","pos":1}"#), None);
        assert_eq!(parse_payload("not json"), None);
    }

    /// An index that holds fewer messages than its last commit claims (the
    /// "indexed 66, found 7" of the faults issue) is rebuilt on open, and
    /// searches are refused until the rebuild has caught up.
    #[test]
    fn an_index_holding_fewer_messages_than_it_claims_is_rebuilt() {
        for (claim, store_pos, rebuilt) in [
            (payload(3, 3), 3, false),
            (payload(5, 3), 5, false),
            (payload(5, 4), 5, true),
            (
                r#"{"format":"confab-search-1","pos":3}"#.to_string(),
                3,
                false,
            ),
            (
                r#"{"format":"confab-search-1","pos":66}"#.to_string(),
                66,
                true,
            ),
        ] {
            let dir = tempfile::tempdir().expect("temp dir");
            let ix = SearchIndex::open(dir.path(), 0).expect("create");
            commit_with(&ix, 3, &claim);
            drop(ix);
            let ix = SearchIndex::open(dir.path(), store_pos).expect("open");
            let st = &ix.status;
            assert_eq!(st.rebuilds.load(Ordering::Relaxed) == 1, rebuilt, "{claim}");
            assert_eq!(st.rebuilding().is_some(), rebuilt, "{claim}");
            assert_eq!(
                st.refuse_during_rebuild.load(Ordering::Relaxed),
                rebuilt,
                "a wrong count is damage: {claim}"
            );
            let want = if rebuilt { 0 } else { claim_pos(&claim) };
            assert_eq!(st.indexed.load(Ordering::Relaxed), want, "{claim}");
        }
        fn claim_pos(p: &str) -> u64 {
            parse_payload(p).map_or(0, |(pos, _)| pos)
        }
    }

    /// A flipped byte inside a segment file is found by the checksums, and
    /// the index is rebuilt on the next open.
    #[test]
    fn checksums_find_a_flipped_byte() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ix = SearchIndex::open(dir.path(), 0).expect("create");
        commit_with(&ix, 50, &payload(50, 50));
        let live = ix.live();
        let clean = check_files(&live.index, &ix.dir, None).ok().expect("check");
        assert!(
            clean.files >= 4 && clean.damaged.is_empty(),
            "{}",
            clean.describe()
        );
        let fast = std::fs::read_dir(&ix.dir)
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "fast"))
            .expect("a .fast file");
        let mut bytes = std::fs::read(&fast).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&fast, &bytes).expect("write");
        let found = check_files(&live.index, &ix.dir, None).ok().expect("check");
        assert_eq!(found.damaged.len(), 1, "{}", found.describe());
        assert!(found.describe().contains(".fast (checksum mismatch)"));
        drop((live, ix));
        let ix = SearchIndex::open(dir.path(), 50).expect("open");
        assert_eq!(ix.status.damage_found.load(Ordering::Relaxed), 1);
        assert_eq!(ix.status.rebuilding(), Some((0, 50)));
    }

    #[test]
    fn room_stats_count_only_the_callers_rooms() {
        let (_dir, ix) = index_with(&[
            (1, 10, "quokka sighting"),
            (1, 11, "quokka quokka"),
            (1, 10, "lake"),
            (2, 10, "quokka"),
            (2, 10, "quokka secret"),
            (2, 10, "secret secret"),
        ]);
        let searcher = ix.live().reader.searcher();
        let text_q = ix.text_query("quokka secret").expect("query");
        let rooms = [RoomId(1), RoomId(1)];
        let st = RoomStats::new(&searcher, ix.fields, &rooms, &text_q).expect("stats");
        assert_eq!(
            st.total_num_docs().ok(),
            Some(3),
            "a repeated room counts once"
        );
        assert_eq!(st.doc_freq(&text_term(&ix, "quokka")).ok(), Some(2));
        assert_eq!(st.doc_freq(&text_term(&ix, "secret")).ok(), Some(0));
        // Not a query term: counted on demand, still within the rooms.
        assert_eq!(st.doc_freq(&text_term(&ix, "sight")).ok(), Some(1));
        assert_eq!(
            st.total_num_tokens(ix.fields.text).ok(),
            Some(3 * AVG_TEXT_TERMS)
        );
        // `from` 10 wrote 5 messages, 4 of them elsewhere: capped at the
        // rooms' 3 documents (BM25's idf asserts df ≤ N).
        let from = Term::from_field_u64(ix.fields.from, 10);
        assert_eq!(st.doc_freq(&from).ok(), Some(3));
        // Snippet weights: terms found in the rooms only.
        let weights = st.snippet_terms();
        assert_eq!(weights.len(), 1);
        assert_eq!(weights.get("quokka").copied(), Some(1.0 / 3.0));
    }

    #[test]
    fn room_counts_scan_or_seek_across_segments() {
        let mut msgs = vec![(1, 10, "quokka"), (1, 10, "lake")];
        msgs.extend([(2, 11, "quokka"); 20]);
        let (_dir, ix) = index_with(&msgs);
        add(&ix, &[(1, 10, "quokka again"), (3, 12, "quokka")]);
        let searcher = ix.live().reader.searcher();
        assert_eq!(searcher.segment_readers().len(), 2);
        let q = ix.text_query("quokka").expect("query");
        let quokka = text_term(&ix, "quokka");
        let count = |rooms: &[u64]| {
            let rooms: Vec<RoomId> = rooms.iter().map(|r| RoomId(*r)).collect();
            let st = RoomStats::new(&searcher, ix.fields, &rooms, &q).expect("stats");
            (st.docs, st.doc_freq(&quokka).expect("doc_freq"))
        };
        // Room 1 alone: 2 of the first segment's 22 messages, and the term
        // in 21 of them, so each of the 2 is looked up in the postings.
        assert_eq!(count(&[1]), (3, 2));
        // Rooms 1 and 2: the postings are scanned against the set.
        assert_eq!(count(&[1, 2]), (23, 22));
        assert_eq!(count(&[2, 3]), (21, 21));
        // No messages at all: one document, as BM25 divides by it.
        assert_eq!(count(&[4]), (1, 0));
    }

    #[test]
    fn scores_ignore_other_rooms() {
        let (_dir, ix) = index_with(&[
            (1, 10, "quokka sighting near the lake"),
            (1, 11, "another quokka quokka photo"),
            (1, 10, "the quokka is the happiest animal of all, they say"),
            (1, 11, "a wombat"),
        ]);
        // (score, seq) of the hits, best first.
        let scores = |ix: &SearchIndex| -> Vec<(f32, u64)> {
            let searcher = ix.live().reader.searcher();
            let mine = filter(ix, &[1]);
            let text_q = ix.text_query("quokka").expect("query");
            let st = RoomStats::new(&searcher, ix.fields, &[RoomId(1)], &text_q).expect("stats");
            let q = BooleanQuery::new(vec![
                (Occur::Must, Box::new(text_q.clone())),
                (
                    Occur::Must,
                    Box::new(BoostQuery::new(Box::new(mine.clone()), 0.0)),
                ),
            ]);
            searcher
                .search_with_statistics_provider(&q, &TopDocs::with_limit(10).order_by_score(), &st)
                .expect("search")
                .into_iter()
                .map(|(score, a)| {
                    let cols = ix
                        .live()
                        .columns
                        .get(searcher.segment_reader(a.segment_ord))
                        .expect("columns");
                    (score, cols.seq.get_val(a.doc_id))
                })
                .collect()
        };
        let before = scores(&ix);
        assert_eq!(before.len(), 3);
        assert!(before.iter().all(|(s, _)| s.is_finite() && *s > 0.0));
        // Another room, many times: the same hits with the same scores.
        add(&ix, &[(2, 12, "quokka quokka quokka"); 50]);
        add(
            &ix,
            &[(2, 12, "quokka and a very long message about nothing else"); 50],
        );
        assert_eq!(scores(&ix), before);
    }
}
