"""Helpers for the browser tests: where Chromium is, and a page object per user.

Importable without Playwright or Chromium installed: ``SKIP_REASON`` then
says why the browser tests cannot run, and the test modules skip.
"""

from __future__ import annotations

import re
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
try:
    from playwright.sync_api import BrowserContext, Locator, Page, expect
except ImportError:  # pragma: no cover - depends on the machine
    expect = None

if not CHROMIUM.exists():
    SKIP_REASON: str | None = (
        f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    )
elif expect is None:
    SKIP_REASON = "browser tests need the playwright package (pip install -e .[test])"
else:
    SKIP_REASON = None
    expect.set_options(timeout=8_000)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "correct horse battery"
DESKTOP = {"width": 1100, "height": 760}
PHONE = {"width": 390, "height": 780}


#: In the page: nothing of its own under way (no render queued, no acks or
#: ``seen`` waiting for their 30 ms batch).
_IDLE = "() => !!window.chatd && !window.chatd.renderQueued && !window.chatd.flushTimer"
#: In the page: a ``ping`` on its socket, resolved once the ``pong`` has been
#: dispatched, that is after every frame that came before it.
_PING = """() => new Promise((resolve, reject) => {
    const conn = window.chatd && window.chatd.conn;
    const ws = conn && conn.ready && conn.ws;
    if (!ws) {
        reject(new Error('the page is not connected'));
        return;
    }
    const onMessage = (ev) => {
        let frame = null;
        try {
            frame = JSON.parse(ev.data);
        } catch {
            return;
        }
        if (!frame || frame.type !== 'pong') return;
        ws.removeEventListener('message', onMessage);
        resolve();
    };
    ws.addEventListener('message', onMessage);
    conn.send({ type: 'ping' });
})"""


def exact(text: str) -> re.Pattern[str]:
    return re.compile(f"^{re.escape(text)}$")


def settle(*chats: ChatPage) -> None:
    """:meth:`ChatPage.round_trip` of each, in order: after ``settle(bob,
    alice)`` what bob's page did has been handled and alice's page shows
    whatever it caused. The barrier before asserting that something did not
    happen (instead of waiting a while)."""
    for chat in chats:
        chat.round_trip()


