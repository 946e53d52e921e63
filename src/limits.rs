//! Budgets that keep one client from crowding out the others.
//!
//! Every limit here protects a resource that all users share — the
//! connection table, the writer thread, other sessions' outboxes, the
//! password hasher — from one user or one address. They are small pieces
//! with one rule each: token buckets (a sustained rate and a burst), window
//! counters (at most N in a window), in-flight counters (at most N at once),
//! and the typing gate (`typing` per user and room, paced). Each map
//! is keyed by something bounded (a user id, an address) and forgets idle
//! keys, so none of them grows with an attacker's traffic. Where each limit
//! is applied, and what it protects, is listed in docs/ARCHITECTURE.md
//! ("Limits").

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ids::{RoomId, UserId};

/// Maps are swept for idle keys when they grow past this many entries.
const SWEEP_AT: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The address a limit counts: IPv4 as it is, IPv6 by its /64 (one host
/// usually holds a whole /64, and would otherwise have 2^64 budgets).
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            rate,
            burst,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
    }

    /// Takes a token if there is one; otherwise says how long until there is.
    pub fn take(&mut self) -> Result<(), Duration> {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Takes a token now, going into debt when there is none: the caller
    /// waits the returned time before it goes on (zero when it need not).
    /// This is backpressure: a reader that waits stops reading its socket.
    pub fn take_or_wait(&mut self) -> Duration {
        self.refill(Instant::now());
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * self.rate >= self.burst
    }
}

/// One token bucket per key (a user, an address), created full; a key
/// whose bucket has filled up again is forgotten (a full bucket and no
/// bucket are the same).
pub struct KeyedBuckets<K> {
    map: Mutex<HashMap<K, TokenBucket>>,
    rate: f64,
    burst: f64,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    pub fn new(rate_per_sec: f64, burst: f64) -> KeyedBuckets<K> {
        KeyedBuckets {
            map: Mutex::new(HashMap::new()),
            rate: rate_per_sec,
            burst,
        }
    }

    /// Takes a token of `key`'s bucket; Err(how long until one is there).
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        let mut map = lock(&self.map);
        if map.len() >= SWEEP_AT && !map.contains_key(key) {
            let now = Instant::now();
            map.retain(|_, b| !b.is_full(now));
        }
        map.entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst))
            .take()
    }

    /// Keys with a bucket now (for tests of the bound).
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// At most `max` events per key within a fixed window that starts at the
/// key's first event (failed logins per username and address, signups per
/// address). At most `cap` keys are remembered: past it, expired windows are
/// swept, and a new key that still finds the table full is not recorded
/// (the per-address limits bound how fast one client can fill it).
pub struct WindowCounter<K> {
    map: Mutex<HashMap<K, (Instant, u32)>>,
    window: Duration,
    max: u32,
    cap: usize,
}

impl<K: Hash + Eq + Clone> WindowCounter<K> {
    pub fn new(max: u32, window: Duration, cap: usize) -> WindowCounter<K> {
        WindowCounter {
            map: Mutex::new(HashMap::new()),
            window,
            max,
            cap,
        }
    }

