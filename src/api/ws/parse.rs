//! Client frames as they arrive: fragments joined into whole messages
//! within `max_frame_bytes` ([`Reassembler`]), the typed [`ClientFrame`]
//! of docs/PROTOCOL.md, and what to tell a client whose frame does not
//! parse ([`explain_bad_frame`]). Knows nothing of sessions or state: the
//! node's and the proxy's readers both use it.

use fastwebsockets::{Frame, OpCode, WebSocketError};
use serde::Deserialize;

/// A complete client message, after reassembling fragments.
pub(crate) enum Incoming_ {
    Text(Vec<u8>),
    Binary,
    Ping(Vec<u8>),
    Close,
    BadUtf8,
    TooBig,
    Gone,
}

/// Joins fragmented frames and enforces `max_frame_bytes` on the whole.
pub(crate) struct Reassembler {
    max: usize,
    buf: Vec<u8>,
    /// Some(is_text) while a fragmented message is being collected.
    open: Option<bool>,
}

impl Reassembler {
    pub(crate) fn new(max: usize) -> Reassembler {
        Reassembler {
            max,
            buf: Vec::new(),
            open: None,
        }
    }
}

impl Reassembler {
    pub(crate) fn feed(&mut self, frame: Result<Frame<'_>, WebSocketError>) -> Option<Incoming_> {
        let frame = match frame {
            Ok(f) => f,
            Err(WebSocketError::InvalidUTF8) => return Some(Incoming_::BadUtf8),
            Err(WebSocketError::FrameTooLarge) => return Some(Incoming_::TooBig),
            Err(_) => return Some(Incoming_::Gone),
        };
        match frame.opcode {
            OpCode::Text | OpCode::Binary if frame.fin => {
                if self.open.is_some() {
                    return Some(Incoming_::Gone);
                }
                if frame.opcode == OpCode::Binary {
                    return Some(Incoming_::Binary);
                }
                Some(Incoming_::Text(frame.payload.to_vec()))
            }
            OpCode::Text | OpCode::Binary => {
                if self.open.is_some() {
                    return Some(Incoming_::Gone);
                }
                self.open = Some(frame.opcode == OpCode::Text);
                self.buf.clear();
                self.buf.extend_from_slice(&frame.payload);
                None
            }
            OpCode::Continuation => {
                let Some(is_text) = self.open else {
                    return Some(Incoming_::Gone);
                };
                if self.buf.len() + frame.payload.len() > self.max {
                    return Some(Incoming_::TooBig);
                }
                self.buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return None;
                }
                self.open = None;
                let data = std::mem::take(&mut self.buf);
                if !is_text {
                    Some(Incoming_::Binary)
                } else if std::str::from_utf8(&data).is_err() {
                    Some(Incoming_::BadUtf8)
                } else {
                    Some(Incoming_::Text(data))
                }
            }
            OpCode::Close => Some(Incoming_::Close),
            OpCode::Ping => Some(Incoming_::Ping(frame.payload.to_vec())),
            OpCode::Pong => None,
        }
    }
}

/// A client → server frame (docs/PROTOCOL.md). Public for the benches.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Auth {},
    Send {
        room: String,
        client_id: Option<String>,
        text: String,
    },
    Read {
        room: String,
        seq: u64,
    },
    Typing {
        room: String,
    },
    Ping {},
}

const CLIENT_TYPES: [&str; 5] = ["auth", "send", "read", "typing", "ping"];

/// Why a client frame did not parse: (code, message, its client_id if any).
pub(crate) fn explain_bad_frame(text: &[u8]) -> (&'static str, String, Option<String>) {
    let value: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return ("invalid_json", format!("not JSON: {e}"), None),
    };
    let client_id = value
        .get("client_id")
        .and_then(|c| c.as_str())
        .map(str::to_owned);
    let Some(kind) = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    else {
        return (
            "invalid_json",
            "a frame is a JSON object with a string `type`".into(),
            client_id,
        );
    };
    if !CLIENT_TYPES.contains(&kind.as_str()) {
        return (
            "unknown_type",
            format!("unknown frame type `{kind}`"),
            client_id,
        );
    }
    match serde_json::from_value::<ClientFrame>(value) {
        Err(e) => (
            "invalid_json",
            format!("bad `{kind}` frame: {e}"),
            client_id,
        ),
        Ok(_) => ("invalid_json", "unparseable frame".into(), client_id),
    }
}
