"""A device that stops reading is closed with 4008 — cleanly, never with a
frame cut in half — and gets everything owed when it comes back."""

import json

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from chatd.testing.client import Api, connect
from chatd.testing.procs import ChatdProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_slow_consumer_closed_4008_and_loses_nothing(tmp_path, names):
    proc = ChatdProcess(tmp_path, args=["--rate", "0"]).start()
    api = Api(proc.http_url)
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    body = "z" * 4000
    count = 2500  # ~10 MB: more than the socket buffers and the 1,024-frame outbox
    try:
        async with open_websocket_url(proc.ws_url) as stalled:
            await stalled.send_message(json.dumps({"type": "auth", "token": tb}))
            assert json.loads(await stalled.get_message())["type"] == "ready"
            # bob's device stops reading here.
            sent_ids = []
            async with connect(proc.ws_url, alice) as a:
                await a.auth(ta)
                for i in range(count):
                    await a.send(body, to=bob, cid=f"s{i}")
                for i in range(count):
                    sent_ids.append((await a.expect("sent", cid=f"s{i}", timeout=30))["id"])
            # Now read what arrived: whole frames, then a clean 4008.
            received = []
            with trio.fail_after(20):
                try:
                    while True:
                        frame = json.loads(await stalled.get_message())
                        if frame["type"] == "message":
                            received.append(frame["id"])
                except ConnectionClosed as exc:
                    assert exc.reason.code == 4008, exc.reason
            assert len(received) < count
            assert received == sent_ids[: len(received)]
        # Reconnecting gets everything not yet acked, in order.
        async with connect(proc.ws_url, bob) as b:
            await b.auth(tb)
            again = [(await b.expect("message", timeout=30))["id"] for _ in range(count)]
            assert again == sent_ids
    finally:
        await api.aclose()
        assert proc.stop() == 0
