//! Wallet writes, applied inside the writer's transaction (see
//! [`crate::wallet`] for the model). A transfer's ledger entries, balances,
//! state change and payment message commit together or not at all.

use redb::{ReadableTable, ReadableTableMetadata};

use super::base::*;
use crate::error::ApiError;
use crate::frames;
use crate::hub::OutFrame;
use crate::ids::{RoomId, UserId};
use crate::store::seal::seal;
use crate::store::*;
use crate::wallet::{
    self, EntryRecord, ISSUER, MAX_AMOUNT, MAX_CATCH_UP_RUNS, State, TransferRecord,
    TransferRequest, TransferView,
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

fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(hyper::StatusCode::CONFLICT, code, message)
}

fn count(outcome: &'static str) {
    metrics::counter!("confab_wallet_transfers_total", "outcome" => outcome).increment(1);
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

    /// Appends one ledger entry and sets the account's balance.
    fn entry(
        t: &mut Tables,
        account: u64,
        transfer: u64,
        delta: i64,
        balance: u64,
        ts: i64,
    ) -> Result<(), ApiError> {
        let n = t
            .wallet_entries
            .range((account, 0)..=(account, u64::MAX))?
            .next_back()
            .transpose()?
            .map(|(k, _)| k.value().1 + 1)
            .unwrap_or(1);
        let rec = EntryRecord {
            transfer,
            delta,
            balance_after: balance,
            ts,
        };
        t.wallet_entries.insert(
            (account, n),
            seal(Rec::WalletEntries, (account, n), encode(&rec)).as_slice(),
        )?;
        t.wallet_accounts.insert(account, balance)?;
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
        if amount == 0 || amount > MAX_AMOUNT {
            return Ok(Err(ApiError::bad_request(
                "invalid_amount",
                format!("amount must be 1..={MAX_AMOUNT}"),
            )));
        }
        let balance = Self::balance(t, user.0)?;
        let Some(new_balance) = balance.checked_add(amount).filter(|b| *b <= MAX_AMOUNT) else {
            return Ok(Err(conflict(
                "balance_limit",
                format!("a balance may not exceed {MAX_AMOUNT}"),
            )));
        };
        let issued = Self::balance(t, ISSUER)?
            .checked_add(amount)
            .ok_or_else(|| ApiError::internal("issued total overflow"))?;
        let now = now_ms();
        let id = Self::next_transfer_id(t)?;
        let rec = TransferRecord {
            from: ISSUER,
            to: user.0,
            amount,
            note: Some("credit".into()),
            key: key.map_or_else(|| format!("credit-{id}"), str::to_string),
            state: State::Executed,
            created_at: now,
            execute_at: now,
            executed_at: Some(now),
            repeat: None,
            parent: None,
            runs: 0,
            failure: None,
            requested_at: None,
        };
        Self::entry(t, ISSUER, id, -(amount as i64), issued, now)?;
        Self::entry(t, user.0, id, amount as i64, new_balance, now)?;
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
            if !req.same_as(&rec) {
                count("conflict");
                return Ok(Err(conflict(
                    "idempotency_conflict",
                    "this idempotency_key was already used for a different transfer",
                )));
            }
            count("replayed");
            return Ok(Ok((self.view_for(t, id, &rec, from.0), true)));
        }
        let now = now_ms();
        if let Err(e) = req.check_new(now) {
            count("rejected");
            return Ok(Err(e));
        }
        if t.users.get(req.to.0)?.is_none() {
            count("rejected");
            return Ok(Err(ApiError::user_not_found()));
        }
        let scheduled = req.repeat.is_some() || req.execute_at.is_some_and(|at| at > now);
        if scheduled && let Err(e) = self.room_to_schedule(t, from)? {
            // Nothing is stored: the same key may be retried later.
            count("rejected");
            return Ok(Err(e));
        }
        let mut rec = TransferRecord {
            from: from.0,
            to: req.to.0,
            amount: req.amount,
            note: req.note.clone(),
            key: req.key.clone(),
            state: State::Scheduled,
            created_at: now,
            execute_at: req.execute_at.unwrap_or(now),
            executed_at: None,
            repeat: req.repeat,
            parent: None,
            runs: 0,
            failure: None,
            requested_at: req.execute_at,
        };
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

    /// Room for one more scheduled transfer of `from`: fewer than
    /// `max_scheduled_transfers` in `wallet_pending` (a range of at most
    /// that many keys), else 409 `too_many_scheduled`.
    fn room_to_schedule(&self, t: &Tables, from: UserId) -> Result<Result<(), ApiError>, ApiError> {
        let max = self.wallet.settings.max_scheduled;
        let mut pending = 0usize;
        for entry in t
            .wallet_pending
            .range((from.0, 0)..=(from.0, u64::MAX))?
            .take(max)
        {
            entry?;
            pending += 1;
        }
        if pending < max {
            return Ok(Ok(()));
        }
        Ok(Err(conflict(
            "too_many_scheduled",
            format!(
                "at most {max} scheduled transfers may wait at a time: cancel one, or wait until one has run"
            ),
        )))
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
        let from_balance = Self::balance(t, rec.from)?;
        let Some(from_after) = from_balance.checked_sub(rec.amount) else {
            return Ok(Err(conflict(
                "insufficient_funds",
                format!(
                    "not enough money: the balance is {}",
                    wallet::format_amount(from_balance, &self.wallet.settings.currency)
                ),
            )));
        };
        let to_balance = Self::balance(t, rec.to)?;
        let Some(to_after) = to_balance
            .checked_add(rec.amount)
            .filter(|b| *b <= MAX_AMOUNT)
        else {
            return Ok(Err(conflict(
                "balance_limit",
                "the recipient's balance would exceed the limit",
            )));
        };
        Self::entry(t, rec.from, id, -(rec.amount as i64), from_after, now)?;
        Self::entry(t, rec.to, id, rec.amount as i64, to_after, now)?;
        rec.state = State::Executed;
        rec.executed_at = Some(now);
        t.wallet_user_transfers.insert((rec.to, id), ())?;
        if let Some(msg) = self.payment_message(t, id, rec, now)? {
            notices.messages.push(msg);
        }
        let (from, to) = (UserId(rec.from), UserId(rec.to));
        notices
            .frames
            .push((from, self.view_for(t, id, rec, rec.from)));
        notices.frames.push((to, self.view_for(t, id, rec, rec.to)));
        count("executed");
        Ok(Ok(()))
    }

    /// The payment message in the pair's direct chat (created if needed).
    /// In a cluster, a chat on another node gets it through the outbox
    /// (None here): it appears there once, when that node confirms it.
    fn payment_message(
        &mut self,
        t: &mut Tables,
        id: u64,
        rec: &TransferRecord,
        now: i64,
    ) -> Result<Option<(Message, Option<Room>)>, ApiError> {
        let (from, to) = (UserId(rec.from), UserId(rec.to));
        let amount = wallet::format_amount(rec.amount, &self.wallet.settings.currency);
        let text = match &rec.note {
            Some(n) => format!("💸 {amount} · {n}"),
            None => format!("💸 {amount}"),
        };
        if let Some(c) = &self.wallet.placement
            && !c.owns(RoomId::direct(from, to).0)
        {
            let (Some(from_user), Some(to_user)) =
                (user_in(&t.users, from)?, user_in(&t.users, to)?)
            else {
                return Err(ApiError::internal("a payment between unknown users"));
            };
            let item = crate::writes::outbox::OutboxItem::Payment {
                from: from_user,
                to: to_user,
                client_id: format!("pay-{}", wallet::stored_hex(id)),
                text,
                transfer: id,
                amount: rec.amount,
                note: rec.note.clone(),
            };
            self.outbox_push(t, &item)?;
            return Ok(None);
        }
        let (room, created) = self.ensure_direct(t, from, to)?;
        let seq = self.next_seq(t, room)?;
        let mrec = MessageRecord {
            from: rec.from,
            ts: now,
            // The stored id: stable whatever the key of public ids (shown
            // as the public id by `Message::from_record`).
            client_id: format!("pay-{}", wallet::stored_hex(id)),
            text,
            payment: Some(PaymentInfo {
                transfer: id,
                amount: rec.amount,
                to: rec.to,
                note: rec.note.clone(),
            }),
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
        Ok(Some((msg, view)))
    }

    /// Queues an operation for another node (see [`CLUSTER_OUTBOX`]).
    pub(super) fn outbox_push(
        &mut self,
        t: &mut Tables,
        item: &crate::writes::outbox::OutboxItem,
    ) -> Result<(), ApiError> {
        let next = t.cluster_outbox.last()?.map_or(1, |(k, _)| k.value() + 1);
        let bytes = serde_json::to_vec(item).map_err(ApiError::internal)?;
        t.cluster_outbox
            .insert(next, seal(Rec::ClusterOutbox, next, bytes).as_slice())?;
        self.outbox_woken = true;
        Ok(())
    }

    fn cancel(
        &mut self,
        t: &mut Tables,
        by: UserId,
        id: u64,
        notices: &mut Notices,
    ) -> Result<Result<TransferView, ApiError>, ApiError> {
        let not_found = || ApiError::not_found("transfer_not_found", "no such transfer");
        let Some(mut rec) = Self::load(t, id)? else {
            return Ok(Err(not_found()));
        };
        // A transfer the caller may not see answers exactly as a missing one.
        if !rec.visible_to(by.0) {
            return Ok(Err(not_found()));
        }
        if rec.from != by.0 {
            return Ok(Err(ApiError::forbidden(
                "forbidden",
                "only the sender can cancel a transfer",
            )));
        }
        match rec.state {
            State::Cancelled => return Ok(Ok(self.view_for(t, id, &rec, by.0))),
            State::Scheduled => {}
            State::Executed | State::Failed => {
                return Ok(Err(conflict(
                    "not_cancellable",
                    format!("the transfer has already {}", rec.state.name()),
                )));
            }
        }
        t.wallet_schedule.remove((rec.execute_at, id))?;
        t.wallet_pending.remove((rec.from, id))?;
        rec.state = State::Cancelled;
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
            metrics::histogram!("confab_wallet_scheduler_lag_seconds")
                .record((now - at).max(0) as f64 / 1000.0);
            match rec.repeat {
                None => {
                    // Executed or failed: either way no longer pending.
                    t.wallet_pending.remove((rec.from, id))?;
                    self.run_once(t, id, &mut rec, now, notices)?;
                }
                Some(repeat) => {
                    let first = rec.requested_at.unwrap_or(rec.execute_at);
                    let mut made = 0;
                    while made < MAX_CATCH_UP_RUNS {
                        let k = rec.runs;
                        let run_at = wallet::run_time(first, repeat, k);
                        if run_at > now {
                            break;
                        }
                        // One run: its own transfer, keyed by (recurring id, run number).
                        let child_id = Self::next_transfer_id(t)?;
                        let mut child = TransferRecord {
                            key: format!("{}#{k}", rec.key),
                            state: State::Scheduled,
                            created_at: now,
                            execute_at: run_at,
                            executed_at: None,
                            repeat: None,
                            parent: Some((id, k)),
                            runs: 0,
                            failure: None,
                            requested_at: Some(run_at),
                            ..rec.clone()
                        };
                        self.run_once(t, child_id, &mut child, now, notices)?;
                        // The recipient's row only if it ran (`execute`).
                        t.wallet_user_transfers.insert((rec.from, child_id), ())?;
                        rec.runs += 1;
                        made += 1;
                    }
                    rec.execute_at = wallet::run_time(first, repeat, rec.runs);
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
            rec.state = State::Failed;
            rec.executed_at = Some(now);
            rec.failure = Some(e.message.clone());
            notices
                .frames
                .push((UserId(rec.from), self.view_for(t, id, rec, rec.from)));
            count("failed");
        }
        Self::save(t, id, rec)
    }
}
