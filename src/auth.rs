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
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hyper::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::AuthConfig;
use crate::error::ApiError;
use crate::ids::UserId;

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
    /// (lower-case username, client IP) → (window start, attempts in window)
    login_attempts: Mutex<HashMap<(String, IpAddr), (Instant, u32)>>,
    login_max_attempts: u32,
    login_window: Duration,
    /// A real hash verified against when the username does not exist, so that
    /// unknown users cost the same time as wrong passwords.
    dummy_hash: String,
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
            login_attempts: Mutex::new(HashMap::new()),
            login_max_attempts: cfg.login_max_attempts,
            login_window: Duration::from_secs(cfg.login_window_secs),
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

    /// Counts a login attempt for (username, ip); Err(429) past the limit.
    pub fn login_attempt(&self, username: &str, ip: IpAddr) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut map = self
            .login_attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            let window = self.login_window;
            map.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = map.entry((username.to_lowercase(), ip)).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.login_window {
            *entry = (now, 0);
        }
        if entry.1 >= self.login_max_attempts {
            let retry = self
                .login_window
                .saturating_sub(now.duration_since(entry.0));
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many login attempts; try again later",
            );
            e.retry_after = Some(retry.as_secs().max(1));
            return Err(e);
        }
        entry.1 += 1;
        Ok(())
    }

    /// Runs a hashing job on the blocking pool, bounded (see module docs).
    async fn bounded<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
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

    pub async fn hash_password(&self, password: String) -> Result<String, ApiError> {
        self.bounded(move || hash_now(&password)).await?
    }

    /// Checks a password; `hash` None (unknown user) still costs one verify.
    pub async fn verify_password(
        &self,
        hash: Option<String>,
        password: String,
    ) -> Result<bool, ApiError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let ok = self
            .bounded(move || {
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