class ChatPage:
    """One user in one browser context, driven through the UI by data-testid."""

    def __init__(self, context: BrowserContext, base_url: str, name: str) -> None:
        self.context = context
        self.base_url = base_url
        self.name = name
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page = self.new_page()

    def new_page(self) -> Page:
        page = self.context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{self.name}: {exc}"))
        # Chromium reports every Content-Security-Policy violation on the console.
        page.on(
            "console",
            lambda msg: (
                "Content Security Policy" in msg.text
                and self.errors.append(f"{self.name}: CSP: {msg.text}")
            ),
        )
        page.on("dialog", self._dialog)
        self.page = page
        return page

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def tid(self, testid: str) -> Locator:
        return self.page.get_by_test_id(testid)

    # -- barriers (to assert that something did not happen) ----------------------

    def idle(self) -> None:
        """Wait until the page has nothing of its own under way: no render
        queued, no acks or ``seen`` waiting for their batch."""
        self.page.wait_for_function(_IDLE)

    def round_trip(self) -> None:
        """Once the page is idle, a ``ping``/``pong`` on its socket, then idle
        again. chatd handles a socket's frames in order and answers each after
        the writes of the frames before it, and hands what it routes to a
        socket of its own at once: by the end every frame the page sent
        before has been handled, and every frame routed to it before has
        arrived and been drawn. One server only: across replicas, wait for a
        later frame that comes the same way instead."""
        self.idle()
        self.page.evaluate(_PING)
        self.idle()

    # -- session ---------------------------------------------------------------

    def goto(self) -> ChatPage:
        self.page.goto(self.base_url + "/")
        return self

    def _credentials(self, password: str) -> None:
        expect(self.tid("login-view")).to_be_visible()
        self.tid("login-username").fill(self.name)
        self.tid("login-password").fill(password)

    def register(self, password: str = PASSWORD) -> ChatPage:
        self.goto()
        self._credentials(password)
        self.tid("register-submit").click()
        return self.expect_online()

    def login(self, password: str = PASSWORD) -> ChatPage:
        self.goto()
        self._credentials(password)
        self.tid("login-submit").click()
        return self.expect_online()

    def expect_online(self) -> ChatPage:
        expect(self.tid("app-view")).to_be_visible()
        expect(self.tid("me")).to_have_text(self.name)
        expect(self.tid("conn-status")).to_have_attribute("data-state", "ready")
        return self

    # -- conversations ---------------------------------------------------------

    def conv(self, title: str) -> Locator:
        return self.tid("conv-item").filter(
            has=self.page.get_by_test_id("conv-title").filter(has_text=exact(title))
        )

    def start_dm(self, peer: str) -> None:
        self.tid("new-chat").click()
        self.tid("new-chat-username").fill(peer)
        self.tid("new-chat-submit").click()
        expect(self.tid("chat-title")).to_have_text(peer)

    def open(self, title: str) -> None:
        self.conv(title).click()
        expect(self.tid("chat-title")).to_have_text(title)

    def create_group(self, title: str, members: list[str]) -> None:
        self.tid("new-group").click()
        self.tid("new-group-title").fill(title)
        self.tid("new-group-members").fill(", ".join(members))
        self.tid("new-group-submit").click()
        expect(self.tid("chat-title")).to_have_text(title)

    # -- messages --------------------------------------------------------------

    def send(self, text: str) -> None:
        box = self.tid("composer-input")
        box.fill(text)
        box.press("Enter")
        expect(box).to_have_value("")

    def messages(self) -> Locator:
        return self.tid("message")

    def message(self, text: str) -> Locator:
        return self.messages().filter(
            has=self.page.get_by_test_id("message-body").filter(has_text=exact(text))
        )

    def expect_status(self, text: str, status: str) -> None:
        expect(self.message(text)).to_have_attribute("data-status", status)
        expect(self.message(text).get_by_test_id("tick")).to_have_attribute("data-status", status)

    def bodies(self) -> list[str]:
        return self.tid("message-body").all_inner_texts()

    def message_by_id(self, id: str) -> Locator:
        """A message by its server id: still found once it is a tombstone."""
        return self.page.locator(f'[data-testid=message][data-id="{id}"]')

    def message_id(self, text: str) -> str:
        expect(self.message(text)).to_have_attribute("data-id", re.compile(r"^\w+$"))
        return self.message(text).get_attribute("data-id") or ""

    # -- replies, reactions, edits, deletions ------------------------------------

    def action(self, message: Locator, name: str) -> None:
        """Click one of a message's actions (reply, react, edit, delete)."""
        message.hover()
        message.get_by_test_id(f"message-{name}").click()

    def reply(self, text: str, answer: str) -> None:
        self.action(self.message(text), "reply")
        expect(self.tid("compose-context")).to_have_attribute("data-mode", "reply")
        self.send(answer)
        expect(self.tid("compose-context")).to_be_hidden()

    def react(self, message: Locator, emoji: str) -> None:
        """Pick ``emoji`` from the message's reaction palette."""
        self.action(message, "react")
        message.locator(f'[data-testid=react-option][data-emoji="{emoji}"]').click()
        expect(message.get_by_test_id("reaction-palette")).to_have_count(0)

    def reaction(self, message: Locator, emoji: str) -> Locator:
        """The chip of ``emoji`` under a message."""
        return message.locator(f'[data-testid=reaction][data-emoji="{emoji}"]')

    def expect_reaction(self, message: Locator, emoji: str, count: int, mine: bool) -> None:
        chip = self.reaction(message, emoji)
        expect(chip.get_by_test_id("reaction-count")).to_have_text(str(count))
        expect(chip).to_have_attribute("aria-pressed", "true" if mine else "false")

    def edit(self, text: str, new_text: str) -> None:
        self.action(self.message(text), "edit")
        box = self.tid("composer-input")
        expect(self.tid("compose-context")).to_have_attribute("data-mode", "edit")
        expect(box).to_have_value(text)
        box.fill(new_text)
        box.press("Enter")
        expect(self.tid("compose-context")).to_be_hidden()

    def delete(self, message: Locator) -> None:
        self.action(message, "delete")
        self.confirm()

    # -- groups that change --------------------------------------------------------

    def note(self, text: str) -> Locator:
        """A system line about a group change in the open chat ("alice added dave")."""
        return self.tid("system-note").filter(has_text=exact(text))

    def open_group_info(self) -> Locator:
        self.tid("group-info").click()
        expect(self.tid("group-panel")).to_be_visible()
        return self.tid("group-panel")

    def close_group_info(self) -> None:
        self.tid("group-panel-close").click()
        expect(self.tid("group-panel")).to_be_hidden()

    def member(self, name: str) -> Locator:
        """A member's row in the group info panel."""
        return self.page.locator(f'[data-testid=group-member][data-name="{name}"]')

    def confirm(self) -> None:
        """Say yes in the page's own confirm dialog (a deletion, a removal, leaving)."""
        expect(self.tid("confirm-dialog")).to_be_visible()
        self.tid("confirm-ok").click()
        expect(self.tid("confirm-dialog")).to_be_hidden()

    # -- end-to-end --------------------------------------------------------------

    def expect_device(self) -> str:
        """Wait until this profile's end-to-end device is registered; its id."""
        self.page.wait_for_function("() => window.chatd && window.chatd.e2e.ready")
        return self.page.evaluate("window.chatd.e2e.deviceId")

    def open_e2e_panel(self) -> Locator:
        """The encryption panel of the open chat, once its device lists are in."""
        self.tid("e2e-info").click()
        expect(self.tid("e2e-panel")).to_be_visible()
        expect(self.tid("e2e-loading")).to_have_count(0)
        return self.tid("e2e-panel")

    def close_e2e_panel(self) -> None:
        self.tid("e2e-panel-close").click()
        expect(self.tid("e2e-panel")).to_be_hidden()

    def turn_on_e2e(self) -> None:
        """Switch the open one-to-one chat to end-to-end, from its panel."""
        self.open_e2e_panel()
        self.tid("e2e-enable").click()
        expect(self.tid("confirm-title")).to_have_text("Turn on end-to-end encryption?")
        self.confirm()
        expect(self.tid("e2e-enable")).to_be_hidden()
        expect(self.tid("e2e-status")).to_have_attribute("data-state", "on")
        self.close_e2e_panel()
        expect(self.tid("chat-lock")).to_be_visible()

    def safety_number(self, user: str) -> Locator:
        """The safety number with ``user`` in the open encryption panel."""
        return self.page.locator(f'[data-testid=safety-number][data-user="{user}"]')

    def e2e_member(self, user: str) -> Locator:
        """A member's section of the encryption panel."""
        return self.page.locator(f'[data-testid=e2e-member][data-name="{user}"]')

    def undecryptable(self, message: Locator) -> Locator:
        """The placeholder a message shows instead of text it could not verify."""
        return message.get_by_test_id("message-undecryptable")

    # -- attention ---------------------------------------------------------------

    def set_focus(self, focused: bool) -> None:
        """Pretend the window lost (or got back) the focus: headless pages always have it."""
        self.page.evaluate(
            """(focused) => {
                document.hasFocus = () => focused;
                window.dispatchEvent(new Event(focused ? 'focus' : 'blur'));
            }""",
            focused,
        )
