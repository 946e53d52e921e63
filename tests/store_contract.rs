//! The store contract: what every storage backend promises the domains,
//! checked through the [`Storage`] interface only (docs/ARCHITECTURE.md,
//! "Storage"). One suite, run against each backend by [`contract!`]: the
//! embedded redb one, and PostgreSQL (a real server, `tests/common/pg.rs`,
//! a fresh database per test); a new backend adds a [`Backend`] and one line.
//!
//! - seqs are gap-free per room under concurrent senders, acked once each;
//! - a repeated `client_id` is answered with the first message, stored once;
//! - the ledger keeps its invariants under concurrent transfers, and an
//!   idempotency key makes one transfer;
//! - a newer schema than the binary knows is refused, naming both versions;
//! - every answered write is seen by the next read, and is still there
//!   after the store is closed and opened again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use confab::frames::{Message, Room, User};
use confab::ids::{RoomId, UserId};
use confab::storage::Storage;
use confab::storage::embedded::Embedded;
use confab::wallet::parse_request;
use confab::writes::{Contact, GroupCommitWriter, Op, Origin, WalletOp, WalletWiring};
use serde_json::json;

#[path = "common/pg.rs"]
mod pg;

/// A backend under test: opens fresh and existing stores.
trait Backend: Send + Sync {
    /// A new, empty store.
    fn fresh(&self) -> Box<dyn Place>;
}

/// One store of a backend (a data directory, a database).
trait Place: Send + Sync {
    /// Opens it (creating it the first time) with its writer running.
    fn open(&self) -> Result<Opened, String>;
    /// Marks the stored schema as `version`, as a newer confab would
    /// have left it (the store is closed).
    fn set_schema_version(&self, version: u64);
    /// The schema version this binary writes.
    fn schema_version(&self) -> u64;
}

/// An open store: the interface, and how to close it.
struct Opened {
    storage: Arc<dyn Storage>,
    close: Box<dyn FnOnce() -> std::thread::JoinHandle<()> + Send>,
}

impl Opened {
    /// Commits what is queued and closes the store.
    async fn close(self) {
        let _ = self.storage.submit(Op::Stop).await;
        let join = (self.close)();
        drop(self.storage);
        tokio::task::spawn_blocking(move || join.join())
            .await
            .expect("join")
            .expect("the writer thread ended cleanly");
    }
}

// ---------------------------------------------------------------------------
// The embedded (redb) backend
// ---------------------------------------------------------------------------

struct EmbeddedBackend;

struct EmbeddedPlace {
    dir: tempfile::TempDir,
}

impl Backend for EmbeddedBackend {
    fn fresh(&self) -> Box<dyn Place> {
        Box::new(EmbeddedPlace {
            dir: tempfile::tempdir().expect("temp dir"),
        })
    }
}

impl Place for EmbeddedPlace {
    fn open(&self) -> Result<Opened, String> {
        let store = confab::store::Store::open(self.dir.path())?;
        let config =
            confab::config::Config::load(&Default::default()).map_err(|e| e.to_string())?;
        let wiring = WalletWiring {
            settings: confab::wallet::WalletSettings {
                currency: "KRW".into(),
                signup_bonus: 0,
                max_scheduled: 100,
            },
            ..Default::default()
        };
        let (writer, join) = GroupCommitWriter::spawn_with(
            store.clone(),
            Arc::new(confab::hub::Hub::default()),
            Default::default(),
            config.store.clone(),
            config.limits.max_group_members,
            wiring,
        )
        .map_err(|e| e.to_string())?;
        store.health.set(confab::store::db::StorageState::Ok, "");
        Ok(Opened {
            storage: Arc::new(Embedded::new(store, writer)),
            close: Box::new(move || join),
        })
    }

    fn set_schema_version(&self, version: u64) {
        let db = redb::Database::open(self.dir.path().join("confab.redb")).expect("open");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .expect("meta");
            meta.insert("schema_version", version).expect("insert");
        }
        txn.commit().expect("commit");
    }

    fn schema_version(&self) -> u64 {
        confab::store::SCHEMA_VERSION
    }
}

// ---------------------------------------------------------------------------
// The PostgreSQL backend
// ---------------------------------------------------------------------------

struct PostgresBackend;

struct PostgresPlace {
    url: String,
    dbname: String,
}

