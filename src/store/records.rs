//! The stored records and their encodings (postcard, sealed with a
//! checksum): users, rooms, members, messages, privacy; and the client
//! views built from them (`Message::from_record`, `Message::unreadable`).

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::seal;
use super::seal::Rec;
use super::transfer_ids;
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};

/// Who may see something of a user, or do something to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    #[default]
    Everyone,
    /// The users in their contacts.
    Contacts,
    Nobody,
}

/// A user's privacy settings (`GET|PUT /api/v1/me/privacy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Privacy {
    /// Who sees them online and their last seen (presence frames).
    pub presence: Audience,
    /// Who may add them to a group.
    pub group_adds: Audience,
}

impl Audience {
    /// Whether `viewer` is in `owner`'s audience, `owner`'s contacts being
    /// `contacts`.
    pub fn admits(
        self,
        contacts: &impl ReadableTable<(u64, u64), i64>,
        owner: UserId,
        viewer: UserId,
    ) -> Result<bool, ApiError> {
        let is_contact = self == Audience::Contacts
            && owner != viewer
            && contacts.get((owner.0, viewer.0))?.is_some();
        Ok(self.admits_given(owner, viewer, is_contact))
    }

    /// Whether `viewer` is in `owner`'s audience, `is_contact` saying
    /// whether `viewer` is in `owner`'s contacts: `owner` themselves
    /// always is.
    pub fn admits_given(self, owner: UserId, viewer: UserId, is_contact: bool) -> bool {
        owner == viewer
            || match self {
                Audience::Everyone => true,
                Audience::Contacts => is_contact,
                Audience::Nobody => false,
            }
    }
}

