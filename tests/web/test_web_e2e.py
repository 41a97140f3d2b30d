"""End-to-end encrypted conversations in real Chromium against a real chatd.

Every browser context is one browser profile, so one end-to-end device (its
own IndexedDB): alice has two (her desk and her laptop), bob one, and more
are added to see what a new device reads. The plaintext exists only in the
pages: the WebSocket frames carry the sealed `e2e` objects (tapped here and
checked), and the server's database holds no trace of it (read raw, with the
server's own keyring as the positive control). A Python client with keys of
its own (harness.e2e_crypto) forges what a browser would never send,
and the page shows why it cannot show it, never its text.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from chatpage import PASSWORD, SKIP_REASON, ChatPage

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import trio
from playwright.sync_api import WebSocketRoute, expect

from harness import e2e_crypto as py
from harness.canary import Scanner
from harness.client import Api, connect
from harness.e2e_keys import KeyedDevice

pytestmark = [pytest.mark.e2e]

WS = re.compile(r"/ws$")
ROOT = Path(__file__).resolve().parents[2]
SAFETY = re.compile(r"^(\d{5} ){11}\d{5}$")
FINGERPRINT = re.compile(r"^([0-9a-f]{4} ){7}[0-9a-f]{4}$")


class Tap:
    """Passes a context's WebSockets through and keeps every frame's raw
    text, both ways, to check what crossed the wire; ``drop`` swallows the
    server's frames it says yes to."""

    def __init__(self, drop: Callable[[dict], bool] | None = None) -> None:
        self.up: list[str] = []
        self.down: list[str] = []
        self.routes: list[WebSocketRoute] = []
        self.drop = drop

    def __call__(self, ws: WebSocketRoute) -> None:
        self.routes.append(ws)
        server = ws.connect_to_server()

        def up(message: str | bytes) -> None:
            self.up.append(str(message))
            server.send(message)

        def down(message: str | bytes) -> None:
            self.down.append(str(message))
            if not (self.drop and self.drop(json.loads(message))):
                ws.send(message)

        ws.on_message(up)
        server.on_message(down)

    def sent(self, kind: str) -> list[dict]:
        return [f for f in map(json.loads, self.up) if f.get("type") == kind]

    def received(self, kind: str) -> list[dict]:
        return [f for f in map(json.loads, self.down) if f.get("type") == kind]

    def seen_ids(self) -> set[str]:
        return {i for f in self.sent("seen") for i in f["ids"]}

    def inject(self, frame: dict) -> None:
        """A frame 'from the server' on the newest connection."""
        self.routes[-1].send(json.dumps(frame))

    def everything(self) -> str:
        return "\n".join(self.up + self.down)


def another_device(user, chat: ChatPage, prefix: str) -> ChatPage:
    """``chat``'s user in a fresh browser profile (a new device), logged in."""
    other = user(prefix)
    other.name = chat.name
    other.login()
    other.expect_device()
    return other


def canary(what: str) -> str:
    return f"{what}-{secrets.token_hex(12)}"


def wait_until(chat: ChatPage, predicate, what: str, seconds: float = 8) -> None:
    for _ in range(int(seconds * 20)):
        if predicate():
            return
        chat.page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting for {what}")


def e2e_dm(user, *, alice_viewport: dict | None = None) -> tuple[ChatPage, ChatPage]:
    """alice and bob, a one-to-one chat alice switched to end-to-end (after
    a first plain message, which creates it), both with it open."""
    alice, bob = user("alice", alice_viewport), user("bob")
    alice.register()
    bob.register()
    alice.expect_device()
    bob.expect_device()
    alice.start_dm(bob.name)
    alice.send("hello in the clear")
    bob.open(alice.name)
    expect(bob.message("hello in the clear")).to_be_visible()
    expect(alice.tid("chat-lock")).to_be_hidden()
    expect(bob.conv(alice.name).get_by_test_id("conv-lock")).to_have_count(0)
    alice.turn_on_e2e()
    return alice, bob


def expect_no_placeholders(*chats: ChatPage) -> None:
    for chat in chats:
        expect(chat.tid("message-undecryptable")).to_have_count(0)
        expect(chat.tid("message-decrypting")).to_have_count(0)


def expect_sealed(chat: ChatPage, text: str) -> None:
    """``text`` is shown, as an end-to-end message (its lock)."""
    expect(chat.message(text)).to_be_visible()
    expect(chat.message(text)).to_have_attribute("data-e2e", "true")
    expect(chat.message(text).get_by_test_id("message-lock")).to_be_visible()


# -- (a), (b): two users, three devices, and a reload --------------------------


