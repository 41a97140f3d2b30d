"""chatd: a real-time chat engine on trio.

The public surface is deliberately small; everything else lives in private
modules and may change. See ``docs/architecture.md`` for the map.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
