"""``python -m forkloop`` runs ``forkloop serve``."""

import sys

from .server.cli import serve_main

sys.exit(serve_main())
