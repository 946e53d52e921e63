//! The node's group-commit writer into PostgreSQL: a thread of its own with
//! a one-thread runtime and one connection. It takes whatever operations
//! queued while the last commit was in flight (up to `commit_batch_max`),
//! applies them in order inside one transaction — runs of sends as a few
//! array statements for the whole run — commits, and only then hands the
//! effects on (acks, answers, fan-out).
//!
//! A commit whose outcome is unknown (the connection dropped while it was
//! in flight: it may well have committed) is resolved before anything is
//! answered: every batch also writes this writer's batch number into
//! `writer_marks`, and after reconnecting the writer reads it back — the
//! number is there exactly when the batch committed. Only that batch
//! waits for the answer (up to `RESOLVE_FOR`: during a failover, until the
//! standby is promoted); what queues meanwhile is refused at once with a
//! retryable error, as when the database is unreachable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::{Client, Transaction};

use super::chat;
use super::context::{BatchState, Ctx, OpenError, PgOptions, Shared};
use super::rows::db_err;
use super::schema;
use super::wallet;
use crate::error::ApiError;
use crate::store::db::StorageState;
use crate::writes::publish::{Committed, Subscriber};
use crate::writes::{Delivery, Effect, Op, fail_effects};

/// The writer: the ops' context, and who hears of its commits.
pub(super) struct Writer {
    ctx: Ctx,
    subscribers: Vec<Box<dyn Subscriber<Effect>>>,
    config: tokio_postgres::Config,
    batch_max: usize,
    /// This writer's name in `writer_marks`, and its last batch number.
    writer_id: String,
    batch_no: i64,
    /// A `Stop` met while refusing what queued during a resolution: the
    /// run loop stops after the batch.
    stopping: bool,
}

/// One connection, its driver spawned on the writer's runtime. A writer
/// that stops answering in the middle of a transaction (its process was
/// stopped or froze) holds the stream lock every writer needs; the server
/// ends such a session after [`STALLED_TRANSACTION`], which rolls it back,
/// so the other nodes write again.
async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the writer's database connection ended");
        }
    });
    client
        .batch_execute(&format!(
            "SET idle_in_transaction_session_timeout = {}",
            STALLED_TRANSACTION.as_millis()
        ))
        .await?;
    Ok(client)
}

/// See [`connect`]: far longer than a healthy writer ever waits between two
/// statements of its transaction (microseconds to a few milliseconds).
const STALLED_TRANSACTION: Duration = Duration::from_secs(3);

