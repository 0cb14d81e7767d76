"""forkloop: network servers built the way the fastest servers are built.

The repository keeps one folder per part at its top (``reactor/``,
``proactor/``, ``server/``, ``loadtest/``); the distribution installs them under
this one name, as `forkloop.reactor`, `forkloop.proactor`, `forkloop.server`
and `forkloop.loadtest`, so nothing forkloop installs can shadow, or be
shadowed by, a module of the user's (a ``server.py`` beside their app, say).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forkloop")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
