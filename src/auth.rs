//! Passwords, tokens and the login rate limit.
//!
//! Password hashing is argon2id, which costs ~20 ms of CPU and 19 MiB of
//! memory per hash: it runs on `hash_concurrency` dedicated threads (never on
//! the async workers) fed by a queue of at most `hash_queue` jobs, so a login
//! storm queues (or gets 503) instead of starving the threads that move
//! messages. Dedicated threads rather than tokio's blocking pool: every new
//! thread that hashes keeps its own malloc arena with the 19 MiB in it, and
//! the blocking pool would spread hashes over many threads.
//!
//! Tokens are HS256 JWTs. The secret comes from the config or is generated on
//! first start into `<data_dir>/jwt_secret` (mode 0600). Logout revokes a
//! token durably (the store's `revoked_tokens` table) and in memory here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hyper::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::AuthConfig;
use crate::error::ApiError;
use crate::ids::UserId;
use crate::limits::{InFlight, WindowCounter, ip_key};

/// Most keys a login or signup counter remembers (about 100 bytes each).
const COUNTER_KEYS: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserId,
    pub jti: String,
    pub exp: i64,
}

pub struct Auth {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    ttl_secs: i64,
    /// Revoked token ids → expiry (unix seconds); entries drop after expiry.
    revoked: Mutex<HashMap<String, i64>>,
    hash_jobs: mpsc::Sender<HashJob>,
    /// Failed logins per (lower-case username, client address):
    /// `login_max_attempts` per `login_window_secs`. Only well-formed
    /// usernames (at most 32 bytes) are ever keys.
    login_failures: WindowCounter<(String, IpAddr)>,
    /// Failed logins per client address, whatever the username
    /// (`login_ip_max_failures`): guessing across many accounts.
    ip_failures: WindowCounter<IpAddr>,
    /// Password hashes queued or running per client address (`hash_per_ip`):
    /// one client cannot fill the hash queue and starve everyone's logins.
    hashing: std::sync::Arc<InFlight<IpAddr>>,
    /// Accounts created per client address per hour.
    signups: WindowCounter<IpAddr>,
    /// A real hash verified against when the username does not exist, so that
    /// unknown users cost the same time as wrong passwords.
    dummy_hash: String,
}

/// The token in an `Authorization` header's value, `Bearer <token>`.
pub fn bearer_token(value: &hyper::header::HeaderValue) -> Result<&str, ApiError> {
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))
}