def test_a_dm_switched_to_end_to_end_reads_on_three_devices_and_after_reload(user):
    alice, bob = e2e_dm(user)
    taps = {}
    for chat in (alice, bob):
        taps[chat] = Tap()
        chat.context.route_web_socket(WS, taps[chat])
        chat.page.reload()  # the tap sees the sockets from now on
        chat.expect_online()
    alice.open(bob.name)
    bob.open(alice.name)
    # The switch was kept across the reload (it waits for alice's first message).
    expect(alice.tid("chat-lock")).to_have_attribute("data-state", "next")
    laptop = another_device(user, alice, "laptop")

    first, second, third = canary("first"), canary("second"), canary("third")
    alice.send(first)
    expect_sealed(bob, first)
    alice.expect_status(first, "seen")  # bob has the chat open: seen once shown
    expect(alice.tid("chat-lock")).to_have_attribute("data-state", "on")
    expect(bob.tid("chat-lock")).to_be_visible()
    expect(bob.tid("chat-lock")).to_have_attribute("title", re.compile("End-to-end encrypted"))
    expect(bob.conv(alice.name).get_by_test_id("conv-lock")).to_be_visible()
    expect(bob.tid("composer-input")).to_have_attribute("placeholder", "Write an encrypted message")

    laptop.open(bob.name)
    expect_sealed(laptop, first)  # alice's other device: her own message, from its share
    expect(laptop.message("hello in the clear")).to_be_visible()
    expect(laptop.message("hello in the clear")).not_to_have_attribute("data-e2e", "true")

    bob.send(second)  # bob learned the switch from alice's message: he encrypts too
    expect_sealed(alice, second)
    expect_sealed(laptop, second)
    bob.expect_status(second, "seen")

    laptop.send(third)
    for chat in (alice, bob, laptop):
        expect_sealed(chat, third)
    laptop.expect_status(third, "seen")
    alice.expect_status(third, "seen")  # the receipts reach alice's other device too
    expect_no_placeholders(alice, bob, laptop)

    # On the wire: sends with `e2e` and no `body`, and none of the text.
    sends = taps[alice].sent("send") + taps[bob].sent("send")
    assert len(sends) >= 2
    assert all("e2e" in f and "body" not in f for f in sends), sends
    assert all("e2e" in f and "body" not in f for f in taps[bob].received("message"))
    for tap in taps.values():
        wire = tap.everything()
        for text in (first, second, third):
            assert text not in wire
    # The page names its device in `auth`, and `ready` claims it.
    auth = taps[alice].sent("auth")[-1]
    assert auth["device"] == alice.expect_device()
    assert taps[alice].received("ready")[-1]["device"] == auth["device"]

    # (b) After a reload each page rebuilds the chat from history: all of it reads.
    for chat, peer in ((alice, bob.name), (laptop, bob.name), (bob, alice.name)):
        chat.page.reload()
        chat.expect_online()
        chat.open(peer)
    for chat in (alice, bob, laptop):
        for text in (first, second, third):
            expect_sealed(chat, text)
        expect(chat.message("hello in the clear")).to_be_visible()
        expect_no_placeholders(chat)
    alice.expect_status(first, "seen")
    # The list's preview is the last message, decrypted.
    expect(bob.conv(alice.name).get_by_test_id("conv-preview")).to_have_text(third)


# -- (c) a device added later ----------------------------------------------------


def test_a_new_device_reads_what_comes_after_it_and_says_so_for_the_rest(user):
    alice, bob = e2e_dm(user)
    old = canary("old")
    alice.send(old)
    expect_sealed(bob, old)
    mid = alice.message_id(old)

    tablet = another_device(user, bob, "tablet")  # bob's new browser, later
    tablet.open(alice.name)
    before = tablet.message_by_id(mid)
    expect(tablet.undecryptable(before)).to_have_text("sent before this device was added")
    expect(tablet.undecryptable(before)).to_have_attribute("data-reason", "before")
    expect(before.get_by_test_id("message-body")).to_have_count(0)
    expect(before.get_by_test_id("message-lock")).to_be_visible()
    expect(tablet.message("hello in the clear")).to_be_visible()  # plain, from before the switch
    # alice was told bob's devices changed (trust on first use: not blocking).
    expect(alice.tid("e2e-notice-text")).to_contain_text(f"{bob.name}'s devices changed")
    expect(alice.tid("e2e-notice")).to_have_attribute("data-paused", "false")

    new = canary("new")
    alice.send(new)  # a new epoch: its key goes to the tablet too
    expect_sealed(tablet, new)
    expect_sealed(bob, new)
    reply = canary("reply")
    tablet.send(reply)
    expect_sealed(alice, reply)
    expect_sealed(bob, reply)
    alice.expect_status(new, "seen")
    # Never any text of the old message on the new device, even after a reload.
    tablet.page.reload()
    tablet.expect_online()
    tablet.open(alice.name)
    expect(tablet.undecryptable(tablet.message_by_id(mid))).to_have_text(
        "sent before this device was added"
    )
    expect_sealed(tablet, new)
    assert old not in tablet.page.content()
    # The tablet never reports as seen what it could not show.
    alice.tid("e2e-notice-dismiss").click()
    expect(alice.tid("e2e-notice")).to_be_hidden()


