//! The browser UI end to end, in headless Chromium (Debian's `chromium`):
//! people sign up in separate browser contexts, chat live, see ticks, typing
//! and membership changes, survive a server restart without losing or
//! duplicating a message, type Korean through an IME, and cannot inject
//! markup, and work the same through `confab proxy` in front of three nodes.
//! Controls are found by accessible role and name, so every step
//! also proves the control is labelled. Screenshots of the main screens
//! (light/dark, desktop/phone) are saved in `target/ui-screenshots/`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::browser::{Browser, Page};
use common::*;
use serde_json::Value;

/// A live message must show up on the other side within this.
const LIVE: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(20);

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots")
}

fn js_str(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

/// A new page (own browser context) with a desktop-sized viewport.
async fn page(browser: &Browser) -> Page {
    let p = browser.new_page().await;
    p.set_viewport(1280, 800, false).await;
    p
}

fn base(srv: &Server) -> String {
    format!("http://{}/", srv.addr)
}

/// Signs up `username` through the login screen and waits for the chat shell.
async fn sign_up(page: &Page, url: &str, username: &str) {
    page.goto(url).await;
    page.fill("textbox", "Username", username).await;
    page.fill("textbox", "Password", PASSWORD).await;
    page.click("button", "Sign up").await;
    page.wait_for_role("textbox", "Search", WAIT).await;
    wait_online(page).await;
}

async fn wait_online(page: &Page) {
    page.wait_for(
        "document.querySelector('.conn')?.dataset.state === 'online'",
        LONG,
    )
    .await;
}

/// Opens "New chat", finds `peer` and starts a direct chat with them.
async fn start_direct(page: &Page, peer: &str) {
    page.click("button", "New chat").await;
    page.fill("textbox", "Find people by username", peer).await;
    page.click("button", &format!("Message: {peer}")).await;
    page.wait_for_role("textbox", "Message", WAIT).await;
}

/// Types `text` into the composer and presses Enter.
async fn send(page: &Page, text: &str) {
    page.focus("textbox", "Message").await;
    page.type_text(text).await;
    page.press("Enter").await;
}

/// The texts in the open chat's log, in order (pending ones included).
async fn log_texts(page: &Page) -> Vec<String> {
    let v = page
        .eval("[...document.querySelectorAll('.log .msg .text')].map(e => e.textContent)")
        .await;
    serde_json::from_value(v).expect("texts")
}

/// Waits until a message with exactly `text` is in the open chat's log.
async fn wait_text(page: &Page, text: &str, timeout: Duration) {
    page.wait_for(
        &format!(
            "[...document.querySelectorAll('.log .msg .text')].some(e => e.textContent === {})",
            js_str(text)
        ),
        timeout,
    )
    .await;
}

/// The tick state (`pending`, `sent`, `delivered`, `read`) of my message `text`.
fn tick_js(text: &str) -> String {
    format!(
        "(() => {{ const m = [...document.querySelectorAll('.log .msg.own')].find(e => e.querySelector('.text')?.textContent === {}); return m?.querySelector('.tick')?.dataset.state ?? null; }})()",
        js_str(text)
    )
}

async fn wait_tick(page: &Page, text: &str, state: &str, timeout: Duration) {
    page.wait_for(&format!("{} === {}", tick_js(text), js_str(state)), timeout)
        .await;
}

fn assert_clean(page: &Page, who: &str) {
    assert!(
        page.dialogs().is_empty(),
        "{who}: dialogs opened: {:?}",
        page.dialogs()
    );
    assert!(
        page.exceptions().is_empty(),
        "{who}: uncaught exceptions: {:?}",
        page.exceptions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_screen_explains_errors() {
    let srv = Server::start(&[]);
    let browser = Browser::launch().await;
    let page = page(&browser).await;
    let url = base(&srv);
    let name = uname("uilogin");
    page.goto(&url).await;
    page.screenshot(shots().join("login-light-desktop.png"))
        .await;
    page.set_dark(true).await;
    page.screenshot(shots().join("login-dark-desktop.png"))
        .await;
    page.set_dark(false).await;

    // Wrong password for an unknown user.
    page.fill("textbox", "Username", &name).await;
    page.fill("textbox", "Password", "not the password").await;
    page.click("button", "Log in").await;
    page.wait_for(
        "document.querySelector('[role=alert]')?.textContent === 'Wrong username or password.'",
        WAIT,
    )
    .await;

    // Sign up, log out, then a second sign-up with the same name is refused.
    page.fill("textbox", "Password", PASSWORD).await;
    page.click("button", "Sign up").await;
    page.wait_for_role("textbox", "Search", WAIT).await;
    let token = page.eval("localStorage.getItem('confab.token')").await;
    assert!(
        token.as_str().is_some_and(|t| t.len() > 20),
        "token kept for reloads"
    );
    page.click("button", "Log out").await;
    page.wait_for_role("button", "Log in", WAIT).await;
    assert_eq!(
        page.eval("localStorage.getItem('confab.token')").await,
        Value::Null,
        "logout forgets the token"
    );
    // The old token was revoked by the server, not just forgotten.
    let (status, _) = srv
        .api()
        .get("/api/v1/me", token.as_str().unwrap_or(""))
        .await;
    assert_eq!(status.as_u16(), 401);

    page.fill("textbox", "Username", &name).await;
    page.fill("textbox", "Password", PASSWORD).await;
    page.click("button", "Sign up").await;
    page.wait_for(
        "document.querySelector('[role=alert]')?.textContent.startsWith('That username is taken')",
        WAIT,
    )
    .await;
    // The right password logs in.
    page.click("button", "Log in").await;
    page.wait_for_role("textbox", "Search", WAIT).await;
    // No token in any URL.
    let href = page.eval("location.href").await;
    assert!(!href.as_str().unwrap_or("").contains("token"), "{href}");
    assert_clean(&page, "login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_is_live_both_ways_with_ticks_to_read() {
    let srv = Server::start(&[]);
    let browser = Browser::launch().await;
    let (a, b) = (page(&browser).await, page(&browser).await);
    let url = base(&srv);
    let (an, bn) = (uname("uia"), uname("uib"));
    sign_up(&a, &url, &an).await;
    sign_up(&b, &url, &bn).await;
    a.screenshot(shots().join("empty-light-desktop.png")).await;

    start_direct(&a, &bn).await;
    send(&a, "hello bob").await;
    // Acked (✓), then delivered to Bob's open session (✓✓) before he reads it.
    a.wait_for(
        &format!("['sent', 'delivered'].includes({})", tick_js("hello bob")),
        WAIT,
    )
    .await;
    wait_tick(&a, "hello bob", "delivered", WAIT).await;

    // Bob's list gets the new chat live, with an unread badge; he opens it.
    b.wait_for_role("button", &an, WAIT).await;
    b.wait_for(
        "document.querySelector('.rooms .badge')?.textContent === '1'",
        WAIT,
    )
    .await;
    b.click("button", &an).await;
    wait_text(&b, "hello bob", WAIT).await;
    // Bob has the chat open: Alice's message goes to read.
    wait_tick(&a, "hello bob", "read", WAIT).await;

    // Live, both ways, within a second each.
    for (from, to, text) in [
        (&a, &b, "how are you?"),
        (&b, &a, "fine, thanks"),
        (&a, &b, "great"),
    ] {
        let t0 = Instant::now();
        send(from, text).await;
        wait_text(to, text, LIVE).await;
        let took = t0.elapsed();
        assert!(took <= LIVE, "{text:?} took {took:?}");
        wait_tick(from, text, "read", WAIT).await;
    }
    assert_eq!(
        log_texts(&a).await,
        ["hello bob", "how are you?", "fine, thanks", "great"]
    );
    assert_eq!(log_texts(&b).await, log_texts(&a).await);

    // Typing shows in the header of the other side; presence says online.
    b.focus("textbox", "Message").await;
    b.type_text("typing something").await;
    a.wait_for(
        "document.querySelector('.chat-sub')?.textContent === 'typing…'",
        WAIT,
    )
    .await;
    a.wait_for(
        "document.querySelector('.chat-sub')?.textContent === 'online'",
        LONG,
    )
    .await;

    // A message is text, never markup: no element, no script, no dialog.
    let evil = "<img src=x onerror=alert(1)>";
    send(&a, evil).await;
    wait_text(&b, evil, LIVE * 2).await;
    let imgs = b
        .eval("document.querySelectorAll('.log img, .rooms img').length")
        .await;
    assert_eq!(imgs, 0, "the message was parsed as HTML");
    assert_eq!(
        b.eval("document.querySelector('.preview')?.textContent")
            .await,
        evil
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_clean(&a, "alice");
    assert_clean(&b, "bob");

    // A long line wraps inside its bubble instead of widening the page.
    let long = "가".repeat(50) + &"w".repeat(400);
    send(&a, &long).await;
    wait_text(&b, &long, WAIT).await;
    let overflow = b
        .eval("document.querySelector('.log').scrollWidth <= document.querySelector('.log').clientWidth")
        .await;
    assert_eq!(overflow, true, "a long message must wrap");

    // After a reload everything is still there, once, in order, ticks read.
    a.reload().await;
    a.click("button", &bn).await;
    wait_text(&a, &long, WAIT).await;
    let texts = log_texts(&a).await;
    assert_eq!(texts.len(), 6, "{texts:?}");
    wait_tick(&a, "great", "read", WAIT).await;

    // Screenshots: the chat in light and dark, desktop and phone width.
    a.screenshot(shots().join("chat-light-desktop.png")).await;
    a.set_dark(true).await;
    a.screenshot(shots().join("chat-dark-desktop.png")).await;
    b.set_viewport(390, 844, true).await;
    b.screenshot(shots().join("chat-light-phone.png")).await;
    b.set_dark(true).await;
    b.screenshot(shots().join("chat-dark-phone.png")).await;
    b.click("button", "Back to chats").await;
    b.wait_for_role("textbox", "Search", WAIT).await;
    b.screenshot(shots().join("list-dark-phone.png")).await;
    b.set_dark(false).await;
    b.screenshot(shots().join("list-light-phone.png")).await;
    // Keyboard only: Tab reaches the chat and Enter opens it.
    b.focus("textbox", "Search").await;
    b.press("Tab").await;
    let focused = b
        .eval("document.activeElement?.getAttribute('aria-label')")
        .await;
    assert_eq!(focused, Value::String(an.clone()));
    b.press("Enter").await;
    b.wait_for_role("textbox", "Message", WAIT).await;
    assert_clean(&b, "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_three_sees_messages_typing_and_membership_live() {
    let srv = Server::start(&[]);
    let browser = Browser::launch().await;
    let url = base(&srv);
    let (a, b, c) = (
        page(&browser).await,
        page(&browser).await,
        page(&browser).await,
    );
    let (an, bn, cn) = (uname("uga"), uname("ugb"), uname("ugc"));
    sign_up(&a, &url, &an).await;
    sign_up(&b, &url, &bn).await;
    sign_up(&c, &url, &cn).await;

    let group = "Weekend 주말 plans";
    a.click("button", "New group").await;
    a.fill("textbox", "Group name", group).await;
    for peer in [&bn, &cn] {
        a.fill("textbox", "Add people by username", peer).await;
        a.click("button", &format!("Add: {peer}")).await;
    }
    a.click("button", "Create group").await;
    a.wait_for_role("textbox", "Message", WAIT).await;
    for p in [&b, &c] {
        p.click("button", group).await;
        p.wait_for_role("textbox", "Message", WAIT).await;
    }

    send(&a, "안녕하세요 모두").await;
    wait_text(&b, "안녕하세요 모두", LIVE).await;
    wait_text(&c, "안녕하세요 모두", LIVE).await;
    // Sender names are shown on others' messages in a group.
    let sender = b
        .eval("document.querySelector('.log .msg.their .sender')?.textContent")
        .await;
    assert_eq!(sender, Value::String(an.clone()));
    wait_tick(&a, "안녕하세요 모두", "read", WAIT).await;

    send(&c, "count me in").await;
    wait_text(&a, "count me in", LIVE).await;
    wait_text(&b, "count me in", LIVE).await;

    // Typing in a group names the typist.
    b.focus("textbox", "Message").await;
    b.type_text("…").await;
    let typing = format!("{bn} is typing…");
    for p in [&a, &c] {
        p.wait_for(
            &format!(
                "document.querySelector('.chat-sub')?.textContent === {}",
                js_str(&typing)
            ),
            WAIT,
        )
        .await;
    }
    a.screenshot(shots().join("group-light-desktop.png")).await;

    // The owner removes C: C loses the room live, A and B see the new member list.
    a.click("button", "Group info").await;
    a.click("button", &format!("Remove: {cn}")).await;
    c.wait_for_no_role("button", group, WAIT).await;
    c.wait_for(
        "document.querySelector('.chat-notice')?.textContent.includes('no longer')",
        WAIT,
    )
    .await;
    for p in [&a, &b] {
        p.wait_for(
            &format!(
                "!document.querySelector('.chat-sub')?.textContent.includes({})",
                js_str(&cn)
            ),
            WAIT,
        )
        .await;
    }
    a.press("Escape").await;
    // Messages after the removal reach B, not C.
    send(&a, "just us now").await;
    wait_text(&b, "just us now", LIVE).await;
    // B leaves; A sees the member list shrink to one.
    b.click("button", "Group info").await;
    b.click("button", "Leave group").await;
    b.wait_for_no_role("button", group, WAIT).await;
    a.wait_for(
        "document.querySelector('.chat-sub')?.textContent === 'You'",
        WAIT,
    )
    .await;
    for (p, who) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        assert_clean(p, who);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_server_restart_loses_and_duplicates_nothing() {
    let mut srv = Server::start(&[]);
    let browser = Browser::launch().await;
    let url = base(&srv);
    let (a, b) = (page(&browser).await, page(&browser).await);
    let (an, bn) = (uname("ura"), uname("urb"));
    sign_up(&a, &url, &an).await;
    sign_up(&b, &url, &bn).await;
    start_direct(&a, &bn).await;
    send(&a, "m1").await;
    b.click("button", &an).await;
    wait_text(&b, "m1", WAIT).await;

    // Sent and then the server dies at once (maybe before the ack reached A).
    send(&a, "m2").await;
    srv.kill9();
    a.wait_for(
        "document.querySelector('.conn')?.dataset.state === 'offline'",
        WAIT,
    )
    .await;
    // Typed while offline: shown as pending, in order.
    for text in ["m3", "m4", "m5"] {
        send(&a, text).await;
    }
    wait_tick(&a, "m5", "pending", WAIT).await;
    a.screenshot(shots().join("offline-light-desktop.png"))
        .await;
    // B also sends while the server is down.
    send(&b, "b1").await;

    srv.restart_same_port();
    wait_online(&a).await;
    wait_online(&b).await;
    for text in ["m2", "m3", "m4", "m5"] {
        wait_tick(&a, text, "read", LONG).await;
        wait_text(&b, text, LONG).await;
    }
    wait_text(&a, "b1", LONG).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expect_a: Vec<&str> = vec!["m1", "m2", "m3", "m4", "m5"];
    let got_b: Vec<String> = log_texts(&b).await;
    let b_only_a: Vec<&str> = got_b
        .iter()
        .map(String::as_str)
        .filter(|t| t.starts_with('m'))
        .collect();
    assert_eq!(
        b_only_a, expect_a,
        "B sees each of A's messages once, in order"
    );
    let got_a = log_texts(&a).await;
    assert_eq!(got_a.iter().filter(|t| t.as_str() == "b1").count(), 1);

    // The server holds each exactly once, and both clients agree on the order.
    let token = a.eval("localStorage.getItem('confab.token')").await;
    let token = token.as_str().expect("token");
    let rooms = srv.api().get("/api/v1/rooms", token).await.1;
    let room = rooms["rooms"][0]["id"]
        .as_str()
        .expect("room id")
        .to_string();
    let stored: Vec<String> = srv
        .api()
        .history_all(token, &room)
        .await
        .iter()
        .map(|m| m["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(stored.len(), 6, "{stored:?}");
    assert_eq!(got_a, stored);
    assert_eq!(log_texts(&b).await, stored);
    // The outbox is empty (nothing left to resend on the next load).
    let outbox = a
        .eval("Object.keys(localStorage).filter(k => k.startsWith('confab.outbox')).length")
        .await;
    assert_eq!(outbox, 0);
    assert_clean(&a, "a");
    assert_clean(&b, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn korean_ime_enter_while_composing_does_not_send() {
    let srv = Server::start(&[]);
    let browser = Browser::launch().await;
    let url = base(&srv);
    let (a, b) = (page(&browser).await, page(&browser).await);
    let (an, bn) = (uname("uka"), uname("ukb"));
    sign_up(&a, &url, &an).await;
    sign_up(&b, &url, &bn).await;
    start_direct(&a, &bn).await;
    send(&a, "시작").await;
    b.click("button", &an).await;
    wait_text(&b, "시작", WAIT).await;

    // "채팅을 시작해요" typed through an IME: the last syllable is still being
    // composed when Enter is pressed. That Enter confirms the syllable only.
    a.focus("textbox", "Message").await;
    a.type_text("채팅을 시작해").await;
    a.ime_set_composition("ㅇ").await;
    a.ime_set_composition("요").await;
    a.press_during_composition("Enter").await;
    a.ime_commit("요").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let value = a.eval("document.querySelector('textarea').value").await;
    assert_eq!(
        value, "채팅을 시작해요",
        "Enter during composition must not send"
    );
    assert_eq!(log_texts(&a).await, ["시작"], "nothing was sent");
    // The next Enter sends the whole sentence.
    a.press("Enter").await;
    wait_text(&b, "채팅을 시작해요", LIVE).await;
    assert_eq!(a.eval("document.querySelector('textarea').value").await, "");

    // Shift+Enter is a new line; Enter sends both lines as one message.
    a.type_text("첫 줄").await;
    a.press("Shift+Enter").await;
    a.type_text("둘째 줄").await;
    a.press("Enter").await;
    wait_text(&b, "첫 줄\n둘째 줄", LIVE).await;
    assert_eq!(
        log_texts(&b).await,
        ["시작", "채팅을 시작해요", "첫 줄\n둘째 줄"]
    );
    assert_clean(&a, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_history_loads_on_scroll_and_panels_answer() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let alice = api.new_user("uha").await;
    let bob = api.new_user("uhb").await;
    let room = api.direct_room(&bob.token, &alice.id).await;
    let room = room["id"].as_str().expect("room id").to_string();
    for i in 1..=130 {
        let (status, body) = api
            .post_message(&bob.token, &room, &cid("h"), &format!("old {i}"))
            .await;
        assert!(status.is_success(), "{status} {body}");
    }

    // Alice logs in with the account made over the API.
    let browser = Browser::launch().await;
    let a = page(&browser).await;
    a.goto(&base(&srv)).await;
    a.fill("textbox", "Username", &alice.username).await;
    a.fill("textbox", "Password", PASSWORD).await;
    a.click("button", "Log in").await;
    a.wait_for(
        "document.querySelector('.rooms .badge')?.textContent === '130'",
        WAIT,
    )
    .await;
    a.click("button", &bob.username).await;
    wait_text(&a, "old 130", WAIT).await;
    assert_eq!(log_texts(&a).await.len(), 50, "one page first");
    // Opening the chat read it: the badge is gone.
    a.wait_for("!document.querySelector('.rooms .badge')", WAIT)
        .await;

    // Scrolling to the top loads the previous pages, keeping the reader's place.
    for want in [100, 130] {
        a.eval("document.querySelector('.log').scrollTop = 0").await;
        a.wait_for(
            &format!("document.querySelectorAll('.log .msg').length === {want}"),
            WAIT,
        )
        .await;
        let top = a.eval("document.querySelector('.log').scrollTop").await;
        assert!(
            top.as_f64().unwrap_or(0.0) > 0.0,
            "the view stayed where the reader was"
        );
    }
    let texts = log_texts(&a).await;
    let expected: Vec<String> = (1..=130).map(|i| format!("old {i}")).collect();
    assert_eq!(texts, expected);

    // Search: one hit with the words marked; clicking it opens the chat
    // scrolled to that (old) message.
    let deadline = Instant::now() + WAIT;
    while api.get("/api/v1/search?q=old%207", &alice.token).await.1["total"] != 1 {
        assert!(Instant::now() < deadline, "message not indexed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.fill("textbox", "Search", "old 7").await;
    a.wait_for(
        "document.querySelectorAll('.results .hits li').length === 1 && [...document.querySelectorAll('.results mark')].map(m => m.textContent).join(',') === 'old,7'",
        WAIT,
    )
    .await;
    a.screenshot(shots().join("search-light-desktop.png")).await;
    a.click("button", &format!("{} — old 7", bob.username))
        .await;
    a.wait_for(
        "document.querySelector('.log [data-seq=\"7\"]')?.classList.contains('flash')",
        WAIT,
    )
    .await;
    wait_text(&a, "old 7", WAIT).await;
    a.focus("textbox", "Search").await;
    a.press("Escape").await;
    a.wait_for("!document.querySelector('.rooms').hidden", WAIT)
        .await;

    // The wallet panel shows a balance or the server's reason, never a blank.
    a.click("button", "Wallet").await;
    a.wait_for(
        "/\\d/.test(document.querySelector('dialog .balance')?.textContent ?? '') || document.querySelector('dialog [role=alert]')?.textContent.startsWith('The wallet is not available:')",
        WAIT,
    )
    .await;
    a.press("Escape").await;
    a.wait_for("!document.querySelector('dialog')", WAIT).await;
    assert!(a.find("link", "Server status").await, "a link to /status");

    // Privacy: the settings load, and a changed choice is saved at once.
    a.click("button", "Privacy").await;
    a.wait_for_role("combobox", "Online and last seen", WAIT)
        .await;
    a.wait_for(
        "document.querySelector('dialog select[name=presence]')?.value === 'everyone'",
        WAIT,
    )
    .await;
    a.eval(
        "(() => { const s = document.querySelector('dialog select[name=presence]'); s.value = 'contacts'; s.dispatchEvent(new Event('change')); })()",
    )
    .await;
    a.wait_for(
        "document.querySelector('dialog [role=status]')?.textContent === 'Saved.'",
        WAIT,
    )
    .await;
    let (_, p) = api.get("/api/v1/me/privacy", &alice.token).await;
    assert_eq!(p["presence"], "contacts", "{p}");
    a.press("Escape").await;
    a.wait_for("!document.querySelector('dialog')", WAIT).await;

    // "Download my data" saves the account's export: all 130 messages, once.
    let downloads = tempfile::tempdir().expect("download dir");
    a.allow_downloads(downloads.path()).await;
    a.click("button", "Download my data").await;
    let file = downloads
        .path()
        .join(format!("confab-{}.jsonl", alice.username));
    let deadline = Instant::now() + WAIT;
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && text.ends_with('\n')
            && text.contains("\"type\":\"end\"")
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no download at {}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let texts: Vec<&str> = lines
        .iter()
        .filter(|v| v["type"] == "message")
        .filter_map(|v| v["text"].as_str())
        .collect();
    assert_eq!(
        texts, expected,
        "the download holds every message once, in order"
    );
    assert_clean(&a, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_sent_from_a_direct_chat_shows_on_both_sides_and_in_the_wallet() {
    let srv = Server::start(&["signup_bonus=50000"]);
    let browser = Browser::launch().await;
    let url = base(&srv);
    let (a, b) = (page(&browser).await, page(&browser).await);
    let (an, bn) = (uname("uwa"), uname("uwb"));
    sign_up(&a, &url, &an).await;
    sign_up(&b, &url, &bn).await;
    start_direct(&a, &bn).await;
    send(&a, "커피 살게요").await;
    b.click("button", &an).await;
    wait_text(&b, "커피 살게요", WAIT).await;

    a.click("button", "Send money").await;
    a.wait_for(
        "document.querySelector('dialog .balance')?.textContent === 'Balance: ₩50,000'",
        WAIT,
    )
    .await;
    a.fill("textbox", "Amount", "5000").await;
    a.fill("textbox", "Note (optional)", "커피값").await;
    a.click("button", "Send money").await;
    a.wait_for(
        "document.querySelector('dialog [role=status].ok')?.textContent === 'Sent ₩5,000.'",
        WAIT,
    )
    .await;
    a.press("Escape").await;
    // The payment is a bubble in the chat on both sides, live.
    for p in [&a, &b] {
        p.wait_for(
            "[...document.querySelectorAll('.log .payment strong')].some(e => e.textContent === '₩5,000')",
            WAIT,
        )
        .await;
        p.wait_for(
            "document.querySelector('.log .payment .payment-note')?.textContent === '커피값'",
            WAIT,
        )
        .await;
    }
    b.screenshot(shots().join("payment-light-desktop.png"))
        .await;
    // The wallet panel: balance and history.
    b.click("button", "Wallet").await;
    b.wait_for(
        "document.querySelector('dialog .balance')?.textContent === '₩55,000'",
        WAIT,
    )
    .await;
    b.wait_for(
        "document.querySelector('dialog .txs .tx strong')?.textContent === '+₩5,000'",
        WAIT,
    )
    .await;
    b.screenshot(shots().join("wallet-light-desktop.png")).await;
    b.press("Escape").await;
    // Bad input is explained, nothing moves.
    a.click("button", "Send money").await;
    a.fill("textbox", "Amount", "0").await;
    a.click("button", "Send money").await;
    a.wait_for(
        "document.querySelector('dialog .error')?.textContent === 'Enter an amount greater than zero.'",
        WAIT,
    )
    .await;
    a.fill("textbox", "Amount", "999999").await;
    a.click("button", "Send money").await;
    a.wait_for(
        "document.querySelector('dialog .error')?.textContent.startsWith('not enough money')",
        WAIT,
    )
    .await;
    assert_clean(&a, "a");
    assert_clean(&b, "b");
}

/// The same UI through `confab proxy` in front of three nodes: two people on
/// different proxies (and, usually, served by different nodes) find each other, chat
/// live with ticks to read, send money, and a reload resumes the chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_works_the_same_through_proxies_of_a_cluster() {
    let c = common::cluster::Cluster::start_with(2, "[wallet]\nsignup_bonus = 50000\n").await;
    let browser = Browser::launch().await;
    let (a, b) = (page(&browser).await, page(&browser).await);
    let (url_a, url_b) = (
        format!("http://{}/", c.proxies[0].addr),
        format!("http://{}/", c.proxies[1].addr),
    );
    let (an, bn) = (uname("pxa"), uname("pxb"));
    sign_up(&a, &url_a, &an).await;
    sign_up(&b, &url_b, &bn).await;
    start_direct(&a, &bn).await;
    send(&a, "hello through the proxy").await;
    b.wait_for_role("button", &an, WAIT).await;
    b.click("button", &an).await;
    wait_text(&b, "hello through the proxy", WAIT).await;
    wait_tick(&a, "hello through the proxy", "read", WAIT).await;
    for (from, to, text) in [(&b, &a, "안녕하세요"), (&a, &b, "fine, thanks")] {
        send(from, text).await;
        wait_text(to, text, WAIT).await;
        wait_tick(from, text, "read", WAIT).await;
    }
    // Money: a transfer and its payment message in one transaction.
    a.click("button", "Send money").await;
    a.wait_for(
        "document.querySelector('dialog .balance')?.textContent === 'Balance: ₩50,000'",
        LONG,
    )
    .await;
    a.fill("textbox", "Amount", "5000").await;
    a.click("button", "Send money").await;
    a.wait_for(
        "document.querySelector('dialog [role=status].ok')?.textContent === 'Sent ₩5,000.'",
        WAIT,
    )
    .await;
    a.press("Escape").await;
    for p in [&a, &b] {
        p.wait_for(
            "[...document.querySelectorAll('.log .payment strong')].some(e => e.textContent === '₩5,000')",
            LONG,
        )
        .await;
    }
    // A reload resumes through the proxy: the chat, once, in order.
    b.reload().await;
    wait_online(&b).await;
    b.click("button", &an).await;
    wait_text(&b, "fine, thanks", WAIT).await;
    let texts = log_texts(&b).await;
    let want = ["hello through the proxy", "안녕하세요", "fine, thanks"];
    let got: Vec<&str> = texts
        .iter()
        .map(String::as_str)
        .filter(|t| want.contains(t))
        .collect();
    assert_eq!(got, want, "{texts:?}");
    assert_clean(&a, "a");
    assert_clean(&b, "b");
}
