//! The `Indexer` thread: keeps the index up with the store's
//! `message_log`, records a position only in a successful commit, and on
//! any failure drops the writer, reopens from the last commit on disk and
//! retries for ever with back-off (100 ms to 30 s).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tantivy::{IndexWriter, TantivyDocument};

use super::index::SearchIndex;
use super::schema::{committed_position, document, payload};
use super::source::Source;
use crate::store::now_ms;

/// Messages read from redb per indexing step.
pub(super) const READ_CHUNK: usize = 5000;
/// Index writer memory budget.
pub(super) const WRITER_BYTES: usize = 64 << 20;

/// First wait after an indexer failure; it doubles with each failure in a
/// row, up to [`RETRY_MAX`], and the indexer never gives up.
pub(super) const RETRY_FIRST: Duration = Duration::from_millis(100);
pub(super) const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why one indexer step failed.
pub(super) struct Failure {
    pub(super) stage: &'static str,
    pub(super) error: String,
    /// The writer is not trusted any more: after a failed commit tantivy's
    /// memory can differ from its files, and a writer whose worker thread
    /// died ("An index writer was killed") drops documents without a word,
    /// then commits the rest. It is dropped, and a new one starts from the
    /// last commit on disk; the store replays the rest.
    pub(super) drop_writer: bool,
    /// The index does not hold what its commit says: rebuild it.
    pub(super) damage: bool,
}

impl Failure {
    pub(super) fn writer(stage: &'static str, e: impl std::fmt::Display) -> Failure {
        Failure {
            stage,
            error: e.to_string(),
            drop_writer: true,
            damage: false,
        }
    }

    pub(super) fn keep_writer(stage: &'static str, e: impl std::fmt::Display) -> Failure {
        Failure {
            drop_writer: false,
            ..Failure::writer(stage, e)
        }
    }

    pub(super) fn damage(stage: &'static str, e: impl std::fmt::Display) -> Failure {
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
    pub(super) index: Arc<SearchIndex>,
    pub(super) source: Arc<dyn Source>,
    /// None after a failure, until a new one is made.
    pub(super) writer: Option<IndexWriter<TantivyDocument>>,
    pub(super) commit_every: Duration,
    /// Last position committed to the index.
    pub(super) durable: u64,
    /// Messages in the index at that commit.
    pub(super) docs: u64,
    /// Last position added to the writer (at least `durable`).
    pub(super) added: u64,
    /// Messages added to the writer since the last commit.
    pub(super) pending: u64,
}

impl Indexer {
    pub fn new(
        index: Arc<SearchIndex>,
        source: Arc<dyn Source>,
        commit_every: Duration,
    ) -> Indexer {
        // Before the first catch-up: show the backlog from the first scrape
        // on, and count its age from this start (`caught_up_at` is 0, i.e.
        // 1970, until the index first catches up).
        index.status.caught_up_at.store(now_ms(), Ordering::Release);
        index.update_gauges(source.committed());
        let start = index.status.indexed.load(Ordering::Acquire);
        Indexer {
            index,
            source,
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
    pub(super) fn run(
        mut self,
        retry: bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, String> {
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
                            committed = self.source.committed(),
                            "stopping with the search index behind the store; the next start indexes the rest"
                        );
                        return Ok(self.durable);
                    }
                    self.pause(backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            }
            let committed = self.source.committed();
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
                self.source
                    .wait_beyond(self.added, wait.max(Duration::from_millis(1)));
            }
        }
    }

    /// Sleeps `d`, or less if the server stops.
    pub(super) fn pause(&self, d: Duration) {
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
    pub(super) fn step(
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
                .rebuild(&why, self.source.committed())
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
        let target = self.source.committed();
        if target > self.added {
            let batch = self
                .source
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
        let caught_up = self.added >= self.source.committed();
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
    pub(super) fn reopen(&mut self) -> Result<(), Failure> {
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
        reload_holding(&live, docs, |held| {
            format!("the index holds {held} messages, its last commit claims {docs}")
        })?;
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
    pub(super) fn commit(&mut self) -> Result<(), Failure> {
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
        reload_holding(&live, docs, |held| {
            format!("after a commit the index holds {held} messages, not {docs}")
        })?;
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

/// Reloads the reader to the last commit and checks that it holds exactly
/// the `docs` messages that commit says (`mismatch` words the damage
/// otherwise); the columns cache keeps only the segments it still sees.
fn reload_holding(
    live: &super::index::Live,
    docs: u64,
    mismatch: impl FnOnce(u64) -> String,
) -> Result<(), Failure> {
    live.reader
        .reload()
        .map_err(|e| Failure::writer("reload", e))?;
    let searcher = live.reader.searcher();
    let held = searcher.num_docs();
    if held != docs {
        return Err(Failure::damage("check", mismatch(held)));
    }
    live.columns.retain(&searcher);
    Ok(())
}
