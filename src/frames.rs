//! Server → client WebSocket frames, serialized once into shared [`Bytes`],
//! and the objects they (and the HTTP answers) carry: users, rooms and
//! messages as clients see them. The field names here are the wire
//! protocol (docs/PROTOCOL.md). The store builds these views from its
//! records (`store::Message::from_record`, `store::room_view`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{RoomId, UserId};

/// A user as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
}

/// A stored message as clients see it (built from the stored record by
/// `store::Message::from_record`).
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub room: RoomId,
    pub seq: u64,
    pub from: UserId,
    pub ts: i64,
    pub text: String,
    pub client_id: String,
    /// "payment" for a wallet transfer; absent for text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentView>,
    /// The stored message is damaged (or was lost to damage): nothing of it
    /// is shown — `from` is all zeros, `ts` 0, `text` and `client_id` empty
    /// (docs/PROTOCOL.md). Its seq keeps the room's chain whole.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unreadable: bool,
}

/// The `payment` object of a payment message.
#[derive(Debug, Clone, Serialize)]
pub struct PaymentView {
    pub transfer: String,
    pub amount: u64,
    pub currency: String,
    pub to: UserId,
    pub note: Option<String>,
}

/// A room as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct Room {
    pub id: RoomId,
    pub kind: &'static str,
    pub name: Option<String>,
    pub owner: Option<UserId>,
    pub members: Vec<User>,
    pub created_at: i64,
    pub last_seq: u64,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Ready {
        user: &'a User,
    },
    Ack {
        client_id: &'a str,
        room: RoomId,
        seq: u64,
        ts: i64,
    },
    Message {
        room: RoomId,
        seq: u64,
        from: UserId,
        ts: i64,
        text: &'a str,
        client_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        kind: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payment: Option<&'a PaymentView>,
        /// A damaged stored message (see [`Message::unreadable`]).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        unreadable: bool,
    },
    Receipt {
        room: RoomId,
        user: UserId,
        seq: u64,
        kind: &'static str,
    },
    Typing {
        room: RoomId,
        user: UserId,
    },
    Presence {
        user: UserId,
        online: bool,
        last_seen: Option<i64>,
    },
    Room {
        room: &'a Room,
    },
    RoomRemoved {
        room: RoomId,
    },
    Pong,
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<RoomId>,
    },
}

impl ServerFrame<'_> {
    pub fn to_bytes(&self) -> Bytes {
        // Serializing these plain structs cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

pub fn message(m: &Message) -> Bytes {
    ServerFrame::Message {
        room: m.room,
        seq: m.seq,
        from: m.from,
        ts: m.ts,
        text: &m.text,
        client_id: &m.client_id,
        kind: m.kind,
        payment: m.payment.as_ref(),
        unreadable: m.unreadable,
    }
    .to_bytes()
}

pub fn ack(m: &Message) -> Bytes {
    ServerFrame::Ack {
        client_id: &m.client_id,
        room: m.room,
        seq: m.seq,
        ts: m.ts,
    }
    .to_bytes()
}

pub fn error(code: &str, message: &str, client_id: Option<&str>, room: Option<RoomId>) -> Bytes {
    ServerFrame::Error {
        code,
        message,
        client_id,
        room,
    }
    .to_bytes()
}
