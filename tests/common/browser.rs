//! A small Chrome DevTools Protocol (CDP) client for the end-to-end UI tests:
//! it starts a headless Chromium, talks CDP to it over one WebSocket, and
//! drives pages the way a person would — controls are found by their
//! accessible role and name (so a test that finds a control also proves it
//! is labelled), clicks are real mouse events at the control's centre, and
//! keys are real key events.
//!
//! One reader task owns the socket's read half: responses are routed by `id`
//! to the waiting request; events are recorded, in order, on the page whose
//! `sessionId` (flattened sessions, one per page) they carry — so whatever
//! Chromium reported before a command's reply (a console error, a dialog)
//! is recorded by the time that command returns. Every page lives in its own
//! browser context, so two pages share no cookies or storage.
//!
//! Everything panics with a descriptive message on failure: these are test
//! helpers. Chromium is taken from `$CONFAB_CHROMIUM`, else `chromium` on
//! `PATH`, else `/usr/bin/chromium` (Debian: `apt-get install chromium`).
//! `CONFAB_TEST_LOG=1` echoes Chromium's stderr (mostly harmless D-Bus
//! errors in containers).
//!
//! # IME (Korean input)
//!
//! While the last Hangul syllable is still being composed, pressing Enter in
//! Chrome delivers `keydown` with `key` "Enter" (or "Process" on Windows),
//! `keyCode` 229 and `isComposing` true *before* `compositionend`; the IME
//! then commits the syllable. Korean IMEs then pass the Enter on as an
//! ordinary `keydown` (keyCode 13, `isComposing` false) — public reports
//! differ by platform. An app that sends on the first Enter sends without the
//! last syllable, and the IME re-commits that syllable into the cleared box.
//!
//! Measured in headless Chromium 156 over CDP: any key event dispatched
//! while an `Input.imeSetComposition` composition is active reaches the page
//! with `isComposing` true (Blink derives it from the composition state);
//! `keyCode` is whatever `windowsVirtualKeyCode` says. A `keyDown` *with
//! text* "\r" also fires `keypress` and inserts a line break into the
//! composition, so `press_during_composition` sends a `rawKeyDown` (keyCode
//! 229, no text). `Input.insertText` then commits: `compositionupdate`,
//! `input` (insertCompositionText), `compositionend`; a `keyup` sent after
//! that has `isComposing` false. The full sequence is
//! `ime_set_composition("한")`, `press_during_composition("Enter")`,
//! `ime_commit("한")`, then `press("Enter")` for the pass-through Enter.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::SpawnExecutor;

/// Default bound for every wait (element to appear, page to load, …).
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for a single CDP round trip (screenshots can be slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest CDP message accepted (screenshots arrive as one base64 string).
const MAX_MESSAGE: usize = 256 << 20;
/// How many stderr lines of Chromium to keep for failure messages.
const STDERR_TAIL: usize = 100;
/// Polling interval of `wait_for` and the locators.
const POLL: Duration = Duration::from_millis(25);

type Writer = WebSocketWrite<tokio::io::WriteHalf<TokioIo<Upgraded>>>;
type Reader = FragmentCollectorRead<tokio::io::ReadHalf<TokioIo<Upgraded>>>;
type Reply = Result<Value, String>;

// ---------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------

/// The CDP connection shared by the browser and its pages.
struct Conn {
    writer: tokio::sync::Mutex<Writer>,
    next_id: AtomicU64,
    /// Requests waiting for their response, by `id`.
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    /// Where each page's events are recorded, by `sessionId`.
    sessions: Mutex<HashMap<String, Arc<Shared>>>,
    closed: AtomicBool,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Conn {
    /// Sends `method` (to `session`, or to the browser) and waits for the
    /// result; `Err` carries CDP's error or a transport failure.
    async fn try_call(&self, session: Option<&str>, method: &str, params: Value) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        if self.closed.load(Ordering::SeqCst) {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err("the DevTools connection is closed".into());
        }
        let bytes = serde_json::to_vec(&msg).expect("serialize CDP request");
        let sent = self
            .writer
            .lock()
            .await
            .write_frame(Frame::text(Payload::Owned(bytes)))
            .await;
        if let Err(e) = sent {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(format!("writing to the DevTools socket: {e}"));
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err("the DevTools connection closed before the reply".into()),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                Err(format!("no reply within {CALL_TIMEOUT:?}"))
            }
        }
    }

    /// Like `try_call`, panicking (with Chromium's recent stderr) on error.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        match self.try_call(session, method, params.clone()).await {
            Ok(v) => v,
            Err(e) => panic!(
                "CDP {method} {params} failed: {e}\n--- chromium stderr (tail) ---\n{}",
                self.stderr_tail()
            ),
        }
    }

    fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().expect("stderr lock");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Fails every waiting request and ends every page's event stream.
    fn shut(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.pending.lock().expect("pending lock").clear();
        self.sessions.lock().expect("sessions lock").clear();
    }
}