# -- (d) safety numbers, verification -------------------------------------------------


def test_safety_numbers_agree_and_change_with_a_new_device(user, tmp_path):
    alice, bob = e2e_dm(user, alice_viewport={"width": 1280, "height": 800})
    hello = "Safety numbers match, so nobody is in between."
    alice.send(hello)
    expect_sealed(bob, hello)
    bob.send("Checked on a call: same digits.")
    expect_sealed(alice, "Checked on a call: same digits.")
    for chat, text in (
        (alice, "Then the door code can go here: only our devices can read it."),
        (bob, "The server only sees that we talked, never what."),
        (alice, "And a new device of yours would show up as a changed number."),
    ):
        chat.send(text)
        expect_sealed(bob if chat is alice else alice, text)

    alice.open_e2e_panel()
    bob.open_e2e_panel()
    number = alice.safety_number(bob.name)
    expect(number).to_have_text(SAFETY)
    seen_by_alice = number.inner_text()
    expect(bob.safety_number(alice.name)).to_have_text(seen_by_alice)
    # The same digits as the Python implementation over the server's lists.
    lists = {
        u: alice.page.evaluate(
            """async (u) => (await fetch(`/api/users/${u}/devices`,
                 { headers: { Authorization: `Bearer ${window.chatd.token}` } })).json()""",
            u,
        )["devices"]
        for u in (alice.name, bob.name)
    }
    assert (
        py.format_safety_number(
            py.safety_number(alice.name, lists[alice.name], bob.name, lists[bob.name])
        )
        == seen_by_alice
    )
    # Each device with its fingerprint; bob's as alice sees it is the one bob sees.
    bob_device = bob.expect_device()
    theirs = alice.e2e_member(bob.name).locator(
        f'[data-testid=e2e-device][data-device="{bob_device}"]'
    )
    mine = bob.e2e_member(bob.name).locator(f'[data-testid=e2e-device][data-device="{bob_device}"]')
    expect(theirs.get_by_test_id("device-fingerprint")).to_have_text(FINGERPRINT)
    expect(mine.get_by_test_id("device-fingerprint")).to_have_text(
        theirs.get_by_test_id("device-fingerprint").inner_text()
    )
    expect(mine).to_contain_text("this device")
    expect(alice.e2e_member(alice.name).get_by_test_id("e2e-device")).to_have_count(1)

    alice.e2e_member(bob.name).get_by_test_id("e2e-verify").click()
    expect(alice.e2e_member(bob.name).get_by_test_id("e2e-verified")).to_be_visible()
    expect(alice.e2e_member(bob.name).get_by_test_id("e2e-verify")).to_have_count(0)
    shot = (
        ROOT / "docs" / "screenshot-e2e.png"
        if os.environ.get("CHATD_E2E_SCREENSHOT")
        else tmp_path / "e2e.png"
    )
    alice.page.screenshot(path=str(shot))
    alice.close_e2e_panel()

    # bob adds a device: both sides' numbers change, and still agree.
    phone = another_device(user, bob, "phone")
    notice = alice.tid("e2e-notice")
    expect(notice).to_have_attribute("data-paused", "true")  # alice had verified bob
    expect(alice.tid("e2e-notice-text")).to_contain_text(
        f"{bob.name}'s devices changed since you verified them"
    )
    expect(bob.safety_number(alice.name)).not_to_have_text(seen_by_alice)  # bob's panel follows
    expect(bob.e2e_member(bob.name).get_by_test_id("e2e-device")).to_have_count(2)
    # Sending to a contact verified before is paused until alice looks again.
    box = alice.tid("composer-input")
    box.fill("held back")
    box.press("Enter")
    expect(alice.tid("composer-note")).to_contain_text("Not sent")
    expect(box).to_have_value("held back")
    expect(alice.message("held back")).to_have_count(0)

    alice.tid("e2e-notice-check").click()
    expect(alice.tid("e2e-panel")).to_be_visible()
    expect(alice.safety_number(bob.name)).not_to_have_text(seen_by_alice)
    expect(alice.e2e_member(bob.name).get_by_test_id("e2e-changed")).to_be_visible()
    changed = alice.safety_number(bob.name).inner_text()
    assert SAFETY.match(changed)
    expect(bob.safety_number(alice.name)).to_have_text(changed)
    phone.open(alice.name)
    phone.open_e2e_panel()
    expect(phone.safety_number(alice.name)).to_have_text(changed)
    phone.close_e2e_panel()

    alice.e2e_member(bob.name).get_by_test_id("e2e-verify").click()
    expect(alice.e2e_member(bob.name).get_by_test_id("e2e-verified")).to_be_visible()
    alice.close_e2e_panel()
    expect(notice).to_be_hidden()
    box.press("Enter")
    expect(box).to_have_value("")
    expect_sealed(phone, "held back")
    expect_sealed(bob, "held back")


