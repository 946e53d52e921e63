//! Self-test of the headless-Chromium harness (`tests/common/browser.rs`):
//! no confab server, just Chromium and a tiny in-process HTTP responder that
//! serves one test page (localStorage needs a real origin; `data:` URLs have
//! an opaque one).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::browser::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAGE: &str = r#"<!doctype html>
<html lang="en"><meta charset="utf-8"><title>harness self-test</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body { margin: 0; font: 16px sans-serif }
  @media (prefers-color-scheme: dark) { body { background: #111; color: #eee } }</style>
<form onsubmit="return false">
  <label>Username <input name="username" autocomplete="off"></label>
  <button type="button" id="login">Log in</button>
</form>
<p id="out"></p>
<textarea aria-label="Message" rows="3"></textarea>
<button hidden>Invisible</button>
<div style="height: 3000px"></div>
<button type="button" id="far">Far away</button>
<script>
  window.keys = []; window.events = []; window.sent = []; window.farClicks = 0;
  document.getElementById('login').addEventListener('click', () => {
    document.getElementById('out').textContent = 'Hello, ' + document.querySelector('input').value;
    const b = document.createElement('button');
    b.textContent = 'Log out';
    document.body.prepend(b);
  });
  document.getElementById('far').addEventListener('click', () => { window.farClicks++; });
  const t = document.querySelector('textarea');
  // A chat composer: Enter sends, Shift+Enter is a newline, and an Enter
  // that belongs to an IME composition is left to the IME.
  t.addEventListener('keydown', e => {
    keys.push({key: e.key, keyCode: e.keyCode, isComposing: e.isComposing, shift: e.shiftKey});
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      sent.push(t.value);
      t.value = '';
    }
  });
  for (const ty of ['keyup', 'compositionstart', 'compositionend']) {
    t.addEventListener(ty, e => events.push(ty + ':' + (e.data ?? e.key + ':' + e.isComposing)));
  }
</script>
</html>"#;

/// Serves `PAGE` for every request on 127.0.0.1 (one request per connection).
async fn serve_page() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test page server");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    PAGE.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(PAGE.as_bytes()).await;
            });
        }
    });
    addr
}

