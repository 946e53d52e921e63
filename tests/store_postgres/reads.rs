//! The PostgreSQL backend's reads
//! (`src/storage/postgres/reads.rs`) against rows written with SQL: the
//! orderings the embedded store gives (ids as `u64`, usernames byte-wise),
//! history paging, the message stream, user search and the presence rules.

use crate::pg;

use confab::ids::{RoomId, UserId};
use confab::storage::postgres::{reads, schema};
use confab::store::{Audience, Privacy};
use confab::wallet::TransferIds;
use serde_json::json;

const ALICE: UserId = UserId(1);
const CAROL: UserId = UserId(3);
/// A top-bit id: negative as a `bigint`, last in `u64` order.
const BOB: UserId = UserId(0x8000_0000_0000_0005);
const AZ: UserId = UserId(4);
const AXB: UserId = UserId(6);
const GROUP: RoomId = RoomId(0x8000_0000_0000_0010);
const GROUP2: RoomId = RoomId(0x8000_0000_0000_0020);

/// A fresh, migrated database and a client on it.
async fn database(hint: &str) -> tokio_postgres::Client {
    let url = pg::server().fresh_database(hint);
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    schema::migrate(&mut client).await.expect("migrate");
    client
}

fn i(id: u64) -> i64 {
    id as i64
}

/// A room to insert: id, kind, created_at, last_seq, and its members with
/// their read_seq.
type RoomSpec = (RoomId, i16, i64, i64, Vec<(UserId, i64)>);

/// Alice, Bob, Carol and two more; two direct rooms and two groups.
async fn populate(c: &tokio_postgres::Client) -> (RoomId, RoomId) {
    let d1 = RoomId::direct(ALICE, BOB);
    let d2 = RoomId::direct(ALICE, CAROL);
    for (id, name, presence) in [
        (ALICE, "alice", 0i16),
        (BOB, "bob", 1),
        (CAROL, "carol", 2),
        (AZ, "a_z", 0),
        (AXB, "axb", 0),
    ] {
        c.execute(
            "INSERT INTO users (id, username, display_name, password_hash, created_at, presence, group_adds, last_seen)
             VALUES ($1, $2, upper($2), 'hash-' || $2, 10, $3, 1, CASE WHEN $2 = 'bob' THEN 777 END)",
            &[&i(id.0), &name, &presence],
        )
        .await
        .expect("user");
    }
    for (owner, contact) in [(ALICE, BOB), (ALICE, CAROL), (BOB, ALICE)] {
        c.execute(
            "INSERT INTO contacts (owner, contact, added_at) VALUES ($1, $2, 1)",
            &[&i(owner.0), &i(contact.0)],
        )
        .await
        .expect("contact");
    }
    // (room, kind, created_at, last_seq, members with read_seq)
    let rooms: [RoomSpec; 4] = [
        (d1, 0, 50, 5, vec![(ALICE, 3), (BOB, 5)]),
        (GROUP, 1, 60, 2, vec![(ALICE, 0), (BOB, 2), (CAROL, 1)]),
        (GROUP2, 1, 1500, 0, vec![(ALICE, 0), (CAROL, 0)]),
        (d2, 0, 1500, 0, vec![(ALICE, 0), (CAROL, 0)]),
    ];
    for (room, kind, created, last, members) in rooms {
        let (name, owner) = if kind == 1 {
            (Some("g"), Some(i(ALICE.0)))
        } else {
            (None, None)
        };
        c.execute(
            "INSERT INTO rooms (id, kind, name, owner, created_at, last_seq) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&i(room.0), &kind, &name, &owner, &created, &last],
        )
        .await
        .expect("room");
        for (user, read) in members {
            c.execute(
                "INSERT INTO members (room, user_id, joined_at, read_seq) VALUES ($1, $2, 1, $3)",
                &[&i(room.0), &i(user.0), &read],
            )
            .await
            .expect("member");
        }
    }
    // Stream order interleaves the rooms: d1 1, g 1, d1 2..5, g 2 (payment).
    let msgs: [(RoomId, i64, i64, UserId, i64); 7] = [
        (d1, 1, 1, ALICE, 100),
        (GROUP, 1, 2, BOB, 1000),
        (d1, 2, 3, BOB, 200),
        (d1, 3, 4, ALICE, 300),
        (d1, 4, 5, BOB, 400),
        (d1, 5, 6, BOB, 500),
        (GROUP, 2, 7, BOB, 2000),
    ];
    for (room, seq, pos, from, ts) in msgs {
        let pay = (room == GROUP && seq == 2).then_some(42i64);
        c.execute(
            "INSERT INTO messages (room, seq, pos, sender, ts, client_id, text, pay_transfer, pay_amount, pay_to, pay_note)
             VALUES ($1, $2, $3::bigint, $4, $5, 'c' || $3::bigint::text, 'text ' || $3::bigint::text, $6, $7, $8, NULL)",
            &[
                &i(room.0),
                &seq,
                &pos,
                &i(from.0),
                &ts,
                &pay,
                &pay.map(|_| 500i64),
                &pay.map(|_| i(CAROL.0)),
            ],
        )
        .await
        .expect("message");
    }
    c.execute(
        "INSERT INTO revoked (jti, exp) VALUES ('b', 200), ('a', 300), ('c', 50)",
        &[],
    )
    .await
    .expect("revoked");
    (d1, d2)
}

