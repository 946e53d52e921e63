//! The session writer: delivery from the session's [`SessionOutbox`] to
//! the socket. Frames are encoded into one buffer per batch
//! ([`FrameWriter`]) and flushed once; catch-up copies already sent are
//! dropped; a kicked session gets its close frame, and a client that stops
//! reading loses its connection instead of holding the writer (invariant
//! 9). Shared with the proxy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, Payload};
use tokio::io::{AsyncWriteExt, WriteHalf};

use super::handshake::Io;
use crate::hub::{OutFrame, SessionOutbox, close};
use crate::ids::RoomId;

/// The session's write side: frames are encoded into one buffer and written
/// with a single `write_all` per batch (fastwebsockets' own writer does a
/// syscall per frame). The buffer is dropped after large batches, so an idle
/// session holds no write buffer at all.
pub(crate) struct FrameWriter {
    pub(crate) io: WriteHalf<Io>,
    pub(crate) buf: Vec<u8>,
}

/// Largest batch buffer kept between batches.
const KEEP_BUFFER: usize = 16 * 1024;
/// A batch stops growing past this many bytes.
const BATCH_BYTES: usize = 256 * 1024;

impl FrameWriter {
    fn push(&mut self, mut frame: Frame<'_>) {
        let mut head = [0u8; 14];
        let n = frame.fmt_head(&mut head);
        self.buf.extend_from_slice(&head[..n]);
        self.buf.extend_from_slice(&frame.payload);
    }

    pub(crate) fn push_text(&mut self, payload: &[u8]) {
        self.push(Frame::text(Payload::Borrowed(payload)));
    }

    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.io.flush().await?;
        }
        self.buf.clear();
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

/// The session writer: outbox → socket, batched, one flush per batch.
pub(crate) async fn write_loop(
    mut tx: FrameWriter,
    outbox: Arc<SessionOutbox>,
    caught_up: HashMap<RoomId, u64>,
) {
    let stale = |f: &OutFrame| match f.room_seq {
        Some((room, seq)) => caught_up.get(&room).is_some_and(|&h| seq <= h),
        None => false,
    };
    let code = 'session: loop {
        if outbox.is_kicked() {
            break outbox.kick_code();
        }
        let mut batch = outbox.take();
        if !batch.is_empty() {
            metrics::histogram!("confab_outbox_depth_frames").record(batch.len() as f64);
        }
        if batch.is_empty() {
            tokio::select! {
                biased;
                _ = outbox.kick_notify.notified() => break outbox.kick_code(),
                _ = outbox.ready.notified() => continue,
            }
        }
        while let Some(f) = batch.pop_front() {
            if f.pong {
                tx.push(Frame::pong(Payload::Borrowed(&f.bytes)));
            } else if !stale(&f) {
                tx.push_text(&f.bytes);
            }
            if tx.buf.len() >= BATCH_BYTES {
                match finish_or_kick(tx.flush(), &outbox).await {
                    Ok(()) => {}
                    Err(Some(code)) => break 'session code,
                    Err(None) => return,
                }
            }
        }
        drop(batch);
        match finish_or_kick(tx.flush(), &outbox).await {
            Ok(()) => {}
            Err(Some(code)) => break code,
            Err(None) => return,
        }
    };
    let reason: &[u8] = match code {
        close::TOO_SLOW => b"too slow: resume from your last seq",
        close::UNAUTHORIZED => b"log in again (logged out or token expired)",
        close::GOING_AWAY => b"server shutting down",
        close::TOO_BIG => b"frame too large",
        _ => b"",
    };
    tx.buf.clear();
    tx.push(Frame::close(code, reason));
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.flush()).await;
}

/// Runs a socket write. A client that stops reading blocks it; when the
/// session is kicked meanwhile (outbox overflow, logout, shutdown), the write
/// gets one more second: if it completes, Err(Some(code)) lets the caller send
/// the close frame on a clean stream; if not, Err(None): drop the connection.
async fn finish_or_kick(
    write: impl std::future::Future<Output = std::io::Result<()>>,
    outbox: &SessionOutbox,
) -> Result<(), Option<u16>> {
    tokio::pin!(write);
    tokio::select! {
        r = &mut write => r.map_err(|_| None),
        _ = outbox.kick_notify.notified() => {
            match tokio::time::timeout(Duration::from_secs(1), &mut write).await {
                Ok(Ok(())) => Err(Some(outbox.kick_code())),
                _ => Err(None),
            }
        }
    }
}
