//! Configuration: the single source of truth for every option.
//!
//! The shipped `config.toml` is compiled into the binary and is the full set
//! of defaults (every option, with its comment). A config file given with
//! `--config` (or `CONFAB_CONFIG`, or `./config.toml` when present) overrides
//! it, environment variables `CONFAB_<OPTION>` override the file, and
//! command-line flags override everything. Option names are unique across the
//! TOML sections, so each has exactly one environment variable and one
//! `--set` spelling. Nothing else in confab reads the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

/// The embedded defaults: the repository's own `config.toml`.
pub const DEFAULTS: &str = include_str!("../config.toml");

/// `CONFAB_*` environment variables that are not settings, and who reads
/// them. Every other `CONFAB_*` name is a setting (`CONFAB_<OPTION>`), or a
/// typo of one, which is warned about at start-up.
pub const NOT_SETTINGS: &[(&str, &str)] = &[
    ("CONFAB_CONFIG", "the config file, the same as `--config`"),
    (
        "CONFAB_GIT_HASH",
        "build time: the commit `confab --version` names (`cargo run` also \
         hands it to the program it runs)",
    ),
    ("CONFAB_CHROMIUM", "the test suite: the Chromium to drive"),
    ("CONFAB_TEST_LOG", "the test suite: echo the servers' logs"),
    (
        "CONFAB_TEST_STORAGE",
        "the test suite: `postgres` runs the servers on PostgreSQL",
    ),
    ("CONFAB_BIN", "benches: the confab binary to start"),
    (
        "CONFAB_STARTUP_",
        "benches/startup.rs: its store size and directory",
    ),
    (
        "CONFAB_STORAGE_BENCH_",
        "benches/storage.rs: its engines and sizes",
    ),
];

