#!/usr/bin/env python3
"""Writes the schema-version-1 store fixture with an OLD confab binary.

Usage: make_fixture.py CONFAB_BINARY DATA_DIR MANIFEST_OUT

Starts `CONFAB_BINARY serve` on a random loopback port with a fresh DATA_DIR,
fills it through the public API (HTTP for accounts, rooms and messages, a
minimal stdlib WebSocket client for `read` frames), dumps everything the store
holds, as the server returns it, into MANIFEST_OUT, then stops the server with
SIGTERM and waits for it to exit so that DATA_DIR/confab.redb is consistent.
Python 3 standard library only.
"""
import base64
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

JWT_SECRET = "fixture-secret-v1"
PASSWORD = "fixture-password-1"
WRITTEN_BY = "confab a209bb3"

USERS = [  # (username, display_name); usernames must be ASCII in v1
    ("alice", "Alice Kim"),
    ("bob", "Bob 박"),
    ("minsu", "민수"),
]

DIRECT = [  # (sender, text): 25 messages alice <-> bob
    ("alice", "Hi Bob, are you there?"),
    ("bob", "안녕하세요, 앨리스!"),
    ("alice", "오늘 회의는 3시에 시작합니다"),
    ("bob", "See you at the meeting"),
    ("alice", "Can you bring the Q3 report?"),
    ("bob", "네, 가져갈게요."),
    ("alice", "Great, thanks 🎉👍"),
    ("bob", "회의실은 어디예요?"),
    ("alice", "3층 큰 회의실이에요."),
    ("bob", "Got it."),
    ("alice", 'He said "ship it" and left.\nSecond line: \'single quotes\' and a tab\there.'),
    ("bob", "ㅋㅋㅋ 진짜요?"),
    ("alice", "Yes, really."),
    ("bob", "점심 먹었어요?"),
    ("alice", "아직요. 같이 먹을래요?"),
    ("bob", "Sure — 12:30 at the usual place?"),
    ("alice", "좋아요!"),
    ("bob", "Running 5 minutes late, sorry."),
    ("alice", "괜찮아요, 천천히 오세요."),
    ("bob", "도착했어요."),
    ("alice", "Mixed 한국어 and English in one message."),
    ("bob", "Backslash \\ and unicode: café, naïve, 日本語"),
    ("alice", "내일 봐요"),
    ("bob", "See you tomorrow"),
    ("alice", "👋"),
]

GROUP = [  # (sender, text): 15 messages in 팀 채팅
    ("alice", "팀 채팅방을 만들었습니다. Welcome everyone!"),
    ("bob", "Thanks Alice!"),
    ("minsu", "안녕하세요, 민수입니다."),
    ("alice", "이번 주 금요일까지 보고서 제출해 주세요."),
    ("minsu", "네 알겠습니다."),
    ("bob", "Is the deadline 5 PM?"),
    ("alice", "Yes, 5 PM KST."),
    ("minsu", "초안 공유드렸어요. 확인 부탁드립니다 🙏"),
    ("bob", "Looks good to me."),
    ("alice", "수고 많으셨어요!"),
    ("minsu", "다음 회의는 언제인가요?"),
    ("alice", "다음 주 월요일 오전 10시입니다."),
    ("bob", "I'll send the calendar invite."),
    ("minsu", "감사합니다 😊"),
    ("alice", "Quote test: \"팀\" means team.\nNew line in the group, too."),
]

GROUP_NAME = "팀 채팅"

# Read positions set with WebSocket `read` frames: (reader, room key, seq).
# Sending already moves the sender's read position to its own message (and a
# read never goes backwards), so these only move past the reader's last send:
# bob 24 -> 25 in the direct room, minsu 14 -> 15 in the group; bob stays at
# 13 in the group (2 unread).
READS = [("bob", "direct", 25), ("minsu", "group", 15)]