/// The reader task: routes responses by `id` and events by `sessionId`.
async fn read_loop(mut rd: Reader, conn: Arc<Conn>) {
    loop {
        // Chromium never pings; a close frame just ends the loop.
        let mut no_send = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
        let frame = match rd.read_frame(&mut no_send).await {
            Ok(f) => f,
            Err(_) => break,
        };
        match frame.opcode {
            OpCode::Text => {}
            OpCode::Close => break,
            _ => continue,
        }
        let Ok(msg) = serde_json::from_slice::<Value>(&frame.payload) else {
            continue;
        };
        if let Some(id) = msg["id"].as_u64() {
            let waiter = conn.pending.lock().expect("pending lock").remove(&id);
            if let Some(tx) = waiter {
                let reply = match msg.get("error") {
                    Some(e) => Err(format!("CDP error {e}")),
                    None => Ok(msg["result"].clone()),
                };
                let _ = tx.send(reply);
            }
        } else if let Some(session) = msg["sessionId"].as_str() {
            let shared = conn
                .sessions
                .lock()
                .expect("sessions lock")
                .get(session)
                .cloned();
            let Some(shared) = shared else { continue };
            record(&shared, &msg);
            if msg["method"] == "Page.javascriptDialogOpening" {
                // Answered from a task: the reader must keep reading.
                let (conn, session) = (conn.clone(), session.to_string());
                let accept = shared.accept_dialogs.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let params = json!({"accept": accept});
                    let method = "Page.handleJavaScriptDialog";
                    // Best effort: the page may be closing.
                    let _ = conn.try_call(Some(&session), method, params).await;
                });
            }
        }
    }
    conn.shut();
}

