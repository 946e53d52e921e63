//! What one cluster node owes another (docs/SCALEOUT.md, "Operations that
//! touch several owners"): the items the writes put in `cluster_outbox` in
//! the transaction that caused them. The forwarder that delivers them is
//! `cluster/outbox.rs`.

use serde::{Deserialize, Serialize};

use crate::ids::RoomId;
use crate::store::User;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutboxItem {
    /// The payment message of a transfer, for the direct chat of `from` and
    /// `to` on the node that owns it.
    Payment {
        from: User,
        to: User,
        client_id: String,
        text: String,
        transfer: u64,
        amount: u64,
        note: Option<String>,
    },
    /// A new user's signup bonus, for the wallet node.
    Bonus { user: User, amount: u64 },
}

impl OutboxItem {
    /// The ring key of the node this item is for, and its endpoint there.
    pub fn target(&self) -> (u64, &'static str) {
        match self {
            OutboxItem::Payment { from, to, .. } => {
                (RoomId::direct(from.id, to.id).0, "/cluster/v1/payment")
            }
            OutboxItem::Bonus { .. } => {
                (crate::placement::ring::wallet_key(), "/cluster/v1/credit")
            }
        }
    }
}
