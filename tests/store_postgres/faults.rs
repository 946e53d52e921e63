//! The writer's connection to PostgreSQL cut, again and again, while
//! messages are sent: every send is answered either with its ack or with a
//! retryable error (never an ack for what was not stored), a retry with the
//! same `client_id` never stores a message twice, and the room's seqs stay
//! 1..n without a gap. A cut that lands during a commit leaves its outcome
//! unknown; the writer resolves it before answering.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use confab::frames::Message;
use confab::ids::{RoomId, UserId};
use confab::storage::Storage;
use confab::writes::{Op, Origin};

use crate::pg;
use crate::wallet::{new_user, open_pg};

async fn send(
    s: &dyn Storage,
    room: RoomId,
    from: UserId,
    client_id: &str,
) -> Result<(Message, bool), confab::error::ApiError> {
    s.call(|reply| Op::Send {
        room,
        from,
        client_id: client_id.to_string(),
        text: format!("text of {client_id}"),
        origin: Origin::Http(reply),
        received: Instant::now(),
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_connection_never_acks_what_was_not_stored_nor_stores_twice() {
    let url = pg::server().fresh_database("cuts");
    let opened = open_pg(&url);
    let s = opened.s.clone();
    let a = new_user(&*s, "cut_a").await;
    let b = new_user(&*s, "cut_b").await;
    let room = s
        .call(|reply| Op::CreateDirect { a, b, reply })
        .await
        .expect("direct")
        .0
        .id;

    // Cut the writer's connection every 10 ms while 6 senders send.
    let stop = Arc::new(AtomicBool::new(false));
    let cutter = {
        let stop = stop.clone();
        let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        tokio::spawn(async move {
            let mut cuts = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let n = admin
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = 'confab-writer'
                           AND datname = current_database()",
                        &[],
                    )
                    .await
                    .expect("terminate");
                cuts += n as u32;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cuts
        })
    };
    const SENDERS: usize = 6;
    const EACH: usize = 250;
    let mut tasks = Vec::new();
    for t in 0..SENDERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            // client_id → (seq if acked, errors seen)
            let mut out: Vec<(String, Option<u64>, u32)> = Vec::new();
            for i in 0..EACH {
                let id = format!("c{t}-{i}");
                match send(&*s, room, a, &id).await {
                    Ok((m, _)) => out.push((id, Some(m.seq), 0)),
                    Err(e) => {
                        assert!(
                            e.status.is_server_error() && e.retry_after.is_some(),
                            "a failed send is retryable: {e:?}"
                        );
                        out.push((id, None, 1));
                    }
                }
            }
            out
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("sender"));
    }
    stop.store(true, Ordering::Relaxed);
    let cuts = cutter.await.expect("cutter");
    let failed = results.iter().filter(|r| r.1.is_none()).count();
    eprintln!(
        "{cuts} cuts; {failed} of {} sends answered with an error",
        results.len()
    );

    // Retry every failed send with its client_id until it is acked.
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    for (id, seq, _) in results {
        let seq = match seq {
            Some(q) => q,
            None => {
                let mut tries = 0;
                loop {
                    match send(&*s, room, a, &id).await {
                        Ok((m, _)) => break m.seq,
                        Err(e) => {
                            tries += 1;
                            assert!(tries < 100, "the retry of {id} kept failing: {e:?}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        };
        assert!(acked.insert(id, seq).is_none());
    }
    // Every message once; the seqs are 1..n; each acked seq holds its text.
    let mut stored: Vec<Message> = Vec::new();
    loop {
        let after = stored.last().map(|m| m.seq).unwrap_or(0);
        let page = s
            .history(room, b, Some(after), None, 500)
            .await
            .expect("history");
        if page.is_empty() {
            break;
        }
        stored.extend(page);
    }
    assert_eq!(stored.len(), SENDERS * EACH, "every message stored once");
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=(SENDERS * EACH) as u64).collect::<Vec<_>>());
    for m in &stored {
        assert_eq!(acked.get(&m.client_id), Some(&m.seq), "{}", m.client_id);
        assert_eq!(m.text, format!("text of {}", m.client_id));
    }
    opened.close().await;
}
