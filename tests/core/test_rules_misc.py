"""Names, ids, rate limiting, envelopes, crypto, auth and config."""

import base64
import json
import os
import stat

import pytest

from chatd import config as cfg
from chatd.auth import Passwords, Tokens, load_or_create_secret
from chatd.core.envelope import (
    KickEnvelope,
    MessageEnvelope,
    PresenceEnvelope,
    ReceiptEnvelope,
    TypingEnvelope,
    decode,
    encode,
)
from chatd.core.errors import BadRequest, Unauthorized
from chatd.core.ids import UlidFactory, ulid_time_ms
from chatd.core.model import Receipt, Sealed, Status, StoredMessage
from chatd.core.names import check_cid, dm_id, dm_members, is_conversation_id, normalize_username
from chatd.core.ratelimit import TokenBucket
from chatd.crypto import Keyring, KeyringError, load_keyring, parse_keys_env


@pytest.mark.parametrize(
    ("raw", "name"),
    [("Alice", "alice"), ("a.b-c_9", "a.b-c_9"), ("abc", "abc"), ("x" * 32, "x" * 32)],
)
def test_usernames(raw, name):
    assert normalize_username(raw) == name


@pytest.mark.parametrize("raw", ["ab", "x" * 33, "al ice", "al:ice", "ällo", "", None, 5])
def test_bad_usernames(raw):
    with pytest.raises(BadRequest):
        normalize_username(raw)


def test_conversation_ids():
    assert dm_id("bob", "alice") == "dm:alice:bob"
    assert dm_members("dm:alice:bob") == ("alice", "bob")
    assert dm_members("dm:bob:alice") is None  # not sorted: not the canonical id
    assert dm_members("dm:alice") is None
    assert is_conversation_id("g:01ABC") and not is_conversation_id("x:1")
    assert check_cid("a b") == "a b"