impl Backend for PostgresBackend {
    fn fresh(&self) -> Box<dyn Place> {
        let url = pg::server().fresh_database("contract");
        let dbname = url
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("dbname="))
            .expect("dbname in the connection string")
            .to_string();
        Box::new(PostgresPlace { url, dbname })
    }
}

impl Place for PostgresPlace {
    fn open(&self) -> Result<Opened, String> {
        let config =
            confab::config::Config::load(&Default::default()).map_err(|e| e.to_string())?;
        let (storage, join) =
            confab::storage::postgres::Postgres::open(confab::storage::postgres::PgOptions {
                url: self.url.clone(),
                hub: Arc::new(confab::hub::Hub::default()),
                live: Default::default(),
                store: config.store.clone(),
                max_group_members: config.limits.max_group_members,
                wallet: WalletWiring {
                    settings: confab::wallet::WalletSettings {
                        currency: "KRW".into(),
                        signup_bonus: 0,
                        max_scheduled: 100,
                    },
                    ..Default::default()
                },
                transfer_ids: Default::default(),
                pool_size: 4,
            })?;
        Ok(Opened {
            storage: Arc::new(storage),
            close: Box::new(move || join),
        })
    }

    fn set_schema_version(&self, version: u64) {
        pg::server().psql(
            &self.dbname,
            &format!("UPDATE meta SET value = {version} WHERE key = 'schema_version'"),
        );
    }

    fn schema_version(&self) -> u64 {
        confab::storage::postgres::schema::SCHEMA_VERSION as u64
    }
}