# -- (e) an end-to-end group ------------------------------------------------------------


def test_an_end_to_end_group_made_with_the_toggle(user):
    alice, bob, carol = user("alice"), user("bob"), user("carol")
    for chat in (alice, bob, carol):
        chat.register()
        chat.expect_device()
    alice.tid("new-group").click()
    alice.tid("new-group-title").fill("Secret plans")
    alice.tid("new-group-members").fill(f"{bob.name}, {carol.name}")
    alice.tid("new-group-e2e").check()
    alice.tid("new-group-submit").click()
    expect(alice.tid("chat-title")).to_have_text("Secret plans")
    expect(alice.tid("chat-lock")).to_have_attribute(
        "data-state", "on"
    )  # from the first message on
    expect(alice.conv("Secret plans").get_by_test_id("conv-lock")).to_be_visible()

    plan = canary("plan")
    alice.send(plan)
    for chat in (bob, carol):
        chat.open("Secret plans")
        expect_sealed(chat, plan)
        expect(chat.tid("chat-lock")).to_be_visible()
    alice.expect_status(plan, "seen")
    carol.reply(plan, "count me in")
    expect_sealed(alice, "count me in")
    expect_sealed(bob, "count me in")
    expect(bob.message("count me in").get_by_test_id("quote-text")).to_have_text(plan)

    # An edit is encrypted too ({"t": "edit", "id": ...}); everyone reads the new text.
    edited = canary("edited")
    alice.edit(plan, edited)
    for chat in (alice, bob, carol):
        expect_sealed(chat, edited)
        expect(chat.message(edited).get_by_test_id("message-edited")).to_be_visible()
    # A plain body is refused in this group; the page never sends one.
    refused = bob.page.evaluate(
        """(conv) => new Promise((resolve) => {
            const app = window.chatd;
            const seen = app.onError.bind(app);
            app.onError = (f) => { if (f.cid === 'plain-try') resolve(f.reason); else seen(f); };
            const frame = { type: 'send', cid: 'plain-try', conversation: conv, body: 'clear?' };
            app.conn.send(frame);
        })""",
        alice.page.evaluate("window.chatd.openId"),
    )
    assert refused == "e2e_required"
    for chat in (alice, bob, carol):
        chat.page.reload()
        chat.expect_online()
        chat.open("Secret plans")
        expect_sealed(chat, edited)
        expect_sealed(chat, "count me in")
        expect(chat.conv("Secret plans").get_by_test_id("conv-lock")).to_be_visible()
        expect_no_placeholders(chat)


# -- (f) what must never be shown ---------------------------------------------------------


