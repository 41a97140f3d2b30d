"""Two (and three) people chatting in real Chromium: ticks, offline, typing, presence."""

import re

import pytest
from chatpage import PHONE, SKIP_REASON, settle

if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from playwright.sync_api import expect

pytestmark = [pytest.mark.e2e]


def test_two_users_ticks_offline_and_back(user):
    alice, bob = user("alice"), user("bob")
    alice.register()
    bob.register()
    bob.page.close()  # bob goes offline

    alice.start_dm(bob.name)
    alice.send("are you there?")
    alice.expect_status("are you there?", "sent")  # stored; bob has no device online
    alice.send("call me when you are back")
    alice.expect_status("call me when you are back", "sent")
    expect(alice.tid("chat-subtitle")).to_have_text(re.compile(r"^last seen "))
    settle(alice)  # whatever her sends caused is on her screen by now
    alice.expect_status("are you there?", "sent")

    # bob comes back (a new tab: a new login) and finds both waiting, unread.
    bob.new_page()
    bob.login()
    expect(bob.conv(alice.name).get_by_test_id("conv-unread")).to_have_text("2")
    expect(bob.conv(alice.name).get_by_test_id("conv-preview")).to_have_text(
        "call me when you are back"
    )
    # His client acked them: two ticks for alice, not yet seen.
    alice.expect_status("are you there?", "delivered")
    alice.expect_status("call me when you are back", "delivered")
    expect(alice.tid("chat-subtitle")).to_have_text("online")

    bob.open(alice.name)
    assert bob.bodies() == ["are you there?", "call me when you are back"]
    alice.expect_status("are you there?", "seen")
    alice.expect_status("call me when you are back", "seen")
    expect(bob.conv(alice.name).get_by_test_id("conv-unread")).to_have_count(0)

    # The other way round, both with the chat open and focused.
    bob.tid("composer-input").type("I'm")
    expect(alice.tid("chat-subtitle")).to_have_text("typing…")
    bob.send("back now!")
    expect(alice.message("back now!")).to_be_visible()
    expect(alice.message("back now!")).to_have_class(re.compile(r"\btheirs\b"))
    bob.expect_status("back now!", "seen")
    expect(alice.tid("chat-subtitle")).to_have_text("online")
    assert alice.bodies() == ["are you there?", "call me when you are back", "back now!"]

    # bob leaves again: alice sees "last seen".
    bob.page.close()
    expect(alice.tid("chat-subtitle")).to_have_text(re.compile(r"^last seen "))


def test_seen_only_while_the_window_has_focus(user):
    alice, bob = user("alice"), user("bob")
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    alice.send("first")
    bob.open(alice.name)
    alice.expect_status("first", "seen")

    bob.set_focus(False)  # bob's window is in the background, chat still open
    alice.send("while you were away")
    expect(bob.message("while you were away")).to_be_visible()
    alice.expect_status("while you were away", "delivered")
    settle(bob, alice)  # a `seen` bob's page had sent would be on alice's screen
    alice.expect_status("while you were away", "delivered")

    bob.set_focus(True)
    alice.expect_status("while you were away", "seen")


def test_markup_is_shown_as_text(user):
    alice, bob = user("alice"), user("bob")
    alice.register()
    bob.register()
    nasty = [
        "<script>alert(1)</script>",
        "<b>x</b>",
        '<img src=x onerror="alert(2)"> & &amp; "quotes"',
    ]
    alice.start_dm(bob.name)
    for text in nasty:
        alice.send(text)
    bob.open(alice.name)
    for text in nasty:
        expect(bob.message(text)).to_be_visible()
        expect(alice.message(text)).to_be_visible()
    assert bob.bodies() == nasty
    for chat in (alice, bob):
        bodies = chat.page.locator("[data-testid=message-body]")
        assert bodies.locator("script, b, img").count() == 0
        assert (
            chat.page.locator(
                "[data-testid=conv-preview] b, [data-testid=conv-preview] img"
            ).count()
            == 0
        )
    expect(bob.conv(alice.name).get_by_test_id("conv-preview")).to_have_text(nasty[-1])
    # (the fixture also fails the test if any alert() dialog opened)


