//! Wallet writes, applied inside the writer's transaction (see
//! [`crate::wallet`] for the model, and [`crate::wallet::rules`] for the
//! rules this and the PostgreSQL backend apply). A transfer's ledger
//! entries, balances, state change and payment message commit together or
//! not at all.

use redb::{ReadableTable, ReadableTableMetadata};

use super::base::*;
use crate::error::ApiError;
use crate::frames;
use crate::hub::OutFrame;
use crate::ids::UserId;
use crate::store::seal::seal;
use crate::store::*;
use crate::wallet::rules::{self, Cancelling, count};
use crate::wallet::{
    self, EntryRecord, ISSUER, State, TransferRecord, TransferRequest, TransferView,
};

/// What a committed wallet change tells whom (gathered by either backend's
/// writer while applying, told by [`announce_wallet`] after the commit).
#[derive(Default)]
pub struct Notices {
    /// Payment messages to fan out (with the room view if the room is new).
    pub messages: Vec<(Message, Option<Room>)>,
    /// `wallet` frames: (user, their view of the transfer).
    pub frames: Vec<(UserId, TransferView)>,
    /// The schedule changed: wake the scheduler.
    pub wake: bool,
}

/// After a wallet change's commit: fans out its payment messages (and a
/// new direct room first), sends the `wallet` frames, wakes the scheduler
/// (`wake`: when the schedule changed), then answers the caller. Both
/// backends' writers answer wallet ops through it.
pub fn announce_wallet<T: Send + 'static>(
    notices: Notices,
    wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    reply: Reply<T>,
    result: Result<T, ApiError>,
) -> Effect {
    Effect::Done(Box::new(move |hub| {
        for (msg, new_room) in notices.messages {
            if let Some(room) = new_room {
                announce_room(hub, &room);
            }
            let frame = OutFrame {
                bytes: frames::message(&msg),
                room_seq: Some((msg.room, msg.seq)),
                pong: false,
            };
            if let Some(p) = &msg.payment {
                hub.send_to_user(msg.from, &frame, None);
                hub.send_to_user(p.to, &frame, None);
            }
        }
        for (user, view) in notices.frames {
            let bytes =
                serde_json::to_vec(&serde_json::json!({"type": "wallet", "transfer": view}))
                    .unwrap_or_default();
            let frame = OutFrame {
                bytes: bytes.into(),
                room_seq: None,
                pong: false,
            };
            hub.send_to_user(user, &frame, None);
        }
        if let Some(w) = wake {
            w.notify_one();
        }
        let _ = reply.send(result);
    }))
}

impl GroupCommitWriter {
    pub(super) fn apply_wallet(
        &mut self,
        op: WalletOp,
        t: &mut Tables,
    ) -> Result<Effect, ApiError> {
        let mut notices = Notices::default();
        Ok(match op {
            WalletOp::Credit {
                user,
                amount,
                key,
                reply,
            } => {
                let replay = match &key {
                    Some(k) => t.wallet_keys.get((ISSUER, k.as_str()))?.is_some(),
                    None => false,
                };
                let result = if t.users.get(user.0)?.is_none() {
                    Err(ApiError::user_not_found())
                } else if replay {
                    Ok(Self::balance(t, user.0)?)
                } else {
                    self.credit(t, user, amount, key.as_deref(), &mut notices)?
                };
                self.announce(notices, reply, result)
            }
            WalletOp::Transfer { from, req, reply } => {
                let result = self.transfer(t, from, req, &mut notices)?;
                self.announce(notices, reply, result)
            }
            WalletOp::Cancel { by, id, reply } => {
                let result = self.cancel(t, by, id, &mut notices)?;
                self.announce(notices, reply, result)
            }
            WalletOp::RunDue { now, reply } => {
                self.run_due(t, now, &mut notices)?;
                let next = t.wallet_schedule.first()?.map(|(k, _)| k.value().0);
                metrics::gauge!("confab_wallet_scheduled").set(t.wallet_schedule.len()? as f64);
                self.announce(notices, reply, Ok(next))
            }
        })
    }

