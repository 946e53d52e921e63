//! The public form of transfer ids.
//!
//! The store numbers transfers 1, 2, 3, … (`meta.next_transfer_id`): the
//! ledger's keys stay ordered, which is what a user's history pages through.
//! Shown as they are, those numbers would tell anyone how many transfers the
//! server made and which ids to try. So clients never see them: every id in
//! an answer, a frame, an export or a payment message is a keyed permutation
//! of the stored id, and only that form is accepted back.
//!
//! The permutation is a 4-round Feistel network over the two 32-bit halves
//! of the id; round `i` maps the right half through the first 4 bytes of
//! SHA-256(key ‖ i ‖ half). With a keyed pseudo-random round function, four
//! rounds give a pseudo-random permutation (Luby–Rackoff), even against
//! someone who can also run it backwards. Here nobody can run it at all: a
//! client sees public ids of its own transfers only, never a stored id, and
//! asking about any other public id answers like a missing transfer. It is a
//! bijection on u64, so every stored id has exactly one public id and a
//! public id names at most one transfer.
//!
//! The key is HMAC-SHA256 of the token secret (`jwt_secret`, or the
//! `cluster_secret` every node of a cluster shares) with a fixed label, so
//! ids are the same on every node of a cluster and after a restore that
//! brings the secret back (backups carry the `jwt_secret` file). Nothing
//! stored depends on the public form: should the secret change, ids shown
//! before simply stop resolving (as the tokens signed with it stop working);
//! the ledger, idempotency keys and payment messages stay intact.

use sha2::{Digest, Sha256};

/// Separates this key from every other use of the token secret.
const LABEL: &[u8] = b"confab/wallet/transfer-id-permutation/v1";
const ROUNDS: u8 = 4;

/// Turns stored transfer ids into public ones and back; carries the
/// currency that payment messages show with them (`wallet_currency`).
#[derive(Clone)]
pub struct TransferIds {
    key: [u8; 32],
    currency: std::sync::Arc<str>,
}

impl std::fmt::Debug for TransferIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never in logs.
        f.write_str("TransferIds(..)")
    }
}

impl Default for TransferIds {
    /// Keyed by an empty secret: for tools and tests that never show ids.
    /// A server always builds its own with [`TransferIds::new`].
    fn default() -> Self {
        TransferIds::new(b"")
    }
}

impl TransferIds {
    /// Keyed by the server's token secret.
    pub fn new(secret: &[u8]) -> TransferIds {
        TransferIds {
            key: hmac_sha256(secret, LABEL),
            currency: "KRW".into(),
        }
    }

    /// These ids, shown with amounts in `currency` (KRW by default).
    pub fn with_currency(mut self, currency: &str) -> TransferIds {
        self.currency = currency.into();
        self
    }

    /// The currency payment messages show.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    fn round(&self, i: u8, half: u32) -> u32 {
        let h = Sha256::new()
            .chain_update(self.key)
            .chain_update([i])
            .chain_update(half.to_be_bytes())
            .finalize();
        u32::from_be_bytes([h[0], h[1], h[2], h[3]])
    }

    /// The public id of stored id `id`.
    pub fn public(&self, id: u64) -> u64 {
        let (mut l, mut r) = ((id >> 32) as u32, id as u32);
        for i in 0..ROUNDS {
            (l, r) = (r, l ^ self.round(i, r));
        }
        (u64::from(l) << 32) | u64::from(r)
    }

    /// The stored id behind public id `public` (the inverse of [`Self::public`]).
    pub fn stored(&self, public: u64) -> u64 {
        let (mut l, mut r) = ((public >> 32) as u32, public as u32);
        for i in (0..ROUNDS).rev() {
            (l, r) = (r ^ self.round(i, l), l);
        }
        (u64::from(l) << 32) | u64::from(r)
    }

    /// A stored id as clients see it: 16 lowercase hex digits of its public id.
    pub fn show(&self, id: u64) -> String {
        format!("{:016x}", self.public(id))
    }

    /// The stored id behind a public id as clients send it (16 hex digits);
    /// None when it is not one. Whether a transfer has that id is for the
    /// caller to look up.
    pub fn parse(&self, s: &str) -> Option<u64> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(|p| self.stored(p))
    }
}

/// HMAC-SHA256 (RFC 2104), on the `sha2` crate the server already uses.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.map(|x| x ^ b);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2, and test case 6 (a key longer than a block).
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn it_is_a_keyed_bijection() {
        let ids = TransferIds::new(b"secret one");
        let other = TransferIds::new(b"secret two");
        let mut seen = std::collections::HashSet::new();
        for id in (0..2000u64).chain([u64::MAX, u64::MAX - 1, 1 << 32, 0xdead_beef_0000_0001]) {
            let p = ids.public(id);
            assert_eq!(ids.stored(p), id);
            assert_eq!(ids.parse(&ids.show(id)), Some(id));
            assert!(seen.insert(p), "two ids map to {p:016x}");
            assert_ne!(p, other.public(id), "the key matters");
        }
        // Consecutive stored ids are not near each other in public form.
        let close = (1..1000u64)
            .filter(|&id| ids.public(id + 1).abs_diff(ids.public(id)) < 1 << 40)
            .count();
        assert!(close < 5, "{close} consecutive pairs close together");
        assert_eq!(ids.parse("not an id"), None);
        assert_eq!(ids.parse("+000000000000001"), None);
        assert_eq!(ids.parse("00000000000000010"), None);
    }

    #[test]
    fn the_same_secret_gives_the_same_ids() {
        // Every node of a cluster, and a store restored with its secret.
        let (a, b) = (TransferIds::new(b"shared"), TransferIds::new(b"shared"));
        for id in [1u64, 2, 3, 99, 1 << 40] {
            assert_eq!(a.show(id), b.show(id));
        }
    }
}