async fn open(browser: &Browser, addr: SocketAddr) -> Page {
    let page = browser.new_page().await;
    page.goto(&format!("http://{addr}/")).await;
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_are_isolated() {
    let addr = serve_page().await;
    let browser = Browser::launch().await;
    let (a, b) = (open(&browser, addr).await, open(&browser, addr).await);
    a.eval("localStorage.setItem('who', 'alice'); document.cookie = 'c=alice'")
        .await;
    assert_eq!(a.eval("localStorage.getItem('who')").await, json!("alice"));
    assert_eq!(b.eval("localStorage.getItem('who')").await, json!(null));
    assert_eq!(b.eval("document.cookie").await, json!(""));
    a.reload().await;
    assert_eq!(a.eval("localStorage.getItem('who')").await, json!("alice"));
    assert_eq!(a.eval("document.cookie").await, json!("c=alice"));
    b.close().await;
    // The other page is unaffected.
    assert_eq!(a.eval("1 + 1").await, json!(2));
    assert!(a.exceptions().is_empty(), "{:?}", a.exceptions());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locate_click_fill_and_keys() {
    let addr = serve_page().await;
    let browser = Browser::launch().await;
    let page = open(&browser, addr).await;

    // Accessible names: the label names the textbox, contents name buttons.
    assert!(page.find("textbox", "Username").await);
    assert!(page.find("textbox", "Message").await);
    assert!(page.find("button", "Log in").await);
    assert!(!page.find("button", "Log out").await);
    assert!(!page.find("button", "Invisible").await, "hidden is ignored");
    assert!(!page.find("link", "Log in").await, "the role must match");
    assert_eq!(page.count("button", "").await, 2);

    page.fill("textbox", "Username", "old text").await;
    page.fill("textbox", "Username", "alice").await;
    assert_eq!(
        page.eval("document.querySelector('input').value").await,
        json!("alice")
    );
    page.click("button", "Log in").await;
    page.wait_for_role("button", "Log out", TIMEOUT).await;
    let hello = page
        .wait_for("document.getElementById('out').textContent", TIMEOUT)
        .await;
    assert_eq!(hello, json!("Hello, alice"));

    // Below the fold: click scrolls it into view first.
    page.click("button", "Far away").await;
    assert_eq!(page.eval("window.farClicks").await, json!(1));
    assert!(page.eval("window.scrollY").await.as_f64().unwrap_or(0.0) > 0.0);

    // A list that re-renders all the time (like a live room list): the
    // located node goes stale between lookup and click, and the click must
    // still land. (Not while the button is held: a press and a release on
    // two different nodes make no click, for a person too.)
    page.eval(
        "window.moving = 0; let down = false; \
         addEventListener('pointerdown', () => { down = true }, true); \
         addEventListener('pointerup', () => { down = false }, true); \
         const ul = document.createElement('ul'); document.body.prepend(ul); \
         setInterval(() => { if (down) return; const b = document.createElement('button'); \
           b.textContent = 'Moving target'; b.onclick = () => window.moving++; \
           const li = document.createElement('li'); li.append(b); ul.replaceChildren(li); }, 10)",
    )
    .await;
    for _ in 0..5 {
        page.click("button", "Moving target").await;
    }
    assert_eq!(page.eval("window.moving").await, json!(5));

    // Enter sends, Shift+Enter inserts a newline.
    page.fill("textbox", "Message", "line one").await;
    page.press("Shift+Enter").await;
    page.type_text("line two").await;
    let value = page.eval("document.querySelector('textarea').value").await;
    assert_eq!(value, json!("line one\nline two"));
    page.press("Enter").await;
    assert_eq!(
        page.eval("window.sent").await,
        json!(["line one\nline two"])
    );
    let keys = page
        .eval("window.keys.filter(k => k.key === 'Enter')")
        .await;
    assert_eq!(
        keys,
        json!([
            {"key": "Enter", "keyCode": 13, "isComposing": false, "shift": true},
            {"key": "Enter", "keyCode": 13, "isComposing": false, "shift": false},
        ])
    );

    // Backspace edits; Tab moves focus on; Escape and arrows arrive as keys.
    page.type_text("abc").await;
    page.press("Backspace").await;
    assert_eq!(
        page.eval("document.querySelector('textarea').value").await,
        json!("ab")
    );
    page.press("ArrowUp").await;
    page.press("ArrowDown").await;
    page.press("Escape").await;
    let keys = page
        .eval("window.keys.slice(-3).map(k => k.key + ':' + k.keyCode)")
        .await;
    assert_eq!(keys, json!(["ArrowUp:38", "ArrowDown:40", "Escape:27"]));
    page.press("Tab").await;
    assert_eq!(
        page.eval("document.activeElement.textContent").await,
        json!("Far away")
    );
    page.focus("textbox", "Username").await;
    assert_eq!(
        page.eval("document.activeElement.name").await,
        json!("username")
    );
    assert!(page.exceptions().is_empty(), "{:?}", page.exceptions());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn korean_ime_enter() {
    let addr = serve_page().await;
    let browser = Browser::launch().await;
    let page = open(&browser, addr).await;
    page.fill("textbox", "Message", "안녕").await;
    page.eval("window.events = []").await;
    page.ime_set_composition("ㅎ").await;
    page.ime_set_composition("하").await;
    page.ime_set_composition("한").await;
    page.press_during_composition("Enter").await;
    // The composing Enter reached the page as composing: nothing was sent,
    // no newline was inserted.
    let last = page.eval("window.keys.at(-1)").await;
    assert_eq!(
        last,
        json!({"key": "Enter", "keyCode": 229, "isComposing": true, "shift": false})
    );
    assert_eq!(page.eval("window.sent").await, json!([]));
    page.ime_commit("한").await;
    assert_eq!(
        page.eval("document.querySelector('textarea').value").await,
        json!("안녕한")
    );
    let events = page.eval("window.events").await;
    assert_eq!(
        events,
        json!([
            "compositionstart:",
            "compositionend:한",
            "keyup:Enter:false"
        ])
    );
    // The Enter the IME passes on sends the whole text.
    page.press("Enter").await;
    assert_eq!(page.eval("window.sent").await, json!(["안녕한"]));
    assert!(page.exceptions().is_empty(), "{:?}", page.exceptions());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialogs_errors_screenshot_and_emulation() {
    let addr = serve_page().await;
    let browser = Browser::launch().await;
    let page = open(&browser, addr).await;

    page.eval("alert('hello there')").await;
    assert_eq!(page.eval("confirm('sure?')").await, json!(false));
    page.accept_dialogs(true);
    assert_eq!(page.eval("confirm('really?')").await, json!(true));
    assert_eq!(page.dialogs(), ["hello there", "sure?", "really?"]);

    // Events that precede a command's reply are recorded when it returns.
    page.eval("console.error('bad', 42)").await;
    assert_eq!(page.console_errors(), ["bad 42"]);
    page.eval(
        "setTimeout(() => { throw new Error('boom') }); Promise.reject(new Error('nope')); 0",
    )
    .await;
    page.eval("new Promise(r => setTimeout(r, 20))").await;
    let exceptions = page.exceptions();
    assert!(
        exceptions.len() == 2
            && exceptions.iter().any(|e| e.contains("Error: boom"))
            && exceptions.iter().any(|e| e.contains("Error: nope")),
        "{exceptions:?}"
    );
    assert!(page.log_errors().is_empty(), "{:?}", page.log_errors());

    let dir = tempfile::tempdir().expect("temp dir");
    let shot = dir.path().join("nested/dir/page.png");
    page.screenshot(&shot).await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.len() > 100 && png.starts_with(b"\x89PNG\r\n\x1a\n"));

    let dark = "matchMedia('(prefers-color-scheme: dark)').matches";
    page.set_dark(true).await;
    assert_eq!(page.eval(dark).await, json!(true));
    page.set_dark(false).await;
    assert_eq!(page.eval(dark).await, json!(false));

    page.set_viewport(390, 844, true).await;
    assert_eq!(page.eval("innerWidth").await, json!(390));
    page.set_viewport(1280, 800, false).await;
    assert_eq!(
        page.eval("[innerWidth, innerHeight]").await,
        json!([1280, 800])
    );

    // wait_for returns the first truthy value, retrying through throws.
    page.eval("setTimeout(() => { window.later = {n: 7} }, 100)")
        .await;
    let v = page
        .wait_for("window.later.n", Duration::from_secs(2))
        .await;
    assert_eq!(v, json!(7));
}
