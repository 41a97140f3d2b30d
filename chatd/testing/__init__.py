"""Contract suites for the ports, shipped with chatd so that a new Store or
Broker implementation can run them unchanged:
:mod:`chatd.testing.store_contract` (with its outage contract and
:mod:`chatd.testing.outage`), :mod:`chatd.testing.broker_contract` and the
broker outage contract :mod:`chatd.testing.broker_outage` (with the real
server failures of :mod:`chatd.testing.broker_faults`); see their
docstrings.

The process harness and the test clients are not here: they live in the
source tree's ``harness/`` package and do not ship.
"""
