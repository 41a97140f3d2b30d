"""Browser tests of the web client: real headless Chromium, real `chatd serve`.

Each test opens one browser context per user (separate sessionStorage and
sockets, like separate devices) in one shared Chromium, against one shared
server; usernames are unique per test (the ``names`` fixture). The helpers
are in ``chatpage.py``; without Chromium or Playwright the tests skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from chatpage import CHROMIUM, CHROMIUM_ARGS, DESKTOP, SKIP_REASON, ChatPage

from harness.procs import ChatdProcess


@pytest.fixture(scope="session")
def web_server(tmp_path_factory) -> Iterator[ChatdProcess]:
    proc = ChatdProcess(tmp_path_factory.mktemp("chatd-web")).start()
    yield proc
    code = proc.stop()
    assert code == 0, proc.logs()[-4000:]


@pytest.fixture(scope="session")
def browser() -> Iterator:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def user(browser, web_server, names) -> Iterator[Callable[..., ChatPage]]:
    """``user("alice")`` → a ChatPage in a fresh context, not yet logged in."""
    made: list[ChatPage] = []

    def make(prefix: str, viewport: dict | None = None) -> ChatPage:
        context = browser.new_context(viewport=viewport or DESKTOP)
        chat = ChatPage(context, web_server.http_url, names(prefix))
        made.append(chat)
        return chat

    yield make
    errors = [e for c in made for e in c.errors]
    dialogs = [d for c in made for d in c.dialogs]
    for chat in made:
        chat.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
    assert not dialogs, f"unexpected dialogs: {dialogs}"
