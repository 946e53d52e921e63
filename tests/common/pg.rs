//! A real PostgreSQL server for the integration tests: one per test binary,
//! started at first use, with a fresh empty database per test.
//!
//! ```ignore
//! let url = pg::server().fresh_database("rooms");   // "host=127.0.0.1 port=… dbname=rooms_…"
//! let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
//! pg::server().psql("postgres", "select 1");         // stdout of psql
//! ```
//!
//! The API:
//!
//! - [`server()`]: the one server of this test binary, started at first use
//!   (`initdb` + start take about 1 s on an idle 2-core machine, 2–5 s on
//!   a busy one, so every test of a binary shares it);
//!   not durable (`fsync=off`): these tests are not about PostgreSQL's own
//!   durability.
//! - [`PgServer::fresh_database`]: a new empty database, owned by the
//!   superuser `postgres`, and its libpq-style connection string (what
//!   `tokio_postgres::connect` takes). Tests never share a database.
//! - [`PgServer::admin_url`]: the connection string of the maintenance
//!   database `postgres`.
//! - [`PgServer::psql`]: runs SQL through `psql` and returns its stdout.
//! - [`start`] with [`PgOptions`]: a server of the caller's own (for example
//!   a durable one, `fsync: true`), stopped and deleted when dropped.
//! - [`start_pair`]: a primary with a synchronous streaming standby
//!   (`pg_basebackup`, about 2–4 s), for failover tests: crash the primary
//!   with [`PgServer::crash`], promote the standby with
//!   [`PgServer::promote`].
//!
//! Each server lives in a fresh data directory under the temp dir
//! (`confab-pg-<pid>`, `confab-pg-<pid>-<n>` for [`start`]ed ones), listens
//! on TCP 127.0.0.1 only (no unix socket: socket paths over 107 bytes fail)
//! on a free port, and logs to `server.log` in its data directory; a server
//! that does not come up panics with that log's tail. Authentication is
//! `trust`, the superuser is `postgres`.
//!
//! No server outlives its test binary: the shared one is stopped by an
//! `atexit` handler (the test harness ends through `exit`), and every
//! PostgreSQL process is spawned from one thread that lives as long as the
//! process, with `PR_SET_PDEATHSIG` = `SIGKILL`, so a test binary that is
//! killed takes its servers with it (the death signal fires when the
//! *spawning thread* ends, so never spawn from a test thread). A killed run
//! leaves its data directory behind; the next first use removes the
//! `confab-pg-<pid>` directories of processes that no longer run.
//!
//! `initdb` and `postgres` refuse to run as root: as root they run as the
//! `postgres` user (created by Debian's `postgresql` package), otherwise as
//! the current user. The binaries come from `$CONFAB_PG_BIN` (a `bin`
//! directory), else the newest `/usr/lib/postgresql/*/bin` (Debian), else
//! `pg_config --bindir`, else `PATH`.
//!
//! This file is standalone (only `std` and `libc`): a test binary may
//! include it alone with `#[path = "common/pg.rs"] mod pg;`.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to accept connections before the start fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an immediate shutdown (SIGQUIT) may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Ports are picked free, then bound by postgres a moment later: another
/// process may take one in between, so a start tries this many ports.
const PORT_ATTEMPTS: usize = 5;
/// Prefix of every data directory under the temp dir (the pid follows, so
/// stale ones can be recognised).
const DIR_PREFIX: &str = "confab-pg-";
/// Lines of `server.log` shown when a server fails.
const LOG_TAIL_LINES: usize = 40;
const NOT_INSTALLED: &str = "PostgreSQL is not installed: run tests/run (it installs Debian's \
     postgresql) or `apt-get install postgresql`";

/// The shared server, or why it could not start (kept, so every later test
/// fails at once with the same reason instead of retrying a 30 s start).
static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();

/// The one PostgreSQL server of this test binary, started at first use
/// (not durable: `fsync=off`). Stopped and deleted when the process exits.
/// Panics, in every test that calls it, if PostgreSQL is missing or did not
/// start.
#[track_caller]
pub fn server() -> &'static PgServer {
    let shared = SHARED.get_or_init(|| {
        let started = try_start(
            &PgOptions::default(),
            format!("{DIR_PREFIX}{}", std::process::id()),
        );
        if started.is_ok() {
            // SAFETY: registers a plain `extern "C" fn`; the test harness
            // ends through `exit`, which runs it.
            unsafe { libc::atexit(stop_shared_at_exit) };
        }
        started
    });
    match shared {
        Ok(server) => server,
        Err(why) => panic!("{why}"),
    }
}

extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(server)) = SHARED.get() {
        // A panic must not unwind out of an `extern "C" fn` (that aborts).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.stop()));
    }
}

/// How a [`start`]ed server runs.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// `true`: PostgreSQL's defaults (`fsync`, `synchronous_commit` and
    /// `full_page_writes` on), for tests about durability across a crash.
    /// `false`: all three off, much faster.
    pub fsync: bool,
    /// Streams its WAL to standbys (`wal_level=replica`), and commits wait
    /// for a synchronous standby once `synchronous_standby_names` is set.
    pub replication: bool,
    /// A standby of the primary on this port: its data directory is a
    /// `pg_basebackup` of that server, named `standby1` to it.
    pub standby_of: Option<u16>,
}

/// A primary and its synchronous standby (commits return only when the
/// standby has them).
pub struct PgPair {
    pub primary: PgServer,
    pub standby: PgServer,
}

/// A primary with one synchronous streaming standby, both durable as
/// PostgreSQL's defaults are. Panics if either cannot start.
#[track_caller]
pub fn start_pair() -> PgPair {
    let primary = start(&PgOptions {
        fsync: false,
        replication: true,
        standby_of: None,
    });
    let standby = start(&PgOptions {
        fsync: false,
        replication: true,
        standby_of: Some(primary.port),
    });
    // Set after the base backup, on the primary only: a standby that
    // inherited it would, once promoted, wait for a standby of its own.
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = 'standby1'; SELECT pg_reload_conf();",
    );
    let deadline = Instant::now() + START_TIMEOUT;
    while primary
        .psql(
            "postgres",
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'",
        )
        .trim()
        != "sync"
    {
        assert!(
            Instant::now() < deadline,
            "the standby never became synchronous"
        );
        thread::sleep(Duration::from_millis(20));
    }
    PgPair { primary, standby }
}

/// A server of the caller's own (the shared one is [`server()`]); stopped
/// and its data directory deleted when dropped. Panics if it cannot start.
#[track_caller]
pub fn start(opts: &PgOptions) -> PgServer {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    let name = format!("{DIR_PREFIX}{}-{n}", std::process::id());
    match try_start(opts, name) {
        Ok(server) => server,
        Err(why) => panic!("{why}"),
    }
}

/// A running PostgreSQL server (see the module doc).
pub struct PgServer {
    port: u16,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    /// The postmaster; `None` once stopped. A mutex because the shared
    /// server is stopped through `&self` (by the atexit handler).
    postmaster: Mutex<Option<Child>>,
    /// Numbers the databases of `fresh_database`.
    databases: AtomicU64,
}

