"""Volume: many connections and many timers, with no leaked fds and bounded memory."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc

from tests.loop_under_test import LoopUnderTest
from tests.loops.loop_support import Echo, Recorder, port_of


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_after_warm_up(backend: LoopUnderTest) -> int:
    """Open fds once the backend made its process-wide ones (uvloop keeps a pipe pair)."""

    async def nothing() -> None:
        await asyncio.sleep(0)

    backend.run(nothing, timeout=10)
    gc.collect()
    return open_fds()


class CountedEcho(Echo):
    """An echo protocol that keeps a count of its live connections."""

    def __init__(self, live: dict[str, object]) -> None:
        self.live = live

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.live["count"] += 1

    def connection_lost(self, exc) -> None:
        self.live["count"] -= 1
        if not self.live["count"]:
            self.live["idle"].set()


async def _echo_server(loop):
    live = {"count": 0, "idle": asyncio.Event()}
    server = await loop.create_server(lambda: CountedEcho(live), "127.0.0.1", 0, backlog=1024)
    return server, live


async def _one_exchange(loop, port: int, payload: bytes) -> bytes:
    transport, client = await loop.create_connection(Recorder, "127.0.0.1", port)
    transport.write(payload)
    echoed = await client.received(len(payload))
    transport.close()
    await client.lost
    return echoed


async def _settle(live: dict) -> None:
    """Wait for every server-side connection to finish, then collect garbage."""
    if live["count"]:
        live["idle"].clear()
        await live["idle"].wait()
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()


def test_ten_thousand_short_connections_leak_no_fds_or_memory(backend: LoopUnderTest):
    total, wave = 10_000, 100

    async def main():
        loop = asyncio.get_running_loop()
        server, live = await _echo_server(loop)
        port = port_of(server)
        wrong = 0
        objects_after_first_wave = 0
        for start in range(0, total, wave):
            echoed = await asyncio.gather(
                *(_one_exchange(loop, port, b"%d" % i) for i in range(start, start + wave))
            )
            wrong += sum(reply != b"%d" % (start + i) for i, reply in enumerate(echoed))
            if not start:
                await _settle(live)
                objects_after_first_wave = len(gc.get_objects())
        await _settle(live)
        grown = len(gc.get_objects()) - objects_after_first_wave
        server.close()
        await server.wait_closed()
        return wrong, grown

    before = fds_after_warm_up(backend)
    wrong, grown = backend.run(main, timeout=90)
    assert wrong == 0
    # A leak of even one object per connection would leave 9,900 more behind.
    assert grown < 2_000, f"{grown} more live objects after 9,900 more connections"
    gc.collect()
    assert open_fds() <= before


def test_thousand_concurrent_connections_all_echo(backend: LoopUnderTest):
    count = 1000

    async def main():
        loop = asyncio.get_running_loop()
        server, live = await _echo_server(loop)
        port = port_of(server)
        connections = await asyncio.gather(
            *(loop.create_connection(Recorder, "127.0.0.1", port) for _ in range(count))
        )
        for i, (transport, _) in enumerate(connections):
            transport.write(b"connection %d" % i)
        echoed = await asyncio.gather(
            *(
                client.received(len(b"connection %d" % i))
                for i, (_, client) in enumerate(connections)
            )
        )
        peak = live["count"]  # every server side has echoed, so every one was accepted
        for transport, _ in connections:
            transport.close()
        await asyncio.gather(*(client.lost for _, client in connections))
        await live["idle"].wait()
        server.close()
        await server.wait_closed()
        return echoed == [b"connection %d" % i for i in range(count)], peak

    before = fds_after_warm_up(backend)
    all_echoed, peak = backend.run(main, timeout=60)
    assert all_echoed
    assert peak == count  # the server held all of them open at once
    gc.collect()
    assert open_fds() <= before


def test_hundred_thousand_cancelled_timers_keep_memory_bounded(backend: LoopUnderTest):
    batches, per_batch = 100, 1000

    async def main():
        loop = asyncio.get_running_loop()
        fired = []
        keepers = [loop.call_later(3600 + i, fired.append, i) for i in range(10)]
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for _ in range(batches):
                handles = [loop.call_later(60.0, fired.append, "never") for _ in range(per_batch)]
                for handle in handles:
                    handle.cancel()
                del handles
                await asyncio.sleep(0)
            # A short timer still fires on time behind 100,000 dead ones.
            done = loop.create_future()
            loop.call_later(0.001, done.set_result, "fired")
            result = await done
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        for handle in keepers:
            handle.cancel()
        return result, grown, fired

    result, grown, fired = backend.run(main, timeout=60)
    assert result == "fired"
    assert fired == []
    # 100,000 retained timers would hold well over 10 MB.
    assert grown < 1024 * 1024, f"{grown} bytes still held after cancelling every timer"
