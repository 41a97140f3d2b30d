"""End to end against a real `chatd serve` (SQLite and MongoDB on
mongomock): end-to-end conversations (issue 12) — the switch, e2e sends,
edits, history, epochs and shares, and every refusal: plaintext after the
switch, foreign devices, stale epochs (missing and extra), shares only to
their addressees, non-members.

The devices are Python ones (``harness.e2e_client``) speaking the same
bytes as the web client (``docs/e2e-crypto.md``)."""

from __future__ import annotations

import pytest

from chatd.core.names import dm_id
from harness.client import connect
from harness.e2e_client import AsyncE2E, E2EDevice
from harness.e2e_crypto import DecryptError

pytestmark = pytest.mark.e2e


async def _device(api, user: str, token: str) -> AsyncE2E:
    dev = AsyncE2E(E2EDevice(user), lambda method, path, **kw: api.call(method, path, token, **kw))
    await dev.register()
    return dev


def _e2e_send(conversation: str, e2e: dict, cid: str) -> dict:
    return {"type": "send", "cid": cid, "conversation": conversation, "e2e": e2e}


async def test_a_dm_switches_and_every_device_reads_it(server, api, names):
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    a1, a2 = await _device(api, alice, ta), await _device(api, alice, ta)
    b1 = await _device(api, bob, tb)
    conv = dm_id(alice, bob)
    async with (
        connect(server.ws_url, "a1") as ca1,
        connect(server.ws_url, "a2") as ca2,
        connect(server.ws_url, "b1") as cb1,
    ):
        assert (await ca1.auth_with(ta, device=a1.dev.device))["device"] == a1.dev.device
        await ca2.auth_with(ta, device=a2.dev.device)
        await cb1.auth_with(tb, device=b1.dev.device)
        cid = await ca1.send("plain before the switch", to=bob)
        await ca1.expect("sent", cid=cid)
        plain = await cb1.expect("message", where=lambda f: "body" in f)
        assert plain["body"] == "plain before the switch"

        await a1.new_epoch(conv, [alice, bob])
        secret = "the end-to-end words"
        await ca1.send_json(_e2e_send(conv, a1.dev.encrypt(conv, secret), "e-1"))
        sent = await ca1.expect("sent", cid="e-1")
        got = await cb1.expect("message", id=sent["id"])
        assert "body" not in got and got["e2e"]["device"] == a1.dev.device
        assert await b1.read(got) == secret
        mine = await ca2.expect("message", id=sent["id"])  # alice's other device
        assert await a2.read(mine) == secret
        await cb1.ack([got["id"]])
        await cb1.seen([got["id"]])
        await ca1.expect("receipt", id=sent["id"], status="delivered")
        await ca1.expect("receipt", id=sent["id"], status="seen")

        # The list says e2e, history carries the object as sent, no body.
        status, listed = await api.call("GET", "/api/conversations", tb)
        [item] = [c for c in listed["conversations"] if c["id"] == conv]
        assert item["e2e"] is True and item["last_message"]["e2e"] == got["e2e"]
        status, history = await api.call("GET", f"/api/conversations/{conv}/messages", tb)
        old, new = history["messages"]
        assert old["body"] == "plain before the switch" and "e2e" not in old
        assert "body" not in new and new["e2e"] == got["e2e"]
        assert await b1.read(new) == secret

        # One way: a plain body now is refused, with the cid; nothing stored.
        cid = await cb1.send("plain after", to=alice)
        err = await cb1.expect("error", cid=cid)
        assert (err["code"], err["reason"]) == ("bad_request", "e2e_required")
        status, history = await api.call("GET", f"/api/conversations/{conv}/messages", tb)
        assert len(history["messages"]) == 2

        # An edit is end-to-end too; a plain edit is refused.
        edit = a1.dev.encrypt(conv, "edited words", edit_of=sent["id"])
        cid = await ca1.act("edit", sent["id"], e2e=edit)
        await ca1.expect("applied", cid=cid)
        edited = await cb1.expect("edited", id=sent["id"])
        assert "body" not in edited and edited["e2e"] == edit
        assert await b1.read({**edited, "from": alice}, edit_of=sent["id"]) == "edited words"
        # Replayed as an edit of another message: the plaintext says otherwise.
        with pytest.raises(DecryptError) as wrong:
            await b1.read({**edited, "from": alice}, edit_of=plain["id"])
        assert wrong.value.reason == "wrong kind"
        cid = await ca1.act("edit", sent["id"], body="plain edit")
        err = await ca1.expect("error", cid=cid)
        assert err["reason"] == "e2e_required"


