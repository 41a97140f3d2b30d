"""Replies, reactions, edits and deletions in real Chromium, live and after a reload.

alice and bob each in their own window: every change one of them makes shows
up live on the other's screen (from the `reaction`, `edited` and `deleted`
events) and on the actor's own (from `applied`), and a reload, which rebuilds
the page from history, shows the same state.
"""

import json
import re

import pytest
from chatpage import SKIP_REASON, settle

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from playwright.sync_api import Locator, WebSocketRoute, expect

pytestmark = [pytest.mark.e2e]

WS = re.compile(r"/ws$")
ORIGINAL = "Lunch at noon?\nAt the usual place"
FIRST_LINE = "Lunch at noon?"
EDITED = "Lunch at one?"
REPLY = "Sure, see you there"
OTHER = "Bring an umbrella"


def expect_quote(message: Locator, state: str, sender: str | None, text: str) -> None:
    quote = message.get_by_test_id("message-quote")
    expect(quote).to_have_attribute("data-state", state)
    expect(quote.get_by_test_id("quote-text")).to_have_text(text)
    if sender is not None:
        expect(quote.get_by_test_id("quote-from")).to_have_text(sender)


def reload(chat, peer: str) -> None:
    chat.page.reload()
    chat.expect_online()
    chat.open(peer)


class FrameLog:
    """Passes a page's WebSocket through and keeps every frame, both ways."""

    def __init__(self) -> None:
        self.from_server: list[dict] = []
        self.from_page: list[dict] = []
        self.routes: list[WebSocketRoute] = []

    def __call__(self, ws: WebSocketRoute) -> None:
        self.routes.append(ws)
        server = ws.connect_to_server()

        def up(message: str | bytes) -> None:
            self.from_page.append(json.loads(message))
            server.send(message)

        def down(message: str | bytes) -> None:
            self.from_server.append(json.loads(message))
            ws.send(message)

        ws.on_message(up)
        server.on_message(down)

    def inject(self, frame: dict) -> None:
        """A frame 'from the server' on the newest connection."""
        self.routes[-1].send(json.dumps(frame))

    def events(self) -> list[dict]:
        kinds = {"reaction", "edited", "deleted"}
        return [f for f in self.from_server if f.get("type") in kinds]

    def acked_events(self) -> set[str]:
        return {e for f in self.from_page if f.get("type") == "ack" for e in f.get("events", [])}


