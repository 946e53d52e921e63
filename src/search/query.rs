//! Searching: `GET /api/v1/search` parameters and answers, query building
//! (words, phrases, the caller's rooms, `from`, dates), BM25 statistics
//! over the caller's rooms only (`RoomStats`), ordering, paging and
//! snippets with highlights.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    Bm25StatisticsProvider, BooleanQuery, BoostQuery, Occur, PhraseQuery, Query, RangeQuery,
    TermQuery,
};
use tantivy::schema::{Field, IndexRecordOption};
use tantivy::snippet::SnippetGenerator;
use tantivy::{BitSet, DocAddress, Order, Searcher, Term};

use super::analyzer::Mode;
use super::index::SearchIndex;
use super::schema::Fields;
use crate::error::ApiError;
use crate::frames::Message;
use crate::ids::{RoomId, UserId};

/// Reads the stored messages at these keys (missing ones skipped).
pub type MessagesAt<'a> = dyn Fn(&[(RoomId, u64)]) -> Result<Vec<Message>, ApiError> + 'a;

/// Longest snippet, in characters.
pub(super) const SNIPPET_CHARS: usize = 160;
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
pub(super) const AVG_TEXT_TERMS: u64 = 26;

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
pub(super) struct RoomStats<'a> {
    pub(super) searcher: &'a Searcher,
    pub(super) text: Field,
    /// The rooms' live messages in each segment, in `searcher` order.
    pub(super) segments: Vec<BitSet>,
    /// Messages in the rooms; at least 1 (no messages means no hits, and
    /// BM25 divides by it).
    pub(super) docs: u64,
    /// Document frequency within the rooms of every `text` term of the query.
    pub(super) doc_freqs: HashMap<Term, u64>,
}

impl<'a> RoomStats<'a> {
    pub(super) fn new(
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
    pub(super) fn count_in_rooms(&self, term: &Term) -> tantivy::Result<u64> {
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
    pub(super) fn snippet_terms(&self) -> BTreeMap<String, tantivy::Score> {
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
    pub(super) fn text_query(&self, q: &str) -> Option<BooleanQuery> {
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

    /// Runs a search over `rooms` (the caller's rooms); `messages_at` reads
    /// the hits' messages from the store (missing ones skipped).
    pub fn search(
        &self,
        messages_at: &MessagesAt<'_>,
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
        let mut messages = messages_at(&keys)?;
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
pub(super) fn char_highlights(
    fragment: &str,
    ranges: &[std::ops::Range<usize>],
) -> (String, Vec<[usize; 2]>) {
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