/// Runs every contract test against one backend.
macro_rules! contract {
    ($name:ident, $backend:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn seqs_are_gap_free_per_room_under_concurrent_senders() {
                super::seqs_are_gap_free(&$backend).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_repeated_client_id_is_answered_with_the_first_message() {
                super::client_ids_dedup(&$backend).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_ledger_keeps_its_invariants_under_concurrent_transfers() {
                super::ledger_invariants(&$backend).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_newer_schema_is_refused_naming_both_versions() {
                super::newer_schema_refused(&$backend).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_answered_write_is_read_at_once_and_after_reopening() {
                super::read_your_writes(&$backend).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn groups_privacy_and_history_pages_answer_by_the_rules() {
                super::groups_privacy_history(&$backend).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn scheduled_and_recurring_transfers_run_once_each() {
                super::scheduled_transfers(&$backend).await
            }
        }
    };
}

contract!(embedded, EmbeddedBackend);
contract!(postgres, PostgresBackend);

// ---------------------------------------------------------------------------
// Helpers: domain operations through the interface
// ---------------------------------------------------------------------------

async fn new_user(s: &dyn Storage, name: &str) -> User {
    s.call(|reply| Op::CreateUser {
        username: name.to_string(),
        display_name: name.to_uppercase(),
        password_hash: "not-a-real-hash".to_string(),
        reply,
    })
    .await
    .expect("create user")
}

async fn group(s: &dyn Storage, owner: &User, members: &[&User], name: &str) -> Room {
    s.call(|reply| Op::CreateGroup {
        owner: owner.id,
        name: name.to_string(),
        members: members.iter().map(|u| u.id).collect(),
        reply,
    })
    .await
    .expect("create group")
}

async fn send(
    s: &dyn Storage,
    room: RoomId,
    from: UserId,
    client_id: &str,
    text: &str,
) -> Result<(Message, bool), confab::error::ApiError> {
    s.call(|reply| Op::Send {
        room,
        from,
        client_id: client_id.to_string(),
        text: text.to_string(),
        origin: Origin::Http(reply),
        received: Instant::now(),
    })
    .await
}

async fn credit(s: &dyn Storage, user: UserId, amount: u64) -> u64 {
    s.call(|reply| {
        Op::Wallet(WalletOp::Credit {
            user,
            amount,
            key: None,
            reply,
        })
    })
    .await
    .expect("credit")
}

async fn pay(
    s: &dyn Storage,
    from: UserId,
    to: UserId,
    amount: u64,
    key: &str,
) -> Result<bool, confab::error::ApiError> {
    let body = json!({"to_user_id": to.to_string(), "amount": amount, "idempotency_key": key});
    let req = parse_request(&body, from, "KRW", confab::store::now_ms())?;
    s.call(|reply| Op::Wallet(WalletOp::Transfer { from, req, reply }))
        .await
        .map(|(_, replay)| replay)
}

/// Every message of `room` as `user` reads it, page by page.
async fn all_messages(s: &dyn Storage, room: RoomId, user: UserId) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    loop {
        let after = out.last().map(|m| m.seq).unwrap_or(0);
        let page = s
            .history(room, user, Some(after), None, 200)
            .await
            .expect("history");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

// ---------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------

async fn seqs_are_gap_free(backend: &dyn Backend) {
    let place = backend.fresh();
    let opened = place.open().expect("open");
    let s = opened.storage.clone();
    let users: Vec<User> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(new_user(&*s, &format!("gap{i}")).await);
        }
        v
    };
    let refs: Vec<&User> = users[1..].iter().collect();
    let rooms = [
        group(&*s, &users[0], &refs, "one").await.id,
        group(&*s, &users[0], &refs, "two").await.id,
    ];
    // 8 senders × 150 messages, alternating between the two rooms, all at once.
    const SENDERS: usize = 8;
    const EACH: usize = 150;
    let mut tasks = Vec::new();
    for t in 0..SENDERS {
        let s = s.clone();
        let from = users[t % users.len()].id;
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..EACH {
                let room = rooms[(t + i) % 2];
                let text = format!("t{t} m{i}");
                let (msg, dup) = send(&*s, room, from, &format!("c-{t}-{i}"), &text)
                    .await
                    .expect("send");
                assert!(!dup, "a new client_id was answered as a duplicate");
                assert_eq!(msg.text, text);
                acked.push((room, msg.seq, text));
            }
            acked
        }));
    }
    let mut acked: BTreeMap<RoomId, Vec<(u64, String)>> = BTreeMap::new();
    for t in tasks {
        for (room, seq, text) in t.await.expect("sender") {
            acked.entry(room).or_default().push((seq, text));
        }
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert_eq!(total, SENDERS * EACH);
    for room in rooms {
        let mut mine = acked.remove(&room).unwrap_or_default();
        mine.sort();
        let seqs: Vec<u64> = mine.iter().map(|m| m.0).collect();
        let want: Vec<u64> = (1..=mine.len() as u64).collect();
        assert_eq!(seqs, want, "acked seqs of a room are 1..=n, each once");
        let stored = all_messages(&*s, room, users[0].id).await;
        let stored: Vec<(u64, String)> = stored.into_iter().map(|m| (m.seq, m.text)).collect();
        assert_eq!(stored, mine, "the room holds exactly what was acked");
    }
    // The message stream holds every message once, in increasing positions.
    let log = s.log_after(0, 100_000).await.expect("log");
    assert_eq!(log.len(), SENDERS * EACH);
    assert!(log.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(s.committed(), log.last().map(|l| l.0).unwrap_or(0));
    opened.close().await;
}

async fn client_ids_dedup(backend: &dyn Backend) {
    let place = backend.fresh();
    let opened = place.open().expect("open");
    let s = opened.storage.clone();
    let a = new_user(&*s, "dupa").await;
    let b = new_user(&*s, "dupb").await;
    let room = group(&*s, &a, &[&b], "dups").await.id;
    let (first, dup) = send(&*s, room, a.id, "same", "first").await.expect("send");
    assert!(!dup);
    let (again, dup) = send(&*s, room, a.id, "same", "second text")
        .await
        .expect("resend");
    assert!(dup, "the repeat is answered as a duplicate");
    assert_eq!((again.seq, again.text.as_str()), (first.seq, "first"));
    // Another sender's identical client_id is a different message.
    let (other, dup) = send(&*s, room, b.id, "same", "b's").await.expect("send");
    assert!(!dup);
    assert_eq!(other.seq, first.seq + 1);
    // Ten copies at once: one is stored, all get its seq.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            send(&*s, room, a.id, "burst", "burst").await.expect("send")
        }));
    }
    let mut seqs = Vec::new();
    let mut fresh = 0;
    for t in tasks {
        let (m, dup) = t.await.expect("task");
        seqs.push(m.seq);
        fresh += usize::from(!dup);
    }
    assert_eq!(fresh, 1, "exactly one of the copies is new");
    assert!(seqs.iter().all(|&q| q == seqs[0]));
    let stored = all_messages(&*s, room, a.id).await;
    assert_eq!(
        stored.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["first", "b's", "burst"]
    );
    opened.close().await;
}