    /// After the commit: payment messages, `wallet` frames, the scheduler, the reply.
    fn announce<T: Send + 'static>(
        &self,
        notices: Notices,
        reply: Reply<T>,
        result: Result<T, ApiError>,
    ) -> Effect {
        let wake = notices.wake.then(|| self.wallet.wake.clone());
        announce_wallet(notices, wake, reply, result)
    }

    fn balance(t: &Tables, account: u64) -> Result<u64, ApiError> {
        Ok(t.wallet_accounts
            .get(account)?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    /// The next stored transfer id. Also marks `wallet_pending` as kept up
    /// to date through this id (see `store::rebuild_wallet_pending`).
    fn next_transfer_id(t: &mut Tables) -> Result<u64, ApiError> {
        let id = t
            .meta
            .get("next_transfer_id")?
            .map(|g| g.value())
            .unwrap_or(1);
        t.meta.insert("next_transfer_id", id + 1)?;
        t.meta.insert(crate::store::PENDING_SYNCED, id + 1)?;
        Ok(id)
    }

    fn load(t: &Tables, id: u64) -> Result<Option<TransferRecord>, ApiError> {
        match t.wallet_transfers.get(id)? {
            Some(g) => Ok(Some(wallet::decode_transfer(id, g.value())?)),
            None => Ok(None),
        }
    }

    fn save(t: &mut Tables, id: u64, rec: &TransferRecord) -> Result<(), ApiError> {
        t.wallet_transfers
            .insert(id, seal(Rec::WalletTransfers, id, encode(rec)).as_slice())?;
        Ok(())
    }

    fn view_for(&self, t: &Tables, id: u64, rec: &TransferRecord, viewer: u64) -> TransferView {
        wallet::view(
            id,
            rec,
            viewer,
            &self.wallet.settings.currency,
            &self.store.transfer_ids,
            |u| user_in(&t.users, UserId(u)).ok().flatten(),
        )
    }

    /// Appends a transfer's ledger entries ([`rules::entries`]) and sets
    /// the accounts' balances.
    fn entries(t: &mut Tables, entries: [(u64, EntryRecord); 2]) -> Result<(), ApiError> {
        for (account, rec) in entries {
            Self::entry(t, account, &rec)?;
        }
        Ok(())
    }

    /// Appends one ledger entry and sets the account's balance.
    fn entry(t: &mut Tables, account: u64, rec: &EntryRecord) -> Result<(), ApiError> {
        let n = t
            .wallet_entries
            .range((account, 0)..=(account, u64::MAX))?
            .next_back()
            .transpose()?
            .map(|(k, _)| k.value().1 + 1)
            .unwrap_or(1);
        t.wallet_entries.insert(
            (account, n),
            seal(Rec::WalletEntries, (account, n), encode(rec)).as_slice(),
        )?;
        t.wallet_accounts.insert(account, rec.balance_after)?;
        Ok(())
    }

    pub(super) fn credit(
        &mut self,
        t: &mut Tables,
        user: UserId,
        amount: u64,
        key: Option<&str>,
        notices: &mut Notices,
    ) -> Result<Result<u64, ApiError>, ApiError> {
        let new_balance = match rules::credited_balance(Self::balance(t, user.0)?, amount) {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let issued = Self::balance(t, ISSUER)?
            .checked_add(amount)
            .ok_or_else(|| ApiError::internal("issued total overflow"))?;
        let now = now_ms();
        let id = Self::next_transfer_id(t)?;
        let rec = rules::credit_record(id, user, amount, key, now);
        Self::entries(
            t,
            rules::entries(id, (ISSUER, issued), (user.0, new_balance), amount, now),
        )?;
        Self::save(t, id, &rec)?;
        if let Some(k) = key {
            t.wallet_keys.insert((ISSUER, k), id)?;
        }
        t.wallet_user_transfers.insert((user.0, id), ())?;
        notices
            .frames
            .push((user, self.view_for(t, id, &rec, user.0)));
        count("credited");
        Ok(Ok(new_balance))
    }

    fn transfer(
        &mut self,
        t: &mut Tables,
        from: UserId,
        req: TransferRequest,
        notices: &mut Notices,
    ) -> Result<Result<(TransferView, bool), ApiError>, ApiError> {
        if let Some(id) = t
            .wallet_keys
            .get((from.0, req.key.as_str()))?
            .map(|g| g.value())
        {
            let rec = Self::load(t, id)?
                .ok_or_else(|| ApiError::internal("idempotency key without transfer"))?;
            if let Err(e) = rules::check_replay(&req, &rec) {
                return Ok(Err(e));
            }
            return Ok(Ok((self.view_for(t, id, &rec, from.0), true)));
        }
        let now = now_ms();
        let to_exists = t.users.get(req.to.0)?.is_some();
        if let Err(e) = rules::check_new_transfer(&req, now, to_exists) {
            return Ok(Err(e));
        }
        let scheduled = req.is_scheduled(now);
        if scheduled
            && let Err(e) = rules::check_room_to_schedule(
                self.pending(t, from)?,
                self.wallet.settings.max_scheduled,
            )
        {
            return Ok(Err(e));
        }
        let mut rec = req.record(from, now);
        let id = Self::next_transfer_id(t)?;
        if scheduled {
            t.wallet_schedule.insert((rec.execute_at, id), ())?;
            t.wallet_pending.insert((from.0, id), ())?;
            notices.wake = true;
            count("scheduled");
        } else if let Err(e) = self.execute(t, id, &mut rec, now, notices)? {
            // Refused now: nothing is stored, the same key may be retried.
            count("rejected");
            return Ok(Err(e));
        }
        Self::save(t, id, &rec)?;
        t.wallet_keys.insert((from.0, req.key.as_str()), id)?;
        // The recipient's row comes with the money (`execute`).
        t.wallet_user_transfers.insert((from.0, id), ())?;
        if scheduled {
            notices
                .frames
                .push((from, self.view_for(t, id, &rec, from.0)));
        }
        Ok(Ok((self.view_for(t, id, &rec, from.0), false)))
    }

    /// How many scheduled transfers of `from` wait in `wallet_pending`,
    /// counted up to `max_scheduled_transfers` (a range of at most that
    /// many keys): what [`rules::check_room_to_schedule`] needs.
    fn pending(&self, t: &Tables, from: UserId) -> Result<usize, ApiError> {
        let mut pending = 0usize;
        for entry in t
            .wallet_pending
            .range((from.0, 0)..=(from.0, u64::MAX))?
            .take(self.wallet.settings.max_scheduled)
        {
            entry?;
            pending += 1;
        }
        Ok(pending)
    }

    /// Moves the money of `rec` now and posts its payment message. A refusal
    /// (insufficient funds, balance limit) changes nothing. From here on
    /// the recipient sees the transfer: its row in their history is added
    /// now, not when it was scheduled.
    fn execute(
        &mut self,
        t: &mut Tables,
        id: u64,
        rec: &mut TransferRecord,
        now: i64,
        notices: &mut Notices,
    ) -> Result<Result<(), ApiError>, ApiError> {
        let balances = (Self::balance(t, rec.from)?, Self::balance(t, rec.to)?);
        let currency = &self.wallet.settings.currency;
        let moved = match rules::transfer_entries(id, rec, balances, currency, now) {
            Ok(moved) => moved,
            Err(e) => return Ok(Err(e)),
        };
        Self::entries(t, moved)?;
        rules::mark_executed(rec, now);
        t.wallet_user_transfers.insert((rec.to, id), ())?;
        let msg = self.payment_message(t, id, rec, now)?;
        notices.messages.push(msg);
        let (from, to) = (UserId(rec.from), UserId(rec.to));
        notices
            .frames
            .push((from, self.view_for(t, id, rec, rec.from)));
        notices.frames.push((to, self.view_for(t, id, rec, rec.to)));
        count("executed");
        Ok(Ok(()))
    }

    /// The payment message in the pair's direct chat (created if needed).
    fn payment_message(
        &mut self,
        t: &mut Tables,
        id: u64,
        rec: &TransferRecord,
        now: i64,
    ) -> Result<(Message, Option<Room>), ApiError> {
        let (from, to) = (UserId(rec.from), UserId(rec.to));
        let pay = rules::payment_message(id, rec, &self.wallet.settings.currency);
        let (room, created) = self.ensure_direct(t, from, to)?;
        let seq = self.next_seq(t, room)?;
        let mrec = MessageRecord {
            from: rec.from,
            ts: now,
            // Shown as the transfer's public id by `Message::from_record`.
            client_id: pay.client_id,
            text: pay.text,
            payment: Some(pay.payment),
        };
        t.messages
            .insert((room.0, seq), mrec.sealed(room, seq).as_slice())?;
        let pos = self.next_log_pos(t)?;
        t.message_log.insert(pos, (room.0, seq))?;
        let view = if created {
            room_view(&t.rooms, &t.members, &t.users, &t.messages, room)?
        } else {
            None
        };
        let msg = Message::from_record(room, seq, mrec, &self.store.transfer_ids);
        Ok((msg, view))
    }

    fn cancel(
        &mut self,
        t: &mut Tables,
        by: UserId,
        id: u64,
        notices: &mut Notices,
    ) -> Result<Result<TransferView, ApiError>, ApiError> {
        let rec = match rules::cancelling(Self::load(t, id)?, by) {
            Ok(Cancelling::Now(rec)) => rec,
            Ok(Cancelling::Already(rec)) => return Ok(Ok(self.view_for(t, id, &rec, by.0))),
            Err(e) => return Ok(Err(e)),
        };
        t.wallet_schedule.remove((rec.execute_at, id))?;
        t.wallet_pending.remove((rec.from, id))?;
        Self::save(t, id, &rec)?;
        notices.wake = true;
        let view = self.view_for(t, id, &rec, by.0);
        notices.frames.push((by, view.clone()));
        count("cancelled");
        Ok(Ok(view))
    }

    fn run_due(&mut self, t: &mut Tables, now: i64, notices: &mut Notices) -> Result<(), ApiError> {
        let due: Vec<(i64, u64)> = t
            .wallet_schedule
            .range((i64::MIN, 0)..=(now, u64::MAX))?
            .take(500)
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for (at, id) in due {
            t.wallet_schedule.remove((at, id))?;
            let Some(mut rec) = Self::load(t, id)? else {
                continue;
            };
            if rec.state != State::Scheduled {
                continue;
            }
            rules::record_lag(at, now);
            match rec.repeat {
                None => {
                    // Executed or failed: either way no longer pending.
                    t.wallet_pending.remove((rec.from, id))?;
                    self.run_once(t, id, &mut rec, now, notices)?;
                }
                Some(repeat) => {
                    for (k, run_at) in rules::due_runs(&rec, repeat, now) {
                        // One run: its own transfer, keyed by (recurring id, run number).
                        let child_id = Self::next_transfer_id(t)?;
                        let mut child = rules::run_record(id, &rec, k, run_at, now);
                        self.run_once(t, child_id, &mut child, now, notices)?;
                        // The recipient's row only if it ran (`execute`).
                        t.wallet_user_transfers.insert((rec.from, child_id), ())?;
                        rec.runs += 1;
                    }
                    rec.execute_at = rules::next_run(&rec, repeat);
                    t.wallet_schedule.insert((rec.execute_at, id), ())?;
                    Self::save(t, id, &rec)?;
                }
            }
        }
        Ok(())
    }

    /// Executes a due transfer, or marks it failed (and tells the sender).
    fn run_once(
        &mut self,
        t: &mut Tables,
        id: u64,
        rec: &mut TransferRecord,
        now: i64,
        notices: &mut Notices,
    ) -> Result<(), ApiError> {
        if let Err(e) = self.execute(t, id, rec, now, notices)? {
            rules::mark_failed(rec, now, &e);
            notices
                .frames
                .push((UserId(rec.from), self.view_for(t, id, rec, rec.from)));
            count("failed");
        }
        Self::save(t, id, rec)
    }
}
