//! Placement: a consistent-hash ring with virtual nodes (docs/SCALEOUT.md).
//!
//! Every node id puts [`POINTS_PER_NODE`] points on a 64-bit ring; a key is
//! owned by the node of the first point at or after `mix(key)`, wrapping
//! around. The functions are fixed (SHA-256 for the points, the SplitMix64
//! finaliser for keys) because placement is part of the stored data's
//! contract: every process given the same node list computes the same owner
//! for every user, room and the wallet, now and in later versions.

use sha2::{Digest, Sha256};

use crate::ids::{RoomId, UserId};

/// Virtual nodes per node: enough to keep shares within a few per cent.
pub const POINTS_PER_NODE: u32 = 512;

/// The SplitMix64 finaliser: spreads ids (random or derived) evenly.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn sha64(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// The ring key of a username (case-insensitive).
pub fn username_key(name: &str) -> u64 {
    sha64(&[b"confab/username/", name.to_lowercase().as_bytes()])
}

/// The ring key of the wallet (the whole ledger has one owner).
pub fn wallet_key() -> u64 {
    sha64(&[b"confab/wallet"])
}

#[derive(Debug, Clone)]
pub struct Ring {
    /// Node ids, in the order given.
    nodes: Vec<String>,
    /// (point, index into `nodes`), sorted by point.
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Builds the ring; node ids must be unique and non-empty.
    pub fn new(nodes: &[String]) -> Ring {
        let mut points = Vec::with_capacity(nodes.len() * POINTS_PER_NODE as usize);
        for (i, n) in nodes.iter().enumerate() {
            for p in 0..POINTS_PER_NODE {
                let point = sha64(&[
                    b"confab/ring/",
                    n.as_bytes(),
                    b"/",
                    p.to_string().as_bytes(),
                ]);
                points.push((point, i));
            }
        }
        // Ties (astronomically unlikely) go to the smaller node id, so the
        // order is the same in every process.
        points.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| nodes[a.1].cmp(&nodes[b.1])));
        Ring {
            nodes: nodes.to_vec(),
            points,
        }
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The index (into [`Ring::nodes`]) of the node owning ring key `key`.
    pub fn owner_index(&self, key: u64) -> usize {
        if self.points.is_empty() {
            return 0;
        }
        let h = mix(key);
        let i = self.points.partition_point(|&(p, _)| p < h);
        self.points[i % self.points.len()].1
    }

    /// The index of the node owning `key` among the nodes for which `live`
    /// holds: the first point at or after `mix(key)` whose node is live. A
    /// node that is not live gives each of its keys to the node after it on
    /// the ring, so its keys spread over the others and no other key moves;
    /// when it is live again, exactly those keys come back. None when no
    /// node is live.
    pub fn live_owner_index(&self, key: u64, live: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = mix(key);
        let start = self.points.partition_point(|&(p, _)| p < h);
        let n = self.points.len();
        (0..n)
            .map(|k| self.points[(start + k) % n].1)
            .find(|&i| live(i))
    }

    pub fn owner(&self, key: u64) -> &str {
        self.nodes
            .get(self.owner_index(key))
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn user_owner(&self, u: UserId) -> &str {
        self.owner(u.0)
    }

    pub fn room_owner(&self, r: RoomId) -> &str {
        self.owner(r.0)
    }

    pub fn username_owner(&self, name: &str) -> &str {
        self.owner(username_key(name))
    }

    pub fn wallet_owner(&self) -> &str {
        self.owner(wallet_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> Ring {
        Ring::new(&ids.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn placement_is_fixed() {
        // These values are part of the on-disk contract: a change here
        // moves rooms between nodes of existing clusters.
        assert_eq!(mix(0), 0);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
        let r = ring(&["n1", "n2", "n3"]);
        let owners: Vec<&str> = (1..=8u64).map(|k| r.owner(k)).collect();
        let again = ring(&["n3", "n1", "n2"]);
        let owners_again: Vec<&str> = (1..=8u64).map(|k| again.owner(k)).collect();
        assert_eq!(
            owners, owners_again,
            "the order of the list does not matter"
        );
    }

    #[test]
    fn a_node_that_is_down_hands_only_its_keys_to_the_others() {
        let r = ring(&["n1", "n2", "n3", "n4"]);
        let mut moved_to = [0usize; 4];
        for k in 0..20_000u64 {
            let key = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let all = r.owner_index(key);
            assert_eq!(r.live_owner_index(key, |_| true), Some(all));
            let without = r.live_owner_index(key, |i| i != 1).expect("live");
            if all == 1 {
                assert_ne!(without, 1);
                moved_to[without] += 1;
            } else {
                assert_eq!(without, all, "a key of another node stays");
            }
        }
        // n2's keys spread over the three others.
        let total: usize = moved_to.iter().sum();
        for (i, &n) in moved_to.iter().enumerate() {
            if i != 1 {
                assert!(n * 5 > total, "{moved_to:?}");
            }
        }
        assert_eq!(r.live_owner_index(7, |_| false), None);
    }

    #[test]
    fn shares_are_even_and_adding_a_node_moves_only_its_share() {
        let three = ring(&["n1", "n2", "n3"]);
        let four = ring(&["n1", "n2", "n3", "n4"]);
        let n = 100_000u64;
        let mut counts = [0u64; 3];
        let mut moved = 0;
        for i in 0..n {
            let key = mix(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xabcdef);
            let a = three.owner_index(key);
            counts[a] += 1;
            let b = four.owner(key);
            if b != three.owner(key) {
                assert_eq!(b, "n4", "a key moved between old nodes");
                moved += 1;
            }
        }
        let (min, max) = (
            counts.iter().min().copied().unwrap_or(0),
            counts.iter().max().copied().unwrap_or(0),
        );
        assert!(max as f64 / min as f64 <= 1.25, "uneven shares {counts:?}");
        let share = moved as f64 / n as f64;
        assert!((0.18..=0.32).contains(&share), "moved {share}");
    }
}
