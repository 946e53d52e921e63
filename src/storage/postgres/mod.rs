//! The PostgreSQL backend of [`Storage`]: what a cluster node stores, in a
//! database every node reaches (docs/SCALEOUT.md).
//!
//! Writes go through one group-commit writer per node ([`writer`]): one
//! transaction in flight, the batch being whatever queued meanwhile, rows
//! sent as `unnest` arrays; answers come only after the commit. Reads go
//! through a connection pool on the caller's runtime ([`reads`],
//! [`ledger`]). The schema and its migrations are in [`schema`].

mod accounts;
mod base;
pub mod blobs;
mod chat;
mod context;
mod export;
pub mod ledger;
pub mod reads;
pub mod rows;
pub mod schema;
mod wallet;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;

use context::Shared;
pub use context::{OpenError, PgOptions};
pub use writer::{describe, refused};

use super::{Pending, Storage};
use crate::error::ApiError;
use crate::frames::{Message, Room, User};
use crate::ids::{RoomId, UserId};
use crate::store::db::StorageHealth;
use crate::store::{Privacy, UserRecord};
use crate::wallet::{TransferIds, TransferView, Verification};
use crate::writes::Op;

/// The PostgreSQL store, as a [`Storage`].
pub struct Postgres {
    pool: Pool,
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
}

/// How often the replication figures are sampled.
const REPLICATION_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// One connection for a command (`confab migrate`, `confab backup`,
/// `confab restore`), named `application` in `pg_stat_activity`; its error
/// names the host and says whether it did not answer or refused.
pub async fn connect_one(url: &str, application: &str) -> Result<tokio_postgres::Client, String> {
    let mut config = pg_config(url)?;
    config.application_name(application);
    let described = describe(&config);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
        let why = rows::describe_error(&e);
        if refused(&e) {
            format!("the database at {described} refused the connection: {why}")
        } else {
            format!("cannot reach the database at {described}: {why}")
        }
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A connection string's config, with confab's defaults added: a connect
/// timeout and TCP keepalives, so that a dead host is noticed in seconds.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, String> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("the database connection string is not valid: {e}"))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(2));
    }
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(5));
    config.keepalives_interval(std::time::Duration::from_secs(2));
    config.keepalives_retries(3);
    if config.get_application_name().is_none() {
        config.application_name("confab");
    }
    // Several hosts (a primary and its standbys): only the one that takes
    // writes will do, for the writer and for reads (which must see what
    // was just written), unless the string says otherwise.
    if config.get_hosts().len() > 1
        && config.get_target_session_attrs() == tokio_postgres::config::TargetSessionAttrs::Any
        && !url.contains("target_session_attrs")
    {
        config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    Ok(config)
}