class Forger:
    """bob's extra device in Python, with keys of its own: it makes an epoch
    shared with every device of the chat, then sends what it likes (the
    server checks the shape of an `e2e` object, never its contents)."""

    def __init__(self, web_server, sender: str, peer: str) -> None:
        self.http_url = web_server.http_url
        self.ws_url = web_server.ws_url
        self.sender = sender
        self.peer = peer
        self.conversation = f"dm:{min(sender, peer)}:{max(sender, peer)}"
        self.device = KeyedDevice(sender)
        self.epoch = py.new_epoch_id()
        self.key = py.new_epoch_key()
        self.token = ""

    def seal(self, plaintext: dict) -> dict:
        return py.encrypt(
            self.key,
            self.device.sign,
            conversation=self.conversation,
            sender=self.sender,
            device=self.device.device,
            epoch=self.epoch,
            plaintext=plaintext,
        )

    def setup(self, *, share: bool = True) -> None:
        """Register the device; with ``share``, make the epoch too."""

        async def run() -> None:
            api = Api(self.http_url)
            try:
                self.token = await api.login(self.sender, PASSWORD)
                path = f"/api/e2e/devices/{self.device.device}"
                status, body = await api.call(
                    "PUT", path, self.token, json=self.device.registration()
                )
                assert status == 201, body
                if not share:
                    return
                targets = []
                for user in (self.sender, self.peer):
                    status, body = await api.call("GET", f"/api/users/{user}/devices", self.token)
                    assert status == 200, body
                    targets += [d for d in body["devices"] if d["removed_ts"] is None]
                shares = {
                    d["device"]: py.seal_share(
                        d["dh_key"],
                        conversation=self.conversation,
                        epoch=self.epoch,
                        sender=self.sender,
                        sender_device=self.device.device,
                        recipient_device=d["device"],
                        epoch_key=self.key,
                    )
                    for d in targets
                    if d["device"] != self.device.device
                }
                path = f"/api/conversations/{self.conversation}/e2e/epochs/{self.epoch}"
                body = {"device": self.device.device, "shares": shares}
                status, answer = await api.call("PUT", path, self.token, json=body)
                assert status == 201, answer
            finally:
                await api.aclose()

        trio.run(run)

    def send(self, *objects: dict) -> list[str]:
        """Send each `e2e` object as a message; their ids, in order."""

        async def run() -> list[str]:
            ids = []
            async with connect(self.ws_url, "forger") as ws:
                ready = await ws.auth_with(self.token, device=self.device.device)
                assert ready["device"] == self.device.device
                for obj in objects:
                    cid = "forge-" + secrets.token_hex(6)
                    frame = {
                        "type": "send",
                        "cid": cid,
                        "conversation": self.conversation,
                        "e2e": obj,
                    }
                    await ws.send_json(frame)
                    ids.append((await ws.expect("sent", cid=cid))["id"])
            return ids

        return trio.run(run)

    def read(self, message_id: str) -> str:
        """Read a message of the chat as this device: the share the sender
        sealed to it, then the six checks (the Python implementation)."""

        async def run() -> str:
            api = Api(self.http_url)
            try:
                path = f"/api/conversations/{self.conversation}/messages"
                status, body = await api.call("GET", path, self.token)
                assert status == 200, body
                [m] = [m for m in body["messages"] if m["id"] == message_id]
                status, body = await api.call("GET", f"/api/users/{m['from']}/devices", self.token)
                assert status == 200, body
                sig_key = py.sig_key_of(body["devices"], m["e2e"]["device"])
                path = f"/api/conversations/{self.conversation}/e2e/shares"
                status, body = await api.call(
                    "GET", path, self.token, params={"epochs": m["e2e"]["epoch"]}
                )
                assert status == 200, body
                [share] = [s for s in body["shares"] if s["to"] == self.device.device]
                key = py.open_share(
                    self.device.dh,
                    share["share"],
                    conversation=self.conversation,
                    epoch=m["e2e"]["epoch"],
                    sender=m["from"],
                    sender_device=m["e2e"]["device"],
                    recipient_device=self.device.device,
                )
                plaintext = py.decrypt(
                    key, sig_key, m["e2e"], conversation=self.conversation, sender=m["from"]
                )
                return py.check_kind(plaintext)
            finally:
                await api.aclose()

        return trio.run(run)


def test_forged_and_damaged_messages_show_why_and_never_their_text(user, web_server):
    alice, bob = e2e_dm(user)
    tap = Tap()
    alice.context.route_web_socket(WS, tap)
    alice.page.reload()
    alice.expect_online()
    alice.open(bob.name)
    alice.send("the real thing")  # the switch is made
    expect_sealed(bob, "the real thing")

    forger = Forger(web_server, bob.name, alice.name)
    forger.setup()
    secret = {
        "sig": canary("badsig"),
        "kind": canary("kind"),
        "good": canary("good"),
    }
    bad_sig = forger.seal({"t": "msg", "body": secret["sig"]})
    sig = bytearray(py.unb64url(bad_sig["sig"]))
    sig[0] ^= 0x01
    bad_sig["sig"] = py.b64url(bytes(sig))
    wrong_kind = forger.seal(
        {"t": "edit", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "body": secret["kind"]}
    )
    good = forger.seal({"t": "msg", "body": secret["good"]})
    bad_id, kind_id, good_id = forger.send(bad_sig, wrong_kind, good)

    expect(alice.undecryptable(alice.message_by_id(bad_id))).to_have_text(
        "couldn't decrypt: bad signature"
    )
    expect(alice.undecryptable(alice.message_by_id(kind_id))).to_have_text(
        "couldn't decrypt: wrong kind"
    )
    expect(alice.message(secret["good"])).to_have_attribute("data-id", good_id)  # the control
    # The same (device, epoch, iv) as another message: a replay, however well signed.
    [replay_id] = forger.send(good)
    replay = alice.message_by_id(replay_id)
    expect(alice.undecryptable(replay)).to_have_text("couldn't decrypt: replayed")
    # A frame whose `e2e` object is damaged, and one from a device bob never had.
    base = {"type": "message", "conversation": forger.conversation, "from": bob.name, "ts": 1}
    damaged = {**good, "iv": "short"}
    stranger = {**good, "device": "nobody-knows-me"}
    tap.inject({**base, "id": "01J0000000000000000000DMGD", "seq": 9001, "e2e": damaged})
    tap.inject({**base, "id": "01J0000000000000000000UNKN", "seq": 9002, "e2e": stranger})
    expect(alice.undecryptable(alice.message_by_id("01J0000000000000000000DMGD"))).to_have_text(
        "couldn't decrypt: damaged message"
    )
    expect(alice.undecryptable(alice.message_by_id("01J0000000000000000000UNKN"))).to_have_text(
        "couldn't decrypt: unknown device"
    )
    for mid in (bad_id, kind_id, replay_id):
        expect(alice.message_by_id(mid).get_by_test_id("message-body")).to_have_count(0)
    page = alice.page.content()
    assert secret["sig"] not in page and secret["kind"] not in page
    # Acked (delivered) like any message, but seen only once its text was shown.
    wait_until(alice, lambda: good_id in tap.seen_ids(), "seen of the genuine message")
    acked = {i for f in tap.sent("ack") for i in f.get("ids", [])}
    assert {bad_id, kind_id, replay_id, good_id} <= acked
    assert not {bad_id, kind_id, replay_id} & tap.seen_ids()

    # History says the same after a reload, although the page reads the
    # replay first (it is the list's last message): the lower seq is the original.
    alice.page.reload()
    alice.expect_online()
    alice.open(bob.name)
    expect(alice.undecryptable(alice.message_by_id(replay_id))).to_have_text(
        "couldn't decrypt: replayed"
    )
    expect(alice.message(secret["good"])).to_have_attribute("data-id", good_id)
    expect(alice.undecryptable(alice.message_by_id(bad_id))).to_have_text(
        "couldn't decrypt: bad signature"
    )
    expect(alice.undecryptable(alice.message_by_id(kind_id))).to_have_text(
        "couldn't decrypt: wrong kind"
    )
    page = alice.page.content()
    assert secret["sig"] not in page and secret["kind"] not in page
    alice.round_trip()  # a `seen` the reloaded page reported has passed the tap by now
    assert not {bad_id, kind_id, replay_id} & tap.seen_ids()