/// Starts the writer thread: connects and migrates (the caller waits for
/// that and gets its error), then serves `rx` until [`Op::Stop`] or until
/// every sender is gone.
pub(super) fn spawn(
    config: tokio_postgres::Config,
    opts: PgOptions,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Op>,
) -> Result<std::thread::JoinHandle<()>, OpenError> {
    let mut config = config;
    // Told apart from the readers' connections in `pg_stat_activity`.
    config.application_name("confab-writer");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), OpenError>>();
    let join = std::thread::Builder::new()
        .name("pg-writer".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(OpenError::Refused(format!(
                        "the writer's runtime: {e}"
                    ))));
                    return;
                }
            };
            rt.block_on(async move {
                let mut client = match connect(&config).await {
                    Ok(c) => c,
                    Err(e) => {
                        let why = format!(
                            "cannot reach the database at {}: {}",
                            describe(&config),
                            super::rows::describe_error(&e)
                        );
                        let _ = ready_tx.send(Err(if refused(&e) {
                            OpenError::Refused(why)
                        } else {
                            OpenError::Unreachable(why)
                        }));
                        return;
                    }
                };
                if let Err(e) = schema::migrate(&mut client).await {
                    // A migration cut short by a lost connection is tried
                    // again; any other failure is the database's answer.
                    let _ = ready_tx.send(Err(if client.is_closed() {
                        OpenError::Unreachable(e)
                    } else {
                        OpenError::Refused(e)
                    }));
                    return;
                }
                match client
                    .query_one("SELECT value FROM meta WHERE key = 'log_pos'", &[])
                    .await
                {
                    Ok(row) => shared
                        .committed
                        .store(row.get::<_, i64>(0) as u64, Ordering::Release),
                    Err(e) => {
                        let _ = ready_tx.send(Err(OpenError::Unreachable(format!(
                            "reading the database: {}",
                            super::rows::describe_error(&e)
                        ))));
                        return;
                    }
                }
                shared.health.set(StorageState::Ok, "");
                // An op whose reply is dropped unanswered was in a batch the
                // database failed (the reply goes with the op, before the
                // batch's error is recorded): retryable, as that error is.
                shared.health.batch_failed(&crate::error::storage_error());
                let _ = ready_tx.send(Ok(()));
                let writer = Writer {
                    ctx: Ctx {
                        shared,
                        max_group_members: opts.max_group_members,
                        wallet: opts.wallet,
                    },
                    subscribers: vec![Box::new(Delivery {
                        hub: opts.hub,
                        live: opts.live,
                    })],
                    config,
                    batch_max: opts.store.commit_batch_max.max(1),
                    writer_id: format!("{:016x}", rand::random::<u64>()),
                    batch_no: 0,
                    stopping: false,
                };
                writer.run(client, rx).await;
            });
        })
        .map_err(|e| OpenError::Refused(format!("starting the database writer: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(join),
        Ok(Err(e)) => {
            let _ = join.join();
            Err(e)
        }
        Err(_) => {
            let _ = join.join();
            Err(OpenError::Refused(
                "the database writer stopped while starting".into(),
            ))
        }
    }
}

/// Whether a failed connection is the database's refusal (wrong
/// credentials or no such database: SQLSTATE classes 28 and 3D) rather
/// than an unreachable host.
pub fn refused(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| matches!(&d.code().code()[..2], "28" | "3D"))
}

/// Hosts and database of a config, for messages (never the password).
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!(
        "{} (database {})",
        hosts.join(","),
        config.get_dbname().unwrap_or("postgres")
    )
}

