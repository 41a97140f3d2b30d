"""The Store port's contract, as a test suite any implementation runs unchanged.

Use it by subclassing in a test module and providing a ``store`` fixture
that yields a fresh, empty store::

    class TestSqliteStore(StoreContract):
        @pytest.fixture
        async def store(self, tmp_path):
            s = SqliteStore.open(tmp_path)
            yield s
            await s.aclose()

Each test states one guarantee from :class:`chatd.ports.Store`. The tests
live in one module per topic, each a class :class:`StoreContract` is made of:

* :mod:`.accounts`: users and conversations;
* :mod:`.messages`: messages, seq and idempotency;
* :mod:`.receipts`: receipts, what is owed, ``write``;
* :mod:`.events`: reactions, edits, deletions;
* :mod:`.groups`: groups that change;
* :mod:`.devices`: end-to-end devices and epochs;
* :mod:`.administration`: the operator's commands.

:mod:`.outage` is a second suite, :class:`StoreOutageContract`: every method
answers :class:`chatd.core.errors.Unavailable` (and nothing else) while the
backend is away, and the store works again once it is back. :mod:`.helpers`
has the record builders the suites (and other tests) use; :mod:`.split` the
:class:`SplitStore` that runs the contract across two stores on one database.
"""

from chatd.testing.store_contract.accounts import AccountsContract
from chatd.testing.store_contract.administration import AdministrationContract
from chatd.testing.store_contract.devices import DevicesContract
from chatd.testing.store_contract.events import EventsContract
from chatd.testing.store_contract.groups import GroupsContract
from chatd.testing.store_contract.helpers import (
    ContractBase,
    new_event,
    new_message,
    one_event,
    present,
    sealed,
    users,
)
from chatd.testing.store_contract.messages import MessagesContract
from chatd.testing.store_contract.outage import Down, StoreOutageContract
from chatd.testing.store_contract.receipts import ReceiptsContract
from chatd.testing.store_contract.split import SplitStore


class StoreContract(
    AccountsContract,
    MessagesContract,
    ReceiptsContract,
    EventsContract,
    GroupsContract,
    DevicesContract,
    AdministrationContract,
):
    """Every guarantee of the Store port; a test module subclasses it and
    provides the ``store`` fixture."""


__all__ = [
    "AccountsContract",
    "AdministrationContract",
    "ContractBase",
    "DevicesContract",
    "Down",
    "EventsContract",
    "GroupsContract",
    "MessagesContract",
    "ReceiptsContract",
    "SplitStore",
    "StoreContract",
    "StoreOutageContract",
    "new_event",
    "new_message",
    "one_event",
    "present",
    "sealed",
    "users",
]