def test_ulids_sort_by_creation_even_in_one_millisecond():
    f = UlidFactory(clock_ms=lambda: 1_700_000_000_000)
    ids = [f.new() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert ulid_time_ms(ids[0]) == 1_700_000_000_000
    clock = iter([5, 4, 6])  # the wall clock stepping back keeps the order
    g = UlidFactory(clock_ms=lambda: next(clock))
    a, b, c = g.new(), g.new(), g.new()
    assert a < b < c


def test_token_bucket():
    b = TokenBucket(rate=2, burst=2, now=0)
    assert b.take(0) and b.take(0) and not b.take(0)
    assert b.take(0.5) and not b.take(0.5)
    assert TokenBucket(rate=0, burst=1, now=0).take(0)


def test_envelopes_roundtrip():
    m = StoredMessage("id1", "dm:a:b", 3, "a", 9, Sealed("k1", b"n" * 12, b"ct"))
    for env in (
        MessageEnvelope(m),
        ReceiptEnvelope(Receipt("id1", "dm:a:b", "a", "b", Status.SEEN, 10)),
        TypingEnvelope("dm:a:b", "a"),
        PresenceEnvelope("a", False, 12),
        KickEnvelope("jti-1", "logged out"),
        KickEnvelope(None, "account disabled"),
    ):
        assert decode(encode(env)) == env
    for bad in ("{}", "[]", "nope", '{"k":"z"}', '{"k":"m"}'):
        with pytest.raises(ValueError):
            decode(bad)


def test_message_envelope_never_carries_plaintext():
    ring = Keyring({"k1": os.urandom(32)}, "k1")
    sealed = ring.seal("top secret words", "id1", "dm:a:b")
    payload = encode(MessageEnvelope(StoredMessage("id1", "dm:a:b", 1, "a", 1, sealed)))
    assert "secret" not in payload


# -- crypto ------------------------------------------------------------------------


def test_seal_and_open_bind_id_and_conversation():
    ring = Keyring({"k1": os.urandom(32)}, "k1")
    s1 = ring.seal("hello", "id1", "dm:a:b")
    s2 = ring.seal("hello", "id1", "dm:a:b")
    assert s1.nonce != s2.nonce and s1.ciphertext != s2.ciphertext
    assert b"hello" not in s1.ciphertext
    assert ring.open(s1, "id1", "dm:a:b") == "hello"
    with pytest.raises(KeyringError):
        ring.open(s1, "id2", "dm:a:b")
    with pytest.raises(KeyringError):
        ring.open(s1, "id1", "dm:a:c")


def test_rotation_keeps_old_keys_opening():
    ring = Keyring({"k1": os.urandom(32)}, "k1")
    old = ring.seal("before", "id1", "c")
    ring2 = ring.with_new_key("k2")
    new = ring2.seal("after", "id2", "c")
    assert new.key_id == "k2" and old.key_id == "k1"
    assert ring2.open(old, "id1", "c") == "before"
    with pytest.raises(KeyringError):
        ring.open(new, "id2", "c")
    assert "k2" in repr(ring2) and str(ring2.keys["k2"]) not in repr(ring2)


def test_keyring_from_env_and_file(tmp_path):
    k = base64.b64encode(os.urandom(32)).decode()
    ring = parse_keys_env(f"a:{k}, b:{k}", None)
    assert ring.active == "b" and set(ring.keys) == {"a", "b"}
    assert parse_keys_env(f"a:{k},b:{k}", "a").active == "a"
    for bad in ("", "nocolon", "a:notbase64!", f"a:{base64.b64encode(b'short').decode()}"):
        with pytest.raises(KeyringError):
            parse_keys_env(bad, None)
    path = tmp_path / "d" / "keys.json"
    created = load_keyring(None, None, path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring(None, None, path, create=True).keys == created.keys
    assert json.loads(path.read_text())["active"] == created.active
    with pytest.raises(KeyringError):
        load_keyring(None, None, tmp_path / "missing.json", create=False)


# -- auth --------------------------------------------------------------------------


def test_passwords():
    p = Passwords()
    h = p.hash("correct horse")
    assert h.startswith("$argon2id$") and "correct" not in h
    assert p.verify(h, "correct horse")
    assert not p.verify(h, "wrong horse")
    assert not p.verify(None, "anything")
    assert not p.verify("garbage", "x")


def test_tokens():
    t = Tokens("s" * 32, 60)
    token = t.issue("alice", now=1_000_000_000_000 / 1000 + 10**6)
    with pytest.raises(Unauthorized):
        t.verify(token)  # issued long ago: expired
    import time

    import jwt

    good = t.issue("alice", time.time())
    assert t.verify(good).user == "alice"
    # Each token has an id of its own (what logout revokes).
    ids = {t.verify(t.issue("alice", time.time())).token_id for _ in range(20)}
    assert len(ids) == 20 and None not in ids
    old_style = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60, "iat": 1, "iss": "chatd"},
        "s" * 32,
        algorithm="HS256",
    )
    assert t.verify(old_style).token_id is None
    with pytest.raises(Unauthorized):
        Tokens("x" * 32, 60).verify(good)  # forged: another secret
    with pytest.raises(Unauthorized):
        t.verify(good + "x")
    none_alg = jwt.encode(
        {"sub": "alice", "exp": 2**31, "iat": 1, "iss": "chatd"}, "", algorithm="none"
    )
    with pytest.raises(Unauthorized):
        t.verify(none_alg)
    hs512 = jwt.encode(
        {"sub": "alice", "exp": 2**31, "iat": 1, "iss": "chatd"}, "s" * 64, algorithm="HS512"
    )
    with pytest.raises(Unauthorized):
        Tokens("s" * 64, 60).verify(hs512)  # right secret, wrong algorithm: pinned
    no_exp = jwt.encode({"sub": "alice", "iat": 1, "iss": "chatd"}, "s" * 32, algorithm="HS256")
    with pytest.raises(Unauthorized):
        t.verify(no_exp)


def test_secret_file(tmp_path):
    s = load_or_create_secret(tmp_path / "jwt.secret")
    assert len(s) >= 32 and load_or_create_secret(tmp_path / "jwt.secret") == s
    assert stat.S_IMODE((tmp_path / "jwt.secret").stat().st_mode) == 0o600


