"""The Redis broker's Lua scripts, one ``.lua`` file each: data, read by
:mod:`chatd.broker.scripts`. A package only so that setuptools ships the
files as its package data (``setup.cfg``)."""
