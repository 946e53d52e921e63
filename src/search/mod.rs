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
//!   unreadable or foreign index (or one ahead of the store) is deleted and
//!   rebuilt from redb. `confab reindex` does the same on demand.
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
use std::sync::{Arc, Mutex};
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
use crate::store::{Message, Store, now_ms};
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

/// Progress and health of the index, shared by the indexer, the API and metrics.
#[derive(Default)]
pub struct IndexStatus {
    /// Last `message_log` position searchable (committed and reloaded).
    pub indexed: AtomicU64,
    /// When the index last had everything committed in the store (ms).
    pub caught_up_at: AtomicI64,
    pub stop: AtomicBool,
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
}

/// Bytes of the files directly in `dir` (or of `dir` itself if it is a file).
pub fn dir_size(dir: &Path) -> u64 {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(dir).map(|m| m.len()).unwrap_or(0),
    }
}

/// The open index: searched by API handlers, fed by the [`Indexer`].
pub struct SearchIndex {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    tokenizer: ConfabTokenizer,
    dir: PathBuf,
    columns: ColumnCache,
    pub status: Arc<IndexStatus>,
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
    /// more (an older store put back) is rebuilt.
    pub fn open(data_dir: &Path, store_pos: u64) -> Result<SearchIndex, String> {
        let dir = data_dir.join("search");
        match Self::try_open(&dir, store_pos) {
            Ok(ix) => Ok(ix),
            Err(why) => {
                if dir.exists() {
                    tracing::warn!(reason = %why, "search index unusable; rebuilding it from the store");
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
                }
                Self::create(&dir)
            }
        }
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

    fn try_open(dir: &Path, store_pos: u64) -> Result<SearchIndex, String> {
        if !dir.join("meta.json").exists() {
            return Err("no index yet".into());
        }
        let index = Index::open_in_dir(dir).map_err(err)?;
        let (expected, _) = schema();
        if index.schema() != expected {
            return Err("schema differs".into());
        }
        let metas = index.load_metas().map_err(err)?;
        let pos = match metas.payload.as_deref().map(parse_payload) {
            Some(Some(pos)) => pos,
            None if metas.segments.is_empty() => 0,
            _ => return Err("missing or foreign commit payload".into()),
        };
        if pos > store_pos {
            return Err(format!("index is ahead of the store ({pos} > {store_pos})"));
        }
        let ix = Self::wrap(index, dir)?;
        // Every segment must be readable.
        ix.reader.searcher().segment_readers();
        ix.status.indexed.store(pos, Ordering::Release);
        Ok(ix)
    }

    fn create(dir: &Path) -> Result<SearchIndex, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (schema, _) = schema();
        let index = Index::create_in_dir(dir, schema).map_err(err)?;
        Self::wrap(index, dir)
    }

    fn wrap(index: Index, dir: &Path) -> Result<SearchIndex, String> {
        let tokenizer = ConfabTokenizer::default();
        // Tokenizers are not persisted: register on every open.
        index
            .tokenizers()
            .register(ANALYZER, TextAnalyzer::from(tokenizer.clone()));
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(err)?;
        let (_, fields) = schema();
        Ok(SearchIndex {
            index,
            reader,
            fields,
            tokenizer,
            dir: dir.to_path_buf(),
            columns: ColumnCache::default(),
            status: Arc::new(IndexStatus::default()),
        })
    }

