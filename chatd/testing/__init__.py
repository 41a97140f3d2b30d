"""Test support that ships with chatd: contract suites for the ports, a
process harness and a WebSocket client. A new Store or Broker
implementation runs :mod:`chatd.testing.store_contract` /
:mod:`chatd.testing.broker_contract` unchanged (see their docstrings).
"""
