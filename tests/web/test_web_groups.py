"""Groups that change, in real Chromium: alice (the group's admin) adds dave,
renames the group, makes carol an admin and removes bob from the group info
panel; carol leaves; alice deletes a message of dave's. Every other window
follows live from the `members` events (a line in the chat, the header, the
list), and a removed member's chat turns read-only and gets nothing more.
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
GROUP = "Weekend plans"
RENAMED = "Hiking crew"
SECRET = "bob cannot read this"


class Tap:
    """Passes a context's WebSockets through and keeps every frame, both
    ways, by connection (0 is the first)."""

    def __init__(self) -> None:
        self.from_server: list[tuple[int, dict]] = []
        self.from_page: list[tuple[int, dict]] = []
        self.connections = 0

    def __call__(self, ws: WebSocketRoute) -> None:
        n = self.connections
        self.connections += 1
        server = ws.connect_to_server()

        def up(message: str | bytes) -> None:
            self.from_page.append((n, json.loads(message)))
            server.send(message)

        def down(message: str | bytes) -> None:
            self.from_server.append((n, json.loads(message)))
            ws.send(message)

        ws.on_message(up)
        server.on_message(down)

    def frames(self, kind: str, connection: int | None = None) -> list[dict]:
        return [
            f
            for n, f in self.from_server
            if f.get("type") == kind and (connection is None or n == connection)
        ]

    def acked_events(self) -> set[str]:
        return {e for _, f in self.from_page if f.get("type") == "ack" for e in f.get("events", [])}


def wait_until(chat, predicate, what: str, seconds: float = 8) -> None:
    for _ in range(int(seconds * 20)):
        if predicate():
            return
        chat.page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting for {what}")


def test_group_changes_live_in_every_window(user):
    alice, bob, carol, dave = user("alice"), user("bob"), user("carol"), user("dave")
    tap = Tap()
    bob.context.route_web_socket(WS, tap)
    for chat in (alice, bob, carol, dave):
        chat.register()
    alice.create_group(GROUP, [bob.name, carol.name])
    alice.send("hello all")
    for chat in (bob, carol):
        chat.open(GROUP)
        expect(chat.message("hello all")).to_be_visible()
    alice.expect_status("hello all", "seen")
    expect(alice.tid("group-info")).to_be_visible()

    # -- the panel: members with the admin badge; only the admin can manage ------
    alice.open_group_info()
    expect(alice.tid("group-member")).to_have_count(3)
    expect(alice.tid("group-member-count")).to_have_text("3 members")
    expect(alice.member(alice.name).get_by_test_id("admin-badge")).to_have_text("admin")
    expect(alice.member(bob.name).get_by_test_id("admin-badge")).to_have_count(0)
    expect(alice.member(bob.name).get_by_test_id("member-remove")).to_be_visible()
    expect(alice.tid("group-add-form")).to_be_visible()
    expect(alice.tid("group-title-input")).to_have_value(GROUP)
    bob.open_group_info()
    expect(bob.tid("group-member")).to_have_count(3)
    expect(bob.member(alice.name).get_by_test_id("admin-badge")).to_be_visible()
    expect(bob.tid("group-panel-title")).to_have_text(GROUP)
    expect(bob.tid("group-leave")).to_be_visible()
    for hidden in ("group-add-form", "group-rename-form"):
        expect(bob.tid(hidden)).to_be_hidden()
    for absent in ("member-remove", "member-promote", "member-demote"):
        expect(bob.tid(absent)).to_have_count(0)
    bob.close_group_info()

    # -- alice adds dave: dave's list gets the group live, bob sees the line --------
    expect(dave.tid("conv-item")).to_have_count(0)
    alice.tid("group-add-input").fill(f"nosuchuser{dave.name[-6:]}")
    alice.tid("group-add-submit").click()
    expect(alice.tid("group-panel-error")).to_contain_text("Not found")
    alice.tid("group-add-input").fill(dave.name)
    alice.tid("group-add-submit").click()
    expect(alice.tid("group-member")).to_have_count(4)
    expect(alice.tid("group-panel-error")).to_have_text("")
    expect(dave.conv(GROUP)).to_be_visible()
    expect(bob.note(f"{alice.name} added {dave.name}")).to_be_visible()
    expect(bob.tid("chat-subtitle")).to_contain_text(dave.name)
    alice.close_group_info()
    expect(alice.note(f"You added {dave.name}")).to_be_visible()
    # dave did not see "hello all": it stays seen, not owed to him.
    alice.expect_status("hello all", "seen")
    dave.open(GROUP)
    expect(dave.note(f"{alice.name} added you")).to_be_visible()
    alice.send("welcome dave")
    expect(dave.message("welcome dave")).to_be_visible()
    expect(dave.message("hello all")).to_have_count(0)  # before his join

    # -- rename: bob's header and list follow -------------------------------------
    alice.open_group_info()
    alice.tid("group-title-input").fill(RENAMED)
    alice.tid("group-rename").click()
    expect(bob.tid("chat-title")).to_have_text(RENAMED)
    expect(bob.conv(RENAMED)).to_be_visible()
    expect(bob.conv(GROUP)).to_have_count(0)
    expect(bob.note(f"{alice.name} renamed the group to “{RENAMED}”")).to_be_visible()
    expect(dave.tid("chat-title")).to_have_text(RENAMED)

    # -- carol becomes an admin -----------------------------------------------------
    alice.member(carol.name).get_by_test_id("member-promote").click()
    expect(alice.member(carol.name).get_by_test_id("admin-badge")).to_be_visible()
    expect(bob.note(f"{alice.name} made {carol.name} an admin")).to_be_visible()
    expect(carol.note(f"{alice.name} made you an admin")).to_be_visible()

    # -- alice removes bob: his chat turns read-only and gets nothing more ---------
    expect(bob.tid("message-actions")).not_to_have_count(0)
    alice.member(bob.name).get_by_test_id("member-remove").click()
    expect(alice.tid("confirm-title")).to_have_text(f"Remove {bob.name}?")
    alice.confirm()
    expect(alice.member(bob.name)).to_have_count(0)
    expect(alice.tid("group-member")).to_have_count(3)
    expect(bob.tid("chat-readonly")).to_contain_text("You are no longer a member")
    expect(bob.tid("composer")).to_be_hidden()
    expect(bob.tid("message-actions")).to_have_count(0)
    expect(bob.note(f"{alice.name} removed you")).to_be_visible()
    expect(carol.note(f"{alice.name} removed {bob.name}")).to_be_visible()
    expect(bob.conv(RENAMED)).to_be_visible()  # kept on screen until a reload
    expect(bob.message("welcome dave")).to_be_visible()  # what he had stays
    alice.close_group_info()
    alice.send(SECRET)
    expect(carol.message(SECRET)).to_be_visible()  # the control: the others get it
    expect(dave.message(SECRET)).to_be_visible()
    bob.round_trip()  # routed to bob with theirs, it would be on his screen by now
    expect(bob.message(SECRET)).to_have_count(0)
    expect(bob.conv(RENAMED).get_by_test_id("conv-preview")).to_have_text(
        f"{alice.name} removed you"
    )
    assert not [f for f in tap.frames("message") if f.get("body") == SECRET]

    # -- carol (an admin now) leaves -----------------------------------------------
    carol.open_group_info()
    expect(carol.tid("group-add-form")).to_be_visible()
    carol.tid("group-leave").click()
    expect(carol.tid("confirm-title")).to_have_text("Leave this group?")
    carol.confirm()
    expect(carol.tid("group-panel")).to_be_hidden()
    expect(carol.tid("chat-readonly")).to_be_visible()
    expect(carol.tid("composer")).to_be_hidden()
    expect(carol.note("You left")).to_be_visible()
    expect(alice.note(f"{carol.name} left")).to_be_visible()
    expect(alice.tid("chat-subtitle")).to_contain_text(dave.name)
    expect(alice.tid("chat-subtitle")).not_to_contain_text(carol.name)
    expect(alice.tid("composer")).to_be_visible()

    # -- alice, the admin, deletes a message of dave's -------------------------------
    dave.send("dave was here")
    expect(alice.message("dave was here")).to_be_visible()
    # dave is no admin: he may delete his own message, not alice's.
    expect(dave.message("dave was here").get_by_test_id("message-delete")).to_have_count(1)
    expect(dave.message(SECRET).get_by_test_id("message-reply")).to_have_count(1)
    expect(dave.message(SECRET).get_by_test_id("message-delete")).to_have_count(0)
    mid = alice.message_id("dave was here")
    alice.action(alice.message_by_id(mid), "delete")
    expect(alice.tid("confirm-title")).to_have_text(f"Delete {dave.name}'s message?")
    alice.confirm()
    expect(alice.message_by_id(mid).get_by_test_id("message-deleted")).to_be_visible()
    expect(dave.message_by_id(mid).get_by_test_id("message-deleted")).to_be_visible()
    expect(dave.message("dave was here")).to_have_count(0)

    # -- bob acked every members event: none comes again on his next connection ------
    events = tap.frames("members")
    assert [e["action"] for e in events] == ["add", "rename", "promote", "remove"]
    wait_until(bob, lambda: {e["eid"] for e in events} <= tap.acked_events(), "bob's acks")
    # Something owed to bob that comes after every event of a backlog: the seen
    # receipt of a message he sent to alice before going away.
    alice.start_dm(bob.name)
    alice.send("are you ok?")
    alice.open(RENAMED)
    bob.open(alice.name)
    bob.send("yes, fine")
    bob.expect_status("yes, fine", "delivered")
    bob.page.close()
    alice.open(bob.name)
    expect(alice.message("yes, fine")).to_be_visible()
    bob.new_page()
    bob.login()
    expect(bob.conv(alice.name)).to_be_visible()
    wait_until(bob, lambda: tap.frames("receipt", tap.connections - 1), "bob's backlog receipt")
    assert tap.frames("members", tap.connections - 1) == []
    expect(bob.conv(RENAMED)).to_have_count(0)  # no longer his after a reload


def test_members_state_updates(user):
    """events.js on its own: applying `members` events, and their lines."""
    alice = user("alice")
    alice.goto()
    result = alice.page.evaluate(
        """async () => {
            const ev = await import('/js/events.js');
            const out = {};
            const conv = { kind: 'group', members: ['a', 'b', 'c'], admins: ['a'], title: 'T' };
            const base = { type: 'members', ts: 100, title: 'T' };
            let r = ev.applyMembers(conv, { ...base, eseq: 3, by: 'a', action: 'add',
                users: ['d', 'e'], members: ['a', 'b', 'c', 'd', 'e'], admins: ['a'] }, 'b');
            out.add = [r.changed, r.wasMember, r.member, r.lines, conv.members.length, conv.joined];
            // An older change arriving late changes nothing, but still says what it was.
            r = ev.applyMembers(conv, { ...base, eseq: 2, by: 'a', action: 'rename', title: 'Old',
                users: [], members: ['a', 'b'], admins: ['a'] }, 'b');
            out.stale = [r.changed, r.lines, conv.title, conv.members.length];
            // The last admin leaves: the longest-standing member becomes admin.
            r = ev.applyMembers(conv, { ...base, eseq: 4, by: 'a', action: 'leave', users: ['a'],
                members: ['b', 'c', 'd', 'e'], admins: ['b'] }, 'b');
            out.leave = [r.lines, ev.canManage(conv, 'b'), ev.canManage(conv, 'c')];
            r = ev.applyMembers(conv, { ...base, eseq: 5, by: 'b', action: 'promote',
                users: ['c', 'd'], members: ['b', 'c', 'd', 'e'], admins: ['b', 'c', 'd'] }, 'c');
            out.promote = r.lines;
            r = ev.applyMembers(conv, { ...base, eseq: 6, by: 'c', action: 'demote', users: ['c'],
                members: ['b', 'c', 'd', 'e'], admins: ['b', 'd'] }, 'c');
            out.demoteSelf = r.lines;
            r = ev.applyMembers(conv, { ...base, eseq: 7, by: 'b', action: 'rename', title: null,
                users: [], members: ['b', 'c', 'd', 'e'], admins: ['b', 'd'] }, 'c');
            out.unnamed = [r.lines, conv.title];
            r = ev.applyMembers(conv, { ...base, eseq: 8, by: 'b', action: 'remove', users: ['c'],
                members: ['b', 'd', 'e'], admins: ['b', 'd'] }, 'c');
            out.removed = [r.changed, r.wasMember, r.member, conv.left, r.lines,
                           ev.canManage(conv, 'c')];
            out.noAdmins = [
                ev.canManage({ kind: 'group', members: ['x', 'y'], admins: [] }, 'y'),
                ev.canManage({ kind: 'group', members: ['x', 'y'], admins: [] }, 'z'),
                ev.canManage({ kind: 'dm', members: ['x', 'y'], admins: [] }, 'x'),
                ev.canManage({ kind: 'group', members: ['x', 'y'] }, 'x'),
            ];
            out.names = [['a'], ['a', 'b'], ['a', 'b', 'c']].map(ev.listNames);
            return out;
        }"""
    )
    assert result == {
        "add": [True, True, True, ["a added d and e"], 5, {"d": 100, "e": 100}],
        "stale": [False, ["a renamed the group to “Old”"], "T", 5],
        "leave": [["a left", "You are now an admin"], True, False],
        "promote": ["b made you and d admins"],
        "demoteSelf": ["You are no longer an admin"],
        "unnamed": [["b removed the group's name"], None],
        "removed": [True, True, False, True, ["b removed you"], False],
        "noAdmins": [True, False, False, False],
        "names": ["a", "a and b", "a, b and c"],
    }
