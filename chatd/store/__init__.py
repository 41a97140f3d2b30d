"""Store implementations. Pick one through :mod:`chatd.wiring`."""