# -- (g) nothing readable at the server ------------------------------------------------------


def test_the_server_stores_no_plaintext_of_an_end_to_end_message(user, web_server):
    alice, bob = e2e_dm(user)
    carol = user("carol")
    carol.register()
    secret, edited, plain = canary("e2e-canary"), canary("e2e-edit-canary"), canary("plain-canary")
    alice.send(secret)
    expect_sealed(bob, secret)
    mid = alice.message_id(secret)
    alice.send("will be edited")
    expect_sealed(bob, "will be edited")
    edit_id = alice.message_id("will be edited")
    alice.edit("will be edited", edited)
    expect_sealed(bob, edited)
    # The control: a plain conversation, which the server can read.
    alice.start_dm(carol.name)
    alice.send(plain)
    carol.open(alice.name)
    expect(carol.message(plain)).to_be_visible()
    expect(carol.message(plain)).not_to_have_attribute("data-e2e", "true")

    data_dir: Path = web_server.data_dir
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "chatd.sqlite3" for p in files)
    for path in files:  # the database, its WAL, the logs: not a byte of it
        raw = path.read_bytes()
        for text in (secret, edited):
            assert text.encode() not in raw, path
            assert text.encode("utf-16-le") not in raw, path
    # Open every stored body with the server's own keyring: the plain canary
    # is there (the positive control), the end-to-end ones are not: only
    # their sealed `e2e` objects.
    opened = Scanner.from_key_file(data_dir / "keys.json").sqlite_bodies(data_dir / "chatd.sqlite3")
    assert any(plain in text for text in opened.values())
    for text in opened.values():
        assert secret not in text and edited not in text
    for id in (mid, edit_id):
        assert opened[id].startswith("\x00e2e:")
        stored = json.loads(opened[id][len("\x00e2e:") :])
        assert set(stored) == {"v", "device", "epoch", "iv", "ct", "sig"}
    # And the history API hands out the same sealed objects, no body.
    history = bob.page.evaluate(
        """async (conv) => (await fetch(`/api/conversations/${conv}/messages`,
             { headers: { Authorization: `Bearer ${window.chatd.token}` } })).json()""",
        bob.page.evaluate("window.chatd.openId"),
    )["messages"]
    sealed = [m for m in history if m["id"] in (mid, edit_id)]
    assert len(sealed) == 2 and all("e2e" in m and "body" not in m for m in sealed)


# -- (h) the outbox: sealed again, same cid ---------------------------------------------------


