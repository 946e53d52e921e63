//! Scale-out groundwork (docs/SCALEOUT.md): three `confab serve --node`
//! processes from one cluster config listen on their own addresses, sign
//! tokens with the shared secret and share one PostgreSQL database (any
//! node signs anyone up, serves any room, refuses a token logged out on
//! another); a bad cluster config is refused with a clear message; a node
//! also speaks HTTP/2 with prior knowledge on its port (the proxies'
//! multiplexed link), a single node does not.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "test-cluster-secret-0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running node: the child and the address it said it listens on.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(dir: &Path, config: &Path, id: &str) -> Node {
    let data = dir.join(id);
    let mut child = confab_command(
        &[
            "serve",
            "--config",
            config.to_str().expect("path"),
            "--node",
            id,
            "--data-dir",
        ],
        dir,
    )
    .arg(&data)
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn node");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("confab listening on http://") {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the node prints its address")
        .parse()
        .expect("an address");
    Node { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_listen_on_their_addresses_and_share_one_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = ["n1", "n2", "n3"];
    let addrs: Vec<SocketAddr> = ids
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr"))
        .collect();
    let entries: Vec<String> = ids
        .iter()
        .zip(&addrs)
        .map(|(id, a)| format!("\"{id}={a}\""))
        .collect();
    let database_url = common::pg::server().fresh_database("nodes");
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            // Ten signups at once from one address over one HTTP/2
            // connection, below: more than the default `hash_per_ip`.
            "[store]\ndatabase_url = \"{database_url}\"\n[auth]\nhash_per_ip = 16\n[cluster]\ncluster_secret = \"{SECRET}\"\ncluster_nodes = [{}]\n",
            entries.join(", ")
        ),
    )
    .expect("write config");
    let nodes: Vec<Node> = ids
        .iter()
        .map(|id| start_node(dir.path(), &config, id))
        .collect();
    for (n, want) in nodes.iter().zip(&addrs) {
        assert_eq!(&n.addr, want, "a node listens on its address from the list");
    }

    // Any node signs anyone up; the name is taken on every node at once.
    let mut users = Vec::new();
    for i in 0..6 {
        let user = Api(nodes[i % 3].addr).signup(&uname("cl")).await;
        let (status, body) = Api(nodes[(i + 1) % 3].addr)
            .post(
                "/api/v1/signup",
                "",
                &json!({"username": user.username.to_uppercase(), "password": PASSWORD}),
            )
            .await;
        assert_err(&(status, body), 409, "username_taken");
        users.push(user);
    }
    // A token from one node is valid on the others (the cluster's secret),
    // and every node knows every user, room and message.
    let (a, b) = (&users[0], &users[1]);
    for n in &nodes {
        let (status, me) = Api(n.addr).get("/api/v1/me", &a.token).await;
        assert_eq!(status.as_u16(), 200, "{me}");
        assert_eq!(me["id"], a.id.as_str());
    }
    let room = Api(nodes[1].addr).direct_room(&a.token, &b.id).await;
    let room = room["id"].as_str().expect("room id").to_string();
    let mut ws = Ws::connect_auth(nodes[2].addr, &a.token).await;
    let ack = ws.send_and_ack(&room, &cid("c"), "written on n3").await;
    assert_eq!(ack["seq"], 1);
    let (status, history) = Api(nodes[0].addr)
        .get(&format!("/api/v1/rooms/{room}/messages"), &b.token)
        .await;
    assert_eq!(status.as_u16(), 200, "{history}");
    assert_eq!(history["messages"][0]["text"], "written on n3", "{history}");
    // A logout on one node: another refuses the token within a few seconds
    // (nodes read the revocations back from the database).
    let (status, _) = Api(nodes[0].addr)
        .post("/api/v1/logout", &b.token, &json!({}))
        .await;
    assert_eq!(status.as_u16(), 204);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = Api(nodes[2].addr).get("/api/v1/me", &b.token).await;
        if status.as_u16() == 401 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "another node refuses a token logged out on n1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One HTTP/2 connection carries many requests at once: health checks and
    // the owner's signups, interleaved on one socket.
    let node = &nodes[0];
    let mut h2 = h2_connect(node.addr).await.expect("an HTTP/2 connection");
    let mut calls = Vec::new();
    let names: Vec<String> = (0..10).map(|_| uname("h2")).collect();
    for i in 0..40 {
        let req = if i % 4 == 0 {
            let body = json!({"username": names[i / 4], "password": PASSWORD}).to_string();
            hyper::Request::post("/api/v1/signup")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        } else {
            hyper::Request::get("/healthz").body(http_body_util::Full::new(bytes::Bytes::new()))
        }
        .expect("request");
        h2.ready().await.expect("connection ready");
        calls.push(h2.send_request(req));
    }
    let mut created = 0;
    for c in calls {
        let resp = c.await.expect("an HTTP/2 response");
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let status = resp.status().as_u16();
        assert!(status == 200 || status == 201, "{status}");
        created += usize::from(status == 201);
    }
    assert_eq!(created, 10, "every signup over HTTP/2 was stored");
}

async fn h2_connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_speaks_only_http1() {
    let srv = Server::start(&[]);
    let result = async {
        let mut h2 = h2_connect(srv.addr).await?;
        h2.ready().await.map_err(|e| e.to_string())?;
        let req = hyper::Request::get("/healthz")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| e.to_string())?;
        h2.send_request(req).await.map_err(|e| e.to_string())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .expect("the attempt ends");
    assert!(
        answer.is_err(),
        "HTTP/2 is only for cluster links: {answer:?}"
    );
}

#[test]
fn a_bad_cluster_config_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cluster.toml");
    let write_with = |store: &str, nodes: &str, secret: &str| {
        std::fs::write(
            &config,
            format!("{store}[cluster]\ncluster_secret = \"{secret}\"\ncluster_nodes = [{nodes}]\n"),
        )
        .expect("write config");
    };
    // Checked before the database is reached: nothing listens here.
    let store = "[store]\ndatabase_url = \"postgresql://confab@127.0.0.1:1/confab\"\n";
    let write = |nodes: &str, secret: &str| write_with(store, nodes, secret);
    let run = |args: &[&str]| {
        let mut full = vec!["serve", "--config", config.to_str().expect("path")];
        full.extend_from_slice(args);
        let out = confab_command(&full, dir.path())
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    write("\"n1=127.0.0.1:1\", \"n2=127.0.0.1:2\"", SECRET);
    assert!(run(&["--node", "n9"]).contains("`--node n9` is not in `cluster_nodes` (n1, n2)"));
    assert!(run(&[]).contains("start a node with `--node ID`"));
    write("\"n1=127.0.0.1:1\", \"n2=127.0.0.1:2\"", "short");
    assert!(run(&["--node", "n1"]).contains("at least 32 characters"));
    write("\"n1=127.0.0.1:1\", \"n1=127.0.0.1:2\"", SECRET);
    assert!(run(&["--node", "n1"]).contains("listed twice"));
    write("\"n1 127.0.0.1:1\"", SECRET);
    assert!(run(&["--node", "n1"]).contains("id=host:port"));
    // A cluster keeps everything in one PostgreSQL database.
    write_with("", "\"n1=127.0.0.1:1\", \"n2=127.0.0.1:2\"", SECRET);
    assert!(run(&["--node", "n1"]).contains("set [store] database_url"));
}
