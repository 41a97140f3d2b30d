"""End to end against a real `chatd serve`: the end-to-end device directory
(issue 12, step 1) — register, identical, conflicting and forged keys,
removal, who may list whose devices, `auth` with a device, `devices` frames."""

import pytest

from harness.client import connect
from harness.e2e_keys import KeyedDevice

pytestmark = pytest.mark.e2e


async def test_register_list_and_remove_devices(server, api, names):
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    ta, tb, tc = await api.user(alice), await api.user(bob), await api.user(carol)
    phone = KeyedDevice(alice, name="Phone")
    path = f"/api/e2e/devices/{phone.device}"
    async with connect(server.ws_url, bob) as b, connect(server.ws_url, carol) as c:
        await b.auth(tb)
        await c.auth(tc)
        cid = await b.send("hi", to=alice)  # bob shares a conversation with alice
        await b.expect("sent", cid=cid)

        status, body = await api.call("PUT", path, ta, json=phone.registration())
        assert (status, body) == (201, {"device": phone.device})
        # bob (a contact) hears that alice's devices changed; carol does not
        # (the positive control comes below, after carol shares a conversation).
        await b.expect("devices", user=alice)
        status, _ = await api.call("PUT", path, ta, json=phone.registration())
        assert status == 200  # identical: nothing new, nobody told
        other = KeyedDevice(alice, device=phone.device)
        status, body = await api.call("PUT", path, ta, json=other.registration())
        assert status == 409 and body["error"]["code"] == "conflict"
        forged = phone.registration()
        forged["dh_key"] = other.dh_key  # not what the signature covers
        status, body = await api.call(
            "PUT", f"/api/e2e/devices/{KeyedDevice(alice).device}", ta, json=forged
        )
        assert status == 400 and "does not verify" in body["error"]["message"]

        status, listed = await api.call("GET", f"/api/users/{alice}/devices", tb)
        assert status == 200 and listed["username"] == alice
        [d] = listed["devices"]
        assert (d["device"], d["sig_key"], d["dh_key"], d["name"]) == (
            phone.device,
            phone.sig_key,
            phone.dh_key,
            "Phone",
        )
        assert d["self_sig"] == phone.registration()["self_sig"] and d["removed_ts"] is None
        status, _ = await api.call("GET", f"/api/users/{alice}/devices", tc)
        assert status == 404  # carol shares nothing with alice
        status, _ = await api.call("DELETE", path, tb)
        assert status == 404  # bob has no such device: only one's own

        # auth with the device: ready echoes it; an unknown one is null.
        async with connect(server.ws_url, alice) as a:
            ready = await a.auth_with(ta, device=phone.device)
            assert ready["device"] == phone.device
        async with connect(server.ws_url, alice) as a:
            ready = await a.auth_with(ta, device="not-registered")
            assert ready["device"] is None

        cid = await c.send("hello", to=alice)
        await c.expect("sent", cid=cid)
        status, _ = await api.call("DELETE", path, ta)
        assert status == 204
        await c.expect("devices", user=alice)  # a contact now
        # ...and only this one: the registration's came before she was.
        assert len(c.seen_frames("devices")) == 1
        await b.expect("devices", user=alice)
        status, listed = await api.call("GET", f"/api/users/{alice}/devices", tb)
        assert listed["devices"][0]["removed_ts"] is not None
        status, _ = await api.call("DELETE", path, ta)
        assert status == 404  # removed already
        status, _ = await api.call("PUT", path, ta, json=phone.registration())
        assert status == 409  # a removed id stays taken
        async with connect(server.ws_url, alice) as a:
            ready = await a.auth_with(ta, device=phone.device)
            assert ready["device"] is None  # removed


async def test_devices_need_a_token(server, api, names):
    d = KeyedDevice(names("alice"))
    status, body = await api.call("PUT", f"/api/e2e/devices/{d.device}", None, json={})
    assert status == 401
