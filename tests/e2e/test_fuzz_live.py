"""A live ``chatd serve`` fuzzed with hypothesis: arbitrary and near-valid
frames, and random interleavings of send/ack/seen aimed at other people's
ids, from an authenticated device. Never an ``internal`` error, never a
crash, never a change to another user's data, and other users' chats keep
flowing. CI runs a fixed example budget; ``make fuzz`` a long one."""

from __future__ import annotations

import json
import os

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.client import Api, connect
from harness.procs import ChatdProcess

pytestmark = pytest.mark.e2e

EXAMPLES = 2000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 100

#: Placeholders the runner replaces with the live world's ids.
IDS = ["$M", "$RID_D", "$RID_S", "$CONV", "$GROUP", "nope", "", "dm:a:b", "g:x"]
USERS = ["$ALICE", "$BOB", "$ME", "nobody_here", "", "A", "x" * 40]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from(IDS + USERS),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
plausible = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("send"), "cid": st.text("abc123", min_size=1, max_size=8)},
        optional={
            "to": st.sampled_from(USERS),
            "conversation": st.sampled_from(IDS),
            "body": st.text(max_size=50),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("ack")},
        optional={
            "ids": st.lists(st.sampled_from(IDS), max_size=3),
            "receipts": st.lists(st.sampled_from(IDS), max_size=3),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("seen")}, optional={"ids": st.lists(st.sampled_from(IDS), max_size=3)}
    ),
    st.fixed_dictionaries(
        {"type": st.just("typing")}, optional={"conversation": st.sampled_from(IDS)}
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["auth", "ping", "pong", "x"])}, optional={"token": values}
    ),
)
anything = st.one_of(
    plausible,
    st.dictionaries(
        st.sampled_from(["type", "cid", "to", "ids", "body", "token"]), values, max_size=4
    ),
    values,
)
raw_frames = st.one_of(anything.map(json.dumps), st.text(max_size=60))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server, three users, and a message from alice to bob that bob has
    not received: mallory fuzzes; nothing she does may touch it."""
    proc = ChatdProcess(tmp_path_factory.mktemp("fuzz")).start()

    async def setup() -> dict[str, str]:
        api = Api(proc.http_url)
        try:
            names = {u: f"{u}_{os.getpid()}" for u in ("alice", "bob", "mallory")}
            tokens = {u: await api.user(n) for u, n in names.items()}
            async with connect(proc.ws_url, "alice") as a:
                await a.auth(tokens["alice"])
                cid = await a.send("canary for bob", to=names["bob"])
                sent = await a.expect("sent", cid=cid)
            status, group = await api.call(
                "POST",
                "/api/conversations",
                tokens["alice"],
                json={"members": [names["bob"]], "title": "no mallory"},
            )
            assert status == 201, group
            return {
                **{f"token_{u}": t for u, t in tokens.items()},
                "$ALICE": names["alice"],
                "$BOB": names["bob"],
                "$ME": names["mallory"],
                "$M": sent["id"],
                "$RID_D": f"{sent['id']}:{names['bob']}:d",
                "$RID_S": f"{sent['id']}:{names['bob']}:s",
                "$CONV": sent["conversation"],
                "$GROUP": group["id"],
            }
        finally:
            await api.aclose()

    ids = trio.run(setup)
    yield proc, ids
    assert proc.stop() == 0, proc.logs()[-3000:]


def fill(frame: str, ids: dict[str, str]) -> str:
    for placeholder in sorted((k for k in ids if k.startswith("$")), key=len, reverse=True):
        frame = frame.replace(placeholder, ids[placeholder])
    return frame


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(raw_frames, min_size=1, max_size=12))
def test_fuzzed_frames_get_defined_answers(world, batch):
    proc, ids = world

    async def run() -> None:
        async with connect(proc.ws_url, "mallory") as m:
            await m.auth(ids["token_mallory"])
            for frame in batch:
                await m.send_json(fill(frame, ids))
            await m.send_json({"type": "ping"})
            await m.expect("pong", timeout=10)
            internal = [f for f in m.frames if f.get("code") == "internal"]
            assert not internal, (batch, internal)
            assert m.closed is None, (batch, m.closed, m.frames[-3:])

    trio.run(run)


def test_after_the_fuzz_others_data_is_untouched_and_chat_flows(world):
    proc, ids = world

    async def run() -> None:
        api = Api(proc.http_url)
        try:
            status, page = await api.call(
                "GET", f"/api/conversations/{ids['$CONV']}/messages", ids["token_alice"]
            )
            assert status == 200
            [canary] = [m for m in page["messages"] if m["id"] == ids["$M"]]
            assert canary["body"] == "canary for bob"
            assert canary["delivered_to"] == [] and canary["seen_by"] == []
            status, convs = await api.call("GET", "/api/conversations", ids["token_mallory"])
            assert all(
                ids["$BOB"] not in c["members"] or ids["$ME"] in c["members"]
                for c in convs["conversations"]
            )
            async with connect(proc.ws_url, "bob") as b, connect(proc.ws_url, "alice") as a:
                await b.auth(ids["token_bob"])
                got = await b.expect("message", id=ids["$M"])
                assert got["body"] == "canary for bob"
                await a.auth(ids["token_alice"])
                cid = await a.send("still flowing", to=ids["$BOB"])
                await a.expect("sent", cid=cid)
                assert (await b.expect("message", lambda f: f["body"] == "still flowing"))[
                    "from"
                ] == ids["$ALICE"]
        finally:
            await api.aclose()
        assert "Traceback" not in proc.logs()

    trio.run(run)
