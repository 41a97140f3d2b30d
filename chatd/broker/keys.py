"""Every Redis key and channel name the broker uses, and how to read them back.

Owns the key layout of docs/redis.md (*Key layout*): the presence, queue,
delivery, token and rate modules build their names here and nowhere else.

Guarantees: every per-user key and channel carries the hash tag
``{u:<user>}``, so all of one user's keys live in one Redis Cluster slot
and a script on them touches one slot; node keys (heartbeats, the index of
incarnations, a node's users, burials) have names of their own. ``P`` below
is the prefix (``chatd`` by default).
"""

from __future__ import annotations


def incarnation_of(node: str, token: str) -> str:
    """How Redis knows ``node`` as served by the broker instance ``token``."""
    return f"{node}#{token}"


def node_of(incarnation: str) -> str:
    return incarnation.rpartition("#")[0]


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    # -- per user: one hash tag, one slot ----------------------------------------------------

    def user_key(self, user: str, kind: str) -> str:
        """``P:{u:<user>}:<kind>``: ``conns``, ``seen``, ``q``, ``qo``, ``rate:…``."""
        return f"{self.prefix}:{{u:{user}}}:{kind}"

    def user_channel(self, user: str, incarnation: str = "") -> str:
        """Where items for ``user`` reach ``incarnation``: in the user's slot,
        so a cluster publishes it on the user's shard only."""
        return f"{self.prefix}:{{u:{user}}}:n:{incarnation}"

    def user_pattern(self, kind: str) -> str:
        """A SCAN pattern for the ``kind`` key of every user."""
        return f"{self.prefix}:{{u:*}}:{kind}"

    def user_of(self, key: str, kind: str) -> str | None:
        """The user of a ``kind`` key (None: not such a key)."""
        head, tail = f"{self.prefix}:{{u:", f"}}:{kind}"
        if key.startswith(head) and key.endswith(tail):
            return key[len(head) : -len(tail)]
        return None

    def user_of_channel(self, channel: str, incarnation: str) -> str | None:
        """The user of one of ``incarnation``'s channels (None: not one)."""
        return self.user_of(channel, f"n:{incarnation}")

    # -- per node ----------------------------------------------------------------------------

    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}:hb:"

    def heartbeat_key(self, incarnation: str) -> str:
        return f"{self.heartbeat_prefix()}{incarnation}"

    def incarnations_key(self) -> str:
        """Every incarnation that ever beat, by its last beat (ms): a
        survivor finds the dead ones here."""
        return f"{self.prefix}:incs"

    def users_key(self, incarnation: str) -> str:
        """The users with a connection through ``incarnation``."""
        return f"{self.prefix}:inc:{incarnation}:users"

    def burial_key(self, incarnation: str) -> str:
        return f"{self.prefix}:buried:{incarnation}"

    # -- tokens and rates --------------------------------------------------------------------

    def revoked_key(self, token_id: str) -> str:
        return f"{self.prefix}:revoked:{token_id}"

    def family_key(self, family: str) -> str:
        return f"{self.prefix}:refresh:{family}"

    def bucket_key(self, bucket: str) -> str:
        """A rate bucket's key; a bucket named ``u:<user>:…`` sits in the
        user's slot."""
        if bucket.startswith("u:"):
            user, _, rest = bucket[2:].partition(":")
            return self.user_key(user, f"rate:{rest}")
        return f"{self.prefix}:rate:{bucket}"
