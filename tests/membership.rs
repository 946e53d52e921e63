//! Authorization and group membership: outsiders can neither read, post nor
//! listen; owners remove members; members leave; ownership passes on.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn member_ids(room: &Value) -> Vec<String> {
    let mut v: Vec<String> = room["members"]
        .as_array()
        .expect("members array")
        .iter()
        .map(|m| m["id"].as_str().expect("member id").to_string())
        .collect();
    v.sort();
    v
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_member_cannot_read_post_or_listen() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("na").await;
    let b = api.new_user("nb").await;
    let c = api.new_user("nc").await;
    let rid = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room id")
        .to_string();
    let (st, m) = api.post_message(&a.token, &rid, "n-1", "private").await;
    assert_eq!(st.as_u16(), 201, "{m}");

    // HTTP: C is refused everywhere.
    assert_err(
        &api.get(&format!("/api/v1/rooms/{rid}/messages"), &c.token)
            .await,
        404,
        "room_not_found",
    );
    assert_err(
        &api.get(&format!("/api/v1/rooms/{rid}"), &c.token).await,
        404,
        "room_not_found",
    );
    assert_err(
        &api.post_message(&c.token, &rid, "n-c", "intrusion").await,
        404,
        "room_not_found",
    );
    assert_err(
        &api.post(
            &format!("/api/v1/rooms/{rid}/members"),
            &c.token,
            &json!({"user_id": c.id}),
        )
        .await,
        404,
        "room_not_found",
    );
    let (_, rooms) = api.get("/api/v1/rooms", &c.token).await;
    assert_eq!(rooms["rooms"], json!([]), "C's room list: {rooms}");

    // A well-formed id of no room: 404 room_not_found.
    let ghost = "0123456789abcdef";
    assert_err(
        &api.get(&format!("/api/v1/rooms/{ghost}/messages"), &a.token)
            .await,
        404,
        "room_not_found",
    );
    assert_err(
        &api.get(&format!("/api/v1/rooms/{ghost}"), &a.token).await,
        404,
        "room_not_found",
    );
    assert_err(
        &api.post_message(&a.token, ghost, "g-1", "x").await,
        404,
        "room_not_found",
    );

    // WS: resume on that room → error frame (with room), C still connected.
    let mut wc = Ws::connect(srv.addr).await;
    wc.auth(&c.token, json!({ rid.as_str(): 0 })).await;
    let e = wc.expect_error("room_not_found").await;
    assert_eq!(e["room"], rid.as_str(), "resume error names the room: {e}");
    let mut wc2 = Ws::connect(srv.addr).await;
    wc2.auth(&c.token, json!({ ghost: 0 })).await;
    let e = wc2.expect_error("room_not_found").await;
    assert_eq!(e["room"], ghost, "{e}");
    wc2.ping().await;

    // WS send → error room_not_found, nothing stored.
    wc.send_msg(&rid, "n-c2", "intrusion").await;
    let e = wc.expect_error("room_not_found").await;
    assert!(
        e.get("client_id").is_none_or(|x| x == "n-c2"),
        "error client_id must match the send: {e}"
    );
    wc.send_msg(ghost, "n-c3", "nowhere").await;
    wc.expect_error("room_not_found").await;
    // read / typing into a foreign room are refused too.
    wc.send_json(&json!({"type": "typing", "room": rid})).await;
    wc.send_json(&json!({"type": "read", "room": rid, "seq": 1}))
        .await;
    wc.ping().await;

    // Live traffic of the room never reaches C.
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    wa.send_json(&json!({"type": "typing", "room": rid})).await;
    wb.expect_type("typing").await;
    wa.send_and_ack(&rid, "n-2", "still private").await;
    wb.expect("B gets the message", |v| {
        v["type"] == "message" && v["client_id"] == "n-2"
    })
    .await;
    wc.ping().await;
    if let Some(v) = wc
        .recv_until(
            |v| v["room"] == rid.as_str() && v["type"] != "error",
            Duration::from_millis(500),
        )
        .await
    {
        panic!("outsider C received a frame of the room: {v}");
    }
    for v in &wc.skipped {
        assert!(
            v["room"] != rid.as_str() || v["type"] == "error",
            "outsider C received a frame of the room: {v}"
        );
    }

    let hist = api.history_all(&a.token, &rid).await;
    let cids: Vec<&str> = hist
        .iter()
        .map(|m| m["client_id"].as_str().expect("cid"))
        .collect();
    assert_eq!(cids, vec!["n-1", "n-2"], "nothing from C was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_changes() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let o = api.new_user("go").await;
    let m1 = api.new_user("gm").await;
    let m2 = api.new_user("gm").await;
    let m3 = api.new_user("gm").await;

    // Validation.
    assert_err(
        &api.post(
            "/api/v1/rooms",
            &o.token,
            &json!({"kind": "group", "name": "", "member_ids": [m1.id]}),
        )
        .await,
        400,
        "invalid_name",
    );
    assert_err(
        &api.post(
            "/api/v1/rooms",
            &o.token,
            &json!({"kind": "group", "name": "x".repeat(65), "member_ids": [m1.id]}),
        )
        .await,
        400,
        "invalid_name",
    );
    assert_err(
        &api.post(
            "/api/v1/rooms",
            &o.token,
            &json!({"kind": "group", "name": "g", "member_ids": ["0123456789abcdef"]}),
        )
        .await,
        404,
        "user_not_found",
    );

    let mut w1 = Ws::connect_auth(srv.addr, &m1.token).await;
    let mut w3 = Ws::connect_auth(srv.addr, &m3.token).await;

    let room = api.group_room(&o.token, "Team", &[&m1.id, &m2.id]).await;
    let gid = room["id"].as_str().expect("room id").to_string();
    assert_eq!(room["kind"], "group");
    assert_eq!(room["name"], "Team");
    assert_eq!(room["owner"], o.id.as_str(), "the creator owns the group");
    assert_eq!(member_ids(&room), sorted(&[&o.id, &m1.id, &m2.id]));
    // Creation is pushed to members.
    let pushed = w1
        .expect("a `room` frame for the new group", |v| v["type"] == "room")
        .await;
    assert_eq!(pushed["room"]["id"], gid.as_str(), "{pushed}");

    let (st, m) = api.post_message(&m1.token, &gid, "m1-1", "hi all").await;
    assert_eq!(st.as_u16(), 201, "{m}");

    // A member that is not the owner cannot remove others.
    assert_err(
        &api.delete(&format!("/api/v1/rooms/{gid}/members/{}", o.id), &m2.token)
            .await,
        403,
        "forbidden",
    );
    // Removing a non-member.
    assert_err(
        &api.delete(&format!("/api/v1/rooms/{gid}/members/{}", m3.id), &o.token)
            .await,
        404,
        "user_not_found",
    );

    // Owner removes m1: m1 is told, and can no longer read or post.
    assert_status(
        &api.delete(&format!("/api/v1/rooms/{gid}/members/{}", m1.id), &o.token)
            .await,
        204,
    );
    let rm = w1
        .expect("room_removed", |v| v["type"] == "room_removed")
        .await;
    assert_eq!(rm["room"], gid.as_str(), "{rm}");
    assert_err(
        &api.get(&format!("/api/v1/rooms/{gid}/messages"), &m1.token)
            .await,
        404,
        "room_not_found",
    );
    assert_err(
        &api.post_message(&m1.token, &gid, "m1-2", "still here?")
            .await,
        404,
        "room_not_found",
    );
    w1.send_msg(&gid, "m1-3", "ws after removal").await;
    w1.expect_error("room_not_found").await;

    // Any member may add: m2 adds m3, who gets a `room` push and can read.
    let (st, r) = api
        .post(
            &format!("/api/v1/rooms/{gid}/members"),
            &m2.token,
            &json!({"user_id": m3.id}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{r}");
    assert_eq!(member_ids(&r), sorted(&[&o.id, &m2.id, &m3.id]));
    let pushed = w3
        .expect("a `room` frame after being added", |v| v["type"] == "room")
        .await;
    assert_eq!(pushed["room"]["id"], gid.as_str(), "{pushed}");
    let (st, h) = api
        .get(&format!("/api/v1/rooms/{gid}/messages"), &m3.token)
        .await;
    assert_eq!(st.as_u16(), 200, "{h}");
    assert_eq!(h["messages"].as_array().expect("messages").len(), 1);
    assert_err(
        &api.post(
            &format!("/api/v1/rooms/{gid}/members"),
            &m2.token,
            &json!({"user_id": "0123456789abcdef"}),
        )
        .await,
        404,
        "user_not_found",
    );

    // m2 leaves.
    assert_status(
        &api.delete(&format!("/api/v1/rooms/{gid}/members/{}", m2.id), &m2.token)
            .await,
        204,
    );
    assert_err(
        &api.get(&format!("/api/v1/rooms/{gid}/messages"), &m2.token)
            .await,
        404,
        "room_not_found",
    );

    // The owner leaves: the longest-standing remaining member (m3, the only
    // one) becomes owner.
    assert_status(
        &api.delete(&format!("/api/v1/rooms/{gid}/members/{}", o.id), &o.token)
            .await,
        204,
    );
    let (st, r) = api.get(&format!("/api/v1/rooms/{gid}"), &m3.token).await;
    assert_eq!(st.as_u16(), 200, "{r}");
    assert_eq!(r["owner"], m3.id.as_str(), "ownership passes on: {r}");
    assert_eq!(member_ids(&r), sorted(&[&m3.id]));
    assert_err(
        &api.get(&format!("/api/v1/rooms/{gid}"), &o.token).await,
        404,
        "room_not_found",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_passes_to_longest_standing_member() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let o = api.new_user("po").await;
    let first = api.new_user("pf").await;
    let second = api.new_user("ps").await;
    let gid = api.group_room(&o.token, "succession", &[&first.id]).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    // joined_at has millisecond resolution: keep the two joins apart.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (st, r) = api
        .post(
            &format!("/api/v1/rooms/{gid}/members"),
            &first.token,
            &json!({"user_id": second.id}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{r}");
    assert_status(
        &api.delete(&format!("/api/v1/rooms/{gid}/members/{}", o.id), &o.token)
            .await,
        204,
    );
    let (_, r) = api
        .get(&format!("/api/v1/rooms/{gid}"), &second.token)
        .await;
    assert_eq!(r["owner"], first.id.as_str(), "{r}");
    // The new owner can remove; the other cannot.
    assert_err(
        &api.delete(
            &format!("/api/v1/rooms/{gid}/members/{}", first.id),
            &second.token,
        )
        .await,
        403,
        "forbidden",
    );
    assert_status(
        &api.delete(
            &format!("/api/v1/rooms/{gid}/members/{}", second.id),
            &first.token,
        )
        .await,
        204,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_rooms_have_fixed_members() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("fa").await;
    let b = api.new_user("fb").await;
    let c = api.new_user("fc").await;
    let rid = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_err(
        &api.post(
            &format!("/api/v1/rooms/{rid}/members"),
            &a.token,
            &json!({"user_id": c.id}),
        )
        .await,
        400,
        "direct_room",
    );
    assert_err(
        &api.delete(&format!("/api/v1/rooms/{rid}/members/{}", a.id), &a.token)
            .await,
        400,
        "direct_room",
    );
    let (_, r) = api.get(&format!("/api/v1/rooms/{rid}"), &b.token).await;
    assert_eq!(member_ids(&r), sorted(&[&a.id, &b.id]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_size_limit() {
    let srv = Server::start(&["max_group_members=3"]);
    let api = srv.api();
    let o = api.new_user("lo").await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(api.new_user("lm").await);
    }
    let ids: Vec<&str> = others.iter().map(|u| u.id.as_str()).collect();
    let r = api
        .post(
            "/api/v1/rooms",
            &o.token,
            &json!({"kind": "group", "name": "too big", "member_ids": ids}),
        )
        .await;
    assert_err(&r, 400, "too_many_members");
    let gid = api.group_room(&o.token, "just right", &ids[..2]).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = api
        .post(
            &format!("/api/v1/rooms/{gid}/members"),
            &o.token,
            &json!({"user_id": ids[2]}),
        )
        .await;
    assert_err(&r, 400, "too_many_members");
}