async fn ledger_invariants(backend: &dyn Backend) {
    let place = backend.fresh();
    let opened = place.open().expect("open");
    let s = opened.storage.clone();
    let mut users = Vec::new();
    for i in 0..4 {
        let u = new_user(&*s, &format!("led{i}")).await;
        credit(&*s, u.id, 1_000).await;
        users.push(u.id);
    }
    // 60 transfers at once, many more than the balances allow: some are
    // refused, none is half-done.
    let mut tasks = Vec::new();
    for k in 0..60u64 {
        let s = s.clone();
        let from = users[(k % 4) as usize];
        let to = users[((k + 1 + k / 4) % 4) as usize];
        let to = if to == from {
            users[((k + 2) % 4) as usize]
        } else {
            to
        };
        tasks.push(tokio::spawn(async move {
            pay(&*s, from, to, 70 + k * 3, &format!("k{k}")).await
        }));
    }
    let mut done = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => done += 1,
            Err(e) => assert_eq!(e.code, "insufficient_funds", "{e:?}"),
        }
    }
    assert!(done > 0, "some transfers went through");
    // The same idempotency key twice: one transfer, the second a replay.
    let before = s.balance(users[0]).await.expect("balance");
    assert!(!pay(&*s, users[0], users[1], 5, "once").await.expect("pay"));
    assert!(
        pay(&*s, users[0], users[1], 5, "once")
            .await
            .expect("replay")
    );
    assert_eq!(s.balance(users[0]).await.expect("balance"), before - 5);
    let v = s.verify_ledger().await.expect("verify");
    assert!(v.breaches.is_empty(), "{:?}", v.breaches);
    assert_eq!(v.issued, 4_000);
    assert_eq!(v.total_balances, 4_000);
    let mut sum = 0;
    for &u in &users {
        sum += s.balance(u).await.expect("balance");
    }
    assert_eq!(sum, 4_000, "money is neither made nor lost");
    opened.close().await;
}

async fn newer_schema_refused(backend: &dyn Backend) {
    let place = backend.fresh();
    let opened = place.open().expect("open");
    let a = new_user(&*opened.storage, "schema").await;
    opened.close().await;
    let newer = place.schema_version() + 1;
    place.set_schema_version(newer);
    let err = match place.open() {
        Ok(_) => panic!("a store of schema {newer} was opened"),
        Err(e) => e,
    };
    assert!(
        err.contains(&newer.to_string()) && err.contains(&place.schema_version().to_string()),
        "the refusal names both versions: {err}"
    );
    // Nothing was changed: with the version put back, the store opens as it was.
    place.set_schema_version(place.schema_version());
    let opened = place.open().expect("open again");
    let found = opened.storage.user(a.id).await.expect("user");
    assert_eq!(found.map(|u| u.username), Some("schema".to_string()));
    opened.close().await;
}

