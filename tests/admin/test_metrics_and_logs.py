"""``/metrics`` and the logs of a real ``chatd serve``, after traffic this
test sent and counted: every counter is checked exactly against it, parsed
with prometheus-client's own parser. The same run's log output must hold no
body, password or token."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.client import Api, connect
from harness.procs import ChatdProcess

pytestmark = pytest.mark.e2e

PASSWORD = "PW-never-logged-7f3a"
BODY = "BODY-never-logged-{}-c41e"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ChatdProcess(
        tmp_path_factory.mktemp("metrics"),
        args=["--log-level", "debug", "--node-id", "m1"],
    ).start()
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    resp = httpx.get(url + "/metrics", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out: dict = {}
    for family in text_string_to_metric_families(resp.text):
        out[("family", family.name)] = family.type
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples, name: str, **labels: str) -> float:
    """A sample's value; a missing sample is a failure, not a zero (a renamed
    metric must not pass the ``== 0`` checks)."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise AssertionError(f"no sample {name}{labels} in /metrics")
    return samples[key]


async def test_counters_match_the_traffic_and_logs_hold_no_secrets(server, names):
    alice, bob, carol = names("alice"), names("bob"), names("carol")
    api = Api(server.http_url)
    tokens = {}
    try:
        for user in (alice, bob, carol):
            tokens[user] = await api.user(user, PASSWORD)
        status, _ = await api.call(
            "POST", "/api/login", json={"username": alice, "password": "wrong-" + PASSWORD}
        )
        assert status == 401
        async with connect(server.ws_url, alice) as a, connect(server.ws_url, bob) as b:
            await a.auth(tokens[alice])
            await b.auth(tokens[bob])
            ids = []
            for i in range(5):
                cid = await a.send(BODY.format(i), to=bob)
                ids.append((await a.expect("sent", cid=cid))["id"])
            cid = await a.send(BODY.format("offline"), to=carol)  # stays owed
            await a.expect("sent", cid=cid)
            for mid in ids:
                await b.expect("message", id=mid)
            await b.ack(ids[:3])
            await b.seen(ids[3:])
            rids = []
            for _ in range(7):  # delivered x5, seen x2
                rids.append((await a.expect("receipt"))["rid"])
            await a.ack(receipts=rids)
            await a.send_json("not json")
            await a.expect("error", code="bad_request")
            await a.send_json({"type": "ping"})
            await a.expect("pong")
            # Scraped while both are connected.
            m = scrape(server.http_url)
            status, history = await api.call(
                "GET",
                f"/api/conversations/dm:{min(alice, bob)}:{max(alice, bob)}/messages",
                tokens[alice],
            )
            assert status == 200 and len(history["messages"]) == 5
    finally:
        await api.aclose()

    frames_in = {"auth": 2, "send": 6, "ack": 2, "seen": 1, "ping": 1, "invalid": 1, "typing": 0}
    for kind, count in frames_in.items():
        assert value(m, "chatd_frames_in_total", type=kind) == count, kind
    frames_out = {
        "ready": 2,
        "sent": 6,
        "message": 5,
        "receipt": 7,
        "pong": 1,
        "error": 1,
        "presence": 0,
        "other": 0,
    }
    for kind, count in frames_out.items():
        assert value(m, "chatd_frames_out_total", type=kind) == count, kind
    assert value(m, "chatd_messages_stored_total") == 6
    assert value(m, "chatd_messages_duplicate_total") == 0
    assert value(m, "chatd_errors_total", code="bad_request", transport="ws") == 1
    assert value(m, "chatd_errors_total", code="unauthorized", transport="http") == 1
    assert value(m, "chatd_delivery_latency_seconds_count") == 5
    assert value(m, "chatd_seen_latency_seconds_count") == 2
    assert 0 < value(m, "chatd_delivery_latency_seconds_sum") < 5 * 10
    assert value(m, "chatd_ws_connections") == 2
    assert value(m, "chatd_ws_sessions") == 2
    assert value(m, "chatd_ws_connections_accepted_total") == 2
    assert value(m, "chatd_owed_queue_users") == 1  # carol
    assert value(m, "chatd_owed_queue_entries") == 1
    assert value(m, "chatd_node_info", node="m1", version=_version()) == 1
    assert value(m, "chatd_active_key_info", key="k1") == 1
    # Store calls are timed by method. Every send, mark and receipt ack goes
    # through one group commit: a write may carry several.
    writes = value(m, "chatd_store_call_seconds_count", method="write")
    assert value(m, "chatd_store_writes_total") == writes
    assert 1 <= writes <= value(m, "chatd_store_write_requests_total")
    # 6 sends and the marks of 2 acks and 1 seen, at least.
    assert value(m, "chatd_store_write_requests_total") >= 6 + 3
    # Routing from the group commit does not wait for the broker: counted.
    assert value(m, "chatd_broker_nowait_calls_total", method="route_nowait") >= 6
    # Declared, and no call failed (its samples appear on the first failure).
    assert m[("family", "chatd_port_unavailable")] == "counter"
    assert not [k for k in m if k[0] == "chatd_port_unavailable_total"]

    # -- the logs of the same run ------------------------------------------------
    text = server.logs()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "chatd logged nothing"
    for line in lines:
        doc = json.loads(line)  # one JSON object per line
        assert doc["node"] == "m1" and doc["level"] and doc["msg"]
    secrets = [PASSWORD, *tokens.values(), *(BODY.format(i) for i in (*range(5), "offline"))]
    secrets += [BODY.split("{")[0]]  # not even a prefix of a body
    for secret in secrets:
        assert secret not in text, f"{secret[:12]}... appears in the logs"


def _version() -> str:
    from chatd import __version__

    return __version__


def test_without_prometheus_client_metrics_are_no_ops(monkeypatch):
    """prometheus-client is a dependency, but an install without it (a trimmed
    image, a vendored build) must still run chatd, and /metrics says why not."""
    from chatd import metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "CollectorRegistry", None)
    m = metrics_mod.Metrics("n1")
    assert not m.enabled
    m.frame_out(b'{"type":"error","code":"bad_request","message":"x"}')
    m.frames_in["send"].inc()
    m.messages_stored.inc()
    m.ws_connections.inc()
    m.watch(lambda: 3, lambda: "k1")
    with pytest.raises(RuntimeError, match="prometheus-client"):
        m.render()