/// `user`'s privacy settings in a snapshot or the writer's transaction.
pub fn privacy_in(
    table: &impl ReadableTable<u64, &'static [u8]>,
    user: UserId,
) -> Result<Privacy, ApiError> {
    match table.get(user.0)? {
        Some(g) => seal::open(Rec::Privacy, user.0, g.value()),
        None => Ok(Privacy::default()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub username: String,
    pub display_name: String,
    pub password_hash: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomKind {
    Direct,
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomRecord {
    pub kind: RoomKind,
    pub name: Option<String>,
    pub owner: Option<u64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    pub joined_at: i64,
    /// Highest seq this member has read (sent messages count as read).
    pub read_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageRecord {
    pub from: u64,
    pub ts: i64,
    pub client_id: String,
    pub text: String,
    /// A payment message: stored after the fields above as an extension
    /// (`1u8` + `PaymentInfo`), so plain messages keep their format.
    #[serde(skip)]
    pub payment: Option<PaymentInfo>,
}

/// What a payment message refers to (the ledger stays the truth).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentInfo {
    pub transfer: u64,
    pub amount: u64,
    pub to: u64,
    pub note: Option<String>,
}

impl MessageRecord {
    /// The record's bytes (unsealed): `postcard(MessageRecord)`, then for a
    /// payment `1u8` + `postcard(PaymentInfo)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode(self);
        if let Some(p) = &self.payment {
            out.extend(encode(&(1u8, p)));
        }
        out
    }

    /// What is stored in `messages` at `(room, seq)`: the record sealed.
    /// Encoded into one buffer sized for it, checksum included (the hot
    /// path: one allocation per message, as before).
    pub fn sealed(&self, room: RoomId, seq: u64) -> Vec<u8> {
        let guess = self.text.len() + self.client_id.len() + 40 + seal::CHECKSUM_LEN;
        let mut out = postcard::to_extend(self, Vec::with_capacity(guess)).unwrap_or_default();
        if let Some(p) = &self.payment {
            out = postcard::to_extend(&(1u8, p), out).unwrap_or_default();
        }
        seal::seal(Rec::Messages, (room.0, seq), out)
    }

    /// Decodes a record's bytes (unsealed, as [`MessageRecord::encode`]
    /// writes them).
    pub fn decode_body(bytes: &[u8]) -> Result<MessageRecord, String> {
        let (mut rec, rest): (MessageRecord, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
        if let Some(1) = rest.first() {
            let (_, p): (u8, PaymentInfo) =
                postcard::from_bytes(rest).map_err(|e| format!("payment: {e}"))?;
            rec.payment = Some(p);
        }
        Ok(rec)
    }

    /// [`MessageRecord::decode_body`] with an `ApiError`.
    pub fn decode(bytes: &[u8]) -> Result<MessageRecord, ApiError> {
        MessageRecord::decode_body(bytes)
            .map_err(|e| ApiError::internal(format!("corrupt message record: {e}")))
    }

    /// Unseals and decodes the value stored at `(room, seq)`. Damage is
    /// reported ([`seal::report`]); a lost-message placeholder is None
    /// without a report. Err(why) for damage.
    pub fn open(room: RoomId, seq: u64, value: &[u8]) -> Result<Option<MessageRecord>, String> {
        use seal::SealKey;
        let key = (room.0, seq).key_bytes();
        if seal::is_lost(key.as_slice(), value) {
            return Ok(None);
        }
        let r = seal::unseal_raw(Rec::Messages, key.as_slice(), value).and_then(|body| {
            MessageRecord::decode_body(body).map_err(|e| format!("does not decode: {e}"))
        });
        match r {
            Ok(rec) => Ok(Some(rec)),
            Err(why) => {
                seal::report(Rec::Messages, key.as_slice(), &why);
                Err(why)
            }
        }
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard only fails for types it cannot represent; ours are plain data.
    postcard::to_allocvec(v).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ApiError> {
    postcard::from_bytes(bytes)
        .map_err(|e| ApiError::internal(format!("corrupt {what} record: {e}")))
}

// The client views of users, rooms and messages are the protocol's
// (`frames`); their constructors from stored records are here.
pub use crate::frames::{Message, PaymentView, Room, User};

impl Message {
    /// The client view of a stored message. A payment message names its
    /// transfer by public id (`ids`, which also carry the wallet's
    /// currency), in `payment.transfer` and in its
    /// `client_id`: the stored `pay-<stored id>` stays as it is (it
    /// deduplicates the cluster outbox's deliveries) but is never shown.
    pub fn from_record(
        room: RoomId,
        seq: u64,
        r: MessageRecord,
        ids: &transfer_ids::TransferIds,
    ) -> Message {
        let client_id = match &r.payment {
            Some(p) => format!("pay-{}", ids.show(p.transfer)),
            None => r.client_id,
        };
        let payment = r.payment.map(|p| PaymentView {
            transfer: ids.show(p.transfer),
            amount: p.amount,
            currency: ids.currency().to_string(),
            to: UserId(p.to),
            note: p.note,
        });
        Message {
            room,
            seq,
            from: UserId(r.from),
            ts: r.ts,
            text: r.text,
            client_id,
            kind: payment.as_ref().map(|_| "payment"),
            payment,
            unreadable: false,
        }
    }

    /// The placeholder for a message that cannot be read.
    pub fn unreadable(room: RoomId, seq: u64) -> Message {
        Message {
            room,
            seq,
            from: UserId(0),
            ts: 0,
            text: String::new(),
            client_id: String::new(),
            kind: None,
            payment: None,
            unreadable: true,
        }
    }

    /// The client view of the value stored at `(room, seq)`: unreadable
    /// (and reported) when it is damaged, never different text.
    pub fn from_stored(
        room: RoomId,
        seq: u64,
        value: &[u8],
        ids: &transfer_ids::TransferIds,
    ) -> Message {
        match MessageRecord::open(room, seq, value) {
            Ok(Some(rec)) => Message::from_record(room, seq, rec, ids),
            Ok(None) | Err(_) => Message::unreadable(room, seq),
        }
    }
}