impl PgServer {
    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new empty database (unique name from `hint` + a counter + pid),
    /// owned by the superuser `postgres`; returns its libpq-style
    /// connection string usable by tokio-postgres, e.g.
    /// `"host=127.0.0.1 port=NNNN user=postgres dbname=hint_3_1234 connect_timeout=5"`.
    /// Takes ~0.1 s (a `psql` run and a `CREATE DATABASE`).
    #[track_caller]
    pub fn fresh_database(&self, hint: &str) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = database_name(hint, n);
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The connection string of the maintenance database `postgres`.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// Runs `sql` with `psql -X -A -t -q -v ON_ERROR_STOP=1` against
    /// `dbname` (statement by statement, as a script) and returns its stdout:
    /// the result rows only, unaligned, columns separated by `|`, one row
    /// per line. Panics with psql's stderr if any statement fails.
    #[track_caller]
    pub fn psql(&self, dbname: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let psql = self.bin_dir.join("psql");
        let mut child = Command::new(&psql)
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &port, "-U", "postgres", "-d", dbname, "-f", "-"])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", psql.display()));
        let mut stdin = child.stdin.take().expect("psql's stdin is piped");
        let script = sql.to_owned();
        // Written from another thread: psql may fill its stdout pipe before
        // it has read the whole script.
        let writer = thread::spawn(move || stdin.write_all(script.as_bytes()));
        let output = child.wait_with_output().expect("waiting for psql");
        let written = writer.join().expect("psql's stdin writer panicked");
        if !output.status.success() {
            panic!(
                "psql on database {dbname:?} (port {}) failed ({}):\n{}\nSQL:\n{sql}",
                self.port,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
        written.unwrap_or_else(|e| panic!("writing the SQL to psql: {e}"));
        String::from_utf8(output.stdout).expect("psql printed UTF-8")
    }

    /// The server dies at once (SIGKILL of the postmaster; its backends
    /// follow): what a crashed machine looks like to its clients. The data
    /// directory stays until the server is dropped.
    pub fn crash(&self) {
        if let Some(mut postmaster) = self.take_postmaster() {
            let _ = postmaster.kill();
            let _ = postmaster.wait();
        }
    }

    /// The postmaster, no longer ours to stop (None once taken).
    fn take_postmaster(&self) -> Option<Child> {
        self.postmaster
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    #[track_caller]
    pub fn promote(&self) {
        self.psql("postgres", "SELECT pg_promote(true, 30)");
    }

    fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=5",
            self.port
        )
    }

    /// Immediate shutdown (SIGQUIT; SIGKILL if that takes over 5 s), then
    /// deletes the data directory. Idempotent.
    fn stop(&self) {
        if let Some(mut postmaster) = self.take_postmaster() {
            stop_process(&mut postmaster);
        }
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn try_start(opts: &PgOptions, dir_name: String) -> Result<PgServer, String> {
    let began = Instant::now();
    let bin_dir = find_bin_dir()?;
    let owner = server_user()?;
    let tmp = std::env::temp_dir();
    remove_stale_dirs(&tmp);
    let data_dir = tmp.join(dir_name);
    make_data_dir(&data_dir, owner)?;
    // Not started yet; if the start fails, dropping it deletes the data dir.
    let mut server = PgServer {
        port: 0,
        data_dir: data_dir.clone(),
        bin_dir: bin_dir.clone(),
        postmaster: Mutex::new(None),
        databases: AtomicU64::new(0),
    };

    let (program, init) = match opts.standby_of {
        None => {
            let mut initdb = Command::new(bin_dir.join("initdb"));
            initdb.arg("-D").arg(&data_dir).args([
                "-N",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ]);
            ("initdb", initdb)
        }
        Some(port) => {
            let mut backup = Command::new(bin_dir.join("pg_basebackup"));
            backup
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .arg("-D")
                .arg(&data_dir)
                .args(["-X", "stream", "-c", "fast", "-R"]);
            ("pg_basebackup", backup)
        }
    };
    let mut init = init;
    init.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = spawn_tied(init, owner)
        .and_then(Child::wait_with_output)
        .map_err(|e| format!("cannot run {}: {e}", bin_dir.join(program).display()))?;
    if !output.status.success() {
        return Err(format!(
            "{program} -D {} failed ({}):\n{}{}",
            data_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }

    let log_path = data_dir.join("server.log");
    for attempt in 1..=PORT_ATTEMPTS {
        let port = free_port()?;
        // Truncated per attempt: a failed attempt's "Address already in
        // use" must not be read as the next attempt's.
        let log = File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let mut postgres = Command::new(bin_dir.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data_dir)
            .arg("-p")
            .arg(port.to_string());
        let durability = if opts.fsync { "on" } else { "off" };
        let mut settings = Vec::new();
        if opts.replication {
            settings.extend([
                "wal_level=replica".to_owned(),
                "max_wal_senders=5".to_owned(),
                "wal_keep_size=64MB".to_owned(),
            ]);
        }
        if let Some(primary) = opts.standby_of {
            settings.push(format!(
                "primary_conninfo=host=127.0.0.1 port={primary} user=postgres application_name=standby1"
            ));
        }
        for setting in [
            "listen_addresses=127.0.0.1".to_owned(),
            "unix_socket_directories=".to_owned(),
            format!("fsync={durability}"),
            // A replicating primary's commits wait for its standby.
            format!(
                "synchronous_commit={}",
                if opts.replication { "on" } else { durability }
            ),
            format!("full_page_writes={durability}"),
            "max_connections=200".to_owned(),
            "shared_buffers=64MB".to_owned(),
            // Dynamic shared memory as files in the data directory, not in
            // /dev/shm: a killed server's segments go with its directory.
            "dynamic_shared_memory_type=mmap".to_owned(),
        ]
        .into_iter()
        .chain(settings)
        {
            postgres.arg("-c").arg(setting);
        }
        postgres
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let mut postmaster = spawn_tied(postgres, owner)
            .map_err(|e| format!("cannot run {}: {e}", bin_dir.join("postgres").display()))?;
        match wait_ready(&mut postmaster, &data_dir, port) {
            Ok(()) => {
                if std::env::var_os("CONFAB_TEST_LOG").is_some() {
                    eprintln!(
                        "pg: PostgreSQL up on 127.0.0.1:{port} ({}) in {:?}",
                        data_dir.display(),
                        began.elapsed()
                    );
                }
                server.port = port;
                *server
                    .postmaster
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner) = Some(postmaster);
                return Ok(server);
            }
            Err(Failure::PortTaken) if attempt < PORT_ATTEMPTS => continue,
            Err(Failure::PortTaken) => {
                return Err(failure(
                    &data_dir,
                    &format!("no free port after {PORT_ATTEMPTS} tries"),
                ));
            }
            Err(Failure::Other(why)) => {
                stop_process(&mut postmaster);
                return Err(failure(&data_dir, &why));
            }
        }
    }
    unreachable!("the last attempt returns")
}

enum Failure {
    /// Another process bound the port between `free_port` and postgres.
    PortTaken,
    Other(String),
}

/// Waits until the postmaster says "ready" in `postmaster.pid` (what
/// `pg_ctl -w` waits for) and its port accepts a TCP connection.
fn wait_ready(postmaster: &mut Child, data_dir: &Path, port: u16) -> Result<(), Failure> {
    let deadline = Instant::now() + START_TIMEOUT;
    let pid_file = data_dir.join("postmaster.pid");
    loop {
        match postmaster.try_wait() {
            Ok(Some(status)) => {
                let log = fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                return Err(if log.contains("Address already in use") {
                    Failure::PortTaken
                } else {
                    Failure::Other(format!("postgres exited during start-up ({status})"))
                });
            }
            Ok(None) => {}
            Err(e) => return Err(Failure::Other(format!("waiting for postgres: {e}"))),
        }
        // Line 8 of postmaster.pid is the postmaster's status.
        let ready = fs::read_to_string(&pid_file).is_ok_and(|pids| {
            // A hot standby says "standby" once it takes connections.
            pids.lines()
                .nth(7)
                .is_some_and(|s| matches!(s.trim(), "ready" | "standby"))
        });
        if ready {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(Failure::Other(format!(
                "postgres did not accept connections on 127.0.0.1:{port} within {START_TIMEOUT:?}"
            )));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The panic message of a failed start: `why` and the tail of the log.
fn failure(data_dir: &Path, why: &str) -> String {
    let log = fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!(
        "PostgreSQL in {} did not start: {why}\n--- server.log (last {LOG_TAIL_LINES} lines) ---\n{tail}",
        data_dir.display()
    )
}

/// SIGQUIT (immediate shutdown: no checkpoint, the data is deleted anyway),
/// SIGKILL if that takes longer than `STOP_TIMEOUT`, then reaps it.
fn stop_process(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: plain kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGQUIT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while let Ok(None) = child.try_wait() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Spawns `command` (as `owner`, if given) from the process-long spawner
/// thread, with `PR_SET_PDEATHSIG` = `SIGKILL`: the child dies with the
/// test binary even when no destructor or atexit handler runs.
fn spawn_tied(mut command: Command, owner: Option<(u32, u32)>) -> io::Result<Child> {
    if let Some((uid, gid)) = owner {
        // std sets the ids (and drops root's supplementary groups) before
        // it runs `pre_exec`: the death signal must be set after, as a
        // credential change clears it.
        command.uid(uid).gid(gid);
    }
    // Untranslated messages: the start-up check reads the server's log.
    command.env("LC_ALL", "C");
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The test binary died between fork and prctl: the signal
            // will never come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    on_spawner_thread(move || command.spawn())
}

/// Runs `job` on a thread that lives as long as the process (see
/// `spawn_tied`) and returns its result.
fn on_spawner_thread<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    type Job = Box<dyn FnOnce() + Send>;
    static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("pg-spawner".to_owned())
            .spawn(move || queue.into_iter().for_each(|job| job()))
            .expect("cannot start the PostgreSQL spawner thread");
        jobs
    });
    let (reply, result) = mpsc::sync_channel(1);
    jobs.send(Box::new(move || {
        let _ = reply.send(job());
    }))
    .expect("the PostgreSQL spawner thread is gone");
    result
        .recv()
        .expect("the PostgreSQL spawner thread is gone")
}

/// The directory with `initdb`, `postgres` and `psql`.
fn find_bin_dir() -> Result<PathBuf, String> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("CONFAB_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "CONFAB_PG_BIN={} has no initdb; unset it or point it at PostgreSQL's bin directory",
                dir.display()
            ))
        };
    }
    // Debian: /usr/lib/postgresql/<major>/bin, not on PATH; the newest wins.
    let mut debian: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    debian.sort();
    if let Some((_, dir)) = debian.pop() {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&dir) {
            return Ok(dir);
        }
    }
    // On PATH, initdb may be a symlink (e.g. /usr/local/bin/initdb): its
    // real directory is the one that also holds postgres and psql.
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| has_initdb(dir)))
        .and_then(|dir| fs::canonicalize(dir.join("initdb")).ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .ok_or_else(|| NOT_INSTALLED.to_owned())
}

