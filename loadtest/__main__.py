"""``python -m loadtest``: the same as ``forkloop loadtest`` (see `loadtest.runner`)."""

import sys

from loadtest.runner import command_line

sys.exit(command_line())
