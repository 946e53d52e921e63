//! A cluster on loopback for the tests: three `confab serve --node`
//! processes sharing one PostgreSQL database (a fresh one on the test
//! binary's server, `pg.rs`) and any number of `confab proxy`, each of
//! which can be killed (SIGKILL), stopped (SIGSTOP) and started again on the
//! same address.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confab::cluster::Ring;
use confab::ids::{RoomId, UserId};
use serde_json::Value;

use super::{Api, confab_command, drain_lines};

pub const SECRET: &str = "scaleout-test-secret-0123456789abcdef";
pub const IDS: [&str; 3] = ["n1", "n2", "n3"];

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One confab process (node or proxy) that can be killed and restarted.
pub struct Proc {
    args: Vec<String>,
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    cwd: PathBuf,
}

impl Proc {
    pub fn start(cwd: &std::path::Path, args: Vec<String>) -> Proc {
        let mut p = Proc {
            args,
            child: None,
            addr: "127.0.0.1:1".parse().expect("addr"),
            log: Arc::new(Mutex::new(VecDeque::new())),
            cwd: cwd.to_path_buf(),
        };
        p.spawn();
        p
    }

    pub fn spawn(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut child = confab_command(&args, &self.cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn confab");
        let (tx, rx) = std::sync::mpsc::channel();
        drain_lines(
            child.stdout.take().expect("stdout"),
            self.log.clone(),
            Some(tx),
        );
        drain_lines(child.stderr.take().expect("stderr"), self.log.clone(), None);
        self.addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => panic!("{:?} did not start:\n{}", self.args, self.log_tail()),
        };
        self.child = Some(child);
    }

    pub fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log");
        log.iter()
            .rev()
            .take(40)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The database every node uses.
    pub database_url: String,
    pub nodes: Vec<Proc>,
    pub proxies: Vec<Proc>,
    pub ring: Ring,
}

impl Cluster {
    pub async fn start(proxies: usize) -> Cluster {
        Cluster::start_with(proxies, "").await
    }

    /// `extra`: more TOML for the shared config file (not `[store]`).
    pub async fn start_with(proxies: usize, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = super::pg::server().fresh_database("cluster");
        let entries: Vec<String> = IDS
            .iter()
            .map(|id| format!("\"{id}=127.0.0.1:{}\"", free_port()))
            .collect();
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\ndatabase_url = \"{database_url}\"\n{extra}\n[cluster]\ncluster_secret = \"{SECRET}\"\ncluster_nodes = [{}]\n",
                entries.join(", ")
            ),
        )
        .expect("write config");
        let cfg = config.to_str().expect("path").to_string();
        let nodes = IDS
            .iter()
            .map(|id| {
                let data = dir.path().join(id).to_str().expect("path").to_string();
                let args = ["serve", "--config", &cfg, "--node", id, "--data-dir", &data];
                Proc::start(dir.path(), args.iter().map(|s| s.to_string()).collect())
            })
            .collect();
        let proxies = (0..proxies)
            .map(|_| {
                let args = ["proxy", "--config", &cfg, "--listen", "127.0.0.1:0"];
                Proc::start(dir.path(), args.iter().map(|s| s.to_string()).collect())
            })
            .collect();
        let c = Cluster {
            dir,
            database_url,
            nodes,
            proxies,
            ring: Ring::new(&IDS.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        };
        for p in 0..c.proxies.len() {
            c.wait_links(p, 3).await;
        }
        c
    }

    pub fn api(&self, proxy: usize) -> Api {
        Api(self.proxies[proxy].addr)
    }

    /// Waits until proxy `p` has `up` links up.
    pub async fn wait_links(&self, p: usize, up: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = self.api(p).get("/api/v1/status", "").await;
            let n = v["nodes"]
                .as_array()
                .map(|a| a.iter().filter(|n| n["up"] == true).count())
                .unwrap_or(0);
            if n == up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy {p} never had {up} links up: {v}\n{}",
                self.proxies[p].log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn user_node(&self, id: &str) -> usize {
        let u: UserId = id.parse().expect("user id");
        node_index(self.ring.user_owner(u))
    }

    /// The node that serves room `id` while every node is up.
    pub fn room_node(&self, id: &str) -> usize {
        let r: RoomId = id.parse().expect("room id");
        node_index(self.ring.room_owner(r))
    }

    /// The node that serves room `id` while node `down` is not reachable.
    pub fn room_node_without(&self, id: &str, down: usize) -> usize {
        let r: RoomId = id.parse().expect("room id");
        self.ring
            .live_owner_index(r.0, |i| i != down)
            .expect("another node")
    }
}

/// SIGSTOP (true) or SIGCONT (false) to process `pid`: it freezes with its
/// sockets open, as a hung machine would, and later goes on.
pub fn pause(pid: u32, stop: bool) {
    let sig = if stop { "-STOP" } else { "-CONT" };
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

/// Searches until at least `want` hits are indexed (indexing is not instant).
pub async fn search_until(api: Api, query: &str, token: &str, want: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api.get(&format!("/api/v1/search?{query}"), token).await;
        assert_eq!(status.as_u16(), 200, "{body}");
        if body["total"].as_u64().unwrap_or(0) >= want as u64 || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn node_index(id: &str) -> usize {
    IDS.iter().position(|x| *x == id).expect("a node id")
}
