//! Scale-out: the cluster's shape (which nodes exist, where, and which one
//! this process is) and placement by consistent hashing. The design, and
//! what of it is built, is in docs/SCALEOUT.md.

pub mod link;
pub mod node;
pub mod outbox;
pub mod ring;

use std::net::SocketAddr;

use crate::config::ClusterConfig;
pub use ring::Ring;

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
}

/// The checked `[cluster]` settings.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// This process's node id (`--node`); None for a proxy.
    pub me: Option<String>,
    pub secret: String,
    pub ring: Ring,
}

/// The shortest `cluster_secret` accepted when there are several nodes.
pub const MIN_SECRET: usize = 32;

impl Cluster {
    /// Parses and checks `[cluster]`. `Ok(None)` without `cluster_nodes`
    /// (a single node, as always).
    pub fn from_config(cfg: &ClusterConfig) -> Result<Option<Cluster>, String> {
        if cfg.cluster_nodes.is_empty() {
            if !cfg.node.is_empty() {
                return Err(format!(
                    "`--node {}` needs a node list (`cluster_nodes` in [cluster])",
                    cfg.node
                ));
            }
            return Ok(None);
        }
        let mut nodes: Vec<Node> = Vec::new();
        for entry in &cfg.cluster_nodes {
            let (id, addr) = entry.split_once('=').ok_or_else(|| {
                format!("`cluster_nodes` entries are id=host:port, got `{entry}`")
            })?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 32
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "node id `{id}` must be 1-32 characters of a-z, 0-9, - and _"
                ));
            }
            let addr: SocketAddr = addr.trim().parse().map_err(|_| {
                format!(
                    "node {id}: `{}` is not an address like 10.0.0.1:8081",
                    addr.trim()
                )
            })?;
            if nodes.iter().any(|n| n.id == id) {
                return Err(format!("node id `{id}` is listed twice"));
            }
            if nodes.iter().any(|n| n.addr == addr) {
                return Err(format!("address {addr} is listed twice"));
            }
            nodes.push(Node {
                id: id.to_string(),
                addr,
            });
        }
        let me = if cfg.node.is_empty() {
            None
        } else if nodes.iter().any(|n| n.id == cfg.node) {
            Some(cfg.node.clone())
        } else {
            return Err(format!(
                "`--node {}` is not in `cluster_nodes` ({})",
                cfg.node,
                nodes
                    .iter()
                    .map(|n| n.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if nodes.len() > 1 && cfg.cluster_secret.len() < MIN_SECRET {
            return Err(format!(
                "`cluster_secret` must be at least {MIN_SECRET} characters (it signs every token of the cluster)"
            ));
        }
        let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        Ok(Some(Cluster {
            ring: Ring::new(&ids),
            nodes,
            me,
            secret: cfg.cluster_secret.clone(),
        }))
    }

    /// This node's entry (for a node process).
    pub fn this_node(&self) -> Option<&Node> {
        let me = self.me.as_deref()?;
        self.nodes.iter().find(|n| n.id == me)
    }

    /// Whether this node owns ring key `key`.
    pub fn owns(&self, key: u64) -> bool {
        self.me.as_deref() == Some(self.ring.owner(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nodes: &[&str], node: &str, secret: &str) -> ClusterConfig {
        ClusterConfig {
            cluster_secret: secret.into(),
            cluster_nodes: nodes.iter().map(|s| s.to_string()).collect(),
            node: node.into(),
            proxy_threads: 1,
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_node_list_is_checked() {
        assert!(
            Cluster::from_config(&cfg(&[], "", ""))
                .expect("single")
                .is_none()
        );
        let c = Cluster::from_config(&cfg(
            &["n1=127.0.0.1:9001", "n2=127.0.0.1:9002"],
            "n2",
            SECRET,
        ))
        .expect("ok")
        .expect("cluster");
        assert_eq!(c.this_node().map(|n| n.addr.port()), Some(9002));
        for (nodes, node, secret, why) in [
            (vec!["n1=127.0.0.1:9001"], "n9", SECRET, "not in"),
            (vec!["n1"], "", SECRET, "id=host:port"),
            (vec!["N1=127.0.0.1:9001"], "", SECRET, "a-z"),
            (vec!["n1=localhost"], "", SECRET, "not an address"),
            (
                vec!["n1=127.0.0.1:1", "n1=127.0.0.1:2"],
                "",
                SECRET,
                "twice",
            ),
            (
                vec!["n1=127.0.0.1:1", "n2=127.0.0.1:1"],
                "",
                SECRET,
                "twice",
            ),
            (
                vec!["n1=127.0.0.1:1", "n2=127.0.0.1:2"],
                "",
                "short",
                "at least",
            ),
            (vec![], "n1", SECRET, "needs a node list"),
        ] {
            let err = Cluster::from_config(&cfg(&nodes, node, secret)).expect_err(why);
            assert!(err.contains(why), "{err}");
        }
    }
}
