//! After a batch is durable: acks, answers, fan-out through the [`Hub`],
//! read receipts — everything an [`Effect`] asks for, never before its
//! commit. [`Delivery`] is the subscriber (`writes/publish.rs`) that does it.

use std::collections::HashMap;
use std::sync::Arc;

use super::base::*;
use crate::frames::{self, ServerFrame};
use crate::hub::{Hub, OutFrame};
use crate::ids::{RoomId, UserId};
use crate::telemetry::LiveStats;

/// The subscriber that acks, answers, fans out and sends receipts, and
/// counts them into the server's live totals.
pub struct Delivery {
    pub hub: Arc<Hub>,
    pub live: Arc<LiveStats>,
}

impl super::publish::Subscriber<Effect> for Delivery {
    fn committed(&mut self, batch: &mut super::publish::Committed<Effect>) {
        self.deliver(std::mem::take(&mut batch.effects));
    }

    fn measured(&mut self, ops: usize, secs: f64) {
        let live = &*self.live;
        LiveStats::add(&live.commits, 1);
        LiveStats::add(&live.commit_ops, ops as u64);
        LiveStats::add(&live.commit_micros, (secs * 1e6) as u64);
    }
}

impl Delivery {
    /// After a successful commit: ack, answer, fan out, send receipts.
    fn deliver(&self, effects: Vec<Effect>) {
        let hub = &*self.hub;
        // (room, recipient, sender) → highest seq delivered in this batch.
        let mut delivered: HashMap<(RoomId, UserId, UserId), u64> = HashMap::new();
        for effect in effects {
            match effect {
                Effect::Sent {
                    msg,
                    members,
                    origin,
                    duplicate,
                    received,
                } => {
                    let skip = match &origin {
                        Origin::Session(s) => Some(s.id),
                        Origin::Http(_) => None,
                    };
                    // The fan-out and its figures come before the answer:
                    // a sender holding an ack knows every online member's
                    // outbox already has the message, and every counter
                    // already counts it.
                    if duplicate {
                        metrics::counter!("confab_messages_deduplicated_total").increment(1);
                    } else {
                        let frame = OutFrame {
                            bytes: frames::message(&msg),
                            room_seq: Some((msg.room, msg.seq)),
                            pong: false,
                        };
                        metrics::counter!("confab_messages_stored_total").increment(1);
                        let live = &*self.live;
                        LiveStats::add(&live.stored, 1);
                        let mut n = 0u64;
                        for &member in members.iter() {
                            let skip = if member == msg.from { skip } else { None };
                            if hub.send_to_user(member, &frame, skip) {
                                n += 1;
                                if member != msg.from {
                                    let e =
                                        delivered.entry((msg.room, member, msg.from)).or_default();
                                    *e = (*e).max(msg.seq);
                                }
                            }
                        }
                        metrics::counter!("confab_messages_delivered_total").increment(n);
                        LiveStats::add(&live.delivered, n);
                        // Send → handed to every recipient's outbox.
                        let took = received.elapsed();
                        metrics::histogram!("confab_send_deliver_seconds")
                            .record(took.as_secs_f64());
                        live.deliver_latency(took);
                    }
                    metrics::histogram!("confab_send_ack_seconds")
                        .record(received.elapsed().as_secs_f64());
                    match origin {
                        Origin::Session(s) => {
                            s.push_bytes(frames::ack(&msg));
                        }
                        Origin::Http(tx) => {
                            let _ = tx.send(Ok((msg, duplicate)));
                        }
                    }
                }
                Effect::Rejected {
                    origin,
                    err,
                    client_id,
                    room,
                } => {
                    LiveStats::add(&self.live.rejected, 1);
                    metrics::counter!("confab_messages_rejected_total", "reason" => err.code)
                        .increment(1);
                    fail_origin(origin, &err, &client_id, room);
                }
                Effect::Read {
                    room,
                    user,
                    seq,
                    members,
                } => {
                    let frame = OutFrame {
                        bytes: ServerFrame::Receipt {
                            room,
                            user,
                            seq,
                            kind: "read",
                        }
                        .to_bytes(),
                        room_seq: None,
                        pong: false,
                    };
                    for &m in members.iter().filter(|&&m| m != user) {
                        hub.send_to_user(m, &frame, None);
                    }
                }
                Effect::Done(f) => f(hub),
                Effect::None => {}
            }
        }
        for ((room, user, sender), seq) in delivered {
            let frame = OutFrame {
                bytes: ServerFrame::Receipt {
                    room,
                    user,
                    seq,
                    kind: "delivered",
                }
                .to_bytes(),
                room_seq: None,
                pong: false,
            };
            hub.send_to_user(sender, &frame, None);
        }
    }
}
