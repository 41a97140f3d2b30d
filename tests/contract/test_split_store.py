"""SplitStore (writes through one store, reads through another on the same
database) must route every method of the Store port, each one way: a read
it sent to the writer would hide exactly the cross-process bug it exists
to catch."""

from chatd.ports import Store
from chatd.testing.store_contract import SplitStore


def test_split_store_covers_every_method_of_the_port_once():
    methods = {n for n, v in vars(Store).items() if callable(v) and not n.startswith("_")}
    assert methods == SplitStore._READS | SplitStore._WRITES
    assert not SplitStore._READS & SplitStore._WRITES
