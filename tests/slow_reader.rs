//! A slow reader never slows the others: it is disconnected (4008) while a
//! fast reader in the same room gets every message promptly.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Largest possible kernel send buffer on this machine (server side of the
/// slow connection can park this much without noticing the client is slow).
fn wmem_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|x| x.parse().ok()))
        .unwrap_or(4 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_cut_off_and_fast_reader_is_not_slowed() {
    const TEXT_CHARS: usize = 2000;
    // Few sends in flight: with outbox_frames=16 a burst of more fan-out
    // frames than that would overflow even a fast reader's queue.
    const WINDOW: usize = 4;
    // Enough traffic to overflow every buffer between the server and L.
    let n: usize = 3000.max(wmem_max() * 3 / 2 / TEXT_CHARS);
    let srv = Server::start(&[
        "outbox_frames=16",
        "send_rate_per_sec=100000",
        "send_burst=100000",
        "user_send_rate_per_sec=100000",
        "user_send_burst=100000",
        "frame_rate_per_sec=100000",
        "frame_burst=100000",
    ]);
    let api = srv.api();
    let s = api.new_user("sl_s").await;
    let f = api.new_user("sl_f").await;
    let l = api.new_user("sl_l").await;
    let rid = api.group_room(&s.token, "firehose", &[&f.id, &l.id]).await["id"]
        .as_str()
        .expect("room id")
        .to_string();

    let mut ws_s = Ws::connect_auth(srv.addr, &s.token).await;
    let mut ws_f = Ws::connect_auth(srv.addr, &f.token).await;
    // L: small receive buffer, authenticates, then stops reading.
    let mut ws_l = Ws::connect_with(
        srv.addr,
        WsOpts {
            recv_buffer: Some(16 * 1024),
            ..WsOpts::default()
        },
    )
    .await
    .expect("L connects");
    ws_l.auth(&l.token, json!({})).await;
    ws_l.pause_reading();

    // F: record when each seq arrives.
    let rid_f = rid.clone();
    let fast = tokio::spawn(async move {
        let mut seen: HashMap<u64, Instant> = HashMap::new();
        let mut order = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while seen.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(v) = ws_f.recv(left).await else {
                panic!(
                    "fast reader: only {} of {n} messages within 120 s",
                    seen.len()
                );
            };
            match v["type"].as_str() {
                Some("message") if v["room"] == rid_f.as_str() => {
                    let seq = v["seq"].as_u64().expect("seq");
                    order.push(seq);
                    seen.insert(seq, Instant::now());
                }
                Some(CLOSE) | Some(EOF) => {
                    panic!(
                        "fast reader disconnected after {} messages: {v}",
                        seen.len()
                    )
                }
                _ => {}
            }
        }
        (seen, order)
    });

    // S: pipelined sends, record the ack time of each seq.
    let text = "s".repeat(TEXT_CHARS);
    let tx = ws_s.sender();
    let mut acks: HashMap<u64, Instant> = HashMap::new();
    let mut sent = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acks.len() < n {
        while sent < n && sent - acks.len() < WINDOW {
            tx.send_msg(&rid, &format!("fh-{sent}"), &text).await;
            sent += 1;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(v) = ws_s.recv(left).await else {
            panic!("sender: only {} of {n} acks within 120 s", acks.len());
        };
        match v["type"].as_str() {
            Some("ack") => {
                acks.insert(v["seq"].as_u64().expect("seq"), Instant::now());
            }
            Some("error") => panic!("sender got an error frame: {v}"),
            Some(CLOSE) | Some(EOF) => panic!("sender disconnected after {} acks: {v}", acks.len()),
            _ => {}
        }
    }

    let (seen, order) = tokio::time::timeout(Duration::from_secs(130), fast)
        .await
        .expect("fast reader finishes")
        .expect("fast reader task");
    assert_eq!(
        order,
        (1..=n as u64).collect::<Vec<u64>>(),
        "fast reader gets every message, in order"
    );
    let mut worst = Duration::ZERO;
    for (seq, acked_at) in &acks {
        let got = seen
            .get(seq)
            .unwrap_or_else(|| panic!("fast reader missed seq {seq}"));
        worst = worst.max(got.saturating_duration_since(*acked_at));
    }
    assert!(
        worst < Duration::from_secs(2),
        "fast reader lagged {worst:?} behind the ack (slow reader slowed it down?)"
    );

    // L finally reads: it was cut off (4008), or its socket ends after data.
    ws_l.resume_reading();
    let mut frames = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let end = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(v) = ws_l.recv(left).await else {
            panic!("slow reader was not disconnected: read {frames} frames, then nothing for 30 s");
        };
        if is_end(&v) {
            break v;
        }
        if v["type"] == "message" {
            frames += 1;
            assert!(
                frames < n,
                "slow reader received all {n} messages: it was never cut off (outbox_frames=16)"
            );
        }
    };
    if end["type"] == CLOSE {
        assert_eq!(end["code"], 4008, "slow reader close code: {end}");
    } else {
        assert!(
            frames > 0,
            "slow reader's connection ended without any data: {end}"
        );
    }
    eprintln!("slow reader: {frames} messages read before {end}; fast reader worst lag {worst:?}");

    // The sender and fast reader are still connected and working.
    ws_s.ping().await;
}
