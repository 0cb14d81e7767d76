"""forkloop's completion (Proactor) event loop: io_uring under the asyncio interface.

Use it like uvloop::

    from forkloop import proactor
    proactor.run(main())                      # or
    asyncio.run(main(), loop_factory=proactor.new_event_loop)   # Python 3.12+
    with asyncio.Runner(loop_factory=proactor.new_event_loop) as runner: ...
    proactor.install()                        # make it the policy's default loop

The loop submits operations and is told when they have *completed*, as
io_uring and Windows' IOCP do, instead of being told that a socket is ready.
Where io_uring is refused it runs the same code on an emulated engine over
epoll. `new_event_loop` picks the engine when the loop is built (io_uring if
the kernel allows it; the user may override that with
``FORKLOOP_PROACTOR_ENGINE=auto|uring|emulated``, see `proactor.engine`);
`new_uring_event_loop` and `new_emulated_event_loop` name theirs, and ignore
the variable. ``loop.engine_name`` says which one a loop runs on.

`proactor.loop` explains one iteration and who owns what; `proactor.ring`,
`proactor.operations` and `proactor.buffers` the io_uring binding;
`proactor.emulated`, `proactor.transports`, `proactor.servers` and
`proactor.readiness` their own parts.
"""

from __future__ import annotations

from ..reactor.policy import LoopPolicy
from .engine import EngineUnavailable
from .loop import EventLoop

__all__ = [
    "EngineUnavailable",
    "EventLoop",
    "EventLoopPolicy",
    "install",
    "new_emulated_event_loop",
    "new_event_loop",
    "new_uring_event_loop",
    "run",
]


def new_event_loop() -> EventLoop:
    """A new, not yet running, proactor event loop on the engine the environment asks for."""
    return EventLoop()


def new_uring_event_loop() -> EventLoop:
    """A new proactor event loop on io_uring, or `EngineUnavailable` saying why not."""
    return EventLoop("uring")


def new_emulated_event_loop() -> EventLoop:
    """A new proactor event loop on the emulated engine (completions over epoll)."""
    return EventLoop("emulated")


class EventLoopPolicy(LoopPolicy, loop_factory=new_event_loop):
    """The default asyncio policy, except that its new loops are proactor loops."""


install = EventLoopPolicy.install
run = EventLoopPolicy.run
