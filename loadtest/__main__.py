"""``python -m forkloop.loadtest``: the same as ``forkloop loadtest`` (see `loadtest.runner`)."""

import sys

from .runner import command_line

sys.exit(command_line())
