//! The store contract: what every storage backend promises the domains,
//! checked through the [`Storage`] interface only (docs/ARCHITECTURE.md,
//! "Storage"). One suite, run against each backend by [`contract!`]: today
//! the embedded redb one; a new backend adds a [`Backend`] and one line.
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
        }
    };
}

contract!(embedded, EmbeddedBackend);

// ---------------------------------------------------------------------------
// Helpers: domain operations through the interface
// ---------------------------------------------------------------------------

async fn new_user(s: &dyn Storage, name: &str) -> User {
    s.call(|reply| Op::CreateUser {
        username: name.to_string(),
        display_name: name.to_uppercase(),
        password_hash: "not-a-real-hash".to_string(),
        placement: None,
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
        placement: None,
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