def test_reply_react_edit_delete_live_and_after_reload(user):
    alice, bob = user("alice"), user("bob")
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send(ORIGINAL)
    alice.send(OTHER)
    bob.open(alice.name)
    alice.expect_status(OTHER, "seen")
    mid = alice.message_id(ORIGINAL)

    # -- reply: bob answers alice's first message; both see the quote ------------
    expect(bob.tid("message-quote")).to_have_count(0)
    bob.reply(ORIGINAL, REPLY)
    expect(alice.message(REPLY)).to_be_visible()
    expect_quote(alice.message(REPLY), "ok", "You", FIRST_LINE)
    expect_quote(bob.message(REPLY), "ok", alice.name, FIRST_LINE)
    for chat in (alice, bob):  # only the reply has a quote
        expect(chat.tid("message-quote")).to_have_count(1)
    # Clicking the quote shows the original, highlighted for a moment.
    expect(alice.message_by_id(mid)).not_to_have_class(re.compile(r"\bflash\b"))
    alice.message(REPLY).get_by_test_id("message-quote").click()
    expect(alice.message_by_id(mid)).to_have_class(re.compile(r"\bflash\b"))
    expect(alice.message(REPLY)).not_to_have_class(re.compile(r"\bflash\b"))
    expect(alice.message_by_id(mid)).not_to_have_class(re.compile(r"\bflash\b"))

    # -- reactions ----------------------------------------------------------------
    expect(bob.message_by_id(mid).get_by_test_id("reaction")).to_have_count(0)
    alice.react(alice.message_by_id(mid), "👍")
    alice.expect_reaction(alice.message_by_id(mid), "👍", 1, mine=True)
    bob.expect_reaction(bob.message_by_id(mid), "👍", 1, mine=False)
    # bob adds the same one by clicking the chip: 2, for both.
    bob.reaction(bob.message_by_id(mid), "👍").click()
    bob.expect_reaction(bob.message_by_id(mid), "👍", 2, mine=True)
    alice.expect_reaction(alice.message_by_id(mid), "👍", 2, mine=True)
    # alice takes hers back (on: false) and puts it on again.
    alice.reaction(alice.message_by_id(mid), "👍").click()
    alice.expect_reaction(alice.message_by_id(mid), "👍", 1, mine=False)
    bob.expect_reaction(bob.message_by_id(mid), "👍", 1, mine=True)
    alice.reaction(alice.message_by_id(mid), "👍").click()
    bob.expect_reaction(bob.message_by_id(mid), "👍", 2, mine=True)
    alice.expect_reaction(alice.message_by_id(mid), "👍", 2, mine=True)
    # A second emoji on another message: one chip each, nothing mixed up.
    bob.react(bob.message(OTHER), "🎉")
    alice.expect_reaction(alice.message(OTHER), "🎉", 1, mine=False)
    for chat in (alice, bob):
        expect(chat.message(OTHER).get_by_test_id("reaction")).to_have_count(1)
        expect(chat.message_by_id(mid).get_by_test_id("reaction")).to_have_count(1)

    # -- edit: alice's own message only --------------------------------------------
    expect(bob.message(REPLY).get_by_test_id("message-edit")).to_have_count(1)
    expect(bob.message(REPLY).get_by_test_id("message-delete")).to_have_count(1)
    expect(bob.message_by_id(mid).get_by_test_id("message-edit")).to_have_count(0)
    expect(bob.message_by_id(mid).get_by_test_id("message-delete")).to_have_count(0)
    expect(bob.message_by_id(mid).get_by_test_id("message-edited")).to_have_count(0)
    alice.edit(ORIGINAL, EDITED)
    for chat in (alice, bob):
        expect(chat.message_by_id(mid).get_by_test_id("message-body")).to_have_text(EDITED)
        expect(chat.message_by_id(mid).get_by_test_id("message-edited")).to_have_text("edited")
        expect(chat.message(REPLY).get_by_test_id("message-edited")).to_have_count(0)
        expect(chat.message(REPLY).get_by_test_id("quote-text")).to_have_text(EDITED)
    bob.expect_reaction(bob.message_by_id(mid), "👍", 2, mine=True)  # an edit keeps them

    def edited_state() -> None:
        for chat, me_in_quote in ((alice, "You"), (bob, alice.name)):
            expect(chat.message(REPLY)).to_be_visible()
            expect_quote(chat.message(REPLY), "ok", me_in_quote, EDITED)
            body = chat.message_by_id(mid).get_by_test_id("message-body")
            expect(body).to_have_text(EDITED)
            expect(chat.message_by_id(mid).get_by_test_id("message-edited")).to_be_visible()
            chat.expect_reaction(chat.message_by_id(mid), "👍", 2, mine=True)
            chat.expect_reaction(chat.message(OTHER), "🎉", 1, mine=chat is bob)
            expect(chat.messages()).to_have_count(3)
            # Every part is an element or text of its own: no stray "null".
            assert "null" not in chat.message(REPLY).inner_text()

    edited_state()
    reload(alice, bob.name)
    reload(bob, alice.name)
    edited_state()

    # -- delete: asked first; cancel keeps it --------------------------------------
    alice.action(alice.message_by_id(mid), "delete")
    expect(alice.tid("confirm-dialog")).to_be_visible()
    alice.tid("confirm-cancel").click()
    expect(alice.tid("confirm-dialog")).to_be_hidden()
    settle(alice, bob)  # a `delete` alice's page had sent would show on bob's
    expect(bob.message_by_id(mid).get_by_test_id("message-body")).to_have_text(EDITED)
    expect(bob.tid("message-deleted")).to_have_count(0)

    alice.delete(alice.message_by_id(mid))

    def deleted_state() -> None:
        for chat in (alice, bob):
            tomb = chat.message_by_id(mid)
            expect(tomb.get_by_test_id("message-deleted")).to_have_text("message deleted")
            expect(tomb.get_by_test_id("message-body")).to_have_count(0)
            expect(tomb.get_by_test_id("reaction")).to_have_count(0)
            expect(tomb.get_by_test_id("message-reply")).to_have_count(0)
            expect(chat.message(OTHER).get_by_test_id("message-reply")).to_have_count(1)
            expect_quote(chat.message(REPLY), "deleted", None, "message deleted")
            # The rest is untouched.
            chat.expect_reaction(chat.message(OTHER), "🎉", 1, mine=chat is bob)
            expect(chat.tid("message-deleted")).to_have_count(1)
            expect(chat.messages()).to_have_count(3)

    deleted_state()
    reload(alice, bob.name)
    reload(bob, alice.name)
    deleted_state()


