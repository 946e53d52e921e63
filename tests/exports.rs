//! Exports under abuse, over real sockets: clients that ask for exports and
//! never read them do not slow anyone's search (exports run on their own
//! threads, not on the blocking pool search uses), the bounds refuse the
//! excess (429 `rate_limited` per user, 503 `busy` with `Retry-After`
//! server-wide), a client that disconnects frees its place at once, and a
//! reader that stalls for `export_stall_secs` loses its export (the stream
//! ends without its `end` line) and its place.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// Characters per seeded message (the server is started with
/// `max_text_chars` this high).
const TEXT_CHARS: usize = 12_000;
/// Seeded messages: ~3.6 MB in every member's export, far more than the
/// socket buffers, the export channel and hyper hold together, so an export
/// nobody reads stalls instead of finishing.
const MESSAGES: usize = 300;
/// Connections that ask for an export and read nothing. More than tokio's
/// 512 blocking-pool threads: when exports ran on that pool, this many
/// stalled exports left no thread for search, and the searches below hung.
const STALLED: usize = 600;

/// Signs up `n` users, puts them all in one group and fills it with
/// [`MESSAGES`] large messages (posted from several tasks at once).
async fn seed(api: Api, n: usize) -> (Vec<User>, String) {
    let mut users = Vec::new();
    for _ in 0..n {
        users.push(api.new_user("exp").await);
    }
    let ids: Vec<&str> = users[1..].iter().map(|u| u.id.as_str()).collect();
    let group = api.group_room(&users[0].token, "big export", &ids).await["id"]
        .as_str()
        .expect("room id")
        .to_string();
    let filler = "lorem ipsum dolor sit amet consectetur adipiscing elit ";
    let mut tasks = Vec::new();
    for t in 0..6 {
        let (token, group) = (users[t % n].token.clone(), group.clone());
        tasks.push(tokio::spawn(async move {
            for i in (t..MESSAGES).step_by(6) {
                let mut text = format!("message {i} ");
                while text.len() < TEXT_CHARS {
                    text.push_str(filler);
                }
                text.truncate(TEXT_CHARS);
                let (st, body) = api.post_message(&token, &group, &cid("big"), &text).await;
                assert_eq!(st.as_u16(), 201, "post {i}: {body}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("poster");
    }
    (users, group)
}

/// Opens a connection that sends `GET path` and reads nothing. Its small
/// receive buffer and segment size keep what the kernels hold for it small:
/// on loopback the segments are 64 KiB and the server's send buffer grows
/// to megabytes with them, as it would not on a real network.
async fn ask_and_never_read(addr: SocketAddr, token: &str, path: &str) -> TcpStream {
    use std::os::fd::AsRawFd;
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mss: libc::c_int = 1000;
    // SAFETY: setsockopt(2) on our own socket with a c_int option value of
    // the size given; it only changes the MSS this end announces.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mss as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    let mut s = sock.connect(addr).await.expect("connect");
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    s
}

/// Reads a response head one byte at a time (so none of the body is
/// taken): the status and the headers, names in lower case.
async fn read_head(s: &mut TcpStream) -> (u16, BTreeMap<String, String>) {
    let mut head = Vec::new();
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            let b = s.read_u8().await.expect("read the response head");
            head.push(b);
            assert!(head.len() < 16 << 10, "response head too long");
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("no response head within 10 s");
    let text = String::from_utf8(head).expect("ASCII head");
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// Reads a `Content-Length` body as JSON.
async fn read_json_body(s: &mut TcpStream, headers: &BTreeMap<String, String>) -> Value {
    let n: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .expect("a refusal has a Content-Length");
    let mut body = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .expect("body within 10 s")
        .expect("read body");
    serde_json::from_slice(&body).expect("JSON error body")
}

/// Reads a whole chunked body.
async fn read_chunked(s: &mut TcpStream) -> Vec<u8> {
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    let read = async {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.expect("chunk size line");
            let size = size.trim().split(';').next().unwrap_or("");
            let n = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).await.expect("chunk");
            if n == 0 {
                return;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the body within 60 s");
    out
}

/// The `type` of every complete line of an export.
fn line_types(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .map(|v| v["type"].as_str().unwrap_or("").to_string())
        .collect()
}

/// One search by `user`, which must find the message about zebras within
/// `limit`; returns how long it took.
async fn search_in_time(api: Api, user: &User, limit: Duration) -> Duration {
    let started = Instant::now();
    let r = tokio::time::timeout(limit, api.get("/api/v1/search?q=zebra", &user.token))
        .await
        .unwrap_or_else(|_| panic!("a search took over {limit:?} while exports were stalled"));
    assert_eq!(r.0.as_u16(), 200, "{}", r.1);
    assert_eq!(r.1["total"], 1, "{}", r.1);
    started.elapsed()
}

/// A whole export by `user`, retried while its bounds refuse it (the
/// server frees places asynchronously); returns the body and how long the
/// refusals lasted.
async fn export_when_admitted(api: Api, user: &User, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    loop {
        let r = api
            .raw(
                hyper::Method::GET,
                "/api/v1/me/export",
                &user.token,
                None,
                &[],
            )
            .await;
        match r.status.as_u16() {
            200 => return (r.body.to_vec(), started.elapsed()),
            429 | 503 if started.elapsed() < within => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            s => panic!(
                "export by {} still refused after {:?}: {s} {}",
                user.username,
                started.elapsed(),
                r.json
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_exports_do_not_slow_search_and_the_excess_is_refused() {
    let srv = Server::start(&[&format!("max_text_chars={TEXT_CHARS}")]);
    let api = srv.api();
    // Someone else, with a message to find in a room of their own.
    let searcher = api.new_user("find").await;
    let friend = api.new_user("find").await;
    let direct = api.direct_room(&searcher.token, &friend.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (st, _) = api
        .post_message(&searcher.token, &direct, &cid("z"), "a zebra crossing")
        .await;
    assert_eq!(st.as_u16(), 201);
    // Six exporters in one big room: more users than export_concurrency (4).
    let (users, group) = seed(api, 6).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = api.get("/api/v1/search?q=zebra", &searcher.token).await;
        if r.0.as_u16() == 200 && r.1["total"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never indexed: {}", r.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet = search_in_time(api, &searcher, Duration::from_secs(2)).await;

    // Ask for exports on STALLED connections and read none of them.
    let mut conns = Vec::new();
    for i in 0..STALLED {
        let u = &users[i % users.len()];
        let path = if i % 10 == 9 {
            format!("/api/v1/rooms/{group}/export")
        } else {
            "/api/v1/me/export".to_string()
        };
        conns.push(ask_and_never_read(srv.addr, &u.token, &path).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Meanwhile another user's searches answer as usual.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        slowest = slowest.max(search_in_time(api, &searcher, Duration::from_secs(2)).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("search: {quiet:?} before, at most {slowest:?} with {STALLED} stalled exports");

    // The bounds admitted export_concurrency exports and refused the rest.
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for s in conns.iter_mut() {
        let (status, headers) = read_head(s).await;
        *by_status.entry(status).or_default() += 1;
        match status {
            200 => assert!(
                headers
                    .get("content-type")
                    .is_some_and(|t| t.starts_with("application/x-ndjson")),
                "{headers:?}"
            ),
            429 => {
                let body = read_json_body(s, &headers).await;
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            }
            503 => {
                let body = read_json_body(s, &headers).await;
                assert_eq!(body["error"]["code"], "busy", "{body}");
                let retry: u64 = headers
                    .get("retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("503 without Retry-After: {headers:?}"));
                assert!(retry >= 1);
            }
            other => panic!("unexpected status {other}: {headers:?}"),
        }
    }
    eprintln!("answers: {by_status:?}");
    assert_eq!(
        by_status.get(&200),
        Some(&4),
        "export_concurrency (4) stalled exports run: {by_status:?}"
    );
    assert!(by_status.get(&429).is_some_and(|n| *n > 0), "{by_status:?}");
    assert!(by_status.get(&503).is_some_and(|n| *n > 0), "{by_status:?}");

    // Clients that disconnect free their places at once, far sooner than
    // export_stall_secs (30 s by default): every user's export is admitted
    // again and complete.
    drop(conns);
    for u in &users {
        let (body, waited) = export_when_admitted(api, u, Duration::from_secs(10)).await;
        let types = line_types(&body);
        assert_eq!(types.first().map(String::as_str), Some("export"));
        assert_eq!(types.last().map(String::as_str), Some("end"), "complete");
        assert_eq!(
            types.iter().filter(|t| *t == "message").count(),
            MESSAGES,
            "every message once"
        );
        assert!(waited < Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_export_is_abandoned_after_export_stall_secs_and_its_place_freed() {
    let srv = Server::start(&[
        &format!("max_text_chars={TEXT_CHARS}"),
        "export_stall_secs=2",
    ]);
    let api = srv.api();
    let (users, _) = seed(api, 2).await;
    let owner = &users[0];

    let started = Instant::now();
    let mut stalled = ask_and_never_read(srv.addr, &owner.token, "/api/v1/me/export").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The stalled export holds the owner's place...
    let r = api
        .raw(
            hyper::Method::GET,
            "/api/v1/me/export",
            &owner.token,
            None,
            &[],
        )
        .await;
    assert_eq!(
        r.status.as_u16(),
        429,
        "the stalled export still runs (is the export too small to stall?)"
    );
    assert_eq!(r.json["error"]["code"], "rate_limited");
    // ...until it has stalled for 2 s: then it is abandoned and a new
    // export by the same user is admitted (and complete).
    let (body, _) = export_when_admitted(api, owner, Duration::from_secs(15)).await;
    let admitted_after = started.elapsed();
    assert!(
        admitted_after >= Duration::from_millis(1900),
        "admitted again before the stall time: {admitted_after:?}"
    );
    assert_eq!(line_types(&body).last().map(String::as_str), Some("end"));

    // The abandoned stream ends (chunked encoding closed properly) without
    // its `end` line: what it had queued, then nothing.
    let (status, _) = read_head(&mut stalled).await;
    assert_eq!(status, 200);
    let partial = read_chunked(&mut stalled).await;
    let types = line_types(&partial);
    assert_eq!(types.first().map(String::as_str), Some("export"));
    assert!(
        !types.iter().any(|t| t == "end"),
        "an abandoned export has no end line"
    );
    assert!(
        partial.len() < body.len(),
        "{} < {}",
        partial.len(),
        body.len()
    );
    assert!(
        srv.log_tail().contains("export abandoned"),
        "the abandonment is logged:\n{}",
        srv.log_tail()
    );
}
