"""A request body that arrives while its handler runs: `StreamedBody`.

A native `App` handler gets its request once the whole body is in (bounded by
``--max-body-size``). A front door that reads bodies as they come (ASGI's
``receive()``) gets its request as soon as the head is parsed, with a
`StreamedBody` the reader feeds piece by piece.

Flow control: the reader appends what the parser hands it; once more than
``HIGH_WATER`` bytes wait unread, `feed` says so and the connection stops
parsing (the transport keeps its usual backpressure), and the body deadline
stops running, since the client is not the one holding things up. When the
handler next reads (it takes everything waiting), ``on_drained`` lets the
connection parse again. So a handler that reads slowly holds at most a high
water mark of body in memory, plus one read.

Invariants
----------
* Pieces come out of `read` in arrival order, each once.
* `read` returns ``more=False`` exactly once, after `finish` and once every
  piece is out (``on_drained`` may parse the rest of the body, its end
  included, while `read` runs); after `fail` it raises `BodyFailed` instead
  (the client left, or its framing was refused).
* ``continue_owed`` is true while the client waits for ``100 Continue`` before
  it sends the body; whoever reads first sends it (`take_continue`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

HIGH_WATER = 256 * 1024


class BodyFailed(Exception):
    """The body will never be complete: the client left or sent bad framing."""


class StreamedBody:
    """The pieces of one request body, from the reader to the handler."""

    __slots__ = (
        "pieces",
        "waiting",
        "complete",
        "failure",
        "continue_owed",
        "on_drained",
        "paused",
        "_waiter",
    )

    def __init__(self, on_drained: Callable[[], None], continue_owed: bool = False) -> None:
        self.pieces: deque[bytes] = deque()
        self.waiting = 0  # bytes fed and not read yet
        self.complete = False
        self.failure: str | None = None
        self.continue_owed = continue_owed
        self.on_drained = on_drained  # the connection may parse again
        self.paused = False  # feed() asked the connection to stop parsing
        self._waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ the reader's side

    def feed(self, piece: bytes) -> bool:
        """Append a piece; False when the connection should stop parsing for now."""
        self.continue_owed = False  # the client sends without waiting: no 100 is due
        self.pieces.append(piece)
        self.waiting += len(piece)
        self._wake()
        if self.waiting > HIGH_WATER:
            self.paused = True
            return False
        return True

    def finish(self) -> None:
        self.complete = True
        self.continue_owed = False
        self._wake()

    def fail(self, reason: str) -> None:
        if not self.complete and self.failure is None:
            self.failure = reason
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ the handler's side

    def take_continue(self) -> bool:
        """True once, if the client still waits for 100 Continue."""
        owed, self.continue_owed = self.continue_owed, False
        return owed

    async def read(self) -> tuple[bytes, bool]:
        """What has arrived since the last read (waiting for some), and whether
        more follows. `BodyFailed` if the body will never be complete."""
        while not self.pieces and not self.complete:
            if self.failure is not None:
                raise BodyFailed(self.failure)
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        pieces = self.pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self.waiting = 0
        if self.paused:
            self.paused = False
            self.on_drained()  # may parse more of the body, even its end, right now
        return data, bool(self.pieces) or not self.complete
