//! Placement: the cluster's shape (which nodes exist, where, and which one
//! this process is) and which node owns what, by consistent hashing
//! (docs/SCALEOUT.md). Plain data and pure functions of the settings, below
//! everything that needs to know where something lives; the cluster's
//! endpoints and links are `cluster/`.

pub mod ring;

use crate::config::ClusterConfig;
/// One node of the cluster.
pub use crate::config::ClusterNode as Node;
pub use ring::Ring;

/// The checked `[cluster]` settings.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// This process's node id (`--node`); None for a proxy.
    pub me: Option<String>,
    pub secret: String,
    pub ring: Ring,
}

impl Cluster {
    /// Parses and checks `[cluster]` ([`ClusterConfig::checked`]) and
    /// places its nodes on the ring. `Ok(None)` without `cluster_nodes` (a
    /// single node, as always).
    pub fn from_config(cfg: &ClusterConfig) -> Result<Option<Cluster>, String> {
        let Some(checked) = cfg.checked()? else {
            return Ok(None);
        };
        let ids: Vec<String> = checked.nodes.iter().map(|n| n.id.clone()).collect();
        Ok(Some(Cluster {
            ring: Ring::new(&ids),
            nodes: checked.nodes,
            me: checked.me,
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