def test_events_are_acked_and_reach_the_actors_other_device(user):
    alice, bob = user("alice"), user("bob")
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send("hello")
    alice.expect_status("hello", "delivered")
    # alice's second device, with the chat open.
    laptop = user("laptop")
    laptop.name = alice.name
    laptop.login()
    laptop.open(bob.name)

    bob.page.close()  # bob offline: what alice does is owed to him
    alice.react(alice.message("hello"), "❤️")
    alice.edit("hello", "hello there")
    # The copies reach alice's other device live.
    laptop.expect_reaction(laptop.message("hello there"), "❤️", 1, mine=True)
    expect(laptop.message("hello there").get_by_test_id("message-edited")).to_be_visible()

    # bob comes back: both events come in his backlog; his page acks them.
    log = FrameLog()
    bob.context.route_web_socket(WS, log)
    bob.new_page()
    bob.login()
    bob.open(alice.name)
    bob.expect_reaction(bob.message("hello there"), "❤️", 1, mine=False)
    expect(bob.message("hello there").get_by_test_id("message-edited")).to_be_visible()
    eids = {f["eid"] for f in log.events()}
    assert {f["type"] for f in log.events()} == {"reaction", "edited"}
    for _ in range(50):
        if eids <= log.acked_events():
            break
        bob.page.wait_for_timeout(50)
    assert eids <= log.acked_events()

    # Acked: the next connection's backlog has no events any more.
    seen = len(log.from_server)
    reload(bob, alice.name)
    bob.expect_reaction(bob.message("hello there"), "❤️", 1, mine=False)
    alice.react(alice.message("hello there"), "😮")  # a live one, the control
    bob.expect_reaction(bob.message("hello there"), "😮", 1, mine=False)
    assert [f["type"] for f in log.from_server[seen:] if f.get("eid")] == ["reaction"]


def test_refused_requests_show_a_toast(user):
    alice, bob = user("alice"), user("bob")
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send("mine only")
    bob.open(alice.name)
    expect(bob.message("mine only")).to_be_visible()
    # The page offers bob no edit of alice's message; asked anyway, the server refuses.
    bob.page.evaluate(
        """() => { const app = window.chatd;
                   const msg = [...app.byId.values()].find((m) => m.body === 'mine only');
                   app.request('edit', msg, { body: 'not yours' }); }"""
    )
    toast = bob.page.locator("[data-testid=toast][data-code=forbidden]")
    expect(toast).to_be_visible()
    expect(toast).to_contain_text("Not allowed")
    expect(toast).to_contain_text("only the sender may edit")
    expect(bob.message("mine only").get_by_test_id("message-edited")).to_have_count(0)
    expect(alice.message("mine only")).to_be_visible()
    assert bob.page.evaluate("window.chatd.actions.size") == 0
    # A refused edit of one's own message comes back to the composer.
    alice.page.evaluate(
        """() => { const app = window.chatd;
                   const msg = [...app.byId.values()].find((m) => m.body === 'mine only');
                   app.request('edit', msg, { body: '' }); }"""
    )
    expect(alice.page.locator("[data-testid=toast][data-code=bad_request]")).to_be_visible()
    expect(alice.tid("compose-context")).to_have_attribute("data-mode", "edit")
    alice.tid("compose-context-cancel").click()
    expect(alice.tid("compose-context")).to_be_hidden()
    expect(alice.tid("composer-input")).to_have_value("")