async fn read_your_writes(backend: &dyn Backend) {
    let place = backend.fresh();
    let opened = place.open().expect("open");
    let s = opened.storage.clone();
    assert!(s.has_no_users().await.expect("has_no_users"));
    let a = new_user(&*s, "ryw_a").await;
    assert_eq!(
        s.user(a.id).await.expect("user").map(|u| u.username),
        Some("ryw_a".into())
    );
    assert!(s.user_by_name("RYW_A").await.expect("by name").is_some());
    let b = new_user(&*s, "ryw_b").await;
    let (contact, _) = s
        .call(|reply| Op::AddContact {
            owner: a.id,
            who: Contact::Name("ryw_b".into()),
            reply,
        })
        .await
        .expect("contact");
    assert_eq!(contact.id, b.id);
    assert_eq!(
        s.contacts(a.id).await.expect("contacts")[0].id,
        b.id,
        "the new contact is listed"
    );
    let (direct, _) = s
        .call(|reply| Op::CreateDirect {
            a: a.id,
            b: b.id,
            reply,
        })
        .await
        .expect("direct");
    assert_eq!(
        s.room_for(direct.id, b.id).await.expect("room").id,
        direct.id
    );
    assert!(
        s.room_ids_of(b.id)
            .await
            .expect("rooms")
            .contains(&direct.id)
    );
    assert_eq!(s.direct_peers(a.id).await.expect("peers"), vec![b.id]);
    for i in 0..20 {
        let (m, _) = send(
            &*s,
            direct.id,
            a.id,
            &format!("r{i}"),
            &format!("hello {i}"),
        )
        .await
        .expect("send");
        let last = s
            .history(direct.id, b.id, None, None, 1)
            .await
            .expect("history");
        assert_eq!(last[0].seq, m.seq, "an acked message is read at once");
        assert_eq!(
            s.messages_at(&[(direct.id, m.seq)]).await.expect("at")[0].text,
            format!("hello {i}")
        );
    }
    credit(&*s, a.id, 500).await;
    assert_eq!(s.balance(a.id).await.expect("balance"), 500);
    pay(&*s, a.id, b.id, 120, "ryw").await.expect("pay");
    assert_eq!(s.balance(b.id).await.expect("balance"), 120);
    let (mine, _) = s
        .transactions(b.id, None, 10, "KRW")
        .await
        .expect("transactions");
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].amount, 120);
    // The payment's message is in the direct chat, after the 20 texts.
    let last = s
        .history(direct.id, a.id, None, None, 1)
        .await
        .expect("history");
    assert_eq!((last[0].seq, last[0].kind), (21, Some("payment")));
    drop(s);
    opened.close().await;

    // Closed and opened again: everything answered is still there.
    let opened = place.open().expect("reopen");
    let s = opened.storage.clone();
    assert!(!s.has_no_users().await.expect("has_no_users"));
    assert_eq!(all_messages(&*s, direct.id, b.id).await.len(), 21);
    assert_eq!(s.balance(a.id).await.expect("balance"), 380);
    assert_eq!(s.contacts(a.id).await.expect("contacts").len(), 1);
    let v = s.verify_ledger().await.expect("verify");
    assert!(v.breaches.is_empty(), "{:?}", v.breaches);
    opened.close().await;
}

