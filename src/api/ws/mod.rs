//! WebSocket sessions at `/api/v1/ws`.
//!
//! A session is two tasks over one socket: the *reader* (the session's own
//! task) parses client frames and hands sends to the writer thread; the
//! *session writer* drains the session's [`SessionOutbox`] in batches into
//! a buffered socket and flushes once per batch. The reader never writes to
//! the socket: it queues error frames and pongs in the outbox.
//! fastwebsockets' `read_frame` is not cancel-safe, so the reader is never
//! raced against anything in a `select!`; it is dropped as a whole when the
//! session ends.
//!
//! This module only declares its parts and names what the rest of the
//! crate uses (the proxy's sessions reuse most of it); bottom first:
//! - `parse`: client frames — fragments joined, the typed [`ClientFrame`],
//!   what is wrong with one that does not parse;
//! - `handshake`: the upgrade request, the first `auth` message, refusals;
//! - `writer`: the session writer, outbox → socket;
//! - `notify`: presence and room frames for other users;
//! - `reader`: the paced reader loop and the handling of each frame;
//! - `session`: one session from upgrade to end (auth, catch-up, the two
//!   tasks).
//!
//! [`SessionOutbox`]: crate::hub::SessionOutbox

mod handshake;
mod notify;
mod parse;
mod reader;
mod session;
mod writer;

pub(crate) use handshake::{accept, auth_first, check_origin, reject};
pub(crate) use notify::{presence_of, privacy_changed, went_offline, went_online};
pub use parse::ClientFrame;
pub(crate) use parse::{Reassembler, explain_bad_frame};
pub(crate) use reader::{FramePacer, execute, next_frame, send_budget};
pub(crate) use session::close_at_expiry;
pub use session::upgrade;
pub(crate) use writer::{FrameWriter, write_loop};