def test_group_of_three_with_a_phone(user):
    alice, bob = user("alice"), user("bob")
    carol = user("carol", viewport=PHONE)
    for u in (alice, bob, carol):
        u.register()
    alice.create_group("Trio", [bob.name, carol.name])
    members = sorted([alice.name, bob.name, carol.name])
    expect(alice.tid("chat-subtitle")).to_have_text(
        ", ".join("you" if m == alice.name else m for m in members)
    )
    alice.send("hi both")

    # bob and carol learn about the group from the first message.
    expect(bob.conv("Trio")).to_be_visible()
    expect(carol.conv("Trio")).to_be_visible()
    alice.expect_status("hi both", "delivered")

    bob.open("Trio")
    expect(bob.message("hi both").get_by_test_id("message-from")).to_have_text(alice.name)
    settle(bob, alice)  # bob's `seen` has reached alice's page
    alice.expect_status("hi both", "delivered")  # carol has not looked yet

    # carol, on a phone: the list fills the screen; the chat replaces it.
    expect(carol.tid("chat-view")).to_be_hidden()
    carol.open("Trio")
    expect(carol.tid("conv-list")).to_be_hidden()
    alice.expect_status("hi both", "seen")
    carol.send("hello from my phone")
    expect(alice.message("hello from my phone")).to_be_visible()
    expect(bob.message("hello from my phone")).to_be_visible()
    carol.expect_status("hello from my phone", "seen")
    carol.tid("chat-back").click()
    expect(carol.tid("conv-list")).to_be_visible()
    expect(carol.conv("Trio").get_by_test_id("conv-preview")).to_have_text("hello from my phone")
    # Bubbles fit the phone's width.
    box = carol.page.evaluate("document.documentElement.scrollWidth")
    assert box <= PHONE["width"]


def test_older_history_loads_on_scroll_up(user):
    alice, bob = user("alice"), user("bob")
    alice.register()
    bob.register()
    alice.start_dm(bob.name)
    count = 56
    alice.page.evaluate(
        """([id, n]) => { for (let i = 1; i <= n; i++) window.chatd.send(id, `m${i}`); }""",
        [alice.page.evaluate("window.chatd.openId"), count],
    )
    expect(alice.message(f"m{count}")).to_have_attribute(
        "data-status", re.compile("delivered|seen")
    )
    expect(alice.page.locator("[data-testid=tick][data-status=pending]")).to_have_count(0)

    # A reload keeps the session (sessionStorage) and starts from the server's history.
    alice.page.reload()
    alice.expect_online()
    alice.open(bob.name)
    expect(alice.message(f"m{count}")).to_be_visible()
    expect(alice.messages()).to_have_count(50)
    alice.tid("messages").evaluate(
        "el => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); }"
    )
    expect(alice.messages()).to_have_count(count)
    expect(alice.tid("history-status")).to_have_text(re.compile("start of the conversation"))
    assert alice.bodies() == [f"m{i}" for i in range(1, count + 1)]


def test_log_out_and_in(user):
    alice = user("alice")
    alice.register()
    token = alice.page.evaluate("JSON.parse(sessionStorage.getItem('chatd.session')).token")
    alice.tid("logout").click()
    expect(alice.tid("login-view")).to_be_visible()
    assert alice.page.evaluate("sessionStorage.getItem('chatd.session')") is None
    # Logging out revoked the token on the server: it is refused from now on.
    status_of = (
        "async t => (await fetch('/api/conversations',"
        " {headers: {Authorization: 'Bearer ' + t}})).status"
    )
    for _ in range(40):
        if alice.page.evaluate(status_of, token) == 401:
            break
        alice.page.wait_for_timeout(50)
    assert alice.page.evaluate(status_of, token) == 401
    alice.tid("login-username").fill(alice.name)
    alice.tid("login-password").fill("wrong password")
    alice.tid("login-submit").click()
    expect(alice.tid("login-error")).to_have_text("Wrong username or password.")
    alice.login()
    expect(alice.tid("conv-empty")).to_be_visible()