async def test_refusals_name_the_devices(server, api, names):
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
    a1, a2 = await _device(api, alice, ta), await _device(api, alice, ta)
    b1 = await _device(api, bob, tb)
    c1 = await _device(api, carol, tc)
    # A one-to-one conversation made before its first message, so that
    # alice can fetch bob's devices (only contacts may).
    status, _ = await api.call("GET", f"/api/users/{bob}/devices", ta)
    assert status == 404
    status, made = await api.call("POST", "/api/conversations", ta, json={"to": bob})
    assert status == 200 and made["kind"] == "dm" and made["e2e"] is False
    conv = made["id"]
    assert conv == dm_id(alice, bob)
    status, again = await api.call("POST", "/api/conversations", ta, json={"to": bob})
    assert (status, again) == (200, made)
    for bad in ({"to": alice}, {"to": "nobody-here"}, {"to": bob, "e2e": True}):
        status, _ = await api.call("POST", "/api/conversations", ta, json=bad)
        assert status in (400, 404), bad
    async with (
        connect(server.ws_url, "a1") as ca1,
        connect(server.ws_url, "a-none") as cnone,
        connect(server.ws_url, "b1") as cb1,
    ):
        await ca1.auth_with(ta, device=a1.dev.device)
        await cnone.auth(ta)  # names no device
        await cb1.auth_with(tb, device=b1.dev.device)
        epoch = await a1.new_epoch(conv, [alice, bob])
        e2e = a1.dev.encrypt(conv, "x")

        # Another device's id, or none at all: forbidden.
        await cnone.send_json(_e2e_send(conv, e2e, "n-1"))
        assert (await cnone.expect("error", cid="n-1"))["code"] == "forbidden"
        b_e2e = {**e2e, "device": b1.dev.device}
        await ca1.send_json(_e2e_send(conv, b_e2e, "n-2"))
        assert (await ca1.expect("error", cid="n-2"))["code"] == "forbidden"
        # Someone else's epoch (bob cannot send under alice's).
        await cb1.send_json(_e2e_send(conv, {**e2e, "device": b1.dev.device}, "n-3"))
        assert (await cb1.expect("error", cid="n-3"))["code"] == "forbidden"
        # Malformed objects: shape errors, before anything else.
        await ca1.send_json(_e2e_send(conv, {**e2e, "iv": "AAAA"}, "n-4"))
        assert (await ca1.expect("error", cid="n-4"))["code"] == "bad_request"
        await ca1.send_json(_e2e_send(conv, {**e2e, "ct": "A" * 22_001}, "n-5"))
        assert (await ca1.expect("error", cid="n-5"))["code"] == "too_large"
        await ca1.send_json({**_e2e_send(conv, e2e, "n-6"), "body": "both"})
        assert (await ca1.expect("error", cid="n-6"))["code"] == "bad_request"

        # bob adds a device and alice removes one: the epoch is stale, and
        # the refusal says which devices lack a share and which should not
        # have one.
        b2 = await _device(api, bob, tb)
        status, _ = await api.call("DELETE", f"/api/e2e/devices/{a2.dev.device}", ta)
        assert status == 204
        await ca1.send_json(_e2e_send(conv, e2e, "s-1"))
        err = await ca1.expect("error", cid="s-1")
        assert (err["code"], err["reason"]) == ("bad_request", "e2e_stale")
        assert err["missing"] == [b2.dev.device] and err["extra"] == [a2.dev.device]
        # An epoch that does not exist: everything is missing.
        unknown = {**e2e, "epoch": "nosuchepoch0"}
        await ca1.send_json(_e2e_send(conv, unknown, "s-2"))
        err = await ca1.expect("error", cid="s-2")
        assert err["reason"] == "e2e_stale"
        assert err["missing"] == sorted([b1.dev.device, b2.dev.device])
        # Rotate and send again with the same cid: stored once.
        await a1.new_epoch(conv, [alice, bob])
        fresh = a1.dev.encrypt(conv, "after rotation")
        await ca1.send_json(_e2e_send(conv, fresh, "s-1"))
        sent = await ca1.expect("sent", cid="s-1")
        got = await cb1.expect("message", id=sent["id"])
        assert await b1.read(got) == "after rotation"

        # Shares go only to their addressees: bob's GET has bob's devices only.
        status, body = await api.call(
            "GET", f"/api/conversations/{conv}/e2e/shares?epochs={epoch},{fresh['epoch']}", tb
        )
        assert status == 200
        assert {s["to"] for s in body["shares"]} == {b1.dev.device, b2.dev.device}
        assert {s["sender"] for s in body["shares"]} == {alice}
        status, body = await api.call(
            "GET", f"/api/conversations/{conv}/e2e/shares?epochs={fresh['epoch']}", ta
        )
        assert body == {"shares": []}  # a1 keeps its own key; a2 is removed

    # Non-members: 403 both ways.
    status, body = await api.call("GET", f"/api/conversations/{conv}/e2e/shares?epochs={epoch}", tc)
    assert status == 403
    c_epoch, c_bodies = c1.dev.plan_epoch(conv, {bob: [b1.dev.keys.public()]})
    status, _ = await api.call(
        "PUT", f"/api/conversations/{conv}/e2e/epochs/{c_epoch}", tc, json=c_bodies[0]
    )
    assert status == 403
    # A share to a device that is not a member's: 400, naming it.
    _, bodies = a1.dev.plan_epoch(conv, {carol: [c1.dev.keys.public()]})
    status, body = await api.call(
        "PUT", f"/api/conversations/{conv}/e2e/epochs/othereppoch1", ta, json=bodies[0]
    )
    assert status == 400 and body["error"]["unknown"] == [c1.dev.device]
    # Uploading for a device that is not yours (or removed): 403.
    for device in (b1.dev.device, a2.dev.device):
        status, _ = await api.call(
            "PUT",
            f"/api/conversations/{conv}/e2e/epochs/othereppoch2",
            ta,
            json={"device": device, "shares": {}},
        )
        assert status == 403
    # Another device's epoch id: 409; malformed shares: 400.
    status, _ = await api.call(
        "PUT",
        f"/api/conversations/{conv}/e2e/epochs/{epoch}",
        tb,
        json={"device": b1.dev.device, "shares": {}},
    )
    assert status == 409
    bad = {"device": a1.dev.device, "shares": {b1.dev.device: "AAAA"}}
    status, _ = await api.call(
        "PUT", f"/api/conversations/{conv}/e2e/epochs/othereppoch3", ta, json=bad
    )
    assert status == 400