impl Postgres {
    /// Connects, brings the schema up to date (refusing a newer one) and
    /// starts the writer thread. Blocks until the database answered; the
    /// error says which database and why.
    pub fn open(opts: PgOptions) -> Result<(Postgres, std::thread::JoinHandle<()>), OpenError> {
        let config = pg_config(&opts.url).map_err(OpenError::Refused)?;
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| OpenError::Refused(format!("the database pool: {e}")))?;
        let shared = Arc::new(Shared {
            health: Arc::new(StorageHealth::default()),
            committed: AtomicU64::new(0),
            ids: opts.transfer_ids.clone(),
            replication: std::sync::Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(opts.store.writer_queue.max(1));
        let join = writer::spawn(config, opts, shared.clone(), rx)?;
        Ok((Postgres { pool, tx, shared }, join))
    }

    /// A pooled connection for a read.
    /// Samples, every [`REPLICATION_EVERY`] for as long as the runtime runs,
    /// which server this node's reads and writes go to and that server's
    /// standbys with their lag (`pg_stat_replication`; the lag columns need
    /// a superuser or the `pg_monitor` role), for `/status` and `/metrics`.
    pub fn watch_replication(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (pool, shared) = (self.pool.clone(), self.shared.clone());
        async move {
            loop {
                let sampled = match pool.get().await {
                    Ok(c) => reads::replication(&c).await.ok(),
                    Err(_) => None,
                };
                if let Some(r) = &sampled {
                    for s in r["standbys"].as_array().into_iter().flatten() {
                        let name = s["name"].as_str().unwrap_or("").to_string();
                        if let Some(b) = s["lag_bytes"].as_f64() {
                            metrics::gauge!("confab_db_replication_lag_bytes", "standby" => name.clone())
                                .set(b);
                        }
                        if let Some(t) = s["replay_lag_seconds"].as_f64() {
                            metrics::gauge!("confab_db_replication_lag_seconds", "standby" => name)
                                .set(t);
                        }
                    }
                    let sync = r["standbys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|s| matches!(s["sync_state"].as_str(), Some("sync" | "quorum")))
                        .count();
                    metrics::gauge!("confab_db_sync_standbys").set(sync as f64);
                }
                *shared.replication.lock().unwrap_or_else(|e| e.into_inner()) = sampled;
                tokio::time::sleep(REPLICATION_EVERY).await;
            }
        }
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, ApiError> {
        let got = self.pool.get().await.map_err(|e| {
            tracing::warn!(error = %e, "no database connection for a read");
            crate::error::storage_error()
        });
        let pool = self.pool.status();
        metrics::gauge!("confab_db_pool_connections", "state" => "idle").set(pool.available as f64);
        metrics::gauge!("confab_db_pool_connections", "state" => "in_use")
            .set(pool.size.saturating_sub(pool.available) as f64);
        got
    }
}

/// Runs `f` with a pooled connection.
macro_rules! with_conn {
    ($self:ident, |$c:ident| $body:expr) => {
        Box::pin(async move {
            let obj = $self.conn().await?;
            let $c: &tokio_postgres::Client = &obj;
            $body.await
        })
    };
}

impl Storage for Postgres {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn database(&self) -> Option<serde_json::Value> {
        let pool = self.pool.status();
        let mut v = serde_json::json!({
            "pool_max": pool.max_size,
            "pool_open": pool.size,
            "pool_idle": pool.available,
            "pool_waiting": pool.waiting,
            "server": null,
            "standbys": null,
        });
        let sampled = self
            .shared
            .replication
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(r) = sampled {
            v["server"] = r["server"].clone();
            v["standbys"] = r["standbys"].clone();
        }
        Some(v)
    }

    fn submit(&self, op: Op) -> Pending<'_, ()> {
        Box::pin(async move {
            self.tx
                .send(op)
                .await
                .map_err(|_| ApiError::busy("the server is shutting down"))
        })
    }

    fn health(&self) -> &StorageHealth {
        &self.shared.health
    }

    fn committed(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    fn head(&self) -> Pending<'_, u64> {
        with_conn!(self, |c| reads::head(c))
    }

    fn damaged_records(&self) -> u64 {
        // PostgreSQL checks its own pages (data checksums); confab keeps no
        // seals of its own there.
        0
    }

    fn transfer_ids(&self) -> &TransferIds {
        &self.shared.ids
    }

    fn has_no_users(&self) -> Pending<'_, bool> {
        with_conn!(self, |c| reads::has_no_users(c))
    }

    fn user(&self, id: UserId) -> Pending<'_, Option<User>> {
        with_conn!(self, |c| rows::user_by_id(c, id))
    }

    fn user_by_name<'a>(&'a self, username: &'a str) -> Pending<'a, Option<(UserId, UserRecord)>> {
        with_conn!(self, |c| reads::user_by_name(c, username))
    }

    fn search_users<'a>(&'a self, prefix: &'a str, limit: usize) -> Pending<'a, Vec<User>> {
        with_conn!(self, |c| reads::search_users(c, prefix, limit))
    }