def test_reaction_state_counts_each_reaction_once(user):
    """events.js on its own: history's counts, then events as set operations."""
    alice = user("alice")
    alice.goto()
    result = alice.page.evaluate(
        """async () => {
            const ev = await import('/js/events.js');
            const chips = (r) => ev.reactionChips(r, 'me').map((c) => [c.emoji, c.count, c.mine]);
            const out = {};
            // A one-to-one chat: history's count names the peer.
            let r = ev.reactionsFromHistory([{ emoji: '👍', count: 2, mine: true }], 'me', 'bob');
            out.dmRepeat = ev.applyReaction(r, 'bob', '👍', true);
            out.dmOff = ev.applyReaction(r, 'bob', '👍', false);
            out.dmOffAgain = ev.applyReaction(r, 'bob', '👍', false);
            out.dm = chips(r);
            // A group: two reactors history does not name.
            r = ev.reactionsFromHistory([{ emoji: '🎉', count: 2, mine: false }], 'me');
            ev.applyReaction(r, 'carol', '🎉', false); // one of the two
            ev.applyReaction(r, 'carol', '🎉', false); // said again: no change
            ev.applyReaction(r, 'me', '🎉', true);
            ev.applyReaction(r, 'me', '🎉', true);
            ev.applyReaction(r, 'dave', '❤️', true);
            out.group = chips(r);
            ev.applyReaction(r, 'dave', '❤️', false);
            out.groupGone = chips(r);
            out.capped = (() => {
                const g = ev.reactionsFromHistory([{ emoji: '👍', count: 3, mine: false }], 'me');
                ev.applyReaction(g, 'x', '👍', true, 3);
                return chips(g);
            })();
            out.firstLine = ev.firstLine('\\n  first  \\nsecond');
            out.quotes = [
                ev.quoteOf(undefined).state,
                ev.quoteOf({ deleted: true, from: 'a' }).text,
                ev.quoteOf({ from: 'a', body: 'x\\ny' }).text,
            ];
            return out;
        }"""
    )
    assert result == {
        "dmRepeat": False,
        "dmOff": True,
        "dmOffAgain": False,
        "dm": [["👍", 1, True]],
        "group": [["🎉", 2, True], ["❤️", 1, False]],
        "groupGone": [["🎉", 2, True]],
        "capped": [["👍", 3, False]],
        "firstLine": "first",
        "quotes": ["missing", "message deleted", "x"],
    }


def test_a_late_ack_of_a_deleted_message_is_no_error_to_show(user):
    """Deleting a message also deletes its receipts, so the server refuses an
    ack or seen of it that crossed the deletion (`not_found` with `ids`): the
    page says nothing about a message it knows is deleted."""
    alice, bob = user("alice"), user("bob")
    log = FrameLog()
    bob.context.route_web_socket(WS, log)
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send("soon gone")
    bob.open(alice.name)
    alice.expect_status("soon gone", "seen")
    mid = alice.message_id("soon gone")
    alice.delete(alice.message_by_id(mid))
    expect(bob.message_by_id(mid).get_by_test_id("message-deleted")).to_be_visible()
    toasts = bob.page.locator("[data-testid=toast][data-code=not_found]")
    refusal = {"type": "error", "code": "not_found", "message": "no such message for you"}
    log.inject({**refusal, "ids": [mid]})
    # The control, right behind it: a refused id that is not a deleted
    # message is shown (told apart by its text). The page holds both for the
    # same 1.5 s, in order: once the control's toast is up, the first one
    # has had its turn.
    control = "no such message for you (the control)"
    log.inject({**refusal, "message": control, "ids": ["01M8FXZZZZ0000000000000000"]})
    expect(toasts.and_(bob.page.locator(f'[data-text="{control}."]'))).to_be_visible()
    expect(toasts).to_have_count(1)