async fn groups_privacy_history(backend: &dyn Backend) {
    use confab::store::Audience;
    let place = backend.fresh();
    let opened = place.open().expect("open");
    let s = opened.storage.clone();
    let owner = new_user(&*s, "gp_owner").await;
    let ann = new_user(&*s, "gp_ann").await;
    let bob = new_user(&*s, "gp_bob").await;
    let shy = new_user(&*s, "gp_shy").await;
    // Shy lets only contacts add them to groups and see them online.
    let (before, after) = s
        .call(|reply| Op::SetPrivacy {
            user: shy.id,
            presence: Some(Audience::Contacts),
            group_adds: Some(Audience::Contacts),
            reply,
        })
        .await
        .expect("privacy");
    assert_eq!(before.group_adds, Audience::Everyone);
    assert_eq!(after.presence, Audience::Contacts);
    assert_eq!(s.privacy(shy.id).await.expect("privacy"), after);
    let refused = s
        .call(|reply| Op::CreateGroup {
            owner: owner.id,
            name: "nope".into(),
            members: vec![shy.id],
            reply,
        })
        .await
        .expect_err("shy may not be added");
    assert_eq!(refused.code, "not_allowed");
    assert_eq!(
        s.presence_audience(shy.id, &[owner.id, ann.id, shy.id])
            .await
            .expect("audience"),
        vec![shy.id]
    );
    s.call(|reply| Op::AddContact {
        owner: shy.id,
        who: Contact::Id(owner.id),
        reply,
    })
    .await
    .expect("contact");
    assert_eq!(
        s.presences_seen_by(owner.id, &[shy.id, ann.id])
            .await
            .expect("seen by"),
        vec![shy.id, ann.id]
    );
    assert!(
        s.presences_seen_by(bob.id, &[shy.id])
            .await
            .expect("seen by")
            .is_empty()
    );
    // Now the owner may add shy (after ann: ann is the longest-standing).
    let g = group(&*s, &owner, &[&ann], "club").await;
    assert_eq!(g.owner, Some(owner.id));
    let g = s
        .call(|reply| Op::AddMember {
            room: g.id,
            by: owner.id,
            user: shy.id,
            reply,
        })
        .await
        .expect("add shy");
    assert_eq!(g.members.len(), 3);
    let room = s
        .call(|reply| Op::AddMember {
            room: g.id,
            by: ann.id,
            user: bob.id,
            reply,
        })
        .await
        .expect("add bob");
    assert_eq!(room.members.len(), 4);
    assert_eq!(s.members(g.id).await.expect("members").len(), 4);
    let err = s
        .call(|reply| Op::RemoveMember {
            room: g.id,
            by: ann.id,
            user: bob.id,
            reply,
        })
        .await
        .expect_err("only the owner removes others");
    assert_eq!(err.code, "forbidden");
    // The owner leaves: the longest-standing member (ann) owns it.
    s.call(|reply| Op::RemoveMember {
        room: g.id,
        by: owner.id,
        user: owner.id,
        reply,
    })
    .await
    .expect("leave");
    let now = s.room_for(g.id, ann.id).await.expect("room");
    assert_eq!(now.owner, Some(ann.id));
    assert_eq!(
        s.room_for(g.id, owner.id).await.expect_err("gone").code,
        "room_not_found"
    );
    assert!(s.check_member(g.id, owner.id).await.is_err());
    let (rejected, _) = match send(&*s, g.id, owner.id, "x", "not a member").await {
        Err(e) => (e.code, ()),
        Ok(_) => panic!("a former member's send was stored"),
    };
    assert_eq!(rejected, "room_not_found");
    // 45 messages; pages before/after/latest.
    for i in 1..=45 {
        send(&*s, g.id, ann.id, &format!("h{i}"), &format!("m{i}"))
            .await
            .expect("send");
    }
    let seqs = |v: Vec<Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    let latest = s
        .history(g.id, bob.id, None, None, 10)
        .await
        .expect("latest");
    assert_eq!(seqs(latest), (36..=45).collect::<Vec<_>>());
    let older = s
        .history(g.id, bob.id, None, Some(36), 10)
        .await
        .expect("before");
    assert_eq!(seqs(older), (26..=35).collect::<Vec<_>>());
    let newer = s
        .history(g.id, bob.id, Some(40), None, 3)
        .await
        .expect("after");
    assert_eq!(seqs(newer), vec![41, 42, 43]);
    assert!(
        s.history(g.id, bob.id, Some(45), None, 10)
            .await
            .expect("none after")
            .is_empty()
    );
    // Reads: bob read up to 40; the room list says 5 unread for him.
    s.submit(Op::Read {
        room: g.id,
        user: bob.id,
        seq: 40,
    })
    .await
    .expect("read");
    // A read beyond the last seq is clamped to it.
    s.submit(Op::Read {
        room: g.id,
        user: shy.id,
        seq: 1_000,
    })
    .await
    .expect("read");
    // Reads are not answered: the next answered write orders after them.
    let hello = s
        .call(|reply| Op::CreateDirect {
            a: bob.id,
            b: ann.id,
            reply,
        })
        .await;
    assert!(hello.is_ok());
    let list = s.rooms_of(bob.id).await.expect("rooms");
    let club = list
        .iter()
        .find(|r| r["id"] == json!(g.id.to_string()))
        .expect("the club is listed");
    assert_eq!(club["unread"], json!(5));
    assert_eq!(club["last_message"]["text"], json!("m45"));
    assert_eq!(club["reads"][shy.id.to_string()], json!(45));
    assert_eq!(
        s.room_heads(bob.id)
            .await
            .expect("heads")
            .into_iter()
            .find(|h| h.0 == g.id)
            .map(|h| h.1),
        Some(45)
    );
    // Users by prefix, in username order; tokens revoked until they expire.
    let found = s.search_users("GP_", 3).await.expect("search");
    assert_eq!(
        found
            .iter()
            .map(|u| u.username.as_str())
            .collect::<Vec<_>>(),
        ["gp_ann", "gp_bob", "gp_owner"]
    );
    s.call(|reply| Op::Revoke {
        jti: "old".into(),
        exp: 100,
        reply,
    })
    .await
    .expect("revoke");
    s.call(|reply| Op::Revoke {
        jti: "live".into(),
        exp: 10_000,
        reply,
    })
    .await
    .expect("revoke");
    assert_eq!(
        s.revoked_tokens(5_000).await.expect("revoked"),
        vec![("live".to_string(), 10_000)]
    );
    s.submit(Op::LastSeen {
        user: bob.id,
        ts: 1234,
    })
    .await
    .expect("last seen");
    let _ = s
        .call(|reply| Op::RemoveContact {
            owner: shy.id,
            contact: owner.id,
            reply,
        })
        .await;
    assert_eq!(s.last_seen(bob.id).await.expect("last seen"), Some(1234));
    assert!(s.contacts(shy.id).await.expect("contacts").is_empty());
    opened.close().await;
}