/// The answer to a request without an `Authorization` header.
pub fn no_bearer_token() -> ApiError {
    ApiError::unauthorized("missing Authorization: Bearer <token>")
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Loads the secret: configured, or `<data_dir>/jwt_secret`, created with
/// 32 random bytes (hex) and mode 0600 on first start.
pub fn load_secret(cfg: &AuthConfig, data_dir: &Path) -> Result<Vec<u8>, String> {
    if let Some(secret) = existing_secret(cfg, data_dir)? {
        return Ok(secret);
    }
    let path = data_dir.join("jwt_secret");
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(secret.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(secret.into_bytes())
}

/// The secret [`load_secret`] would give, without creating one: for tools
/// that run beside (or instead of) the server, e.g. an offline export,
/// which must show transfer ids as the server does but must not leave a
/// new `jwt_secret` behind (perhaps owned by another user).
pub fn existing_secret(cfg: &AuthConfig, data_dir: &Path) -> Result<Option<Vec<u8>>, String> {
    if !cfg.jwt_secret.is_empty() {
        return Ok(Some(cfg.jwt_secret.as_bytes().to_vec()));
    }
    let path = data_dir.join("jwt_secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().as_bytes().to_vec())),
        Ok(_) => Err(format!(
            "{} is empty; delete it to generate a new secret",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl Auth {
    pub fn new(cfg: &AuthConfig, secret: &[u8], revoked: Vec<(String, i64)>) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let dummy_hash = hash_now("confab-dummy-password").unwrap_or_default();
        Auth {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            validation,
            ttl_secs: cfg.token_ttl_secs.min(i64::MAX as u64 / 2) as i64,
            revoked: Mutex::new(revoked.into_iter().collect()),
            hash_jobs: spawn_hash_threads(cfg.hash_concurrency, cfg.hash_queue),
            login_failures: WindowCounter::new(
                cfg.login_max_attempts,
                Duration::from_secs(cfg.login_window_secs),
                COUNTER_KEYS,
            ),
            ip_failures: WindowCounter::new(
                cfg.login_ip_max_failures,
                Duration::from_secs(cfg.login_window_secs),
                COUNTER_KEYS,
            ),
            hashing: InFlight::new(cfg.hash_per_ip),
            signups: WindowCounter::new(
                cfg.signups_per_ip_per_hour,
                Duration::from_secs(3600),
                COUNTER_KEYS,
            ),
            dummy_hash,
        }
    }

    pub fn issue(&self, user: UserId) -> Result<String, ApiError> {
        let now = now_secs();
        let claims = Claims {
            sub: user.to_string(),
            iat: now,
            exp: now.saturating_add(self.ttl_secs),
            jti: hex::encode(rand::random::<[u8; 16]>()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
            .map_err(ApiError::internal)
    }

    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation).map_err(|e| {
                ApiError::unauthorized(match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired; log in again",
                    ErrorKind::InvalidSignature => "the token's signature is not valid",
                    _ => "the token is not valid",
                })
            })?;
        let c = data.claims;
        let user: UserId = c
            .sub
            .parse()
            .map_err(|_| ApiError::unauthorized("the token is not valid"))?;
        let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        if revoked.contains_key(&c.jti) {
            return Err(ApiError::unauthorized("the token was revoked (logged out)"));
        }
        Ok(Caller {
            user,
            jti: c.jti,
            exp: c.exp,
        })
    }

    /// The revoked tokens not yet expired: (token id, expiry).
    pub fn revoked_list(&self) -> Vec<(String, i64)> {
        let now = now_secs();
        let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked
            .iter()
            .filter(|(_, exp)| **exp > now)
            .map(|(j, &e)| (j.clone(), e))
            .collect()
    }

    /// Records a durable revocation in memory (after the store committed it).
    pub fn revoke(&self, jti: String, exp: i64) {
        let now = now_secs();
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked.retain(|_, e| *e > now);
        revoked.insert(jti, exp);
    }

    /// Adds revocations another node of the cluster recorded (read back from
    /// the shared store); returns how many were new here.
    pub fn absorb(&self, list: Vec<(String, i64)>) -> usize {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = 0;
        for (jti, exp) in list {
            new += usize::from(revoked.insert(jti, exp).is_none());
        }
        new
    }

    /// Whether a login for `username` (well-formed) from `ip` may be tried:
    /// 429 while that pair, or that address, has used up its failures.
    pub fn check_login(&self, username: &str, ip: IpAddr) -> Result<(), ApiError> {
        let ip = ip_key(ip);
        self.ip_failures
            .check(&ip)
            .and_then(|()| self.login_failures.check(&(username.to_lowercase(), ip)))
            .map_err(|wait| {
                rate_limited(
                    "too many failed logins; try again later",
                    wait.as_secs().max(1),
                )
            })
    }

    /// Whether another login may be tried from `ip` at all (before a
    /// malformed username is refused).
    pub fn check_login_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.ip_failures.check(&ip_key(ip)).map_err(|wait| {
            rate_limited(
                "too many failed logins; try again later",
                wait.as_secs().max(1),
            )
        })
    }

    /// Counts a failed login (wrong password or unknown user). `username`
    /// None: a malformed one, which is counted for the address only.
    pub fn login_failed(&self, username: Option<&str>, ip: IpAddr) {
        let ip = ip_key(ip);
        self.ip_failures.add(&ip);
        if let Some(name) = username {
            self.login_failures.add(&(name.to_lowercase(), ip));
        }
    }

    /// A successful login forgets that pair's failures.
    pub fn login_succeeded(&self, username: &str, ip: IpAddr) {
        self.login_failures
            .clear(&(username.to_lowercase(), ip_key(ip)));
    }

    /// Whether `ip` may create another account (`signups_per_ip_per_hour`).
    pub fn check_signup(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.signups.check(&ip_key(ip)).map_err(|wait| {
            rate_limited(
                "too many accounts created from your address; try again later",
                wait.as_secs().max(1),
            )
        })
    }

    /// Counts an account created from `ip`.
    pub fn signed_up(&self, ip: IpAddr) {
        self.signups.add(&ip_key(ip));
    }

    /// Runs a hashing job on the hash threads for a client at `ip`: at most
    /// `hash_per_ip` of one address at once (429 beyond), and at most
    /// `hash_queue` waiting in all (503 beyond). Neither refusal is a failed
    /// login: it says nothing about the password.
    async fn bounded<T: Send + 'static>(
        &self,
        ip: IpAddr,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let Some(_admitted) = self.hashing.try_enter(ip_key(ip)) else {
            return Err(rate_limited(
                "too many sign-ins from your address at once; try again in a moment",
                1,
            ));
        };
        let (tx, rx) = oneshot::channel();
        let job: HashJob = Box::new(move || {
            let _ = tx.send(job());
        });
        self.hash_jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ApiError::busy("too many logins at once; try again in a moment")
            }
            mpsc::error::TrySendError::Closed(_) => ApiError::internal("hash threads are gone"),
        })?;
        rx.await
            .map_err(|_| ApiError::internal("a hash job was dropped"))
    }

    pub async fn hash_password(&self, ip: IpAddr, password: String) -> Result<String, ApiError> {
        self.bounded(ip, move || hash_now(&password)).await?
    }

    /// Checks a password; `hash` None (unknown user) still costs one verify.
    pub async fn verify_password(
        &self,
        ip: IpAddr,
        hash: Option<String>,
        password: String,
    ) -> Result<bool, ApiError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let ok = self
            .bounded(ip, move || {
                PasswordHash::new(&hash)
                    .map(|parsed| {
                        Argon2::default()
                            .verify_password(password.as_bytes(), &parsed)
                            .is_ok()
                    })
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && ok)
    }
}

