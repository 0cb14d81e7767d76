"""The fleet tier's notifications: one pub/sub connection per worker, shared by its waiters.

A worker waiting for a fill on another server (`server.fleet_cache`) is woken
by a message on the key's shard channel (``SSUBSCRIBE``; the filler's finishing
script ``SPUBLISH``es ``stored``, ``errored``, ``failed`` or ``released``).
Every waiter of a worker shares one subscription connection: the first waiter
of a channel subscribes, the last one to leave unsubscribes, and one reader
task routes each message to the queues of that channel's waiters. Nothing
polls: the reader blocks on the connection until the store writes.

When the connection fails, the reader opens the tier's breaker (which wakes
every waiter with ``FALLBACK`` and calls `Notifications.reset`); the next
waiter after the breaker closes opens a new connection. A cluster routes each
shard channel to the node that owns its slot (redis-py's ``ClusterPubSub``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fleet_cache import FleetTier


class StoreUnavailable(Exception):
    """A call failed or missed its deadline: the breaker is open."""


class Notifications:
    """One pub/sub connection per worker; each waiter gets the messages of its key's channel."""

    def __init__(self, tier: FleetTier) -> None:
        self.tier = tier
        self.pubsub: Any = None  # redis-py's PubSub or ClusterPubSub
        self.queues: dict[str, set[asyncio.Queue[bytes]]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def listen(self, channel: str) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        listeners = self.queues.setdefault(channel, set())
        listeners.add(queue)
        if len(listeners) == 1:
            if self.pubsub is None:
                self.pubsub = self.tier.client().pubsub()
            await self.tier.call(self.pubsub.ssubscribe(channel))
            if self.reader is None or self.reader.done():
                self.reader = asyncio.get_running_loop().create_task(self._read())
        return queue

    async def stop_listening(self, channel: str, queue: asyncio.Queue[bytes]) -> None:
        listeners = self.queues.get(channel)
        if listeners is None:
            return
        listeners.discard(queue)
        if not listeners:
            del self.queues[channel]
            if self.pubsub is not None and not self.tier.breaker_open:
                with contextlib.suppress(StoreUnavailable):
                    await self.tier.call(self.pubsub.sunsubscribe(channel))

    async def _read(self) -> None:
        pubsub = self.pubsub
        try:
            while pubsub is self.pubsub:
                message = await pubsub.get_sharded_message(timeout=None)
                if message is None or message.get("type") != "smessage":
                    continue
                channel = message["channel"]
                channel = channel.decode() if isinstance(channel, bytes) else channel
                self.tier.stats.fleet_notifications += 1
                for queue in self.queues.get(channel, ()):
                    queue.put_nowait(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the store's connection
            if pubsub is self.pubsub:
                self.tier.open_breaker(f"its notification connection failed ({exc!r})")

    def reset(self) -> None:
        """The breaker opened: drop the connection; the next waiter opens another."""
        pubsub, self.pubsub = self.pubsub, None
        reader, self.reader = self.reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if pubsub is not None:
            task = asyncio.get_running_loop().create_task(close_quietly(pubsub))
            self.tier.background.add(task)
            task.add_done_callback(self.tier.background.discard)


async def close_quietly(closable: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closable.aclose(), 1.0)


async def first_of(
    queue: asyncio.Queue[bytes], broken: asyncio.Future[None], timeout: float
) -> bytes | None:
    """The next notification, or None when ``timeout`` passes or the breaker opens."""
    if not queue.empty():
        return queue.get_nowait()
    getting = asyncio.ensure_future(queue.get())
    try:
        waited_for: set[asyncio.Future[Any]] = {getting, broken}
        done, _ = await asyncio.wait(
            waited_for, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        if not getting.done():
            getting.cancel()
    if getting in done:
        return getting.result()
    return None
