"""The web client when things go wrong: lost frames, dropped sockets, errors, bad tokens.

A ``WsTap`` sits between the page and chatd (Playwright's WebSocket routing):
it passes frames through, and on request swallows some, injects others or
cuts the connection, so each failure happens exactly when the test wants.
"""

import json
import re

import pytest
from chatpage import SKIP_REASON

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from playwright.sync_api import WebSocketRoute, expect

pytestmark = [pytest.mark.e2e]

WS = re.compile(r"/ws$")


class WsTap:
    def __init__(self) -> None:
        self.urls: list[str] = []
        self.routes: list[tuple[WebSocketRoute, WebSocketRoute]] = []  # (page side, server side)
        self.from_page: list[dict] = []
        self.from_server: list[dict] = []
        self.swallow_sends = False  # page → server `send` frames vanish
        self.swallow_sent = False  # server → page `sent` frames vanish
        self.refuse = False  # new connections are closed at once

    def __call__(self, ws: WebSocketRoute) -> None:
        self.urls.append(ws.url)
        if self.refuse:
            ws.close(code=1013, reason="try again later")
            return
        server = ws.connect_to_server()
        self.routes.append((ws, server))

        def page_to_server(message: str | bytes) -> None:
            frame = json.loads(message)
            self.from_page.append(frame)
            if frame.get("type") == "send" and self.swallow_sends:
                return
            server.send(message)

        def server_to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            self.from_server.append(frame)
            if self.swallow_sent and frame.get("type") == "sent":
                return
            ws.send(message)

        ws.on_message(page_to_server)
        server.on_message(server_to_page)

    def inject(self, frame: dict) -> None:
        """A frame 'from the server' on the current connection."""
        self.routes[-1][0].send(json.dumps(frame))

    def cut(self) -> None:
        """Drop the current connection, as a network failure would."""
        page_side, server_side = self.routes[-1]
        page_side.close(code=1012, reason="cut by the test")
        server_side.close()

    def sends(self, body: str) -> list[dict]:
        return [f for f in self.from_page if f.get("type") == "send" and f.get("body") == body]


def strip_cids(route) -> None:
    """Answer the list and history as a server that names no cids would."""
    response = route.fetch()
    data = response.json()
    for conv in data.get("conversations", []):
        if conv.get("last_message"):
            conv["last_message"].pop("cid", None)
    for message in data.get("messages", []):
        message.pop("cid", None)
    route.fulfill(response=response, json=data)


def tapped(chat) -> WsTap:
    tap = WsTap()
    chat.page.route_web_socket(WS, tap)
    return tap


def test_page_from_chatd_connects_to_its_ws_port(user, web_server):
    alice = user("alice")
    tap = tapped(alice)
    alice.register()
    assert tap.urls == [f"ws://127.0.0.1:{web_server.ws_port}/ws"]
    assert tap.from_page[0]["type"] == "auth"


def test_the_page_runs_under_its_content_security_policy(user, web_server):
    """chatd serves the page with a CSP that allows only its own scripts,
    styles and WebSocket; the client works under it (every web test fails on
    a CSP violation Chromium reports), and the policy does bite: an injected
    inline script is refused."""
    alice = user("alice")
    response = alice.page.goto(web_server.http_url + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert f"connect-src 'self' ws://127.0.0.1:{web_server.ws_port}" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    bob = user("bob").register()
    alice.register()
    alice.start_dm(bob.name)
    alice.send("hello under the CSP")
    alice.expect_status("hello under the CSP", "delivered")
    assert alice.errors == [] and bob.errors == []
    # The positive control: an inline script never runs, and the console says why.
    alice.page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.__inline = 1'; document.body.append(s); }"
    )
    for _ in range(50):
        if alice.errors:
            break
        alice.page.wait_for_timeout(50)
    assert alice.page.evaluate("() => window.__inline") is None
    assert alice.errors and "CSP" in alice.errors[0]
    alice.errors.clear()


def test_ws_url_resolution(user):
    alice = user("alice")
    alice.goto()
    cases = alice.page.evaluate(
        """async () => {
            const { resolveWsUrl } = await import('/js/wsurl.js');
            const loc = (href) => new URL(href);
            const info = (extra) => ({
                http_port: 8080, ws_port: 8081, ws_path: '/ws', ws_url: null, ...extra,
            });
            return {
                direct: resolveWsUrl(info(), loc('http://chat.example:8080/')),
                directV6: resolveWsUrl(info(), loc('http://[::1]:8080/#c=x')),
                proxied: resolveWsUrl(info(), loc('https://chat.example/app/')),
                proxiedPort: resolveWsUrl(info(), loc('http://chat.example:9000/')),
                relative: resolveWsUrl(info({ ws_url: '/ws' }), loc('https://chat.example/')),
                relativeHttp: resolveWsUrl(info({ ws_url: '/socket' }), loc('http://chat.example:8080/')),
                absoluteHttp: resolveWsUrl(info({ ws_url: 'http://rt.example:7000/ws' }), loc('https://chat.example/')),
                absoluteHttps: resolveWsUrl(info({ ws_url: 'https://rt.example/ws' }), loc('http://chat.example/')),
                absoluteWss: resolveWsUrl(info({ ws_url: 'wss://rt.example/ws' }), loc('http://chat.example/')),
                defaultPort: resolveWsUrl(info({ http_port: 443 }), loc('https://chat.example/')),
            };
        }"""
    )
    assert cases == {
        "direct": "ws://chat.example:8081/ws",
        "directV6": "ws://[::1]:8081/ws",
        "proxied": "wss://chat.example/ws",
        "proxiedPort": "ws://chat.example:9000/ws",
        "relative": "wss://chat.example/ws",
        "relativeHttp": "ws://chat.example:8080/socket",
        "absoluteHttp": "ws://rt.example:7000/ws",
        "absoluteHttps": "wss://rt.example/ws",
        "absoluteWss": "wss://rt.example/ws",
        "defaultPort": "wss://chat.example:8081/ws",
    }