/// WebSocket client handshake to `ws://host:port/path` (same approach as
/// `common::Ws`).
async fn ws_connect(url: &str) -> Result<fastwebsockets::WebSocket<TokioIo<Upgraded>>, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let stream = TcpStream::connect(host)
        .await
        .map_err(|e| format!("connect {host}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let req = hyper::Request::builder()
        .method("GET")
        // Origin-form: Chromium's DevTools server 404s an absolute URI.
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::UPGRADE, "websocket")
        .header(hyper::header::CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
        .await
        .map_err(|e| format!("WebSocket handshake to {host}{path}: {e}"))?;
    Ok(ws)
}

// ---------------------------------------------------------------------------
// Browser
// ---------------------------------------------------------------------------

/// A headless Chromium process and the CDP connection to it. Dropping it
/// kills Chromium (its whole process group) and removes its profile.
pub struct Browser {
    conn: Arc<Conn>,
    child: Child,
    reader: tokio::task::JoinHandle<()>,
    // Dropped after `drop` killed Chromium, which no longer writes to it.
    _profile: TempDir,
}

impl Browser {
    /// Starts Chromium with a fresh profile and connects to it.
    pub async fn launch() -> Browser {
        let exe = chromium_path();
        let profile = tempfile::Builder::new()
            .prefix("confab-chromium-")
            .tempdir()
            .expect("create a temp dir for the Chromium profile");
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so Drop can kill the renderers too.
        .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start Chromium `{exe}`: {e}"));
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let (url_tx, url_rx) = oneshot::channel();
        let pipe = child.stderr.take().expect("Chromium stderr is piped");
        let tail = stderr.clone();
        // Reads stderr for the whole life of the process so the pipe never
        // fills; the first "DevTools listening on ws://…" line is the URL.
        std::thread::spawn(move || {
            let mut url_tx = Some(url_tx);
            let verbose = std::env::var_os("CONFAB_TEST_LOG").is_some();
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                if verbose {
                    eprintln!("[chromium] {line}");
                }
                if let Some(url) = line.strip_prefix("DevTools listening on ")
                    && let Some(tx) = url_tx.take()
                {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut tail = tail.lock().expect("stderr lock");
                if tail.len() >= STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let url = match tokio::time::timeout(Duration::from_secs(30), url_rx).await {
            Ok(Ok(url)) => url,
            _ => {
                let status = child.try_wait().ok().flatten();
                kill_group(&mut child);
                let tail: Vec<String> = stderr
                    .lock()
                    .expect("stderr lock")
                    .iter()
                    .cloned()
                    .collect();
                panic!(
                    "Chromium `{exe}` did not print `DevTools listening on ws://…` within 30 s \
                     (exit status {status:?})\n--- chromium stderr ---\n{}",
                    tail.join("\n")
                );
            }
        };
        let mut ws = match ws_connect(&url).await {
            Ok(ws) => ws,
            Err(e) => {
                kill_group(&mut child);
                panic!("cannot connect to Chromium's DevTools at {url}: {e}");
            }
        };
        ws.set_max_message_size(MAX_MESSAGE);
        ws.set_auto_close(false);
        ws.set_auto_pong(false);
        let (rd, wr) = ws.split(tokio::io::split);
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(wr),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            stderr,
        });
        let reader = tokio::spawn(read_loop(FragmentCollectorRead::new(rd), conn.clone()));
        Browser {
            conn,
            child,
            reader,
            _profile: profile,
        }
    }

    /// Sends a browser-level CDP command (no session) and returns its result.
    pub async fn cdp(&self, method: &str, params: Value) -> Value {
        self.conn.call(None, method, params).await
    }

    /// Opens an `about:blank` page in a new, isolated browser context (its
    /// own cookies, localStorage, cache), attached and ready to drive.
    pub async fn new_page(&self) -> Page {
        let ctx = self.cdp("Target.createBrowserContext", json!({})).await;
        let context = str_field(&ctx, "browserContextId").to_string();
        let target = self
            .cdp(
                "Target.createTarget",
                json!({"url": "about:blank", "browserContextId": context}),
            )
            .await;
        let target = str_field(&target, "targetId").to_string();
        let attached = self
            .cdp(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        let session = str_field(&attached, "sessionId").to_string();
        let shared = Arc::new(Shared {
            state: Mutex::new(PageState::default()),
            changed: watch::channel(()).0,
            accept_dialogs: AtomicBool::new(false),
        });
        self.conn
            .sessions
            .lock()
            .expect("sessions lock")
            .insert(session.clone(), shared.clone());
        let page = Page {
            conn: self.conn.clone(),
            session,
            target,
            context,
            shared,
            pending_keyup: Mutex::new(None),
        };
        for method in ["Page.enable", "Runtime.enable", "DOM.enable", "Log.enable"] {
            page.cdp(method, json!({})).await;
        }
        page.cdp("Page.setLifecycleEventsEnabled", json!({"enabled": true}))
            .await;
        // Each context is its own window and only one window has OS focus;
        // without this, focus/blur events and :focus would depend on which
        // page was opened last.
        page.cdp(
            "Emulation.setFocusEmulationEnabled",
            json!({"enabled": true}),
        )
        .await;
        page
    }

    /// Chromium's last stderr lines (it is noisy: D-Bus errors are normal).
    pub fn stderr_tail(&self) -> String {
        self.conn.stderr_tail()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.reader.abort();
        self.conn.shut();
        kill_group(&mut self.child);
    }
}

fn chromium_path() -> String {
    if let Some(p) = std::env::var_os("CONFAB_CHROMIUM") {
        return p.to_string_lossy().into_owned();
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("chromium").is_file()));
    if on_path {
        return "chromium".into();
    }
    if Path::new("/usr/bin/chromium").is_file() {
        return "/usr/bin/chromium".into();
    }
    panic!(
        "Chromium not found: the UI tests need a headless Chromium. Install it \
         (Debian/Ubuntu: `apt-get install chromium`) or set CONFAB_CHROMIUM to its path."
    );
}

/// SIGKILL to Chromium's process group (browser, zygotes, renderers), then reap.
fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) on the process group that `Browser::launch` created
    // for this child (pgid = its pid).
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("CDP reply without a string `{key}`: {v}"))
}

// ---------------------------------------------------------------------------
// Page
// ---------------------------------------------------------------------------