/// Whether `name` is one of [`NOT_SETTINGS`] (a name ending in `_` there
/// stands for every name it begins).
fn not_a_setting(name: &str) -> bool {
    NOT_SETTINGS.iter().any(|(n, _)| {
        if n.ends_with('_') {
            name.starts_with(n)
        } else {
            name == *n
        }
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub search: SearchConfig,
    pub wallet: WalletConfig,
    pub backup: BackupConfig,
    pub cluster: ClusterConfig,
    /// Things worth telling the operator (e.g. an unknown `CONFAB_*`
    /// variable, which may be a typo); logged at start-up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// The admin socket's name in `data_dir` (the server listens on it, see
/// `admin`; a restore refuses a directory where a server answers on it).
pub const ADMIN_SOCKET: &str = "admin.sock";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_body_bytes: usize,
    pub request_body_timeout_secs: u64,
    pub allowed_origins: Vec<String>,
    pub shutdown_grace_secs: u64,
    pub log: String,
    pub log_format: String,
    pub status_allowed_ips: Vec<String>,
    pub status_token: String,
    pub metrics_allowed_ips: Vec<String>,
    pub metrics_token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub jwt_secret: String,
    pub token_ttl_secs: u64,
    pub login_max_attempts: u32,
    pub login_window_secs: u64,
    pub login_ip_max_failures: u32,
    pub hash_per_ip: u32,
    pub signups_per_ip_per_hour: u32,
    pub hash_concurrency: usize,
    pub hash_queue: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_text_chars: usize,
    pub max_frame_bytes: usize,
    pub send_rate_per_sec: u32,
    pub send_burst: u32,
    pub user_send_rate_per_sec: u32,
    pub user_send_burst: u32,
    pub frame_rate_per_sec: u32,
    pub frame_burst: u32,
    pub typing_interval_ms: u64,
    pub max_sessions_per_user: usize,
    pub outbox_frames: usize,
    pub auth_timeout_secs: u64,
    pub max_group_members: usize,
    pub export_concurrency: usize,
    pub export_stall_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub commit_batch_max: usize,
    pub commit_wait_us: u64,
    pub writer_queue: usize,
    pub quick_repair: bool,
    pub cache_mb: usize,
    pub storage_reserve_mb: usize,
    /// Seconds between two background scrub passes (0 = off).
    pub store_scrub_secs: u64,
    /// A PostgreSQL connection string: store everything there instead of
    /// in the embedded store ("" = embedded, the default).
    pub database_url: String,
    /// Connections for reads when `database_url` is set.
    pub database_pool: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    pub search_enabled: bool,
    pub index_commit_ms: u64,
    /// Seconds between checksum scrubs of the index files (0: none; they
    /// are checked on every start all the same).
    pub index_scrub_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalletConfig {
    pub wallet_currency: String,
    pub signup_bonus: u64,
    pub scheduler_clock_offset_ms: i64,
    /// Pending scheduled (and recurring) transfers per sender.
    pub max_scheduled_transfers: usize,
}

/// The largest `max_scheduled_transfers`: the writer counts a sender's
/// pending transfers (up to the limit) each time they schedule one.
pub const MAX_SCHEDULED_TRANSFERS_LIMIT: usize = 10_000;

/// Largest amount in one transfer or balance: 10^15 minor units (< 2^53).
/// The wallet's rule (`wallet::MAX_AMOUNT`), here because `signup_bonus`
/// is checked against it.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    pub backup_dir: String,
    pub backup_interval_secs: u64,
    pub backup_keep: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster_secret: String,
    pub cluster_nodes: Vec<String>,
    pub node: String,
    pub proxy_threads: usize,
}

/// One node of `cluster_nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub addr: SocketAddr,
}

/// The node list of `[cluster]`, checked.
#[derive(Debug, Clone)]
pub struct ClusterNodes {
    pub nodes: Vec<ClusterNode>,
    /// This process's node id (`--node`); None for a proxy.
    pub me: Option<String>,
}

/// The shortest `cluster_secret` accepted when there are several nodes.
pub const MIN_CLUSTER_SECRET: usize = 32;

impl ClusterConfig {
    /// Parses and checks the node list, this process's node and the
    /// secret. `Ok(None)` without `cluster_nodes` (a single node, as
    /// always). The cluster (`cluster::Cluster`) is built from it.
    pub fn checked(&self) -> Result<Option<ClusterNodes>, String> {
        if self.cluster_nodes.is_empty() {
            if !self.node.is_empty() {
                return Err(format!(
                    "`--node {}` needs a node list (`cluster_nodes` in [cluster])",
                    self.node
                ));
            }
            return Ok(None);
        }
        let mut nodes: Vec<ClusterNode> = Vec::new();
        for entry in &self.cluster_nodes {
            let (id, addr) = entry.split_once('=').ok_or_else(|| {
                format!("`cluster_nodes` entries are id=host:port, got `{entry}`")
            })?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 32
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "node id `{id}` must be 1-32 characters of a-z, 0-9, - and _"
                ));
            }
            let addr: SocketAddr = addr.trim().parse().map_err(|_| {
                format!(
                    "node {id}: `{}` is not an address like 10.0.0.1:8081",
                    addr.trim()
                )
            })?;
            if nodes.iter().any(|n| n.id == id) {
                return Err(format!("node id `{id}` is listed twice"));
            }
            if nodes.iter().any(|n| n.addr == addr) {
                return Err(format!("address {addr} is listed twice"));
            }
            nodes.push(ClusterNode {
                id: id.to_string(),
                addr,
            });
        }
        let me = if self.node.is_empty() {
            None
        } else if nodes.iter().any(|n| n.id == self.node) {
            Some(self.node.clone())
        } else {
            return Err(format!(
                "`--node {}` is not in `cluster_nodes` ({})",
                self.node,
                nodes
                    .iter()
                    .map(|n| n.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if nodes.len() > 1 && self.cluster_secret.len() < MIN_CLUSTER_SECRET {
            return Err(format!(
                "`cluster_secret` must be at least {MIN_CLUSTER_SECRET} characters (it signs every token of the cluster)"
            ));
        }
        Ok(Some(ClusterNodes { nodes, me }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0} is not valid TOML: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("unknown config option `{0}`")]
    Unknown(String),
    #[error("option `{option}`: cannot use `{value}`: {reason}")]
    BadValue {
        option: String,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where each layer of overrides comes from; `main` fills it from clap.
#[derive(Debug, Default)]
pub struct Overrides {
    /// An explicit config file (`--config` / `CONFAB_CONFIG`).
    pub file: Option<PathBuf>,
    /// Environment variables (name, value); only `CONFAB_*` ones are looked at.
    pub env: Vec<(String, String)>,
    /// Command-line settings as (option, value), applied last.
    pub cli: Vec<(String, String)>,
}

impl Config {
    /// Builds the configuration: defaults < file < environment < command line.
    pub fn load(ov: &Overrides) -> Result<Config, ConfigError> {
        let mut table: Table = DEFAULTS
            .parse()
            .map_err(|e| ConfigError::Parse(PathBuf::from("<embedded config.toml>"), e))?;
        // option name -> section, from the defaults themselves.
        let mut sections: BTreeMap<String, String> = BTreeMap::new();
        for (section, v) in &table {
            if let Value::Table(t) = v {
                for key in t.keys() {
                    sections.insert(key.clone(), section.clone());
                }
            }
        }

        let file = ov.file.clone().or_else(|| {
            let local = Path::new("config.toml");
            local.exists().then(|| local.to_path_buf())
        });
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(&path).map_err(|e| ConfigError::Read(path.clone(), e))?;
            let user: Table = text
                .parse()
                .map_err(|e| ConfigError::Parse(path.clone(), e))?;
            for (section, v) in user {
                let Value::Table(t) = v else {
                    return Err(ConfigError::Unknown(section));
                };
                for (key, value) in t {
                    if sections.get(&key) != Some(&section) {
                        return Err(ConfigError::Unknown(format!("{section}.{key}")));
                    }
                    set(&mut table, &section, &key, value)?;
                }
            }
        }

        let mut warnings = Vec::new();
        for (name, raw) in &ov.env {
            let Some(key) = name.strip_prefix("CONFAB_") else {
                continue;
            };
            if not_a_setting(name) {
                continue;
            }
            let key = key.to_ascii_lowercase();
            let Some(section) = sections.get(&key) else {
                warnings.push(format!("ignoring {name}: no such config option"));
                continue;
            };
            let value = parse_like(&table, section, &key, raw)?;
            set(&mut table, section, &key, value)?;
        }
        for (key, raw) in &ov.cli {
            let Some(section) = sections.get(key) else {
                return Err(ConfigError::Unknown(key.clone()));
            };
            let value = parse_like(&table, section, key, raw)?;
            set(&mut table, section, key, value)?;
        }

        let mut config: Config = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        config.warnings = warnings;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_connections", self.server.max_connections as u64),
            ("max_body_bytes", self.server.max_body_bytes as u64),
            (
                "max_connections_per_ip",
                self.server.max_connections_per_ip as u64,
            ),
            (
                "request_body_timeout_secs",
                self.server.request_body_timeout_secs,
            ),
            (
                "login_ip_max_failures",
                u64::from(self.auth.login_ip_max_failures),
            ),
            ("hash_per_ip", u64::from(self.auth.hash_per_ip)),
            (
                "signups_per_ip_per_hour",
                u64::from(self.auth.signups_per_ip_per_hour),
            ),
            (
                "user_send_rate_per_sec",
                u64::from(self.limits.user_send_rate_per_sec),
            ),
            ("user_send_burst", u64::from(self.limits.user_send_burst)),
            (
                "frame_rate_per_sec",
                u64::from(self.limits.frame_rate_per_sec),
            ),
            ("frame_burst", u64::from(self.limits.frame_burst)),
            (
                "max_sessions_per_user",
                self.limits.max_sessions_per_user as u64,
            ),
            ("token_ttl_secs", self.auth.token_ttl_secs),
            (
                "login_max_attempts",
                u64::from(self.auth.login_max_attempts),
            ),
            ("login_window_secs", self.auth.login_window_secs),
            ("hash_concurrency", self.auth.hash_concurrency as u64),
            ("max_text_chars", self.limits.max_text_chars as u64),
            ("max_frame_bytes", self.limits.max_frame_bytes as u64),
            (
                "send_rate_per_sec",
                u64::from(self.limits.send_rate_per_sec),
            ),
            ("send_burst", u64::from(self.limits.send_burst)),
            ("outbox_frames", self.limits.outbox_frames as u64),
            ("auth_timeout_secs", self.limits.auth_timeout_secs),
            ("max_group_members", self.limits.max_group_members as u64),
            ("export_concurrency", self.limits.export_concurrency as u64),
            ("export_stall_secs", self.limits.export_stall_secs),
            ("commit_batch_max", self.store.commit_batch_max as u64),
            ("writer_queue", self.store.writer_queue as u64),
            ("database_pool", self.store.database_pool as u64),
            ("index_commit_ms", self.search.index_commit_ms),
            ("backup_interval_secs", self.backup.backup_interval_secs),
            ("backup_keep", self.backup.backup_keep as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("`{name}` must be at least 1")));
            }
        }
        if !["text", "json"].contains(&self.server.log_format.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "`log_format` must be \"text\" or \"json\", got `{}`",
                self.server.log_format
            )));
        }
        for (name, list) in [
            ("status_allowed_ips", &self.server.status_allowed_ips),
            ("metrics_allowed_ips", &self.server.metrics_allowed_ips),
        ] {
            for c in list {
                let ip = c.split('/').next().unwrap_or("");
                if ip.trim().parse::<std::net::IpAddr>().is_err() {
                    return Err(ConfigError::Invalid(format!(
                        "`{name}` entries are addresses or CIDR ranges, got `{c}`"
                    )));
                }
            }
        }
        self.cluster.checked().map_err(ConfigError::Invalid)?;
        let c = &self.wallet.wallet_currency;
        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::Invalid(format!(
                "`wallet_currency` must be an ISO 4217 code such as KRW, got `{c}`"
            )));
        }
        if !(1..=MAX_SCHEDULED_TRANSFERS_LIMIT).contains(&self.wallet.max_scheduled_transfers) {
            return Err(ConfigError::Invalid(format!(
                "`max_scheduled_transfers` must be 1 to {MAX_SCHEDULED_TRANSFERS_LIMIT}, got {}",
                self.wallet.max_scheduled_transfers
            )));
        }
        if self.wallet.signup_bonus > MAX_AMOUNT {
            return Err(ConfigError::Invalid(
                "`signup_bonus` is over the balance limit".into(),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The token secret as configured for this process: on a cluster node
    /// the cluster's (every node and proxy accepts every token, and transfer
    /// ids look the same on every node), else `jwt_secret`. Empty: the data
    /// directory's `jwt_secret` file (see `auth::load_secret`).
    pub fn token_secret(&self) -> &str {
        if !self.cluster.cluster_nodes.is_empty() && !self.cluster.cluster_secret.is_empty() {
            &self.cluster.cluster_secret
        } else {
            &self.auth.jwt_secret
        }
    }
}

fn set(table: &mut Table, section: &str, key: &str, value: Value) -> Result<(), ConfigError> {
    let Some(Value::Table(t)) = table.get_mut(section) else {
        return Err(ConfigError::Unknown(format!("{section}.{key}")));
    };
    t.insert(key.to_string(), value);
    Ok(())
}

/// Parses a string from the environment or command line as a value of the
/// same TOML type as the option's default.
fn parse_like(table: &Table, section: &str, key: &str, raw: &str) -> Result<Value, ConfigError> {
    let bad = |reason: &str| ConfigError::BadValue {
        option: key.to_string(),
        value: raw.to_string(),
        reason: reason.to_string(),
    };
    let default = table
        .get(section)
        .and_then(|s| s.get(key))
        .ok_or_else(|| ConfigError::Unknown(key.to_string()))?;
    Ok(match default {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse::<i64>()
                .map_err(|_| bad("expected a whole number"))?,
        ),
        Value::Boolean(_) => Value::Boolean(
            raw.trim()
                .parse::<bool>()
                .map_err(|_| bad("expected true or false"))?,
        ),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => {
            let doc: Table = format!("v = {raw}")
                .parse()
                .map_err(|_| bad("not a TOML value"))?;
            doc.get("v")
                .cloned()
                .ok_or_else(|| bad("not a TOML value"))?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load() {
        let c = Config::load(&Overrides::default()).expect("defaults load");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn cli_beats_env_beats_defaults() {
        let ov = Overrides {
            file: None,
            env: vec![
                ("CONFAB_LISTEN".into(), "127.0.0.1:9000".into()),
                ("CONFAB_DATA_DIR".into(), "/tmp/x".into()),
                ("PATH".into(), "/bin".into()),
                ("CONFAB_LISTN".into(), "typo".into()),
                ("CONFAB_GIT_HASH".into(), "0123456789ab".into()),
                ("CONFAB_CONFIG".into(), "".into()),
                ("CONFAB_STARTUP_MESSAGES".into(), "1000".into()),
            ],
            cli: vec![("listen".into(), "127.0.0.1:9001".into())],
        };
        let c = Config::load(&ov).expect("load");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(c.server.data_dir, PathBuf::from("/tmp/x"));
        // Only the typo is warned about: build-time and tool variables are
        // not settings.
        assert_eq!(
            c.warnings,
            vec!["ignoring CONFAB_LISTN: no such config option".to_string()]
        );
    }

    #[test]
    fn unknown_and_bad_values_are_errors() {
        let ov = Overrides {
            cli: vec![("no_such_option".into(), "1".into())],
            ..Default::default()
        };
        assert!(matches!(Config::load(&ov), Err(ConfigError::Unknown(_))));
        let ov = Overrides {
            cli: vec![("send_burst".into(), "many".into())],
            ..Default::default()
        };
        assert!(matches!(
            Config::load(&ov),
            Err(ConfigError::BadValue { .. })
        ));
        let ov = Overrides {
            cli: vec![("send_burst".into(), "0".into())],
            ..Default::default()
        };
        assert!(matches!(Config::load(&ov), Err(ConfigError::Invalid(_))));
        for bad in ["0", "10001"] {
            let ov = Overrides {
                cli: vec![("max_scheduled_transfers".into(), bad.into())],
                ..Default::default()
            };
            assert!(matches!(Config::load(&ov), Err(ConfigError::Invalid(_))));
        }
    }

    #[test]
    fn max_scheduled_transfers_defaults_to_50() {
        let c = Config::load(&Overrides::default()).expect("defaults load");
        assert_eq!(c.wallet.max_scheduled_transfers, 50);
    }
}
