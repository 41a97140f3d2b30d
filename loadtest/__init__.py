"""Load tooling for chatd: the Locust suite (``loadtest/run``), the capacity
benchmark (``loadtest/bench.py``) and a socket.io reference implementation
(``loadtest/reference/``). See ``docs/loadtest.md``."""
