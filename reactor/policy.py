"""What a loop package offers at its top: a policy, ``install()`` and ``run()``, as uvloop does.

``forkloop.reactor`` and ``forkloop.proactor`` each have a loop factory
(``new_event_loop``) and offer the same three entry points around it::

    reactor.run(main())        # asyncio.run, on a fresh loop of the package
    reactor.install()          # asyncio.run() and friends use the package's loops from now on
    reactor.EventLoopPolicy    # the policy install() sets

They are written once, here: a package declares its policy as
``class EventLoopPolicy(LoopPolicy, loop_factory=new_event_loop)`` and
publishes ``EventLoopPolicy.install`` and ``EventLoopPolicy.run`` as its
``install`` and ``run``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopPolicy(asyncio.DefaultEventLoopPolicy):
    """The default asyncio policy, except that its new loops come from the subclass's factory."""

    # A plain function read through the class (never an instance), so it is not bound.
    loop_factory: ClassVar[LoopFactory]

    def __init_subclass__(cls, *, loop_factory: LoopFactory, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.loop_factory = loop_factory

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return type(self).loop_factory()

    @classmethod
    def install(cls) -> None:
        """Make this package's loops the default: ``asyncio.run()`` and friends then use them."""
        asyncio.set_event_loop_policy(cls())

    @classmethod
    def run(
        cls,
        main: Coroutine[Any, Any, T],
        *,
        debug: bool | None = None,
        loop_factory: LoopFactory | None = None,
    ) -> T:
        """Run ``main`` to completion on a fresh loop of this package, like `asyncio.run`."""
        factory = cls.loop_factory if loop_factory is None else loop_factory
        with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
            return runner.run(main)