#[tokio::test]
async fn accounts_reads() {
    let c = database("reads_accounts").await;
    // A linguistic collation on usernames (where the server has ICU), so
    // that byte order ("af" < "aé") differs from the column's ("aé" < "af").
    let icu = c
        .query_opt(
            "SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'",
            &[],
        )
        .await
        .unwrap()
        .is_some();
    if icu {
        c.batch_execute(r#"ALTER TABLE users ALTER COLUMN username TYPE text COLLATE "und-x-icu""#)
            .await
            .unwrap();
    }
    assert!(reads::has_no_users(&c).await.unwrap());
    populate(&c).await;
    assert!(!reads::has_no_users(&c).await.unwrap());

    let (id, rec) = reads::user_by_name(&c, "ALIce").await.unwrap().unwrap();
    assert_eq!(id, ALICE);
    assert_eq!(
        (
            rec.username.as_str(),
            rec.display_name.as_str(),
            rec.password_hash.as_str(),
            rec.created_at
        ),
        ("alice", "ALICE", "hash-alice", 10)
    );
    assert!(reads::user_by_name(&c, "nobody").await.unwrap().is_none());
    let (id, _) = reads::user_by_name(&c, "BOB").await.unwrap().unwrap();
    assert_eq!(id, BOB, "a top-bit id reads back as u64");

    let names =
        |v: Vec<confab::frames::User>| v.into_iter().map(|u| u.username).collect::<Vec<_>>();
    // Byte order ('_' < 'f' < 'l' < 'x' < 'é'), whatever the collation.
    for (id, name) in [(7u64, "af"), (8, "aé")] {
        c.execute(
            "INSERT INTO users (id, username, display_name, password_hash, created_at)
             VALUES ($1, $2, $2, '', 1)",
            &[&i(id), &name],
        )
        .await
        .unwrap();
    }
    assert_eq!(
        names(reads::search_users(&c, "a", 10).await.unwrap()),
        ["a_z", "af", "alice", "axb", "aé"],
        "byte order (ICU collation on the column: {icu})"
    );
    assert_eq!(
        names(reads::search_users(&c, "A", 2).await.unwrap()),
        ["a_z", "af"]
    );
    assert_eq!(
        names(reads::search_users(&c, "a_", 10).await.unwrap()),
        ["a_z"],
        "_ is literal"
    );
    assert_eq!(
        names(reads::search_users(&c, "a%", 10).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        names(reads::search_users(&c, "AÉ", 10).await.unwrap()),
        ["aé"]
    );
    assert_eq!(
        names(reads::search_users(&c, "", 3).await.unwrap()),
        ["a_z", "af", "alice"]
    );
    assert_eq!(
        names(reads::search_users(&c, "b", 0).await.unwrap()),
        Vec::<String>::new()
    );

    // By username, not id (Carol's id is smaller than Bob's).
    assert_eq!(
        names(reads::contacts(&c, ALICE).await.unwrap()),
        ["bob", "carol"]
    );
    assert_eq!(
        names(reads::contacts(&c, CAROL).await.unwrap()),
        Vec::<String>::new()
    );

    assert_eq!(
        reads::privacy(&c, BOB).await.unwrap(),
        Privacy {
            presence: Audience::Contacts,
            group_adds: Audience::Contacts
        }
    );
    assert_eq!(
        reads::privacy(&c, UserId(99)).await.unwrap(),
        Privacy::default()
    );
    assert_eq!(reads::last_seen(&c, BOB).await.unwrap(), Some(777));
    assert_eq!(reads::last_seen(&c, ALICE).await.unwrap(), None);
    assert_eq!(reads::last_seen(&c, UserId(99)).await.unwrap(), None);

    // Bob: contacts only (Alice is his contact); Carol: nobody; Alice: everyone.
    assert_eq!(
        reads::presence_audience(&c, BOB, &[ALICE, CAROL, BOB, AZ, ALICE])
            .await
            .unwrap(),
        [ALICE, BOB, ALICE]
    );
    assert_eq!(
        reads::presence_audience(&c, CAROL, &[ALICE, CAROL])
            .await
            .unwrap(),
        [CAROL]
    );
    assert_eq!(
        reads::presence_audience(&c, ALICE, &[CAROL, BOB])
            .await
            .unwrap(),
        [CAROL, BOB]
    );
    assert_eq!(
        reads::presence_audience(&c, UserId(99), &[CAROL])
            .await
            .unwrap(),
        [CAROL],
        "an unknown owner has the default (everyone)"
    );
    assert!(
        reads::presence_audience(&c, BOB, &[])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        reads::presences_seen_by(&c, ALICE, &[BOB, CAROL, ALICE, UserId(99)])
            .await
            .unwrap(),
        [BOB, ALICE, UserId(99)]
    );
    assert_eq!(
        reads::presences_seen_by(&c, CAROL, &[BOB, CAROL, ALICE])
            .await
            .unwrap(),
        [CAROL, ALICE]
    );
    assert_eq!(
        reads::presences_seen_by(&c, AZ, &[BOB]).await.unwrap(),
        Vec::<UserId>::new()
    );

    assert_eq!(
        reads::revoked_tokens(&c, 100).await.unwrap(),
        [("a".to_string(), 300), ("b".to_string(), 200)]
    );
}

#[tokio::test]
async fn room_reads() {
    let c = database("reads_rooms").await;
    let (d1, d2) = populate(&c).await;
    let ids = TransferIds::default();

    // Most recent activity first; D2 and GROUP2 tie at 1500 and keep u64
    // id order (GROUP2 is negative as a bigint).
    let rooms = reads::rooms_of(&c, ALICE, &ids).await.unwrap();
    let order: Vec<String> = rooms
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        order,
        [
            GROUP.to_string(),
            d2.to_string(),
            GROUP2.to_string(),
            d1.to_string()
        ]
    );
    let g = &rooms[0];
    assert_eq!(g["kind"], "group");
    assert_eq!(g["name"], "g");
    assert_eq!(g["last_seq"], 2);
    assert_eq!(g["unread"], 2);
    assert_eq!(
        g["reads"],
        json!({ ALICE.to_string(): 0, BOB.to_string(): 2, CAROL.to_string(): 1 })
    );
    let members: Vec<&str> = g["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["username"].as_str().unwrap())
        .collect();
    assert_eq!(
        members,
        ["alice", "carol", "bob"],
        "members in u64 id order"
    );
    assert_eq!(g["last_message"]["seq"], 2);
    assert_eq!(g["last_message"]["kind"], "payment");
    assert_eq!(g["last_message"]["payment"]["amount"], 500);
    assert_eq!(g["last_message"]["payment"]["to"], CAROL.to_string());
    assert_eq!(
        g["last_message"]["client_id"],
        format!("pay-{}", ids.show(42))
    );
    assert!(rooms[1]["last_message"].is_null());
    assert_eq!(rooms[1]["unread"], 0);
    assert_eq!(rooms[1]["kind"], "direct");
    let d = &rooms[3];
    assert_eq!(d["unread"], 2);
    assert_eq!(d["last_message"]["text"], "text 6");
    assert_eq!(d["last_message"]["ts"], 500);
    assert_eq!(
        reads::rooms_of(&c, UserId(99), &ids).await.unwrap(),
        Vec::<serde_json::Value>::new()
    );
    assert_eq!(reads::rooms_of(&c, BOB, &ids).await.unwrap().len(), 2);

    let mut all = vec![d1, d2, GROUP, GROUP2];
    all.sort();
    assert_eq!(reads::room_ids_of(&c, ALICE).await.unwrap(), all);
    let heads = reads::room_heads(&c, ALICE).await.unwrap();
    let mut want = vec![(d1, 5), (d2, 0), (GROUP, 2), (GROUP2, 0)];
    want.sort();
    assert_eq!(heads, want);

    let mut peers = vec![(d1, BOB), (d2, CAROL)];
    peers.sort();
    assert_eq!(
        reads::direct_peers(&c, ALICE).await.unwrap(),
        peers.into_iter().map(|p| p.1).collect::<Vec<_>>()
    );
    assert_eq!(reads::direct_peers(&c, BOB).await.unwrap(), [ALICE]);

    let room = reads::room_for(&c, GROUP, CAROL).await.unwrap();
    assert_eq!(
        room.members.iter().map(|u| u.id).collect::<Vec<_>>(),
        [ALICE, CAROL, BOB]
    );
    assert_eq!(
        (room.kind, room.last_seq, room.created_at, room.owner),
        ("group", 2, 60, Some(ALICE))
    );
    assert_eq!(
        reads::room_for(&c, d1, CAROL).await.unwrap_err().code,
        "room_not_found"
    );
    assert_eq!(
        reads::room_for(&c, RoomId(12345), CAROL)
            .await
            .unwrap_err()
            .code,
        "room_not_found"
    );
    reads::check_member(&c, GROUP, BOB).await.unwrap();
    assert_eq!(
        reads::check_member(&c, d1, CAROL).await.unwrap_err().code,
        "room_not_found"
    );
}

#[tokio::test]
async fn message_reads() {
    let c = database("reads_messages").await;
    let (d1, _) = populate(&c).await;
    let ids = TransferIds::default();
    let h = |after: Option<u64>, before: Option<u64>, limit: usize| {
        let (c, ids) = (&c, &ids);
        async move {
            reads::history(c, ids, d1, ALICE, after, before, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(h(None, None, 2).await, [4, 5]);
    assert_eq!(h(None, None, 10).await, [1, 2, 3, 4, 5]);
    assert_eq!(h(Some(1), None, 2).await, [2, 3]);
    assert_eq!(h(None, Some(4), 2).await, [2, 3]);
    assert_eq!(h(Some(1), Some(4), 10).await, [2, 3]);
    assert_eq!(h(Some(1), Some(2), 10).await, Vec::<u64>::new());
    assert_eq!(h(Some(5), None, 10).await, Vec::<u64>::new());
    assert_eq!(h(None, Some(1), 10).await, Vec::<u64>::new());
    assert_eq!(h(Some(u64::MAX), None, 10).await, Vec::<u64>::new());
    assert_eq!(h(None, Some(u64::MAX), 10).await, [1, 2, 3, 4, 5]);
    assert_eq!(h(Some(0), None, 3).await, [1, 2, 3]);
    assert_eq!(h(None, None, 0).await, Vec::<u64>::new());
    assert_eq!(
        reads::history(&c, &ids, d1, CAROL, None, None, 10)
            .await
            .unwrap_err()
            .code,
        "room_not_found"
    );
    let first = &reads::history(&c, &ids, d1, ALICE, None, None, 1)
        .await
        .unwrap()[0];
    assert_eq!(
        (
            first.from,
            first.ts,
            first.text.as_str(),
            first.client_id.as_str()
        ),
        (BOB, 500, "text 6", "c6")
    );
    assert!(first.payment.is_none() && first.kind.is_none());

    let log = reads::log_after(&c, &ids, 0, 3).await.unwrap();
    let got: Vec<(u64, RoomId, u64)> = log.iter().map(|(p, m)| (*p, m.room, m.seq)).collect();
    assert_eq!(got, [(1, d1, 1), (2, GROUP, 1), (3, d1, 2)]);
    let log = reads::log_after(&c, &ids, 5, 100).await.unwrap();
    let got: Vec<(u64, RoomId, u64)> = log.iter().map(|(p, m)| (*p, m.room, m.seq)).collect();
    assert_eq!(got, [(6, d1, 5), (7, GROUP, 2)]);
    assert_eq!(log[1].1.kind, Some("payment"));
    assert!(reads::log_after(&c, &ids, 7, 10).await.unwrap().is_empty());
    assert!(
        reads::log_after(&c, &ids, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(reads::log_after(&c, &ids, 0, 0).await.unwrap().is_empty());

    let at = reads::messages_at(
        &c,
        &ids,
        &[
            (GROUP, 2),
            (d1, 1),
            (d1, 99),
            (RoomId(7), 1),
            (GROUP, 2),
            (d1, u64::MAX),
        ],
    )
    .await
    .unwrap();
    let got: Vec<(RoomId, u64)> = at.iter().map(|m| (m.room, m.seq)).collect();
    assert_eq!(got, [(GROUP, 2), (d1, 1), (GROUP, 2)]);
    assert!(reads::messages_at(&c, &ids, &[]).await.unwrap().is_empty());
}