    /// Bytes on disk.
    pub fn size_bytes(&self) -> u64 {
        dir_size(&self.dir)
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
        let searcher = self.reader.searcher();
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
            let columns = self.columns.clone();
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
            let cols = self
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

fn parse_payload(p: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(p).ok()?;
    if v.get("format")?.as_str()? != FORMAT {
        return None;
    }
    v.get("pos")?.as_u64()
}

fn payload(pos: u64) -> String {
    serde_json::json!({"format": FORMAT, "pos": pos}).to_string()
}

/// The thread that keeps the index up with the store.
pub struct Indexer {
    index: Arc<SearchIndex>,
    store: Store,
    writer: IndexWriter<TantivyDocument>,
    commit_every: Duration,
}

impl Indexer {
    pub fn new(
        index: Arc<SearchIndex>,
        store: Store,
        commit_every: Duration,
    ) -> Result<Indexer, String> {
        let writer = index
            .index
            .writer_with_num_threads(1, WRITER_BYTES)
            .map_err(err)?;
        // Before the first catch-up: show the backlog from the first scrape
        // on, and count its age from this start (`caught_up_at` is 0, i.e.
        // 1970, until the index first catches up).
        index.status.caught_up_at.store(now_ms(), Ordering::Release);
        let lag = store
            .feed
            .committed()
            .saturating_sub(index.status.indexed.load(Ordering::Acquire));
        metrics::gauge!("confab_search_index_lag_messages").set(lag as f64);
        Ok(Indexer {
            index,
            store,
            writer,
            commit_every,
        })
    }

    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("confab-indexer".into())
            .spawn(move || {
                self.run(|_, _| {});
            })
    }

    /// Indexes everything in the store now, reporting `(done, total)`; for
    /// `confab reindex`. Returns the number of messages indexed.
    pub fn catch_up(self, progress: impl FnMut(u64, u64)) -> Result<u64, String> {
        self.index.status.stop.store(true, Ordering::Release);
        let start = self.index.status.indexed.load(Ordering::Acquire);
        let end = self.run(progress);
        Ok(end.saturating_sub(start))
    }

    /// The loop: read what the store committed, add it, commit on schedule.
    /// With `stop` set it drains everything committed so far, commits and returns.
    fn run(mut self, mut progress: impl FnMut(u64, u64)) -> u64 {
        let status = self.index.status.clone();
        let mut pos = status.indexed.load(Ordering::Acquire);
        let mut pending = 0usize;
        let mut last_commit = Instant::now() - self.commit_every;
        let mut last_size = Instant::now() - Duration::from_secs(60);
        loop {
            let target = self.store.feed.committed();
            let stopping = status.stop.load(Ordering::Acquire);
            if target > pos {
                match self.store.log_after(pos, READ_CHUNK) {
                    Ok(batch) => {
                        for (p, m) in &batch {
                            if let Err(e) = self.writer.add_document(self.doc(m)) {
                                tracing::error!(error = %e, "indexing a message failed");
                            }
                            pos = *p;
                        }
                        pending += batch.len();
                        metrics::counter!("confab_search_indexed_total")
                            .increment(batch.len() as u64);
                        if batch.is_empty() {
                            pos = target;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the message log failed");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                progress(pos, target);
            }
            let caught_up = pos >= self.store.feed.committed();
            let due = last_commit.elapsed() >= self.commit_every;
            if pending > 0 && (due || (stopping && caught_up)) {
                self.commit(pos);
                pending = 0;
                last_commit = Instant::now();
            }
            if caught_up && pending == 0 {
                status.caught_up_at.store(now_ms(), Ordering::Release);
            }
            let (lag, lag_secs) = status.lag(self.store.feed.committed());
            metrics::gauge!("confab_search_index_lag_messages").set(lag as f64);
            metrics::gauge!("confab_search_index_lag_seconds").set(lag_secs);
            if last_size.elapsed() >= Duration::from_secs(10) {
                metrics::gauge!("confab_search_index_bytes").set(self.index.size_bytes() as f64);
                last_size = Instant::now();
            }
            if stopping && caught_up && pending == 0 {
                return pos;
            }
            if caught_up {
                let wait = if pending > 0 {
                    self.commit_every.saturating_sub(last_commit.elapsed())
                } else {
                    Duration::from_secs(1)
                };
                self.store
                    .feed
                    .wait_beyond(pos, wait.max(Duration::from_millis(1)));
            }
        }
    }

    fn doc(&self, m: &Message) -> TantivyDocument {
        let f = self.index.fields;
        let mut d = TantivyDocument::default();
        d.add_u64(f.room, m.room.0);
        d.add_u64(f.seq, m.seq);
        d.add_u64(f.from, m.from.0);
        d.add_i64(f.ts, m.ts);
        d.add_text(f.text, &m.text);
        d
    }

    fn commit(&mut self, pos: u64) {
        let started = Instant::now();
        let result = self.writer.prepare_commit().and_then(|mut c| {
            c.set_payload(&payload(pos));
            c.commit()
        });
        match result.and_then(|_| self.index.reader.reload()) {
            Ok(()) => {
                self.index.columns.retain(&self.index.reader.searcher());
                self.index.status.indexed.store(pos, Ordering::Release);
                metrics::histogram!("confab_search_commit_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => tracing::error!(error = %e, "search index commit failed; will retry"),
        }
    }
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
        ix.reader.reload().expect("reload");
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
        let searcher = ix.reader.searcher();
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
        let searcher = ix.reader.searcher();
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
            let searcher = ix.reader.searcher();
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