/// What a page's event stream recorded.
#[derive(Default)]
struct PageState {
    exceptions: Vec<String>,
    console_errors: Vec<String>,
    log_errors: Vec<String>,
    dialogs: Vec<String>,
    /// Loader ids whose document fired `load`.
    loaded: HashSet<String>,
    /// Count of main-frame `load` events.
    loads: u64,
}

struct Shared {
    state: Mutex<PageState>,
    /// Pinged after every recorded event.
    changed: watch::Sender<()>,
    accept_dialogs: AtomicBool,
}

/// Records one of a page's events (called by the reader, in order).
fn record(shared: &Shared, msg: &Value) {
    let p = &msg["params"];
    {
        let mut st = shared.state.lock().expect("page state lock");
        match msg["method"].as_str().unwrap_or("") {
            "Runtime.exceptionThrown" => {
                let d = &p["exceptionDetails"];
                let text = d["exception"]["description"].as_str();
                let text = text.or(d["text"].as_str()).unwrap_or("?");
                st.exceptions.push(text.to_string());
            }
            "Runtime.consoleAPICalled" if p["type"] == "error" => {
                let args = p["args"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                let parts: Vec<String> = args.iter().map(remote_object_text).collect();
                st.console_errors.push(parts.join(" "));
            }
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                let e = &p["entry"];
                let url = e["url"].as_str().unwrap_or("");
                let text = e["text"].as_str().unwrap_or("");
                st.log_errors
                    .push(format!("{text} {url}").trim().to_string());
            }
            "Page.javascriptDialogOpening" => {
                let text = p["message"].as_str().unwrap_or("");
                st.dialogs.push(text.to_string());
            }
            "Page.lifecycleEvent" if p["name"] == "load" => {
                if let Some(l) = p["loaderId"].as_str() {
                    st.loaded.insert(l.to_string());
                }
            }
            "Page.loadEventFired" => st.loads += 1,
            _ => return,
        }
    }
    shared.changed.send_replace(());
}

/// A console argument as text: primitives by value, objects by description.
fn remote_object_text(o: &Value) -> String {
    match (&o["value"], o["description"].as_str()) {
        (Value::String(s), _) => s.clone(),
        (Value::Null, Some(d)) => d.to_string(),
        (Value::Null, None) => o["type"].as_str().unwrap_or("?").to_string(),
        (v, _) => v.to_string(),
    }
}

/// JavaScript truthiness of a value returned by value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// One page (tab) in its own browser context, driven over a flattened session.
pub struct Page {
    conn: Arc<Conn>,
    session: String,
    target: String,
    context: String,
    shared: Arc<Shared>,
    /// The `keyup` owed by `press_during_composition`.
    pending_keyup: Mutex<Option<Value>>,
}

impl Page {
    /// Sends a raw CDP command to this page's session and returns its result.
    pub async fn cdp(&self, method: &str, params: Value) -> Value {
        self.conn.call(Some(&self.session), method, params).await
    }

    /// Lets this page's browser context save downloads into `dir`.
    #[allow(dead_code)]
    pub async fn allow_downloads(&self, dir: &Path) {
        self.conn
            .call(
                None,
                "Browser.setDownloadBehavior",
                json!({"behavior": "allow", "browserContextId": self.context, "downloadPath": dir}),
            )
            .await;
    }

    async fn try_cdp(&self, method: &str, params: Value) -> Reply {
        self.conn
            .try_call(Some(&self.session), method, params)
            .await
    }

