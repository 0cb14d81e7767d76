"""Flow control of one connection, both ways: `FlowControl`.

Reading. Backpressure is logical first: while the write buffer is above its
high-water mark, or enough complete requests are queued, the connection stops
*parsing* (``read_paused``) and keeps what arrives in a stash. The transport
keeps reading, so a client that hangs up is noticed (and its handler
cancelled), until the stash itself holds ``STASH_LIMIT`` bytes; only then is the
transport paused. `resume_reading` undoes both and hands back the stash.

Writing. The transport says when its buffer crosses the high-water mark
(``pause_writing``) and when it has drained (``resume_writing``). While paused a
send deadline runs (``send_timeout``: a client that reads nothing is cut), and a
streaming response waits in `drain`.

Invariants
----------
* ``transport_paused`` implies ``read_paused``.
* ``stash`` is empty unless ``read_paused`` was set when its bytes arrived, and
  its bytes are handed back in arrival order.
* At most one coroutine waits in `drain`; it is woken by ``resume_writing`` or
  failed by `connection_lost`.
"""

from __future__ import annotations

import asyncio

STASH_LIMIT = 256 * 1024


class FlowControl:
    """Pauses and stashes for one connection; see the module's docstring."""

    __slots__ = (
        "transport",
        "read_paused",
        "transport_paused",
        "stash",
        "stash_size",
        "write_paused",
        "send_deadline",
        "_drain_waiter",
    )

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.read_paused = False
        self.transport_paused = False
        self.stash: list[bytes] = []
        self.stash_size = 0
        self.write_paused = False
        self.send_deadline = 0.0  # while write_paused: when the client is cut
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ reading

    def hold(self, data: bytes) -> None:
        """Keep ``data`` until reading resumes; pause the transport past the limit."""
        self.stash.append(data)
        self.stash_size += len(data)
        if self.stash_size > STASH_LIMIT and not self.transport_paused:
            self.transport_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> bytes:
        """Parse again: the transport reads again, and the stash is handed back."""
        self.read_paused = False
        self.resume_transport()
        if not self.stash:
            return b""
        data = b"".join(self.stash)
        self.stash.clear()
        self.stash_size = 0
        return data

    def resume_transport(self) -> None:
        if self.transport_paused:
            self.transport_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ writing

    def pause_writing(self, send_deadline: float) -> None:
        self.write_paused = True
        self.send_deadline = send_deadline
        self.read_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = 0.0
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def draining(self) -> bool:
        """True while a coroutine waits in `drain`."""
        return self._drain_waiter is not None

    async def drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the transport's buffer is below its high-water mark again."""
        waiter = self._drain_waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    def connection_lost(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client connection lost"))
