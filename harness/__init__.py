"""The test harness: what the tests and ``loadtest/`` use to run chatd for
real. It launches processes (chatd, ``redis-server``, a Redis Cluster,
``nginx``, chatd on mongomock), injects faults, checks for lost messages,
and speaks to chatd as a client (plain and end-to-end).

It does not ship: the wheel, the image and the zipapp hold ``chatd`` and
``admin`` only (``setup.cfg``), and no runtime module imports from here
(``tests/test_house.py`` checks both). It is imported from the source tree:
pytest puts the repository root on ``sys.path`` (``pythonpath`` in
``setup.cfg``), the ``loadtest/`` scripts do it themselves.

The contract suites a new Store or Broker implementation runs stay in
:mod:`chatd.testing`, which does ship.
"""