/// The (uid, gid) to run PostgreSQL as: `postgres` when we are root (initdb
/// and postgres refuse root), else `None` (ourselves).
fn server_user() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam_r with a zeroed passwd and a buffer we own.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        );
        if rc != 0 || found.is_null() {
            return Err(format!(
                "running as root, but there is no `postgres` user to run PostgreSQL as \
                 (initdb and postgres refuse root). {NOT_INSTALLED} (the package creates the user)"
            ));
        }
        Ok(Some((pwd.pw_uid, pwd.pw_gid)))
    }
}

/// An empty data directory, mode 0700, owned by the server's user.
fn make_data_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    let _ = fs::remove_dir_all(dir);
    let fail = |e: io::Error| format!("cannot create the data directory {}: {e}", dir.display());
    fs::create_dir(dir).map_err(fail)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(fail)?;
    if let Some((uid, gid)) = owner {
        chown(dir, Some(uid), Some(gid)).map_err(fail)?;
    }
    Ok(())
}

/// Removes the `confab-pg-<pid>[-<n>]` directories of processes that no
/// longer run (left by a test binary that was killed), and the SysV shared
/// memory segment each killed postmaster left (56 bytes, but never freed).
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !is_running(pid) {
            remove_orphaned_segment(&entry.path());
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether process `pid` exists and is not a zombie (a killed test binary
/// stays a zombie until its parent reaps it).
fn is_running(pid: u32) -> bool {
    // /proc/<pid>/stat: "pid (comm) state ..."; comm may contain spaces.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
    })
}

