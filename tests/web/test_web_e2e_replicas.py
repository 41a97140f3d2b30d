"""The browser's half of "the server never sees plaintext" (issue 12): two
Chromium profiles on two replicas behind NGINX with a real Redis chat
end-to-end, and a scanner (``harness.canary``) looks for their
canaries in everything the server side holds or emitted: the store with
every body opened by the server's own keyring, the raw database files,
Redis keys and ``MONITOR`` (sealed envelopes opened), the replicas' and
NGINX's logs, and every WebSocket frame either page exchanged. A canary the
same pages sent before the switch (plain) is the positive control; the
Python half is tests/e2e/test_e2e_canary.py."""

from __future__ import annotations

import secrets

import pytest
from chatpage import DESKTOP, SKIP_REASON, ChatPage

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from playwright.sync_api import expect
from test_web_e2e import WS, Tap, expect_sealed

from harness.canary import Scanner, redis_monitor
from harness.cluster import Cluster
from harness.nginx import requires_nginx

pytestmark = [pytest.mark.e2e, requires_nginx()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("web-e2e"), replicas=2, nginx_access_log=True).start()
    yield c
    assert c.close() == [0, 0], c.logs()


def node_of(cluster: Cluster, user: str) -> set[str]:
    incarnations = cluster.redis.command("HVALS", f"chatd:{{u:{user}}}:conns") or []
    return {inc.split("#", 1)[0] for inc in incarnations}


def test_browser_canaries_cross_two_replicas_and_are_nowhere(browser, cluster, names, tmp_path):
    plain = "plain-" + secrets.token_hex(12)
    sealed = ["sealed-" + secrets.token_hex(12) for _ in range(2)]
    pages: list[ChatPage] = []
    taps: list[Tap] = []
    monitor = tmp_path / "monitor.log"
    try:
        with redis_monitor(cluster.redis.port, monitor):
            alice = ChatPage(browser.new_context(viewport=DESKTOP), cluster.url, names("alice"))
            bob = ChatPage(browser.new_context(viewport=DESKTOP), cluster.url, names("bob"))
            pages += [alice, bob]
            for chat in (alice, bob):
                tap = Tap()
                taps.append(tap)
                chat.context.route_web_socket(WS, tap)
                chat.register()
                chat.expect_device()
            # On different replicas (NGINX balances by open connections).
            for _ in range(6):
                if node_of(cluster, alice.name) != node_of(cluster, bob.name):
                    break
                bob.page.reload()
                bob.expect_online()
            assert node_of(cluster, alice.name) != node_of(cluster, bob.name)

            alice.start_dm(bob.name)
            alice.send(f"before the switch {plain}")
            bob.open(alice.name)
            expect(bob.message(f"before the switch {plain}")).to_be_visible()
            alice.turn_on_e2e()
            alice.send(sealed[0])
            expect_sealed(bob, sealed[0])
            bob.send(sealed[1])
            expect_sealed(alice, sealed[1])
            alice.expect_status(sealed[0], "seen")
            # History through NGINX, decrypted after a reload.
            bob.page.reload()
            bob.expect_online()
            bob.open(alice.name)
            expect_sealed(bob, sealed[0])
    finally:
        for chat in pages:
            chat.context.close()

    scan = Scanner.from_key_file(cluster.data_dir / "keys.json")
    scan.sqlite_store(cluster.data_dir / "chatd.sqlite3")
    scan.redis_keys(cluster.redis.port)
    scan.monitor_log(monitor.read_bytes())
    scan.files("chatd logs", [n.log_path for n in cluster.nodes])
    assert cluster.nginx is not None
    scan.files(
        "nginx logs", [cluster.nginx.workdir / "access.log", cluster.nginx.workdir / "error.log"]
    )
    for tap in taps:
        scan.found.add("frames", tap.everything())

    for text in sealed:
        assert scan.found.where(text) == [], text
    # The positive controls: the plain canary is seen where the server keeps
    # and sends a plain body, and the logs the scanner reads name alice.
    assert {"store (opened)", "redis (monitor, opened)", "frames"} <= set(scan.found.where(plain))
    assert {"chatd logs", "nginx logs"} <= set(scan.found.where(alice.name))