def test_unsent_messages_are_retried_once_after_reconnect(user):
    alice, bob = user("alice"), user("bob")
    tap = tapped(alice)
    # Until said otherwise alice's page talks to a server that does not name
    # a message's cid in the list and history (stripped here): whenever the
    # list is fetched, it can only match a stored copy by body.
    alice.page.route("**/api/conversations**", strip_cids)
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send("warm up")
    alice.expect_status("warm up", "delivered")

    # 1. The send never reaches the server: pending (the clock) it stays.
    tap.swallow_sends = True
    alice.send("lost on the way")
    alice.expect_status("lost on the way", "pending")
    # 2. The server stores it but the `sent` answer is lost: still pending here.
    tap.swallow_sends, tap.swallow_sent = False, True
    alice.send("stored, answer lost")
    expect(bob.conv(alice.name).get_by_test_id("conv-preview")).to_have_text("stored, answer lost")
    # The stored copy reaches the page another way (the list's last message,
    # history) before any `sent`. Without its cid the page can only match it
    # by body: shown once, as the pending message.
    reload_lists = (
        "async () => { await window.chatd.loadConversations();"
        " await window.chatd.loadLatest(window.chatd.openId, { refresh: true }); }"
    )
    alice.page.evaluate(reload_lists)  # resolves once both are in the state
    alice.idle()  # and drawn
    alice.expect_status("lost on the way", "pending")
    alice.expect_status("stored, answer lost", "pending")
    expect(alice.messages()).to_have_count(3)
    # History names our cid: that settles the pending message at once (no
    # `sent` needed); the one the server never got stays pending.
    alice.page.unroute("**/api/conversations**", strip_cids)
    alice.page.evaluate(reload_lists)
    alice.expect_status("stored, answer lost", "delivered")
    alice.idle()  # that history is drawn; the same render kept the other
    alice.expect_status("lost on the way", "pending")
    expect(alice.messages()).to_have_count(3)

    # The connection drops; the client reconnects and sends the unconfirmed
    # one again, same cid (the settled one is out of the outbox).
    tap.swallow_sent = False
    tap.cut()
    alice.expect_status("lost on the way", "delivered")
    alice.expect_status("stored, answer lost", "delivered")
    assert len(tap.sends("stored, answer lost")) == 1
    assert len({f["cid"] for f in tap.sends("lost on the way")}) == 1
    assert len(tap.sends("lost on the way")) == 2
    assert len(tap.urls) == 2

    # Nothing doubled, and both sides show the server's (seq) order.
    order = ["warm up", "stored, answer lost", "lost on the way"]
    bob.open(alice.name)
    expect(bob.messages()).to_have_count(3)
    assert bob.bodies() == order
    expect(alice.messages()).to_have_count(3)
    assert alice.bodies() == order
    alice.expect_status("lost on the way", "seen")


def test_offline_outbox_and_retry_now(user):
    alice, bob = user("alice"), user("bob")
    tap = tapped(alice)
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send("before the outage")
    alice.expect_status("before the outage", "delivered")

    tap.refuse = True
    tap.cut()
    expect(alice.tid("conn-status")).to_have_attribute("data-state", "waiting")
    expect(alice.tid("conn-status")).to_contain_text("retrying in")
    alice.send("typed while offline")
    alice.expect_status("typed while offline", "pending")
    expect(alice.tid("offline-banner")).to_contain_text("1 unsent")
    # It survives a reload of the tab (the outbox lives in sessionStorage).
    alice.page.reload()
    alice.open(bob.name)
    alice.expect_status("typed while offline", "pending")

    # "Retry now" beats the backoff. Wait (still refused) until the next
    # automatic try is at least a second away, so the click, not the
    # timer, is what reconnects; then let connections through.
    retry = alice.tid("conn-retry")
    expect(alice.tid("conn-status")).to_contain_text(
        re.compile(r"retrying in (?:[2-9]|[1-9]\d)s"), timeout=15_000
    )
    expect(retry).to_be_visible()
    tap.refuse = False
    retry.click()
    alice.expect_online()
    alice.expect_status("typed while offline", "delivered")
    expect(alice.tid("offline-banner")).to_be_hidden()
    expect(bob.conv(alice.name).get_by_test_id("conv-unread")).to_have_text("2")
    bob.open(alice.name)
    assert bob.bodies() == ["before the outage", "typed while offline"]


