//! Server → client WebSocket frames, serialized once into shared [`Bytes`].
//! The field names here are the wire protocol (docs/PROTOCOL.md).

use bytes::Bytes;
use serde::Serialize;

use crate::ids::{RoomId, UserId};
use crate::store::{Message, Room, User};

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
        payment: Option<&'a crate::store::PaymentView>,
        /// A damaged stored message (see `store::Message::unreadable`).
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
