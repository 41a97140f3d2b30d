"""Tokens and rates on Redis: revoked access tokens, refresh-token families,
rate buckets.

Owns the Broker port's ``revoke``/``is_revoked``, ``refresh_begin``/
``refresh_rotate``/``refresh_end`` (script ROTATE) and ``take`` (script
TAKE); key names from :mod:`chatd.broker.keys`.

Guarantees: every key expires (a revocation when the token would have, a
family at its ``until``, a bucket once it would be full again); a refresh
token presented twice deletes its family (ROTATE answers ``reused``); a
bucket runs on Redis's clock, so every node shares one rate.
"""

from __future__ import annotations

import time

from chatd.broker.keys import Keys
from chatd.broker.link import Link
from chatd.broker.scripts import SCRIPTS, Call
from chatd.ports import Rotation, Taken


class Tokens:
    def __init__(self, link: Link, keys: Keys) -> None:
        self.link = link
        self.keys = keys

    async def revoke(self, token_id: str, until_ms: int) -> None:
        if until_ms > time.time_ns() // 1_000_000:
            await self.link.commands(
                "revoke", [("SET", self.keys.revoked_key(token_id), 1, "PXAT", until_ms)]
            )

    async def is_revoked(self, token_id: str) -> bool:
        [found] = await self.link.commands("revoked", [("EXISTS", self.keys.revoked_key(token_id))])
        return bool(found)

    async def refresh_begin(
        self, family: str, user: str, digest: str, token_id: str, until_ms: int
    ) -> None:
        key = self.keys.family_key(family)
        await self.link.commands(
            "refresh",
            [
                ("HSET", key, "user", user, "digest", digest, "jti", token_id),
                ("PEXPIREAT", key, until_ms),
            ],
        )

    async def refresh_rotate(
        self, family: str, digest: str, new_digest: str, new_token_id: str, until_ms: int
    ) -> Rotation:
        call: Call = (
            SCRIPTS["rotate"],
            [self.keys.family_key(family)],
            [digest, new_digest, new_token_id, until_ms],
        )
        [(outcome, user, token_id)] = await self.link.scripts("refresh", [call])
        return Rotation(str(outcome), user or None, token_id or None)

    async def refresh_end(self, family: str) -> None:
        await self.link.commands("refresh", [("DEL", self.keys.family_key(family))])

    async def take(self, bucket: str, want: int, rate: float, burst: int) -> Taken:
        if rate <= 0:
            return Taken(want, 0.0)
        call: Call = (SCRIPTS["take"], [self.keys.bucket_key(bucket)], [want, rate, burst])
        [(taken, wait_ms)] = await self.link.scripts("take", [call])
        return Taken(int(taken), int(wait_ms) / 1000)