def test_a_refused_send_is_sealed_again_under_a_new_epoch_with_the_same_cid(user, web_server):
    """The server answers `e2e_stale` when an epoch's shares miss a device
    (alice's page never heard of bob's new one: its `devices` frames are
    swallowed here) and `e2e_required` when a plain body comes after the
    switch (bob's page missed it). Each time the page seals the message
    again and resends it with the same cid: stored once, read everywhere."""
    alice, bob = e2e_dm(user)
    alice.send("switched")
    expect_sealed(bob, "switched")
    tap = Tap(drop=lambda f: f.get("type") == "devices")
    alice.context.route_web_socket(WS, tap)
    alice.page.reload()
    alice.expect_online()
    alice.open(bob.name)
    alice.page.wait_for_function(f"() => window.chatd.e2e.cachedDevices('{bob.name}')")
    forger = Forger(web_server, bob.name, alice.name)
    forger.setup(share=False)  # bob's new (Python) device: alice's page does not know it

    text = canary("resealed")
    alice.send(text)
    expect_sealed(bob, text)
    [stale] = [f for f in tap.received("error") if f.get("reason") == "e2e_stale"]
    assert forger.device.device in stale["missing"]
    tries = [f for f in tap.sent("send") if f["cid"] == stale["cid"]]
    assert len(tries) == 2 and tries[0]["e2e"]["epoch"] != tries[1]["e2e"]["epoch"]
    assert tap.received("sent")[-1]["cid"] == stale["cid"]
    alice.expect_status(text, "seen")
    expect(alice.message(text)).to_have_count(1)
    expect(alice.tid("message-failed")).to_have_count(0)
    # The new epoch went to the device alice's page had not heard of: the
    # Python implementation reads the browser's message.
    assert forger.read(alice.message_id(text)) == text

    # e2e_required: carol's page does not hear of the switch (its sealed
    # message frames are swallowed), so it sends a plain body; the server
    # refuses it and the page sends it again, sealed, same cid.
    carol = user("carol")
    carol_tap = Tap(drop=lambda f: f.get("type") == "message" and "e2e" in f)
    carol.context.route_web_socket(WS, carol_tap)
    carol.register()
    carol.expect_device()
    alice.start_dm(carol.name)
    alice.send("plain first")
    carol.open(alice.name)
    expect(carol.message("plain first")).to_be_visible()
    alice.turn_on_e2e()
    alice.send("sealed, unheard of")
    wait_until(
        carol, lambda: any("e2e" in f for f in carol_tap.received("message")), "the swallowed frame"
    )
    late = canary("late")
    carol.send(late)
    expect_sealed(alice, late)
    [required] = [f for f in carol_tap.received("error") if f.get("reason") == "e2e_required"]
    tries = [f for f in carol_tap.sent("send") if f["cid"] == required["cid"]]
    assert [("body" in f, "e2e" in f) for f in tries] == [(True, False), (False, True)]
    expect_sealed(carol, late)
    expect(carol.tid("chat-lock")).to_be_visible()
    expect(alice.message(late)).to_have_count(1)
    expect(carol.tid("message-failed")).to_have_count(0)


def test_epochs_rotate_on_count_age_members_and_devices(user):
    """A new epoch (key and shares) after 100 messages, after 7 days, when
    the group's members change and when someone's devices change; none
    otherwise. Read off the `send` frames; the count and age are moved on
    in the page's own epoch record."""
    alice, bob, carol = user("alice"), user("bob"), user("carol")
    tap = Tap()
    alice.context.route_web_socket(WS, tap)
    for chat in (alice, bob, carol):
        chat.register()
        chat.expect_device()
    alice.tid("new-group").click()
    alice.tid("new-group-title").fill("Rotating")
    alice.tid("new-group-members").fill(bob.name)
    alice.tid("new-group-e2e").check()
    alice.tid("new-group-submit").click()
    expect(alice.tid("chat-title")).to_have_text("Rotating")
    alice.send("zero")  # bob's list learns of the group from its first message
    bob.open("Rotating")
    expect_sealed(bob, "zero")

    def send(text: str) -> str:
        """Send, wait until bob reads it; the epoch it went under."""
        alice.send(text)
        expect_sealed(bob, text)
        frames = [f for f in tap.sent("send") if "e2e" in f]
        return frames[-1]["e2e"]["epoch"]

    def tamper(js: str) -> None:
        alice.page.evaluate(
            f"""async () => {{ const app = window.chatd;
                const ep = await app.e2e.loadCurrent(app.openId); {js} }}"""
        )

    first = send("one")
    assert send("two") == first  # the control: nothing changed
    tamper("ep.count = 100;")
    by_count = send("after 100")
    assert by_count != first
    tamper(f"ep.created = Date.now() - {8 * 24 * 3600 * 1000};")
    by_age = send("after a week")
    assert by_age != by_count

    panel = alice.open_group_info()
    panel.get_by_test_id("group-add-input").fill(carol.name)
    panel.get_by_test_id("group-add-submit").click()
    expect(alice.member(carol.name)).to_be_visible()
    alice.close_group_info()
    by_members = send("carol joined")
    assert by_members != by_age
    carol.open("Rotating")
    expect_sealed(carol, "carol joined")

    tablet = another_device(user, bob, "tablet")
    alice.page.wait_for_function(
        f"""() => (window.chatd.e2e.cachedDevices('{bob.name}') || [])
                 .filter((d) => d.removed_ts == null).length === 2"""
    )
    by_devices = send("bob has a tablet")
    assert by_devices != by_members
    tablet.open("Rotating")
    expect_sealed(tablet, "bob has a tablet")
    assert not [f for f in tap.received("error") if f.get("reason") == "e2e_stale"]


# -- the device itself: one per profile, kept at logout, removable --------------------------------


