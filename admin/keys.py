"""chatctl's key operations (``keys list|rotate|retire|reencrypt``): which
keys seal how many messages, writing the key file, and re-sealing every
body under the active key while chatd serves. Through the Store port, like
every operation in :mod:`admin.ops` (which re-exports these)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from chatd import crypto
from chatd.config import Config
from chatd.ports import Reseal, Store


async def list_keys(store: Store, ring: crypto.Keyring) -> list[dict[str, Any]]:
    counts = await store.count_by_key()
    out = [
        {
            "key": kid,
            "active": kid == ring.active,
            "messages": counts.get(kid, 0),
            "in_keyring": True,
        }
        for kid in ring.keys
    ]
    out += [
        {"key": kid, "active": False, "messages": n, "in_keyring": False}
        for kid, n in sorted(counts.items())
        if kid not in ring.keys
    ]
    return out


def save_keyring(config: Config, new: crypto.Keyring) -> dict[str, str]:
    """Keep a changed keyring where it came from. From ``CHATD_KEYS``,
    nothing is written: returns ``CHATD_KEYS``, the value to set. From the
    key file: writes it and returns ``key_file``, its path. Raises OSError
    when the file cannot be written."""
    if config.keys:
        return {"CHATD_KEYS": crypto.keys_env_value(new)}
    crypto.write_key_file(config.key_path, new)
    return {"key_file": str(config.key_path)}


async def reencrypt(
    store: Store,
    ring: crypto.Keyring,
    *,
    batch: int,
    progress: Callable[[int], None],
    passes: int = 3,
    pause: float = 1.5,
) -> dict[str, Any]:
    """Re-seal every stored body sealed with a key other than the active one.

    Safe while chatd serves: each body is replaced by compare-and-set, so a
    body that changed meanwhile is skipped (and picked up by the next pass).
    Resumable: only what is still sealed with an old key is read, so a second
    run continues where an interrupted one stopped. Runs up to ``passes``
    passes, ``pause`` seconds apart, while messages sealed with old keys
    remain (replicas that had not yet picked up the new key).
    """
    resealed = skipped = 0
    failed: set[str] = set()
    for n in range(passes):
        counts = await store.count_by_key()
        todo = {k: c for k, c in counts.items() if k != ring.active and k in ring.keys}
        if not todo:
            break
        if n:
            await trio.sleep(pause)
        for kid in sorted(todo):
            after: str | None = None
            while page := await store.messages_by_key(kid, after, batch):
                items = []
                for m in page:
                    try:
                        body = ring.open(m.body, m.id, m.conversation)
                    except crypto.KeyringError:
                        failed.add(m.id)
                        continue
                    items.append(Reseal(m.id, m.body, ring.seal(body, m.id, m.conversation)))
                done = await store.reseal(items)
                resealed += sum(done)
                skipped += len(done) - sum(done)
                progress(len(page))
                after = page[-1].id
    counts = await store.count_by_key()
    return {
        "active": ring.active,
        "resealed": resealed,
        "skipped": skipped,
        "failed": len(failed),
        "remaining": {k: c for k, c in sorted(counts.items()) if k != ring.active},
    }