def test_send_error_marks_message_failed_with_retry(user, names):
    alice = user("alice")
    alice.register()
    ghost = names("ghost")
    alice.start_dm(ghost)
    alice.send("anyone home?")
    failed = alice.message("anyone home?")
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed.get_by_test_id("message-failed")).to_contain_text(f"no user '{ghost}'")
    expect(alice.page.locator("[data-testid=toast][data-code=not_found]")).to_be_visible()

    failed.get_by_test_id("message-retry").click()
    expect(failed).to_have_attribute("data-status", "failed")  # still nobody there
    failed.get_by_test_id("message-discard").click()
    expect(alice.messages()).to_have_count(0)

    # Over the body limit: refused before sending, with the reason.
    alice.tid("composer-input").fill("x" * 4001)
    alice.tid("composer-input").press("Enter")
    expect(alice.tid("composer-note")).to_contain_text("Too long")
    expect(alice.messages()).to_have_count(0)


def test_every_error_code_is_shown(user):
    alice, bob = user("alice"), user("bob")
    tap = tapped(alice)
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send("hello")
    alice.expect_status("hello", "delivered")

    titles = {
        "bad_request": "Request refused",
        "unauthorized": "Not signed in",
        "forbidden": "Not allowed",
        "not_found": "Not found",
        "too_large": "Too large",
        "rate_limited": "Slow down",
        "unavailable": "Service unavailable",
        "internal": "Server error",
    }
    for code, title in titles.items():
        tap.inject({"type": "error", "code": code, "message": f"test {code}"})
        toast = alice.page.locator(f"[data-testid=toast][data-code={code}]")
        expect(toast).to_be_visible()
        expect(toast).to_contain_text(title)
        expect(toast).to_contain_text(f"test {code}")
    expect(alice.tid("conn-status")).to_have_attribute("data-state", "ready")

    # An error naming a cid fails that message, visibly, with a retry that works.
    tap.swallow_sends = True
    alice.send("too fast?")
    alice.expect_status("too fast?", "pending")
    [frame] = tap.sends("too fast?")
    tap.inject(
        {"type": "error", "code": "rate_limited", "message": "slow down", "cid": frame["cid"]}
    )
    alice.expect_status("too fast?", "failed")
    tap.swallow_sends = False
    alice.message("too fast?").get_by_test_id("message-retry").click()
    alice.expect_status("too fast?", "delivered")
    assert {f["cid"] for f in tap.sends("too fast?")} == {frame["cid"]}


def test_bad_token_closes_4001_and_returns_to_login(user):
    alice = user("alice")
    alice.register()
    alice.page.evaluate(
        """() => {
            const s = JSON.parse(sessionStorage.getItem('chatd.session'));
            s.token = 'not-a-real-token';
            sessionStorage.setItem('chatd.session', JSON.stringify(s));
        }"""
    )
    alice.page.reload()
    expect(alice.tid("login-view")).to_be_visible()
    expect(alice.tid("login-error")).to_contain_text("log in again")
    expect(alice.tid("login-username")).to_have_value(alice.name)
    assert alice.page.evaluate("sessionStorage.getItem('chatd.session')") is None
    alice.login()


@pytest.fixture(scope="module")
def short_token_server(tmp_path_factory):
    """Access tokens that live 10 s (the shortest chatd allows)."""
    from harness.procs import ChatdProcess

    proc = ChatdProcess(tmp_path_factory.mktemp("short-tokens"), args=["--token-ttl", "10"]).start()
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


def test_an_expired_token_is_refreshed_without_the_password(browser, short_token_server, names):
    """The server closes the socket when the access token expires (4001);
    the client trades its refresh token for a new one and carries on: no
    login form, messages still flow, the token in the session is new."""
    from chatpage import DESKTOP, ChatPage

    pages = []
    try:
        alice = ChatPage(
            browser.new_context(viewport=DESKTOP), short_token_server.http_url, names("alice")
        )
        bob = ChatPage(
            browser.new_context(viewport=DESKTOP), short_token_server.http_url, names("bob")
        )
        pages += [alice, bob]
        bob.register()
        alice.register()
        session = "JSON.parse(sessionStorage.getItem('chatd.session'))"
        before = alice.page.evaluate(session)
        assert before["refresh"]
        # Past the 10 s token: 4001, then the refresh (as soon as it is done).
        alice.page.wait_for_function(
            f"t => {{ const s = {session}; return !!s && s.token !== t; }}",
            arg=before["token"],
            timeout=20_000,
        )
        alice.expect_online()
        after = alice.page.evaluate(session)
        assert after["token"] != before["token"] and after["refresh"] != before["refresh"]
        expect(alice.tid("login-view")).to_be_hidden()
        alice.start_dm(bob.name)
        alice.send("still here after an hour's worth")
        alice.expect_status("still here after an hour's worth", "delivered")
        assert not [e for p in pages for e in p.errors]
    finally:
        for p in pages:
            p.context.close()