# -- config ------------------------------------------------------------------------


def test_config_precedence():
    c = cfg.load({"PORT": "9000", "CHATD_WS_PORT": "9001"}, {})
    assert (c.http_port, c.ws_port) == (9000, 9001)
    c = cfg.load({"PORT": "9000", "CHATD_HTTP_PORT": "9100"}, {"http_port": 9200})
    assert c.http_port == 9200
    assert cfg.load({"PORT": "9000", "CHATD_HTTP_PORT": "9100"}, {}).http_port == 9100
    assert cfg.load({"JWT_SECRET": "x" * 20}, {}).jwt_secret == "x" * 20
    c = cfg.load({"REDIS_URL": "redis://r", "MONGO_URI": "mongodb://m"}, {})
    assert (c.broker_kind, c.store_kind) == ("redis", "mongo")
    c = cfg.load({}, {})
    assert (c.broker_kind, c.store_kind, c.http_port, c.ws_port) == ("memory", "sqlite", 8080, 8081)


@pytest.mark.parametrize(
    ("env", "flags"),
    [
        ({"CHATD_HTTP_PORTT": "1"}, {}),
        ({}, {"nope": 1}),
        ({"CHATD_HTTP_PORT": "abc"}, {}),
        ({}, {"http_port": 70000}),
        ({}, {"http_port": 9000, "ws_port": 9000}),
        ({}, {"log_level": "loud"}),
        ({"JWT_SECRET": "short"}, {}),
    ],
)
def test_config_errors(env, flags):
    with pytest.raises(cfg.ConfigError):
        cfg.load(env, flags)


LONG = "s" * 32
KEYS = "k1:" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, None),  # one process, embedded: generated secrets are fine
        ({"JWT_SECRET": "x" * 20}, None),
        ({"REDIS_URL": "redis://r"}, "CHATD_JWT_SECRET of at least 32 bytes and CHATD_KEYS"),
        ({"MONGO_URI": "mongodb://m", "CHATD_KEYS": KEYS}, "CHATD_JWT_SECRET of at least 32"),
        ({"REDIS_URL": "redis://r", "JWT_SECRET": "x" * 31, "CHATD_KEYS": KEYS}, "32 bytes"),
        ({"REDIS_URL": "redis://r", "JWT_SECRET": LONG}, "set CHATD_KEYS"),
        ({"REDIS_URL": "redis://r", "JWT_SECRET": LONG, "CHATD_KEYS": KEYS}, None),
        ({"REDIS_URL": "redis://r", "JWT_SECRET": LONG, "CHATD_KEY_FILE": "/k.json"}, None),
        ({"MONGO_URI": "mongodb://m", "JWT_SECRET": LONG, "CHATD_KEYS": KEYS}, None),
    ],
)
def test_replicas_must_name_their_shared_secrets(env, problem):
    config = cfg.load(env, {})
    if problem is None:
        cfg.require_shared_secrets(config)
        return
    with pytest.raises(cfg.ConfigError, match=problem) as info:
        cfg.require_shared_secrets(config)
    assert "\n" not in str(info.value)


def test_test_variables_are_not_config():
    cfg.load({"CHATD_TEST_MONGO_URL": "x"}, {})


def test_secrets_do_not_show_in_repr():
    c = cfg.load({"JWT_SECRET": "supersecretvalue123"}, {})
    assert "supersecretvalue123" not in repr(c)


def test_wiring_refuses_unknown_names(tmp_path):
    from chatd import wiring

    with pytest.raises(cfg.ConfigError, match="unknown store"):
        wiring.open_store(cfg.load({}, {"store": "oracle", "data_dir": str(tmp_path)}))
    with pytest.raises(cfg.ConfigError, match="unknown broker"):
        wiring.open_broker(cfg.load({}, {"broker": "kafka"}))
    with pytest.raises(cfg.ConfigError, match="needs"):
        wiring.open_broker(cfg.load({}, {"broker": "redis"}))
