"""forkloop's readiness (Reactor) event loop: epoll under the asyncio interface.

Use it like uvloop::

    from forkloop import reactor
    reactor.run(main())                      # or
    asyncio.run(main(), loop_factory=reactor.new_event_loop)   # Python 3.12+
    with asyncio.Runner(loop_factory=reactor.new_event_loop) as runner: ...
    reactor.install()                        # make it the policy's default loop

Where to read on: `reactor.loop` (the scheduling core: one iteration of the
loop and its invariants), `reactor.eventloop` (how the parts are assembled),
`reactor.poller` (epoll and the `selectors` fallback), `reactor.timers`,
`reactor.wakeup` (threads and signals), `reactor.readiness` (fd callbacks and
``sock_*``), `reactor.transports`, `reactor.servers`, `reactor.networking`
(addresses, TLS) and `reactor.subprocesses` with `reactor.pipes`.

Set ``REACTOR_POLLER=selectors`` to run on the portable `selectors` poller
instead of epoll (it is chosen automatically where epoll does not exist).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .eventloop import EventLoop

__all__ = ["EventLoop", "EventLoopPolicy", "install", "new_event_loop", "run"]

T = TypeVar("T")


def new_event_loop() -> EventLoop:
    """A new, not yet running, reactor event loop."""
    return EventLoop()


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """The default asyncio policy, except that its new loops are reactor loops."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


def install() -> None:
    """Make reactor loops the default: ``asyncio.run()`` and friends then use them."""
    asyncio.set_event_loop_policy(EventLoopPolicy())


def run(
    main: Coroutine[Any, Any, T],
    *,
    debug: bool | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
) -> T:
    """Run ``main`` to completion on a fresh reactor loop, like `asyncio.run`."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory) as runner:
        return runner.run(main)
