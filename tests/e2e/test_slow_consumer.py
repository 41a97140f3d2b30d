"""A device that stops reading is closed with 4008 — cleanly, never with a
frame cut in half — and gets everything owed when it comes back."""

import json

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from harness.client import Api, connect, silent_device
from harness.procs import ChatdProcess

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


async def test_a_device_that_never_reads_again_is_released(tmp_path, names):
    """Dropped for overflowing its outbox while it never reads: the frame in
    hand cannot finish, so after the drop grace the socket is cut and the
    user leaves presence."""
    proc = ChatdProcess(tmp_path, args=["--rate", "0"]).start()
    api = Api(proc.http_url)
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    try:
        async with open_websocket_url(proc.ws_url) as stalled:
            await stalled.send_message(json.dumps({"type": "auth", "token": tb}))
            assert json.loads(await stalled.get_message())["type"] == "ready"
            async with connect(proc.ws_url, alice) as a:
                await a.auth(ta)
                for i in range(2500):
                    await a.send("q" * 4000, to=bob, cid=f"s{i}")
                await a.expect("sent", cid="s2499", timeout=30)
                with trio.fail_after(20):
                    while True:
                        _, info = await api.call("GET", f"/api/users/{bob}", ta)
                        if not info["online"]:
                            break
                        await trio.sleep(0.2)
    finally:
        await api.aclose()
        assert proc.stop() == 0


async def test_acks_are_taken_while_a_long_backlog_streams(tmp_path, names):
    """The backlog runs beside the reader: an ack sent after the first
    message is applied (its receipt reaches the sender) while the rest of
    the backlog is still stuck behind a device that is not reading."""
    proc = ChatdProcess(tmp_path, args=["--rate", "0"]).start()
    api = Api(proc.http_url)
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    try:
        async with connect(proc.ws_url, alice) as a:
            await a.auth(ta)
            for i in range(1500):
                await a.send("b" * 4000, to=bob, cid=f"s{i}")
            first = await a.expect("sent", cid="s0", timeout=30)
            await a.expect("sent", cid="s1499", timeout=30)
            async with open_websocket_url(proc.ws_url) as b:
                await b.send_message(json.dumps({"type": "auth", "token": tb}))
                assert json.loads(await b.get_message())["type"] == "ready"
                msg = json.loads(await b.get_message())
                assert msg["id"] == first["id"]
                await b.send_message(json.dumps({"type": "ack", "ids": [msg["id"]]}))
                # bob reads nothing more: ~6 MB of backlog is still in flight.
                receipt = await a.expect("receipt", id=first["id"], timeout=10)
                assert receipt["status"] == "delivered"
    finally:
        await api.aclose()
        assert proc.stop() == 0


def close_code_of(sock) -> int | None:
    """Read everything the server sent until it hangs up; the code of its
    close frame (server frames are unmasked)."""
    sock.settimeout(15)
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    pos = 0
    while pos + 2 <= len(data):
        opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        if opcode == 0x8:
            return int.from_bytes(data[pos : pos + 2], "big")
        pos += n
    return None


async def test_the_process_budget_closes_the_slow_devices_and_loses_nothing(tmp_path, names):
    """--outbox-total-mib 1 with a per-device budget far above it: devices
    that never read are closed with 4008 once all of them together hold
    more than 1 MiB (each well under its own 8 MiB); the sender's device,
    which reads, stays; the owner gets everything when back."""
    proc = ChatdProcess(
        tmp_path,
        args=[
            "--rate",
            "0",
            "--outbox-kib",
            "8192",
            "--outbox-total-mib",
            "1",
            "--socket-sndbuf-kib",
            "32",
        ],
    ).start()
    api = Api(proc.http_url)
    alice, bob = names("alice"), names("bob")
    ta, tb = await api.user(alice), await api.user(bob)
    count = 300  # 300 x 4 KB = 1.2 MB per silent device, past its 32 KiB kernel buffer
    silent = []
    try:
        silent = [silent_device(proc.ws_port, tb) for _ in range(3)]
        sent_ids = []
        async with connect(proc.ws_url, alice) as a:
            await a.auth(ta)
            for i in range(count):
                await a.send("q" * 4000, to=bob, cid=f"s{i}")
            for i in range(count):
                sent_ids.append((await a.expect("sent", cid=f"s{i}", timeout=30))["id"])
            codes = [await trio.to_thread.run_sync(close_code_of, s) for s in silent]
            assert codes == [4008, 4008, 4008], codes
            assert a.closed is None  # the device that reads was never touched
        assert proc.logs().count("closing a slow connection") == 3
        async with connect(proc.ws_url, bob) as b:
            await b.auth(tb)
            again = [(await b.expect("message", timeout=30))["id"] for _ in range(count)]
            assert again == sent_ids
    finally:
        for s in silent:
            s.close()
        await api.aclose()
        assert proc.stop() == 0