    /// Waits (up to `timeout`) until `done` holds for the recorded state.
    async fn wait_state(&self, what: &str, timeout: Duration, done: impl Fn(&PageState) -> bool) {
        let mut rx = self.shared.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.shared.state.lock().expect("page state lock")) {
                return;
            }
            if self.conn.closed.load(Ordering::SeqCst) {
                panic!("{what}: the browser connection closed");
            }
            // `changed` cannot fail: `self.shared` holds the sender.
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!("{what}: timed out after {timeout:?}");
            }
        }
    }

    /// Navigates to `url` and waits for its `load` event.
    pub async fn goto(&self, url: &str) {
        let r = self.cdp("Page.navigate", json!({"url": url})).await;
        if let Some(err) = r["errorText"].as_str() {
            panic!("navigating to {url} failed: {err}");
        }
        // A same-document navigation (only the fragment changed) has no loader.
        let Some(loader) = r["loaderId"].as_str() else {
            return;
        };
        let what = format!("goto({url}): waiting for the load event");
        self.wait_state(&what, TIMEOUT, |st| st.loaded.contains(loader))
            .await;
    }

    /// Reloads the page and waits for its `load` event.
    pub async fn reload(&self) {
        let before = self.shared.state.lock().expect("page state lock").loads;
        self.cdp("Page.reload", json!({})).await;
        self.wait_state("reload: waiting for the load event", TIMEOUT, |st| {
            st.loads > before
        })
        .await;
    }

    /// Closes the page and disposes of its browser context.
    pub async fn close(self) {
        self.conn
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(&self.session);
        self.conn
            .call(None, "Target.closeTarget", json!({"targetId": self.target}))
            .await;
        let _ = self
            .conn
            .try_call(
                None,
                "Target.disposeBrowserContext",
                json!({"browserContextId": self.context}),
            )
            .await;
    }

    async fn try_eval(&self, js: &str) -> Result<Value, String> {
        let params = json!({"expression": js, "awaitPromise": true, "returnByValue": true});
        let r = self.try_cdp("Runtime.evaluate", params).await?;
        if let Some(d) = r.get("exceptionDetails") {
            let desc = d["exception"]["description"].as_str();
            return Err(desc.or(d["text"].as_str()).unwrap_or("?").to_string());
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `js` in the page (awaiting a returned promise) and returns
    /// its value as JSON (`undefined` → `null`). Panics if it throws.
    pub async fn eval(&self, js: &str) -> Value {
        match self.try_eval(js).await {
            Ok(v) => v,
            Err(e) => panic!("eval({js}) failed: {e}"),
        }
    }

    /// Re-evaluates `js` every 25 ms until it returns a truthy value, which
    /// is returned. A throw counts as "not yet" (the element may not exist
    /// yet, or a navigation may be in progress).
    pub async fn wait_for(&self, js: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.try_eval(js).await;
            if let Ok(v) = &last
                && truthy(v)
            {
                return v.clone();
            }
            if Instant::now() >= deadline {
                panic!("wait_for({js}) still not truthy after {timeout:?}; last result: {last:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `backendDOMNodeId`s of the non-ignored accessibility nodes with this
    /// role and accessible name, in document order (`name` "" = any name).
    async fn query(&self, role: &str, name: &str) -> Result<Vec<u64>, String> {
        let doc = self.try_cdp("DOM.getDocument", json!({"depth": 0})).await?;
        let mut params = json!({"nodeId": doc["root"]["nodeId"], "role": role});
        if !name.is_empty() {
            params["accessibleName"] = json!(name);
        }
        let r = self.try_cdp("Accessibility.queryAXTree", params).await?;
        let nodes = r["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        Ok(nodes
            .iter()
            .filter(|n| n["ignored"] != true)
            .filter_map(|n| n["backendDOMNodeId"].as_u64())
            .collect())
    }

    /// How many controls have this role and accessible name right now.
    pub async fn count(&self, role: &str, name: &str) -> usize {
        match self.query(role, name).await {
            Ok(ids) => ids.len(),
            Err(e) => panic!("count({role:?}, {name:?}): {e}"),
        }
    }

    /// Whether a control with this role and accessible name exists right now.
    pub async fn find(&self, role: &str, name: &str) -> bool {
        self.count(role, name).await > 0
    }

    /// Waits until a control with this role and accessible name exists;
    /// returns its `backendNodeId` (the first one, in document order).
    pub async fn wait_for_role(&self, role: &str, name: &str, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.query(role, name).await;
            if let Ok(ids) = &last
                && let Some(id) = ids.first()
            {
                return *id;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no {role:?} named {name:?} appeared within {timeout:?} (last query: {last:?}); \
                     accessibility tree:\n{}",
                    self.ax_outline().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until no control with this role and accessible name exists.
    pub async fn wait_for_no_role(&self, role: &str, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(role, name).await > 0 {
            if Instant::now() >= deadline {
                panic!("a {role:?} named {name:?} is still present after {timeout:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `role "name"` for every named, non-ignored node (for failure messages).
    pub async fn ax_outline(&self) -> String {
        let Ok(r) = self.try_cdp("Accessibility.getFullAXTree", json!({})).await else {
            return "<unavailable>".into();
        };
        let nodes = r["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let lines: Vec<String> = nodes
            .iter()
            .filter(|n| n["ignored"] != true)
            .filter(|n| {
                !matches!(
                    n["role"]["value"].as_str(),
                    Some("none" | "generic" | "StaticText" | "InlineTextBox" | "LabelText")
                )
            })
            .filter_map(|n| {
                let name = n["name"]["value"].as_str().filter(|s| !s.is_empty())?;
                Some(format!("  {} {name:?}", n["role"]["value"].as_str()?))
            })
            .take(80)
            .collect();
        lines.join("\n")
    }

    /// Waits until the control exists, is rendered and is the topmost
    /// element at its centre (scrolled into view); returns that point in
    /// viewport coordinates. Retries all along: a re-rendered list replaces
    /// the node, a toast may briefly cover it.
    async fn clickable_point(&self, role: &str, name: &str) -> (f64, f64) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let id = self.wait_for_role(role, name, left).await;
            match self.center_if_on_top(id).await {
                Ok(point) => return point,
                Err(e) if Instant::now() >= deadline => {
                    panic!("the {role:?} named {name:?} is not clickable after {TIMEOUT:?}: {e}")
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    async fn center_if_on_top(&self, id: u64) -> Result<(f64, f64), String> {
        let node = json!({"backendNodeId": id});
        self.try_cdp("DOM.scrollIntoViewIfNeeded", node.clone())
            .await?;
        let model = self.try_cdp("DOM.getBoxModel", node.clone()).await?;
        let quad = |k: &str| -> Vec<f64> {
            let q = model["model"][k]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            q.iter().filter_map(Value::as_f64).collect()
        };
        // The content box, unless it is empty (an icon button with padding).
        let (mut q, b) = (quad("content"), quad("border"));
        let area = |q: &[f64]| q.len() == 8 && (q[2] - q[0]).abs() * (q[5] - q[1]).abs() > 0.0;
        if !area(&q) {
            q = b;
        }
        if !area(&q) {
            return Err("it has an empty box (hidden?)".into());
        }
        let x = (q[0] + q[2] + q[4] + q[6]) / 4.0;
        let y = (q[1] + q[3] + q[5] + q[7]) / 4.0;
        let obj = self.try_cdp("DOM.resolveNode", node).await?;
        let hit = self
            .try_cdp(
                "Runtime.callFunctionOn",
                json!({
                    "objectId": obj["object"]["objectId"],
                    "functionDeclaration": "function(x, y) { \
                        if (!this.isConnected) return 'it was removed from the document'; \
                        const e = document.elementFromPoint(x, y); \
                        return !e || this === e || this.contains(e) ? '' \
                            : `(${x}, ${y}) is covered by ${e.outerHTML.slice(0, 300)}`; }",
                    "arguments": [{"value": x}, {"value": y}],
                    "returnByValue": true,
                }),
            )
            .await?;
        match hit["result"]["value"].as_str() {
            Some("") => Ok((x, y)),
            Some(why) => Err(why.to_string()),
            None => Err(format!("hit test failed: {hit}")),
        }
    }

    /// Clicks the control with this role and accessible name: waits until
    /// it exists and nothing covers it, scrolls it into view, then moves the
    /// mouse to its centre and presses/releases the left button there.
    pub async fn click(&self, role: &str, name: &str) {
        let (x, y) = self.clickable_point(role, name).await;
        self.mouse("mouseMoved", x, y, "none", 0).await;
        self.mouse("mousePressed", x, y, "left", 1).await;
        self.mouse("mouseReleased", x, y, "left", 0).await;
    }

    async fn mouse(&self, kind: &str, x: f64, y: f64, button: &str, buttons: u8) {
        let mut p = json!({"type": kind, "x": x, "y": y, "button": button, "buttons": buttons});
        if kind != "mouseMoved" {
            p["clickCount"] = json!(1);
        }
        self.cdp("Input.dispatchMouseEvent", p).await;
    }

    /// Focuses the control with this role and accessible name.
    pub async fn focus(&self, role: &str, name: &str) {
        let id = self.wait_for_role(role, name, TIMEOUT).await;
        self.cdp("DOM.focus", json!({"backendNodeId": id})).await;
    }

    /// Replaces the text of a field: focus, select all, Backspace, then
    /// insert `text` as typed input (`input` events fire as for a person).
    pub async fn fill(&self, role: &str, name: &str, text: &str) {
        let id = self.wait_for_role(role, name, TIMEOUT).await;
        self.cdp("DOM.focus", json!({"backendNodeId": id})).await;
        let obj = self
            .cdp("DOM.resolveNode", json!({"backendNodeId": id}))
            .await;
        self.cdp(
            "Runtime.callFunctionOn",
            json!({
                "objectId": obj["object"]["objectId"],
                "functionDeclaration": "function() { \
                    if (typeof this.select === 'function') { this.select(); return; } \
                    const r = document.createRange(); r.selectNodeContents(this); \
                    const s = getSelection(); s.removeAllRanges(); s.addRange(r); }",
            }),
        )
        .await;
        self.press("Backspace").await;
        self.type_text(text).await;
    }

    /// Inserts `text` into the focused element (like typing or pasting it;
    /// no key events). Empty text is a no-op.
    pub async fn type_text(&self, text: &str) {
        if !text.is_empty() {
            self.cdp("Input.insertText", json!({"text": text})).await;
        }
    }

    /// Presses and releases a key, optionally with modifiers: "Enter",
    /// "Shift+Enter", "Control+a", "Tab", "Escape", "Backspace", "Delete",
    /// "ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight", "Home", "End",
    /// "PageUp", "PageDown", "Space", or a single character.
    pub async fn press(&self, combo: &str) {
        let (mods, key) = match combo.rsplit_once('+') {
            Some((m, k)) if !k.is_empty() => (m, k),
            _ => ("", combo),
        };
        let mut modifiers = 0;
        for m in mods.split('+').filter(|m| !m.is_empty()) {
            modifiers |= match m {
                "Alt" => 1,
                "Control" | "Ctrl" => 2,
                "Meta" | "Cmd" => 4,
                "Shift" => 8,
                _ => panic!("press({combo:?}): unknown modifier {m:?}"),
            };
        }
        let k = key_def(key, modifiers & 8 != 0)
            .unwrap_or_else(|| panic!("press({combo:?}): unknown key {key:?}"));
        // Text only without Control/Alt/Meta (a shortcut types nothing).
        let text = k.text.filter(|_| modifiers & 7 == 0);
        let mut down = json!({
            "type": if text.is_some() { "keyDown" } else { "rawKeyDown" },
            "modifiers": modifiers, "key": k.key, "code": k.code,
            "windowsVirtualKeyCode": k.code_num, "nativeVirtualKeyCode": k.code_num,
        });
        if let Some(t) = &text {
            down["text"] = json!(t);
            down["unmodifiedText"] = json!(t);
        }
        let mut up = down.clone();
        up["type"] = json!("keyUp");
        if let Some(o) = up.as_object_mut() {
            o.remove("text");
            o.remove("unmodifiedText");
        }
        self.cdp("Input.dispatchKeyEvent", down).await;
        self.cdp("Input.dispatchKeyEvent", up).await;
    }

    /// Starts or updates an IME composition in the focused element, as an
    /// input method does while a syllable is being assembled (`compositionstart`
    /// / `compositionupdate`; the text is shown but not yet committed). The
    /// caret is placed after the text.
    pub async fn ime_set_composition(&self, text: &str) {
        let end = text.encode_utf16().count();
        self.cdp(
            "Input.imeSetComposition",
            json!({"text": text, "selectionStart": end, "selectionEnd": end}),
        )
        .await;
    }

    /// Commits the active composition as `text` (`compositionend`; `text`
    /// replaces the composed text). If `press_during_composition` left a key
    /// down, its `keyup` follows (keyCode as usual, `isComposing` false).
    pub async fn ime_commit(&self, text: &str) {
        self.cdp("Input.insertText", json!({"text": text})).await;
        let up = self.pending_keyup.lock().expect("keyup lock").take();
        if let Some(up) = up {
            self.cdp("Input.dispatchKeyEvent", up).await;
        }
    }

    /// The `keydown` of a key the IME consumes while a composition is active
    /// (see "IME" in the module docs): the page sees `key` = `key`,
    /// `keyCode` 229 and `isComposing` true, and no text is inserted. The
    /// matching `keyup` is sent by the next `ime_commit`, after
    /// `compositionend`, as in Chrome. `key` is a name as in `press`.
    pub async fn press_during_composition(&self, key: &str) {
        let k = key_def(key, false)
            .unwrap_or_else(|| panic!("press_during_composition({key:?}): unknown key"));
        // rawKeyDown: a "keyDown" with text would also fire keypress and
        // insert the text (a line break for Enter) into the composition.
        let down = json!({
            "type": "rawKeyDown", "key": k.key, "code": k.code,
            "windowsVirtualKeyCode": 229, "nativeVirtualKeyCode": 229,
        });
        self.cdp("Input.dispatchKeyEvent", down).await;
        let up = json!({
            "type": "keyUp", "key": k.key, "code": k.code,
            "windowsVirtualKeyCode": k.code_num, "nativeVirtualKeyCode": k.code_num,
        });
        *self.pending_keyup.lock().expect("keyup lock") = Some(up);
    }

    /// Saves a PNG screenshot of the viewport to `path` (parent directories
    /// are created).
    pub async fn screenshot(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        let r = self
            .cdp(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": false}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(str_field(&r, "data"))
            .expect("screenshot data is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Emulates a viewport of `width`×`height` CSS pixels (scale factor 1);
    /// `mobile` also emulates a mobile device (meta viewport, overlay scrollbars).
    pub async fn set_viewport(&self, width: u32, height: u32, mobile: bool) {
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    /// Emulates `prefers-color-scheme: dark` (or `light`).
    pub async fn set_dark(&self, dark: bool) {
        let value = if dark { "dark" } else { "light" };
        self.cdp(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": value}]}),
        )
        .await;
    }

    /// Whether later `alert`/`confirm`/`prompt` dialogs are accepted (OK)
    /// rather than dismissed (Cancel, the default). Either way they are
    /// recorded in `dialogs()`.
    pub fn accept_dialogs(&self, accept: bool) {
        self.shared.accept_dialogs.store(accept, Ordering::SeqCst);
    }

    fn state<T>(&self, f: impl FnOnce(&PageState) -> T) -> T {
        f(&self.shared.state.lock().expect("page state lock"))
    }

    /// Uncaught exceptions (and unhandled rejections) so far.
    pub fn exceptions(&self) -> Vec<String> {
        self.state(|s| s.exceptions.clone())
    }

    /// `console.error(…)` messages so far.
    pub fn console_errors(&self) -> Vec<String> {
        self.state(|s| s.console_errors.clone())
    }

    /// Browser-reported errors so far (failed loads, CSP violations, …).
    pub fn log_errors(&self) -> Vec<String> {
        self.state(|s| s.log_errors.clone())
    }

    /// Messages of the JavaScript dialogs opened so far (all answered).
    pub fn dialogs(&self) -> Vec<String> {
        self.state(|s| s.dialogs.clone())
    }
}

/// A key as CDP wants it: DOM `key`, DOM `code`, Windows virtual key code
/// (what `event.keyCode` reports) and the text it types, if any.
struct KeyDef {
    key: String,
    code: String,
    code_num: u32,
    text: Option<String>,
}

fn key_def(name: &str, shift: bool) -> Option<KeyDef> {
    let named = |key: &str, code_num: u32, text: Option<&str>| KeyDef {
        key: key.into(),
        code: key.into(),
        code_num,
        text: text.map(str::to_string),
    };
    Some(match name {
        "Enter" => named("Enter", 13, Some("\r")),
        "Tab" => named("Tab", 9, None),
        "Escape" => named("Escape", 27, None),
        "Backspace" => named("Backspace", 8, None),
        "Delete" => named("Delete", 46, None),
        "ArrowLeft" => named("ArrowLeft", 37, None),
        "ArrowUp" => named("ArrowUp", 38, None),
        "ArrowRight" => named("ArrowRight", 39, None),
        "ArrowDown" => named("ArrowDown", 40, None),
        "Home" => named("Home", 36, None),
        "End" => named("End", 35, None),
        "PageUp" => named("PageUp", 33, None),
        "PageDown" => named("PageDown", 34, None),
        "Space" | " " => KeyDef {
            key: " ".into(),
            code: "Space".into(),
            code_num: 32,
            text: Some(" ".into()),
        },
        _ => {
            let mut chars = name.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return None;
            };
            let c = if shift { c.to_ascii_uppercase() } else { c };
            let upper = c.to_ascii_uppercase();
            let (code, code_num) = match upper {
                'A'..='Z' => (format!("Key{upper}"), upper as u32),
                '0'..='9' => (format!("Digit{c}"), c as u32),
                _ => (String::new(), 0),
            };
            KeyDef {
                key: c.to_string(),
                code,
                code_num,
                text: Some(c.to_string()),
            }
        }
    })
}