fn rate_limited(message: &str, retry_after_secs: u64) -> ApiError {
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
    e.retry_after = Some(retry_after_secs);
    e
}

/// The password rules (docs/PROTOCOL.md): 8 to 256 bytes with at least 8
/// characters, no control characters, not only spaces, at least 4
/// different characters, not the username, and not one of the passwords
/// every guessing list starts with.
pub fn check_password(username: &str, password: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::bad_request(
            "invalid_password",
            format!("passwords are 8–256 bytes: {why}"),
        ))
    };
    if password.len() > 256 {
        return bad("this one is too long");
    }
    if password.chars().count() < 8 {
        return bad("at least 8 characters");
    }
    if password.chars().any(char::is_control) {
        return bad("no control characters");
    }
    if password.trim().is_empty() {
        return bad("not only spaces");
    }
    let mut distinct: Vec<char> = password.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 4 {
        return bad("at least 4 different characters");
    }
    let lower = password.to_lowercase();
    if lower == username.to_lowercase() {
        return bad("not your username");
    }
    if COMMON_PASSWORDS.contains(&lower.as_str()) {
        return bad("this one is among the first any attacker tries");
    }
    Ok(())
}

/// The passwords at the top of every published list of leaked passwords
/// (8 characters and more, lower-case).
const COMMON_PASSWORDS: &[&str] = &[
    "password",
    "password1",
    "password123",
    "12345678",
    "123456789",
    "1234567890",
    "qwertyuiop",
    "qwerty123",
    "iloveyou",
    "11111111",
    "sunshine",
    "princess",
    "football",
    "baseball",
    "welcome1",
    "abcd1234",
    "1q2w3e4r",
    "1qaz2wsx",
    "qwer1234",
    "asdfghjkl",
    "zaq12wsx",
    "passw0rd",
    "p@ssw0rd",
    "letmein1",
    "trustno1",
    "starwars",
    "dragon12",
    "monkey12",
    "superman",
    "whatever",
    "87654321",
    "00000000",
    "12341234",
    "q1w2e3r4",
    "changeme",
    "admin123",
];

type HashJob = Box<dyn FnOnce() + Send>;

/// Starts the hashing threads; they end when the sender is dropped.
fn spawn_hash_threads(threads: usize, queue: usize) -> mpsc::Sender<HashJob> {
    let (tx, rx) = mpsc::channel::<HashJob>(queue.max(1));
    let rx = std::sync::Arc::new(Mutex::new(rx));
    for i in 0..threads.max(1) {
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("confab-hash-{i}"))
            .spawn(move || {
                loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                    match job {
                        Some(job) => job(),
                        None => return,
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a password-hashing thread");
        }
    }
    tx
}

fn hash_now(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(ApiError::internal)?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(ApiError::internal)
}
