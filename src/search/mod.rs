//! Message search: a tantivy index in `<data_dir>/search/`, derived from the
//! store and never trusted over it.
//!
//! - **Feeding.** Every stored message has a `message_log` position. The
//!   [`Indexer`] thread waits on its [`Source`] — the embedded store's
//!   [`CommitFeed`](crate::store::CommitFeed), or a PostgreSQL database's
//!   head polled every 100 ms ([`Polled`]: other nodes write it too) —
//!   reads newly committed messages, adds them, and commits the
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

mod checksums;
mod index;
mod indexer;
mod query;
mod schema;
mod scrub;
mod source;
mod status;

pub use index::SearchIndex;
pub use indexer::Indexer;
pub use query::{Hit, MAX_WINDOW, SearchRequest, SearchResponse};
pub use scrub::spawn_scrub;
pub use source::{Polled, Source};
pub use status::IndexStatus;

#[cfg(test)]
use self::{checksums::*, query::*, schema::*};
#[cfg(test)]
use crate::ids::RoomId;
#[cfg(test)]
use std::sync::atomic::Ordering;
#[cfg(test)]
use tantivy::query::{Bm25StatisticsProvider, BooleanQuery, BoostQuery, Occur, Query, TermQuery};
#[cfg(test)]
use tantivy::schema::IndexRecordOption;
#[cfg(test)]
use tantivy::{IndexWriter, TantivyDocument, Term};

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