    /// Ok when `key` is under its limit; Err(time until its window ends).
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        match lock(&self.map).get(key) {
            Some(&(start, n)) if n >= self.max => {
                let left = self
                    .window
                    .saturating_sub(now.saturating_duration_since(start));
                if left.is_zero() { Ok(()) } else { Err(left) }
            }
            _ => Ok(()),
        }
    }

    /// Counts one event of `key`.
    pub fn add(&self, key: &K) {
        let now = Instant::now();
        let mut map = lock(&self.map);
        if map.len() >= self.cap && !map.contains_key(key) {
            let window = self.window;
            map.retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
            if map.len() >= self.cap {
                return;
            }
        }
        let e = map.entry(key.clone()).or_insert((now, 0));
        if now.saturating_duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Forgets `key` (a successful login clears its failures).
    pub fn clear(&self, key: &K) {
        lock(&self.map).remove(key);
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// At most `max` at once per key (password hashes per address). Entering
/// gives a guard; dropping it leaves.
pub struct InFlight<K: Hash + Eq + Clone> {
    map: Mutex<HashMap<K, u32>>,
    max: u32,
}

impl<K: Hash + Eq + Clone> InFlight<K> {
    pub fn new(max: u32) -> Arc<InFlight<K>> {
        Arc::new(InFlight {
            map: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A guard, or None when `key` already has `max` in flight.
    pub fn try_enter(self: &Arc<Self>, key: K) -> Option<InFlightGuard<K>> {
        let mut map = lock(&self.map);
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(InFlightGuard {
            owner: self.clone(),
            key,
        })
    }

    fn leave(&self, key: &K) {
        let mut map = lock(&self.map);
        if let Some(n) = map.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

pub struct InFlightGuard<K: Hash + Eq + Clone> {
    owner: Arc<InFlight<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for InFlightGuard<K> {
    fn drop(&mut self) {
        self.owner.leave(&self.key);
    }
}

/// Open TCP connections: at most `max` in all and `max_per_ip` from one
/// address (so one client cannot take every slot, e.g. with request bodies
/// it never finishes). Shared by the server and the proxy.
pub struct Connections {
    open: AtomicUsize,
    by_ip: Arc<InFlight<IpAddr>>,
    max: usize,
}

impl Connections {
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Connections> {
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            by_ip: InFlight::new(u32::try_from(max_per_ip).unwrap_or(u32::MAX)),
            max,
        })
    }

    /// Takes a slot for a new connection from `ip`, or None when the server
    /// or that address is full.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        let per_ip = (prev < self.max)
            .then(|| self.by_ip.try_enter(ip_key(ip)))
            .flatten();
        let Some(per_ip) = per_ip else {
            self.open.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("confab_connections_refused_total").increment(1);
            return None;
        };
        metrics::gauge!("confab_connections_open").increment(1.0);
        Some(ConnectionSlot {
            owner: self.clone(),
            _per_ip: Some(per_ip),
        })
    }

    /// Takes a slot past the limits: the upgrade of a connection that was
    /// counted (its HTTP side lets go of its own slot right after).
    pub fn take(self: &Arc<Self>) -> ConnectionSlot {
        self.open.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!("confab_connections_open").increment(1.0);
        ConnectionSlot {
            owner: self.clone(),
            _per_ip: None,
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One open connection; dropping it frees the slot.
pub struct ConnectionSlot {
    owner: Arc<Connections>,
    _per_ip: Option<InFlightGuard<IpAddr>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.owner.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("confab_connections_open").decrement(1.0);
    }
}

/// `typing` events passed on per user and room: one per `interval` on
/// average, up to [`TYPING_BURST`] at once (a client resends its first one
/// right after a message is sent); the rest are dropped. A typing
/// indicator shows for a few seconds, so nothing is lost, and a flood of
/// them cannot fill other members' outboxes.
pub struct TypingGate(KeyedBuckets<(UserId, RoomId)>);

/// Typing events a user may send into one room back to back.
pub const TYPING_BURST: f64 = 3.0;

impl TypingGate {
    pub fn new(interval: Duration) -> TypingGate {
        TypingGate(KeyedBuckets::new(
            1.0 / interval.as_secs_f64().max(1e-3),
            TYPING_BURST,
        ))
    }

    /// Whether this `typing` of `user` in `room` is passed on.
    pub fn allow(&self, user: UserId, room: RoomId) -> bool {
        self.0.take(&(user, room)).is_ok()
    }
}

/// Capped exponential back-off for an accept loop (the listener, the
/// proxy's, the admin socket). `accept` fails when the
/// process is out of file descriptors (EMFILE, ENFILE) or memory, and then
/// fails again at once for as long as a connection waits in the queue —
/// also after its client gave up, since the connection stays queued until
/// accepted: retrying straight away spun a core (~90%) until descriptors
/// came free. One warning per episode, one line when it is over.
pub struct AcceptBackoff {
    /// What is accepting, for the log lines.
    what: &'static str,
    /// The current pause; None while accepting works.
    delay: Option<Duration>,
    failures: u64,
    since: Option<std::time::Instant>,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            delay: None,
            failures: 0,
            since: None,
        }
    }

    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// What an accept gave: the connection (ending a failure episode), or
    /// None after the pause a failure calls for (usually EMFILE: back off
    /// instead of spinning).
    pub async fn accepted<T>(&mut self, accepted: std::io::Result<T>) -> Option<T> {
        match accepted {
            Ok(x) => {
                self.succeeded();
                Some(x)
            }
            Err(e) => {
                tokio::time::sleep(self.failed(&e)).await;
                None
            }
        }
    }

    /// The pause after a failed accept: 10 ms, doubling up to 1 s.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        let delay = match self.delay {
            None => {
                tracing::warn!(error = %e, "{}: accept failed (out of file descriptors?); retrying every 10 ms to 1 s until it works again", self.what);
                self.since = Some(std::time::Instant::now());
                Self::FIRST
            }
            Some(d) => (d * 2).min(Self::MAX),
        };
        self.delay = Some(delay);
        self.failures += 1;
        delay
    }

    fn succeeded(&mut self) {
        if self.delay.take().is_some() {
            let seconds = self.since.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
            tracing::info!(
                failures = self.failures,
                seconds,
                "{}: accepting again",
                self.what
            );
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_and_forget_idle_keys() {
        let mut b = TokenBucket::new(1000.0, 2.0);
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        let wait = b.take().expect_err("empty");
        assert!(wait <= Duration::from_millis(1), "{wait:?}");
        std::thread::sleep(Duration::from_millis(3));
        assert!(b.take().is_ok());
        let mut slow = TokenBucket::new(10.0, 1.0);
        assert_eq!(slow.take_or_wait(), Duration::ZERO);
        let w = slow.take_or_wait();
        assert!(
            w > Duration::from_millis(50) && w <= Duration::from_millis(100),
            "{w:?}"
        );

        let keyed: KeyedBuckets<u32> = KeyedBuckets::new(1e9, 1.0);
        for k in 0..(SWEEP_AT as u32 + 10) {
            assert!(keyed.take(&k).is_ok());
        }
        assert!(
            keyed.len() < SWEEP_AT,
            "full buckets are swept: {}",
            keyed.len()
        );
    }

    #[test]
    fn window_counters_limit_and_stay_bounded() {
        let w: WindowCounter<u32> = WindowCounter::new(2, Duration::from_secs(60), 100);
        assert!(w.check(&1).is_ok());
        w.add(&1);
        w.add(&1);
        assert!(w.check(&1).is_err());
        assert!(w.check(&2).is_ok());
        w.clear(&1);
        assert!(w.check(&1).is_ok());
        for k in 0..1000 {
            w.add(&k);
        }
        assert!(w.len() <= 100);
    }

    #[test]
    fn in_flight_and_connections_count_per_address() {
        let f = InFlight::new(2);
        let a = f.try_enter(1u8).expect("1st");
        let _b = f.try_enter(1u8).expect("2nd");
        assert!(f.try_enter(1u8).is_none());
        assert!(f.try_enter(2u8).is_some());
        drop(a);
        assert!(f.try_enter(1u8).is_some());

        let c = Connections::new(3, 2);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let s1 = c.try_take(ip("10.0.0.1")).expect("1");
        let _s2 = c.try_take(ip("10.0.0.1")).expect("2");
        assert!(c.try_take(ip("10.0.0.1")).is_none(), "per address");
        let _s3 = c.try_take(ip("10.0.0.2")).expect("3");
        assert!(c.try_take(ip("10.0.0.3")).is_none(), "in all");
        drop(s1);
        assert!(c.try_take(ip("10.0.0.1")).is_some());
        // One IPv6 host is its /64.
        let _v = c.try_take(ip("2001:db8::1"));
        assert_eq!(ip_key(ip("2001:db8::1")), ip_key(ip("2001:db8::ffff:1")));
        assert_eq!(ip_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn typing_passes_a_few_then_once_per_interval() {
        let g = TypingGate::new(Duration::from_millis(50));
        let (u, r) = (UserId(1), RoomId(2));
        for _ in 0..3 {
            assert!(g.allow(u, r));
        }
        assert!(!g.allow(u, r));
        assert!(g.allow(UserId(3), r));
        std::thread::sleep(Duration::from_millis(60));
        assert!(g.allow(u, r));
        assert!(!g.allow(u, r));
    }

    #[test]
    fn accept_back_off_doubles_to_a_second_and_starts_over_after_a_success() {
        let mut b = AcceptBackoff::new("test");
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<u64> = (0..10).map(|_| b.failed(&e).as_millis() as u64).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(&e), Duration::from_millis(10));
    }
}