async fn scheduled_transfers(backend: &dyn Backend) {
    let place = backend.fresh();
    let opened = place.open().expect("open");
    let s = opened.storage.clone();
    let a = new_user(&*s, "sch_a").await;
    let b = new_user(&*s, "sch_b").await;
    credit(&*s, a.id, 10_000).await;
    let now = confab::store::now_ms();
    let schedule = |key: &str, at: i64, repeat: Option<&str>| {
        let mut body = json!({
            "to_user_id": b.id.to_string(), "amount": 100,
            "idempotency_key": key, "execute_at": at,
        });
        if let Some(r) = repeat {
            body["repeat"] = json!(r);
        }
        parse_request(&body, a.id, "KRW", now).expect("request")
    };
    let run = |req: confab::wallet::TransferRequest| {
        let s = s.clone();
        async move {
            s.call(|reply| {
                Op::Wallet(WalletOp::Transfer {
                    from: a.id,
                    req,
                    reply,
                })
            })
            .await
            .expect("transfer")
            .0
        }
    };
    let once = run(schedule("later", now + 60_000, None)).await;
    assert_eq!(once.state, "scheduled");
    let cancelled = run(schedule("cancel-me", now + 60_000, None)).await;
    let weekly = run(schedule("weekly", now + 1_000, Some("weekly"))).await;
    assert_eq!(weekly.repeat, Some("weekly"));
    // The recipient does not see plans.
    let (theirs, _) = s.transactions(b.id, None, 50, "KRW").await.expect("list");
    assert!(theirs.is_empty());
    let id = s.transfer_ids().parse(&cancelled.id).expect("id");
    let view = s
        .call(|reply| {
            Op::Wallet(WalletOp::Cancel {
                by: a.id,
                id,
                reply,
            })
        })
        .await
        .expect("cancel");
    assert_eq!(view.state, "cancelled");
    // Three weeks later: the one-off runs once, the weekly one 4 times
    // (at +1 s, +7, +14 and +21 days).
    let later = now + 21 * 86_400_000 + 2_000;
    let next = s
        .call(|reply| Op::Wallet(WalletOp::RunDue { now: later, reply }))
        .await
        .expect("run due");
    assert!(next.is_some_and(|n| n > later), "the weekly one is next");
    // Running again at the same time does nothing more.
    s.call(|reply| Op::Wallet(WalletOp::RunDue { now: later, reply }))
        .await
        .expect("run due again");
    assert_eq!(s.balance(b.id).await.expect("balance"), 500);
    assert_eq!(s.balance(a.id).await.expect("balance"), 9_500);
    let (theirs, _) = s.transactions(b.id, None, 50, "KRW").await.expect("list");
    assert_eq!(theirs.len(), 5);
    assert!(theirs.iter().all(|t| t.state == "executed"));
    assert_eq!(
        theirs.iter().filter(|t| t.recurring.is_some()).count(),
        4,
        "four runs of the weekly transfer"
    );
    // Paging a's own history: 2 at a time, every transfer once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let before = cursor
            .as_deref()
            .and_then(|c: &str| s.transfer_ids().parse(c));
        let (page, next) = s.transactions(a.id, before, 2, "KRW").await.expect("page");
        seen.extend(page.into_iter().map(|t| t.id));
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len());
    // credit + once + cancelled + weekly + 4 runs
    assert_eq!(seen.len(), 8);
    assert!(
        s.transfer(s.transfer_ids().parse(&once.id).expect("id"), b.id, "KRW")
            .await
            .expect("transfer")
            .is_some_and(|t| t.state == "executed")
    );
    let v = s.verify_ledger().await.expect("verify");
    assert!(v.breaches.is_empty(), "{:?}", v.breaches);
    assert_eq!(v.scheduled, 1, "the weekly transfer waits for its next run");
    // The payment messages are in the pair's direct chat, in order.
    let direct = RoomId::direct(a.id, b.id);
    let msgs = all_messages(&*s, direct, b.id).await;
    assert_eq!(msgs.len(), 5);
    assert!(msgs.iter().all(|m| m.kind == Some("payment")));
    opened.close().await;
}
