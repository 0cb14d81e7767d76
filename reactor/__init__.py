"""forkloop's readiness (Reactor) event loop: epoll under the asyncio interface.

Use it like uvloop::

    from forkloop import reactor
    reactor.run(main())                      # or
    asyncio.run(main(), loop_factory=reactor.new_event_loop)   # Python 3.12+
    with asyncio.Runner(loop_factory=reactor.new_event_loop) as runner: ...
    reactor.install()                        # make it the policy's default loop

Where to read on: `reactor.loop` (the scheduling core: one iteration of the
loop and its invariants), `reactor.eventloop` (how the parts are assembled),
`reactor.loop_part` (what the parts rely on, typed),
`reactor.poller` (epoll and the `selectors` fallback), `reactor.timers`,
`reactor.wakeup` (threads and signals), `reactor.readiness` (fd callbacks and
``sock_*``), `reactor.transports`, `reactor.servers`, `reactor.networking`
(addresses, TLS), `reactor.datagrams` and `reactor.subprocesses` with
`reactor.pipes`;
`reactor.policy` makes ``install`` and ``run`` (the proactor's too).

Set ``REACTOR_POLLER=selectors`` to run on the portable `selectors` poller
instead of epoll (it is chosen automatically where epoll does not exist).
"""

from __future__ import annotations

from .eventloop import EventLoop
from .policy import LoopPolicy

__all__ = ["EventLoop", "EventLoopPolicy", "install", "new_event_loop", "run"]


def new_event_loop() -> EventLoop:
    """A new, not yet running, reactor event loop."""
    return EventLoop()


class EventLoopPolicy(LoopPolicy, loop_factory=new_event_loop):
    """The default asyncio policy, except that its new loops are reactor loops."""


install = EventLoopPolicy.install
run = EventLoopPolicy.run