async def test_an_e2e_group_and_a_member_added(server, api, names):
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
    a1, b1, c1 = (
        await _device(api, alice, ta),
        await _device(api, bob, tb),
        await _device(api, carol, tc),
    )
    status, group = await api.call(
        "POST", "/api/conversations", ta, json={"members": [bob], "title": "sealed", "e2e": True}
    )
    assert status == 201 and group["e2e"] is True
    gid = group["id"]
    status, _ = await api.call(
        "POST", "/api/conversations", ta, json={"members": [bob], "e2e": "yes"}
    )
    assert status == 400
    async with connect(server.ws_url, "a1") as ca1, connect(server.ws_url, "c1") as cc1:
        await ca1.auth_with(ta, device=a1.dev.device)
        await cc1.auth_with(tc, device=c1.dev.device)
        cid = await ca1.send("plain", conversation=gid)
        assert (await ca1.expect("error", cid=cid))["reason"] == "e2e_required"
        first_epoch = await a1.new_epoch(gid, [alice, bob])
        await ca1.send_json(_e2e_send(gid, a1.dev.encrypt(gid, "to the group"), "g-1"))
        await ca1.expect("sent", cid="g-1")

        status, _ = await api.call(
            "POST", f"/api/conversations/{gid}/members", ta, json={"members": [carol]}
        )
        assert status == 200
        # The group changed: the old epoch lacks carol's device.
        await ca1.send_json(_e2e_send(gid, a1.dev.encrypt(gid, "hello carol"), "g-2"))
        err = await ca1.expect("error", cid="g-2")
        assert err["reason"] == "e2e_stale" and err["missing"] == [c1.dev.device]
        await a1.new_epoch(gid, [alice, bob, carol])
        await ca1.send_json(_e2e_send(gid, a1.dev.encrypt(gid, "hello carol"), "g-2"))
        sent = await ca1.expect("sent", cid="g-2")
        got = await cc1.expect("message", id=sent["id"])
        assert await c1.read(got) == "hello carol"
    # carol joined later: the first message is not hers to read at all (not
    # in her history), and she holds no share of its epoch either.
    status, history = await api.call("GET", f"/api/conversations/{gid}/messages", tc)
    assert [m["id"] for m in history["messages"]] == [sent["id"]]
    status, shares = await api.call(
        "GET", f"/api/conversations/{gid}/e2e/shares?epochs={first_epoch}", tc
    )
    assert (status, shares) == (200, {"shares": []})
    # ...while bob, a member then, has his (the positive control).
    status, shares = await api.call(
        "GET", f"/api/conversations/{gid}/e2e/shares?epochs={first_epoch}", tb
    )
    assert [s["to"] for s in shares["shares"]] == [b1.dev.device]
    # bob (offline) reads both from history.
    status, history = await api.call("GET", f"/api/conversations/{gid}/messages", tb)
    assert [await b1.read(m) for m in history["messages"]] == ["to the group", "hello carol"]