/// Removes the SysV segment named in a dead server's `postmaster.pid`
/// (line 1: the postmaster's pid, negative for initdb's single-user
/// backend; line 7: the segment's key and id) if that process created it.
/// A backend of the killed postmaster may still be attached for a moment:
/// the kernel frees the segment when it detaches.
fn remove_orphaned_segment(data_dir: &Path) {
    let Ok(pid_file) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let lines: Vec<&str> = pid_file.lines().collect();
    let creator = lines
        .first()
        .and_then(|l| l.trim().parse::<libc::pid_t>().ok())
        .map(libc::pid_t::abs);
    let shmid = lines
        .get(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|id| id.parse::<libc::c_int>().ok());
    let (Some(creator), Some(shmid)) = (creator, shmid) else {
        return;
    };
    if is_running(creator as u32) {
        return;
    }
    // SAFETY: IPC_STAT fills a zeroed shmid_ds we own; IPC_RMID takes no buffer.
    unsafe {
        let mut segment: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(shmid, libc::IPC_STAT, &mut segment) == 0 && segment.shm_cpid == creator {
            libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// `<hint>_<n>_<pid>`, with `hint` reduced to lowercase letters, digits and
/// `_` so the name needs no quoting (and stays under 63 bytes).
fn database_name(hint: &str, n: u64) -> String {
    let mut base: String = hint
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if !base.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        base.insert_str(0, "db_");
    }
    format!("{base}_{n}_{}", std::process::id())
}
