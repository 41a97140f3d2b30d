"""The web client through NGINX with two replicas sharing a real Redis: the
page is served by NGINX, its WebSocket goes through NGINX's /ws, and the two
users sit on different replicas."""

from __future__ import annotations

import pytest
from chatpage import DESKTOP, SKIP_REASON, ChatPage

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from playwright.sync_api import expect

from harness.cluster import Cluster
from harness.nginx import requires_nginx

pytestmark = [
    pytest.mark.e2e,
    requires_nginx(),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("web-cluster"), replicas=2).start()
    yield c
    assert c.close() == [0, 0], c.logs()


def node_of(cluster: Cluster, user: str) -> set[str]:
    """Which replicas hold the user's sockets, as the Redis presence registry says."""
    incarnations = cluster.redis.command("HVALS", f"chatd:{{u:{user}}}:conns") or []
    return {inc.split("#", 1)[0] for inc in incarnations}


def test_chat_across_replicas_through_nginx(browser, cluster, names):
    pages: list[ChatPage] = []
    try:
        alice = ChatPage(browser.new_context(viewport=DESKTOP), cluster.url, names("alice"))
        bob = ChatPage(browser.new_context(viewport=DESKTOP), cluster.url, names("bob"))
        pages += [alice, bob]
        alice.register()
        bob.register()
        # NGINX balances by open connections, so bob normally lands on the other
        # replica; reload until he does (each reload is a new socket).
        for _ in range(6):
            if node_of(cluster, alice.name) != node_of(cluster, bob.name):
                break
            bob.page.reload()
            bob.expect_online()
        a_nodes, b_nodes = node_of(cluster, alice.name), node_of(cluster, bob.name)
        assert len(a_nodes) == len(b_nodes) == 1 and a_nodes != b_nodes, (a_nodes, b_nodes)

        alice.start_dm(bob.name)
        alice.send("hello from the other replica")
        alice.expect_status("hello from the other replica", "delivered")
        bob.open(alice.name)
        expect(bob.message("hello from the other replica")).to_be_visible()
        alice.expect_status("hello from the other replica", "seen")
        bob.send("and back")
        expect(alice.message("and back")).to_be_visible()
        bob.expect_status("and back", "seen")
        assert not [e for p in pages for e in p.errors]
    finally:
        for p in pages:
            p.context.close()