impl Writer {
    async fn run(mut self, client: Client, mut rx: mpsc::Receiver<Op>) {
        let mut conn = Conn {
            client: Some(client),
            next_try: Instant::now(),
            wait: RETRY_MIN,
        };
        let mut batch: Vec<Op> = Vec::with_capacity(self.batch_max);
        loop {
            let Some(first) = rx.recv().await else {
                break;
            };
            batch.push(first);
            while batch.len() < self.batch_max {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // What queued after a Stop is not taken: commit up to it, stop.
            let stop = batch.iter().position(|op| matches!(op, Op::Stop));
            if let Some(at) = stop {
                batch.truncate(at);
            }
            if !batch.is_empty() {
                self.commit(&mut conn, std::mem::take(&mut batch), &mut rx)
                    .await;
            }
            if stop.is_some() || self.stopping {
                break;
            }
        }
    }

    /// Applies and commits one batch, and answers its ops. Without a
    /// connection (the database is unreachable, or failing over) the batch
    /// is refused at once with a retryable error: never an ack.
    async fn commit(&mut self, conn: &mut Conn, batch: Vec<Op>, rx: &mut mpsc::Receiver<Op>) {
        let Some(client) = self.connected(conn).await else {
            let e = self.refusal();
            for op in batch {
                op.refuse(&e);
            }
            return;
        };
        let started = Instant::now();
        let n = batch.len();
        self.batch_no += 1;
        let mut effects = Vec::with_capacity(n);
        let mut state = BatchState::default();
        let result = match client.transaction().await {
            Ok(txn) => {
                let r = self.apply_all(&txn, batch, &mut effects, &mut state).await;
                match r {
                    Ok(()) => txn.commit().await.map_err(Failure::Commit),
                    Err(e) => {
                        let _ = txn.rollback().await;
                        Err(Failure::Apply(e))
                    }
                }
            }
            Err(e) => {
                // Not begun (the connection just went): nothing was applied,
                // and every op is answered, a session's send too.
                let e = db_err(e);
                for op in batch {
                    op.refuse(&e);
                }
                Err(Failure::Apply(e))
            }
        };
        let committed = match result {
            Ok(()) => true,
            Err(Failure::Apply(e)) => {
                self.failed(effects, &e);
                self.measured(n, started);
                return;
            }
            Err(Failure::Commit(e)) if !client.is_closed() => {
                // The server answered: the transaction was rolled back.
                self.failed(effects, &db_err(e));
                self.measured(n, started);
                return;
            }
            Err(Failure::Commit(e)) => {
                // The connection dropped during the commit: its outcome is
                // unknown until this batch's mark is read back.
                tracing::warn!(error = %e, "a commit's connection dropped; finding out whether it happened");
                match self.resolve(conn, rx).await {
                    Some(done) => done,
                    None => {
                        // Could not find out: nothing is answered as done.
                        // Clients retry with their client_ids, which finds
                        // the messages if the commit did happen.
                        self.failed(effects, &crate::error::storage_error());
                        self.measured(n, started);
                        return;
                    }
                }
            }
        };
        if committed {
            if let Some(pos) = state.last_pos {
                self.ctx.shared.committed.fetch_max(pos, Ordering::AcqRel);
            }
            let mut done = Committed {
                log_pos: state.last_pos,
                effects,
            };
            for s in &mut self.subscribers {
                s.committed(&mut done);
            }
        } else {
            self.failed(effects, &crate::error::storage_error());
        }
        self.measured(n, started);
    }

    /// The connection, reconnecting when it is gone and the back-off allows
    /// (the storage is `failing` meanwhile, with which database and why).
    async fn connected<'c>(&self, conn: &'c mut Conn) -> Option<&'c mut Client> {
        if conn.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return conn.client.as_mut();
        }
        conn.client = None;
        if Instant::now() < conn.next_try {
            return None;
        }
        match connect(&self.config).await {
            Ok(c) => {
                self.ctx.shared.health.set(StorageState::Ok, "");
                conn.wait = RETRY_MIN;
                conn.client = Some(c);
                conn.client.as_mut()
            }
            Err(e) => {
                let detail = format!(
                    "cannot reach the database at {}: {}",
                    describe(&self.config),
                    super::rows::describe_error(&e)
                );
                self.ctx.shared.health.set(StorageState::Failing, &detail);
                conn.next_try = Instant::now() + conn.wait;
                conn.wait = (conn.wait * 2).min(RETRY_MAX);
                None
            }
        }
    }

    /// Whether the last batch committed, asked on a new connection (tried
    /// for up to [`RESOLVE_FOR`]); None when the database did not answer.
    /// Only that batch waits for the answer: what queues meanwhile was not
    /// tried, and is refused at once with a retryable error (during a
    /// failover the promotion can take a Patroni `ttl`).
    async fn resolve(&mut self, conn: &mut Conn, rx: &mut mpsc::Receiver<Op>) -> Option<bool> {
        let until = Instant::now() + RESOLVE_FOR;
        conn.client = None;
        while Instant::now() < until {
            self.refuse_queued(rx);
            conn.next_try = Instant::now();
            if let Some(c) = self.connected(conn).await
                && let Some(done) = self.mark_committed(c).await
            {
                tracing::info!(committed = done, "the unknown commit was resolved");
                return Some(done);
            }
            let pause = tokio::time::sleep(conn.wait);
            tokio::pin!(pause);
            while !self.stopping {
                tokio::select! {
                    _ = &mut pause => break,
                    op = rx.recv() => match op {
                        Some(op) => self.refuse_one(op),
                        None => break,
                    },
                }
            }
        }
        None
    }

    /// Refuses everything queued now (see [`Writer::resolve`]).
    fn refuse_queued(&mut self, rx: &mut mpsc::Receiver<Op>) {
        while !self.stopping {
            match rx.try_recv() {
                Ok(op) => self.refuse_one(op),
                Err(_) => break,
            }
        }
    }

    /// Refuses one op that was not tried; a `Stop` is kept for the run loop
    /// (nothing after it is taken).
    fn refuse_one(&mut self, op: Op) {
        if matches!(op, Op::Stop) {
            self.stopping = true;
            return;
        }
        op.refuse(&self.refusal());
    }

    /// What an op that was not tried is answered: the storage's state
    /// (which database, and why) when it is failing, else a retryable
    /// storage error.
    fn refusal(&self) -> crate::error::ApiError {
        self.ctx
            .shared
            .health
            .refusal()
            .unwrap_or_else(crate::error::storage_error)
    }

    /// Whether this writer's last batch is in `writer_marks` (None: the
    /// database could not be asked).
    async fn mark_committed(&self, client: &Client) -> Option<bool> {
        let row = client
            .query_opt(
                "SELECT batch FROM writer_marks WHERE writer = $1",
                &[&self.writer_id],
            )
            .await
            .ok()?;
        Some(row.is_some_and(|r| r.get::<_, i64>(0) == self.batch_no))
    }

    fn failed(&mut self, effects: Vec<Effect>, e: &ApiError) {
        metrics::counter!("confab_commit_failures_total").increment(1);
        self.ctx.shared.health.batch_failed(e);
        fail_effects(effects, e);
    }

    fn measured(&mut self, ops: usize, started: Instant) {
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("confab_commit_duration_seconds").record(secs);
        metrics::histogram!("confab_commit_batch_size").record(ops as f64);
        for s in &mut self.subscribers {
            s.measured(ops, secs);
        }
    }

    /// Takes the stream lock, applies the batch's ops in order (runs of
    /// sends together), then the senders' read positions and this batch's
    /// mark.
    ///
    /// Every writer transaction takes `meta.log_pos`'s row lock *first*
    /// and holds it to its commit. Stream positions then follow commit
    /// order (what the indexers rely on), and since no transaction holds
    /// another lock while waiting for it, the nodes' writers can never
    /// deadlock on rooms or wallet accounts taken in different orders.
    async fn apply_all(
        &self,
        txn: &Transaction<'_>,
        batch: Vec<Op>,
        effects: &mut Vec<Effect>,
        state: &mut BatchState,
    ) -> Result<(), ApiError> {
        if let Err(e) = txn
            .execute("SELECT 1 FROM meta WHERE key = 'log_pos' FOR UPDATE", &[])
            .await
        {
            let e = db_err(e);
            for op in batch {
                op.refuse(&e);
            }
            return Err(e);
        }
        let mut ops = batch.into_iter().peekable();
        while let Some(op) = ops.next() {
            let result = if matches!(op, Op::Send { .. }) {
                let mut sends = vec![op];
                while matches!(ops.peek(), Some(Op::Send { .. })) {
                    sends.extend(ops.next());
                }
                chat::send_many(&self.ctx, txn, sends, effects, state).await
            } else {
                match op {
                    Op::Wallet(w) => wallet::apply_wallet(&self.ctx, txn, w, state)
                        .await
                        .map(|e| effects.push(e)),
                    op => chat::apply(&self.ctx, txn, op, state)
                        .await
                        .map(|e| effects.push(e)),
                }
            };
            if let Err(e) = result {
                // The rest of the batch is answered as not done.
                for op in ops {
                    op.refuse(&e);
                }
                return Err(e);
            }
        }
        chat::apply_reads(txn, state, effects).await?;
        chat::flush_reads(txn, state).await?;
        txn.execute(
            "INSERT INTO writer_marks (writer, batch) VALUES ($1, $2)
             ON CONFLICT (writer) DO UPDATE SET batch = $2, at = now()",
            &[&self.writer_id, &self.batch_no],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }
}

/// The writer's connection, and when to try again without one.
struct Conn {
    client: Option<Client>,
    next_try: Instant,
    wait: Duration,
}

const RETRY_MIN: Duration = Duration::from_millis(50);
/// At most this long between two tries: a promoted standby is written to
/// within about this long of taking writes.
const RETRY_MAX: Duration = Duration::from_millis(500);
/// How long a commit with an unknown outcome is resolved for before its
/// ops are answered as not done.
const RESOLVE_FOR: Duration = Duration::from_secs(15);

enum Failure {
    /// Applying failed; the transaction was rolled back.
    Apply(ApiError),
    /// The commit itself failed: its outcome is unknown.
    Commit(tokio_postgres::Error),
}
