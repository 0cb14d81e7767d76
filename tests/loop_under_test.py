"""A loop backend as the tests see it: `LoopUnderTest`, what the ``backend`` fixture gives.

The fixture (`tests/conftest.py`) makes one per registered backend or variant;
test modules import the class from here to name its type, never from conftest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from forkloop.server import backends


@dataclass(frozen=True)
class LoopUnderTest:
    """One registered backend as the tests see it; ``id`` names it in test ids."""

    id: str

    @property
    def backend(self) -> str:
        """The registry's name, which ``forkloop serve --loop`` also takes."""
        return self.id

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return backends.get(self.backend).new_event_loop()

    def run(self, main: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
        """Run ``main()`` to completion on a fresh loop of this backend."""

        async def bounded() -> Any:
            async with asyncio.timeout(timeout):
                return await main()

        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(bounded())
