"""SplitStore: a store whose reads and writes go to two stores on one database."""

from __future__ import annotations

from typing import Any

from chatd.ports import Store


class SplitStore:
    """Writes through one store, reads through another on the same database,
    as two replicas do: run the contract on it to check that what one
    process commits, another reads."""

    _READS = frozenset(
        {
            "get_user",
            "get_conversation",
            "conversations_of",
            "shares_conversation",
            "dm_peers",
            "history",
            "get_messages",
            "owed_messages",
            "owed_receipts",
            "owed_events",
            "devices",
            "contacts",
            "active_devices",
            "sent_id",
            "get_epoch",
            "epoch_check",
            "epoch_shares",
            "ping",
            "list_users",
            "count_by_key",
            "messages_by_key",
            "stats",
        }
    )
    #: Everything else the port has (tests/contract/test_split_store.py
    #: checks that the two cover every method of Store, once).
    _WRITES = frozenset(
        {
            "write",
            "append",
            "mark",
            "ack_receipts",
            "create_user",
            "set_last_seen",
            "ensure_dm",
            "create_group",
            "change_group",
            "put_device",
            "remove_device",
            "put_epoch",
            "set_disabled",
            "delete_user",
            "reseal",
            "aclose",
        }
    )

    def __init__(self, writer: Store, reader: Store) -> None:
        self._writer = writer
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader if name in self._READS else self._writer, name)
