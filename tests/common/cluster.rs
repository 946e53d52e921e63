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
    /// Nodes by their index in [`IDS`] (then the ones added, in order).
    pub nodes: Vec<Proc>,
    pub proxies: Vec<Proc>,
    /// The ring of the first three nodes (which serves what while they are
    /// all up).
    pub ring: Ring,
    /// The node list in the config file: (id, address).
    pub list: Vec<(String, String)>,
    extra: String,
}

impl Cluster {
    pub async fn start(proxies: usize) -> Cluster {
        Cluster::start_with(proxies, "").await
    }

    /// `extra`: more TOML for the shared config file (not `[store]`).
    pub async fn start_with(proxies: usize, extra: &str) -> Cluster {
        let database_url = super::pg::server().fresh_database("cluster");
        Cluster::start_on(proxies, extra, database_url).await
    }

    /// On the database `database_url` (e.g. a primary and its standby).
    pub async fn start_on(proxies: usize, extra: &str, database_url: String) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Cluster {
            dir,
            database_url,
            nodes: Vec::new(),
            proxies: Vec::new(),
            ring: Ring::new(&IDS.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            list: IDS
                .iter()
                .map(|id| (id.to_string(), format!("127.0.0.1:{}", free_port())))
                .collect(),
            extra: extra.to_string(),
        };
        c.write_config();
        for id in IDS {
            let node = c.start_node(id);
            c.nodes.push(node);
        }
        for _ in 0..proxies {
            let cfg = c.config_path();
            let args = ["proxy", "--config", &cfg, "--listen", "127.0.0.1:0"];
            let proxy = Proc::start(c.dir.path(), args.iter().map(|s| s.to_string()).collect());
            c.proxies.push(proxy);
        }
        for p in 0..c.proxies.len() {
            c.wait_links(p, 3).await;
        }
        c
    }

    fn config_path(&self) -> String {
        self.dir
            .path()
            .join("cluster.toml")
            .to_str()
            .expect("path")
            .to_string()
    }

    /// Writes the shared config file with the node list as it is now.
    pub fn write_config(&self) {
        let entries: Vec<String> = self
            .list
            .iter()
            .map(|(id, addr)| format!("\"{id}={addr}\""))
            .collect();
        std::fs::write(
            self.config_path(),
            format!(
                "[store]\ndatabase_url = \"{}\"\n{}\n[cluster]\ncluster_secret = \"{SECRET}\"\ncluster_nodes = [{}]\n",
                self.database_url,
                self.extra,
                entries.join(", ")
            ),
        )
        .expect("write config");
    }

    fn start_node(&self, id: &str) -> Proc {
        let cfg = self.config_path();
        let data = self.dir.path().join(id).to_str().expect("path").to_string();
        let args = ["serve", "--config", &cfg, "--node", id, "--data-dir", &data];
        Proc::start(
            self.dir.path(),
            args.iter().map(|s| s.to_string()).collect(),
        )
    }

    /// A new node `id` on a new port: in the config file, then started
    /// (the proxies learn of it on [`Cluster::reload_proxies`]).
    pub fn add_node(&mut self, id: &str) -> usize {
        self.list
            .push((id.to_string(), format!("127.0.0.1:{}", free_port())));
        self.write_config();
        let node = self.start_node(id);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Takes node `id` out of the config file's list (it keeps running).
    pub fn remove_from_list(&mut self, id: &str) {
        self.list.retain(|(x, _)| x != id);
        self.write_config();
    }

    /// SIGHUP to every proxy: they read the node list again.
    pub fn reload_proxies(&self) {
        for p in &self.proxies {
            let ok = std::process::Command::new("kill")
                .args(["-HUP", &p.pid().to_string()])
                .status()
                .expect("run kill");
            assert!(ok.success(), "kill -HUP");
        }
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
