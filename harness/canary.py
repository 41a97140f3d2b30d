"""Where could a message's plaintext be? A scanner for issue 12's promise
that the server never sees the plaintext of an end-to-end message.

It gathers, as text, everything the server side holds or emitted: every
body in the store **opened with the server's own keyring** (so that the
at-rest encryption hides nothing from the scan), the raw database files,
every key and value in Redis with each sealed envelope in it opened too,
what ``redis-cli MONITOR`` saw pass (envelopes opened the same way), the
replicas' and NGINX's logs, and every frame the clients got. A test asserts
that an end-to-end canary is in none of it, and that a canary sent in a
plain conversation is found (the positive control: the scanner can see).
"""

from __future__ import annotations

import codecs
import json
import re
import sqlite3
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chatd import crypto
from chatd.core.envelope import EventEnvelope, MessageEnvelope, decode
from chatd.core.model import Sealed

_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"')


def _unescape(raw: bytes) -> bytes:
    """redis-cli's quoting (\\" \\\\ \\n \\xNN ...) undone."""
    return codecs.escape_decode(raw)[0]


@dataclass
class Haystack:
    """Named blobs of text to search."""

    parts: dict[str, list[str]] = field(default_factory=dict)

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.parts.setdefault(where, []).append(text)

    def where(self, needle: str) -> list[str]:
        """The names of the parts that hold ``needle``."""
        return sorted(name for name, texts in self.parts.items() if any(needle in t for t in texts))


@dataclass
class Scanner:
    keyring: crypto.Keyring
    found: Haystack = field(default_factory=Haystack)

    @classmethod
    def from_key_file(cls, path: Path) -> Scanner:
        return cls(crypto.load_key_file(path))

    def _open(self, body: Sealed, message_id: str, conversation: str) -> str:
        try:
            return self.keyring.open(body, message_id, conversation)
        except crypto.KeyringError as exc:
            return f"<does not open: {exc}>"

    def envelopes(self, where: str, blob: bytes | str) -> None:
        """Every sealed envelope in ``blob`` (JSON objects starting
        ``{"k":``), opened with the keyring."""
        text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
        decoder = json.JSONDecoder()
        for m in re.finditer(r'\{"k":', text):
            try:
                _, end = decoder.raw_decode(text, m.start())
                env = decode(text[m.start() : end])
            except (ValueError, KeyError, TypeError):
                continue
            match env:
                case MessageEnvelope(message=msg):
                    self.found.add(where, self._open(msg.body, msg.id, msg.conversation))
                case EventEnvelope(event=ev) if ev.body is not None:
                    self.found.add(where, self._open(ev.body, ev.message_id, ev.conversation))

    def sqlite_bodies(self, db_path: Path) -> dict[str, str]:
        """Every message body of a SQLite store, opened with the keyring, by
        message id (a message deleted for everyone has no body left)."""
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT id, conversation, key_id, nonce, ciphertext FROM messages WHERE deleted = 0"
            ).fetchall()
        finally:
            db.close()
        return {
            mid: self._open(Sealed(kid, bytes(nonce), bytes(ct)), mid, conv)
            for mid, conv, kid, nonce, ct in rows
        }

    def sqlite_store(self, db_path: Path) -> None:
        """Every message body of a SQLite store, opened; and the raw files."""
        for text in self.sqlite_bodies(db_path).values():
            self.found.add("store (opened)", text)
        for path in sorted(db_path.parent.glob(db_path.name + "*")):
            self.found.add("store (raw files)", path.read_bytes())

    def redis_keys(self, port: int) -> None:
        """Every key and value in the Redis on ``port``, and the envelopes in them opened."""
        blob = redis_dump(port)
        self.found.add("redis (keys)", blob)
        self.envelopes("redis (keys, opened)", blob)

    def monitor_log(self, text: bytes) -> None:
        self.found.add("redis (monitor)", text)
        for line in text.splitlines():
            for arg in _QUOTED.findall(line):
                self.envelopes("redis (monitor, opened)", _unescape(arg))

    def files(self, where: str, paths: Iterable[Path]) -> None:
        for path in paths:
            if path.exists():
                self.found.add(where, path.read_bytes())

    def frames(self, where: str, frames: Iterable[dict]) -> None:
        for frame in frames:
            self.found.add(where, json.dumps(frame, ensure_ascii=False))


def redis_dump(port: int) -> bytes:
    """Every key and value in the Redis on ``port``, as one blob."""

    def cli(*args: str) -> bytes:
        return subprocess.run(
            ["redis-cli", "-p", str(port), "--raw", *args],
            check=True,
            capture_output=True,
            timeout=10,
        ).stdout

    blob = []
    for key in cli("--scan").decode().split():
        kind = cli("TYPE", key).decode().strip()
        read = {
            "string": ("GET", key),
            "hash": ("HGETALL", key),
            "list": ("LRANGE", key, "0", "-1"),
            "set": ("SMEMBERS", key),
            "zset": ("ZRANGE", key, "0", "-1"),
            "stream": ("XRANGE", key, "-", "+"),
        }.get(kind)
        if read is not None:
            blob.append(key.encode() + b" " + cli(*read))
    return b"\n".join(blob)


@contextmanager
def redis_monitor(port: int, out: Path) -> Iterator[Path]:
    """``redis-cli MONITOR`` into ``out`` while the block runs."""
    with open(out, "wb") as sink:
        proc = subprocess.Popen(["redis-cli", "-p", str(port), "MONITOR"], stdout=sink)
        try:
            yield out
        finally:
            proc.terminate()
            proc.wait(5)