    fn contacts(&self, owner: UserId) -> Pending<'_, Vec<User>> {
        with_conn!(self, |c| reads::contacts(c, owner))
    }

    fn privacy(&self, user: UserId) -> Pending<'_, Privacy> {
        with_conn!(self, |c| reads::privacy(c, user))
    }

    fn last_seen(&self, user: UserId) -> Pending<'_, Option<i64>> {
        with_conn!(self, |c| reads::last_seen(c, user))
    }

    fn presence_audience<'a>(
        &'a self,
        owner: UserId,
        viewers: &'a [UserId],
    ) -> Pending<'a, Vec<UserId>> {
        with_conn!(self, |c| reads::presence_audience(c, owner, viewers))
    }

    fn presences_seen_by<'a>(
        &'a self,
        viewer: UserId,
        owners: &'a [UserId],
    ) -> Pending<'a, Vec<UserId>> {
        with_conn!(self, |c| reads::presences_seen_by(c, viewer, owners))
    }

    fn revoked_tokens(&self, now_secs: i64) -> Pending<'_, Vec<(String, i64)>> {
        with_conn!(self, |c| reads::revoked_tokens(c, now_secs))
    }

    fn room_for(&self, room: RoomId, user: UserId) -> Pending<'_, Room> {
        with_conn!(self, |c| reads::room_for(c, room, user))
    }

    fn rooms_of(&self, user: UserId) -> Pending<'_, Vec<serde_json::Value>> {
        with_conn!(self, |c| reads::rooms_of(c, user, &self.shared.ids))
    }

    fn room_ids_of(&self, user: UserId) -> Pending<'_, Vec<RoomId>> {
        with_conn!(self, |c| reads::room_ids_of(c, user))
    }

    fn room_heads(&self, user: UserId) -> Pending<'_, Vec<(RoomId, u64)>> {
        with_conn!(self, |c| reads::room_heads(c, user))
    }

    fn check_member(&self, room: RoomId, user: UserId) -> Pending<'_, ()> {
        with_conn!(self, |c| reads::check_member(c, room, user))
    }

    fn members(&self, room: RoomId) -> Pending<'_, Vec<UserId>> {
        with_conn!(self, |c| rows::members(c, room))
    }

    fn direct_peers(&self, user: UserId) -> Pending<'_, Vec<UserId>> {
        with_conn!(self, |c| reads::direct_peers(c, user))
    }

    fn history(
        &self,
        room: RoomId,
        user: UserId,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Pending<'_, Vec<Message>> {
        with_conn!(self, |c| reads::history(
            c,
            &self.shared.ids,
            room,
            user,
            after,
            before,
            limit
        ))
    }

    fn log_after(&self, after: u64, max: usize) -> Pending<'_, Vec<(u64, Message)>> {
        with_conn!(self, |c| reads::log_after(c, &self.shared.ids, after, max))
    }

    fn messages_at<'a>(&'a self, keys: &'a [(RoomId, u64)]) -> Pending<'a, Vec<Message>> {
        with_conn!(self, |c| reads::messages_at(c, &self.shared.ids, keys))
    }

    fn balance(&self, user: UserId) -> Pending<'_, u64> {
        with_conn!(self, |c| ledger::balance(c, user))
    }

    fn transactions<'a>(
        &'a self,
        user: UserId,
        before: Option<u64>,
        limit: usize,
        currency: &'a str,
    ) -> Pending<'a, (Vec<TransferView>, Option<String>)> {
        with_conn!(self, |c| ledger::transactions(
            c,
            &self.shared.ids,
            user,
            before,
            limit,
            currency
        ))
    }

    fn transfer<'a>(
        &'a self,
        id: u64,
        viewer: UserId,
        currency: &'a str,
    ) -> Pending<'a, Option<TransferView>> {
        with_conn!(self, |c| ledger::transfer(
            c,
            &self.shared.ids,
            id,
            viewer,
            currency
        ))
    }

    fn export(
        &self,
        scope: crate::export::Scope,
        slot: crate::export::Slot,
    ) -> Pending<'_, tokio::sync::mpsc::Receiver<bytes::Bytes>> {
        Box::pin(async move {
            let obj = self.conn().await?;
            export::spawn(obj, scope, self.shared.ids.clone(), slot).await
        })
    }

    fn verify_ledger(&self) -> Pending<'_, Verification> {
        Box::pin(async move {
            let mut obj = self.conn().await?;
            let c: &mut tokio_postgres::Client = &mut obj;
            ledger::verify(c).await
        })
    }
}