def devices_in_db(chat: ChatPage) -> list[str]:
    """The device ids in the profile's IndexedDB."""
    return chat.page.evaluate(
        """() => new Promise((resolve, reject) => {
            const req = indexedDB.open('chatd-e2e');
            req.onerror = () => reject(req.error);
            req.onsuccess = () => {
                const all = req.result.transaction('devices').objectStore('devices').getAll();
                all.onsuccess = () => resolve(all.result.map((d) => d.device));
            };
        })"""
    )


def test_one_device_per_profile_kept_at_logout_and_removed_on_request(user):
    alice, bob = e2e_dm(user)
    alice.send("before the removal")
    expect_sealed(bob, "before the removal")
    device = alice.expect_device()
    assert devices_in_db(alice) == [device]
    # The keys are not extractable: IndexedDB holds the CryptoKey objects.
    extractable = alice.page.evaluate(
        """() => { const d = window.chatd.e2e.device;
                   return [d.sign.privateKey.extractable, d.dh.privateKey.extractable]; }"""
    )
    assert extractable == [False, False]

    # A second tab of the same profile is the same device, and reads what the
    # first one sends (its own epoch key is in the shared IndexedDB).
    first_tab = alice.page
    second_tab = alice.new_page()
    alice.login()  # a tab has its own session (sessionStorage)
    assert alice.expect_device() == device
    alice.open(bob.name)
    alice.page = first_tab
    from_first = canary("from-the-first-tab")
    alice.send(from_first)
    alice.page = second_tab
    expect_sealed(alice, from_first)
    second_tab.close()
    alice.page = first_tab

    # Logging out keeps the keys: logging in again is the same device.
    alice.tid("logout").click()
    expect(alice.tid("login-view")).to_be_visible()
    assert devices_in_db(alice) == [device]
    alice.login()
    assert alice.expect_device() == device
    alice.open(bob.name)
    expect_sealed(alice, "before the removal")

    bob.open_e2e_panel()
    number = bob.safety_number(alice.name).inner_text()
    # "Remove this device": asked first; deleted here, tombstoned on the server, logged out.
    alice.open_e2e_panel()
    alice.tid("e2e-remove-device").click()
    expect(alice.tid("confirm-title")).to_have_text("Remove this device?")
    alice.confirm()
    expect(alice.tid("login-view")).to_be_visible()
    assert devices_in_db(alice) == []
    expect(bob.e2e_member(alice.name).locator(f'[data-device="{device}"]')).to_have_count(0)
    expect(bob.safety_number(alice.name)).not_to_have_text(number)
    bob.close_e2e_panel()

    # The next login is a new device: it cannot read what came before it.
    alice.login()
    fresh = alice.expect_device()
    assert fresh != device and devices_in_db(alice) == [fresh]
    alice.open(bob.name)
    old = alice.message_by_id(bob.message_id("before the removal"))
    expect(alice.undecryptable(old)).to_have_text("sent before this device was added")
    bob.send("to the new device")
    expect_sealed(alice, "to the new device")


def test_the_replay_guard_keeps_the_earliest_message_whatever_the_reading_order(user):
    """js/e2e.js alone: of the messages carrying one (device, epoch, iv), the
    one with the lowest seq is the original, whichever is read first; and
    what a placeholder says."""
    page = user("alice").goto().page
    result = page.evaluate(
        """async () => {
            const m = await import('/js/e2e.js');
            const verdict = (fn) => { try { return fn() ?? 'ok'; } catch (e) { return e.reason; } };
            const g = new m.OrderedReplayGuard();
            const iv = 'AAAAAAAAAAAAAAAA';
            const iv2 = 'AAAAAAAAAAAAAAAB';
            return {
                later: verdict(() => g.check('device01', 'epoch001', iv, 'B', 9)),
                again: verdict(() => g.check('device01', 'epoch001', iv, 'B', 9)),
                earlier: verdict(() => g.check('device01', 'epoch001', iv, 'A', 4)),
                laterNow: verdict(() => g.check('device01', 'epoch001', iv, 'B', 9)),
                third: verdict(() => g.check('device01', 'epoch001', iv, 'C', 12)),
                padded: verdict(() => g.check('device01', 'epoch001', iv + '==', 'D', 13)),
                otherIv: verdict(() => g.check('device01', 'epoch001', iv2, 'E', 14)),
                texts: [
                    m.placeholderText({ reason: 'bad signature' }),
                    m.placeholderText({ reason: 'no key for this device', before: true }),
                ],
            };
        }"""
    )
    assert result == {
        "later": "ok",
        "again": "ok",
        "earlier": "B",  # A is the original: B's verdict is taken back
        "laterNow": "replayed",
        "third": "replayed",
        "padded": "replayed",
        "otherIv": "ok",
        "texts": ["couldn't decrypt: bad signature", "sent before this device was added"],
    }