class Api:
    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def call(self, method, path, body=None, token=None, expect=(200, 201, 204)):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = "Bearer " + token
        conn.request(method, "/api/v1" + path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        if resp.status not in expect:
            raise RuntimeError(f"{method} {path} -> {resp.status} {raw!r}")
        return json.loads(raw) if raw else None


class WebSocket:
    """Just enough RFC 6455 for text frames to and from confab."""

    def __init__(self, host, port, path):
        self.sock = socket.create_connection((host, port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed during upgrade")
            buf += chunk
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head!r}")

    def _frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(hdr + mask + masked)

    def send(self, obj):
        self._frame(0x1, json.dumps(obj).encode())

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self):
        """Next text frame as JSON (answers pings, skips other control frames)."""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            payload = self._read(n)  # server frames are not masked
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise RuntimeError(f"closed by server: {payload!r}")
            if opcode == 0x9:
                self._frame(0xA, payload)

    def close(self):
        try:
            self._frame(0x8, struct.pack("!H", 1000))
            self.sock.settimeout(5)
            while True:
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", self._read(2))
                self._read(n)
                if b0 & 0x0F == 0x8:
                    break
        except Exception:
            pass
        self.sock.close()


def start_server(binary, data_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFAB_")}
    cwd = os.path.dirname(os.path.abspath(data_dir))  # no config.toml there: built-in defaults
    if os.path.exists(os.path.join(cwd, "config.toml")):
        sys.exit(f"{cwd}/config.toml exists; refusing to let it change the defaults")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
         "--set", f"jwt_secret={JWT_SECRET}"],
        cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=open(os.path.join(cwd, "confab-v1-server.log"), "w"), text=True,
    )
    line = proc.stdout.readline().strip()
    prefix = "confab listening on http://"
    if not line.startswith(prefix):
        proc.kill()
        sys.exit(f"unexpected first line from server: {line!r}")
    return proc, line[len(prefix):]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    binary, data_dir, manifest_out = sys.argv[1:]
    if os.path.exists(data_dir):
        sys.exit(f"{data_dir} exists; the fixture needs a fresh data dir")
    proc, addr = start_server(binary, data_dir)
    print("server at", addr)
    api = Api(addr)
    try:
        tok, ids = {}, {}
        for name, display in USERS:
            r = api.call("POST", "/signup",
                         {"username": name, "password": PASSWORD, "display_name": display},
                         expect=(201,))
            tok[name], ids[name] = r["token"], r["user"]["id"]
        # Logging in again must work with the same password.
        for name, _ in USERS:
            assert api.call("POST", "/login", {"username": name, "password": PASSWORD})["user"]["id"] == ids[name]

        # Contacts.
        api.call("POST", "/contacts", {"username": "bob"}, tok["alice"], expect=(201,))
        api.call("POST", "/contacts", {"username": "minsu"}, tok["alice"], expect=(201,))
        api.call("POST", "/contacts", {"username": "alice"}, tok["bob"], expect=(201,))

        # Rooms: direct alice<->bob; group created with bob, minsu added afterwards.
        direct = api.call("POST", "/rooms", {"kind": "direct", "user_id": ids["bob"]},
                          tok["alice"], expect=(201,))["id"]
        group = api.call("POST", "/rooms",
                         {"kind": "group", "name": GROUP_NAME, "member_ids": [ids["bob"]]},
                         tok["alice"], expect=(201,))["id"]
        api.call("POST", f"/rooms/{group}/members", {"user_id": ids["minsu"]}, tok["bob"])
        room_ids = {"direct": direct, "group": group}

        # Messages, interleaved so the two rooms' seqs grow together.
        def post(room_key, i, sender, text):
            cid = f"fx-{room_key}-{i:02d}"
            m = api.call("POST", f"/rooms/{room_ids[room_key]}/messages",
                         {"text": text, "client_id": cid}, tok[sender], expect=(201,))
            assert m["seq"] == i and m["text"] == text and m["from"] == ids[sender], m

        for i in range(max(len(DIRECT), len(GROUP))):
            if i < len(DIRECT):
                post("direct", i + 1, *DIRECT[i])
            if i < len(GROUP):
                post("group", i + 1, *GROUP[i])
        # A repeated client_id stores nothing.
        dup = api.call("POST", f"/rooms/{direct}/messages",
                       {"text": "duplicate", "client_id": "fx-direct-01"}, tok["alice"], expect=(200,))
        assert dup["seq"] == 1 and dup["text"] == DIRECT[0][1]

        # Read positions over the WebSocket.
        host, port = addr.rsplit(":", 1)
        for reader, room_key, seq in READS:
            ws = WebSocket(host, int(port), "/api/v1/ws")
            ws.send({"type": "auth", "token": tok[reader]})
            while (f := ws.recv())["type"] != "ready":
                pass
            ws.send({"type": "read", "room": room_ids[room_key], "seq": seq})
            ws.send({"type": "ping"})
            while (f := ws.recv())["type"] != "pong":
                if f["type"] == "error":
                    raise RuntimeError(f)
            ws.close()
        # Read positions are written at most a second late: wait until they show.
        want = {(room_ids[k], ids[u]): s for u, k, s in READS}
        deadline = time.time() + 10
        while True:
            seen = {}
            for name, _ in USERS:
                for r in api.call("GET", "/rooms", token=tok[name])["rooms"]:
                    for uid, s in r["reads"].items():
                        seen[(r["id"], uid)] = s
            if all(seen.get(k) == v for k, v in want.items()):
                break
            if time.time() > deadline:
                raise RuntimeError(f"read positions not visible: {seen}")
            time.sleep(0.2)

        # Dump what the store holds, through the API.
        users = [api.call("GET", "/me", token=tok[name]) for name, _ in USERS]
        rooms, messages = [], []
        for key in ("direct", "group"):
            r = api.call("GET", f"/rooms/{room_ids[key]}", token=tok["alice"])
            listed = next(x for x in api.call("GET", "/rooms", token=tok["alice"])["rooms"]
                          if x["id"] == r["id"])
            rooms.append({
                "id": r["id"], "kind": r["kind"], "name": r["name"], "owner": r["owner"],
                "members": [m["id"] for m in r["members"]],
                "created_at": r["created_at"], "last_seq": r["last_seq"],
                "reads": listed["reads"],
            })
            after = 0
            while True:
                page = api.call("GET", f"/rooms/{r['id']}/messages?after={after}&limit=200",
                                token=tok["alice"])["messages"]
                if not page:
                    break
                for m in page:
                    messages.append({k: m[k] for k in ("room", "seq", "from", "ts", "text", "client_id")})
                after = page[-1]["seq"]
        contacts = {ids[name]: [c["id"] for c in api.call("GET", "/contacts", token=tok[name])["contacts"]]
                    for name, _ in USERS}
        manifest = {
            "schema_version": 1,
            "written_by": WRITTEN_BY,
            "jwt_secret": JWT_SECRET,
            "password": PASSWORD,
            "users": [{"id": u["id"], "username": u["username"], "display_name": u["display_name"]}
                      for u in users],
            "rooms": rooms,
            "contacts": contacts,
            "messages": messages,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        print("server exited with", rc)
    if rc != 0:
        sys.exit("server did not exit cleanly")
    with open(manifest_out, "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(manifest['users'])} users, {len(rooms)} rooms, {len(messages)} messages -> {manifest_out}")


if __name__ == "__main__":
    main()
