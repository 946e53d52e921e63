//! Reads that survive damage: [`catch`] turns a panic inside redb (on a
//! damaged page) into an error, and [`visit_messages`] walks `messages` in
//! key order and, when a page cannot be read, goes on past it. The lowest
//! file of `integrity`: it imports none of the others.

use std::collections::{BTreeSet, HashMap};

use redb::{ReadTransaction, ReadableTable};

use super::super::{MESSAGE_LOG, MESSAGES};

/// Runs `f`, turning a panic (inside redb, on a damaged page) into
/// Err(its message).
pub fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match super::super::catch_panic(f) {
        Ok(r) => r,
        Err(why) => {
            metrics::counter!("confab_store_read_failures_total", "kind" => "panic").increment(1);
            Err(format!("redb panicked: {why}"))
        }
    }
}

pub(super) fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------
// Walking `messages` past damage
// ---------------------------------------------------------------------------

/// What [`visit_messages`] meets.
pub enum Item<'a> {
    /// A stored value (not yet checked: see [`verify_value`](super::super::verify_value)).
    Record {
        room: u64,
        seq: u64,
        value: &'a [u8],
    },
    /// A message `message_log` knows of whose page cannot be read.
    Unreachable { room: u64, seq: u64 },
    /// A range scan broke off: after `after` (the last key read, None: at
    /// the start of the scan), because of `why`.
    Page {
        after: Option<(u64, u64)>,
        why: String,
    },
}

/// How a range scan ended.
enum Scan<E> {
    Done,
    /// The callback failed: stop, with its error.
    Stopped(E),
    /// A damaged page: the last key read before it, and why.
    Broke(Option<(u64, u64)>, String),
}

fn scan_range<E>(
    txn: &ReadTransaction,
    lo: (u64, u64),
    hi: (u64, u64),
    f: &mut dyn FnMut(Item<'_>) -> Result<(), E>,
) -> Scan<E> {
    let mut last = None;
    let mut stopped = None;
    let r = catch(|| {
        let t = txn.open_table(MESSAGES).map_err(s)?;
        for e in t.range(lo..=hi).map_err(s)? {
            let (k, v) = e.map_err(s)?;
            let (room, seq) = k.value();
            if let Err(e) = f(Item::Record {
                room,
                seq,
                value: v.value(),
            }) {
                stopped = Some(e);
                return Ok(());
            }
            last = Some((room, seq));
        }
        Ok(())
    });
    match (r, stopped) {
        (_, Some(e)) => Scan::Stopped(e),
        (Ok(()), None) => Scan::Done,
        (Err(why), None) => Scan::Broke(last, why),
    }
}

/// One message by key, past a damaged neighbourhood.
fn point<E>(
    txn: &ReadTransaction,
    room: u64,
    seq: u64,
    f: &mut dyn FnMut(Item<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut out = None;
    let r = catch(|| {
        let t = txn.open_table(MESSAGES).map_err(s)?;
        if let Some(g) = t.get((room, seq)).map_err(s)? {
            out = Some(f(Item::Record {
                room,
                seq,
                value: g.value(),
            }));
        }
        Ok(())
    });
    match (r, out) {
        (_, Some(res)) => res,
        (Ok(()), None) => Ok(()),
        (Err(_), None) => f(Item::Unreachable { room, seq }),
    }
}

/// The seqs `message_log` lists for each of `rooms` at or after its start
/// (sorted), and, when `all_after` is given, every room it lists after
/// that id. Err when the log cannot be read either.
#[allow(clippy::type_complexity)]
fn from_log(
    txn: &ReadTransaction,
    rooms: &HashMap<u64, u64>,
    all_after: Option<u64>,
) -> Result<(HashMap<u64, Vec<u64>>, BTreeSet<u64>), String> {
    catch(|| {
        let log = txn.open_table(MESSAGE_LOG).map_err(s)?;
        let mut seqs: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut later = BTreeSet::new();
        for e in log.iter().map_err(s)? {
            let (_, v) = e.map_err(s)?;
            let (room, seq) = v.value();
            if let Some(&from) = rooms.get(&room)
                && seq >= from
            {
                seqs.entry(room).or_default().push(seq);
            }
            if all_after.is_some_and(|a| room > a) {
                later.insert(room);
            }
        }
        for v in seqs.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        Ok((seqs, later))
    })
}

/// Visits the stored messages of `room` (of every room when None), in key
/// order, going on past damaged pages (see the module docs): after a
/// [`Item::Page`], the rest of that room follows key by key (from the log;
/// [`Item::Unreachable`] for each it cannot read) and, for every room,
/// the other rooms one by one — a room whose own scan breaks has its tail
/// visited after the others. Stops at the first error of `f`.
pub fn visit_messages<E>(
    txn: &ReadTransaction,
    room: Option<u64>,
    f: &mut dyn FnMut(Item<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let (lo, hi) = match room {
        Some(r) => ((r, 0), (r, u64::MAX)),
        None => ((0, 0), (u64::MAX, u64::MAX)),
    };
    let (last, why) = match scan_range(txn, lo, hi, f) {
        Scan::Done => return Ok(()),
        Scan::Stopped(e) => return Err(e),
        Scan::Broke(last, why) => (last, why),
    };
    f(Item::Page {
        after: last,
        why: why.clone(),
    })?;
    // Where the broken scan's room goes on from.
    let (r0, s0) = match (last, room) {
        (Some((r, q)), _) => (r, q + 1),
        (None, Some(r)) => (r, 0),
        (None, None) => (0, 0),
    };
    let mut tails: HashMap<u64, u64> = HashMap::from([(r0, s0)]);
    if room.is_none() {
        // The other rooms, each scanned by itself.
        let (_, later) = match from_log(txn, &HashMap::new(), Some(r0)) {
            Ok(x) => x,
            Err(why) => {
                return f(Item::Page {
                    after: None,
                    why: format!("message_log: {why}"),
                });
            }
        };
        for r in later {
            match scan_range(txn, (r, 0), (r, u64::MAX), f) {
                Scan::Done => {}
                Scan::Stopped(e) => return Err(e),
                Scan::Broke(last, why) => {
                    f(Item::Page { after: last, why })?;
                    tails.insert(r, last.map_or(0, |(_, q)| q + 1));
                }
            }
        }
    }
    let (seqs, _) = match from_log(txn, &tails, None) {
        Ok(x) => x,
        Err(why) => {
            return f(Item::Page {
                after: None,
                why: format!("message_log: {why}"),
            });
        }
    };
    let mut rooms: Vec<&u64> = tails.keys().collect();
    rooms.sort_unstable();
    for r in rooms {
        for &q in seqs.get(r).map(Vec::as_slice).unwrap_or(&[]) {
            point(txn, *r, q, f)?;
        }
    }
    Ok(())
}
