"""Handlers start at once, on a borrowed task: `EagerStarter`.

A request's handler is a coroutine. Wrapping each one in a fresh
`asyncio.Task` costs a task (its allocation, its entry in the loop's set of
all tasks, its removal from it) and, before Python 3.12, a trip round the
loop: a new task's first step is only scheduled, so the request waits for the
next iteration, and a handler that never suspends (most of them: it answers
from memory) pays for a task it never needed.

`EagerStarter.start` runs the coroutine's first step right away, inside the
caller (the connection's ``data_received``), as Python 3.12's eager tasks do.
Most handlers finish within it and no task is involved at all. One that
suspends (it awaits the body, a database, a sleep) is handed to a *host*: a
task kept from one request to the next, which drives it step by step until it
returns, and then waits in the starter's pool of idle hosts for another.

What a handler sees is what a task of its own would give it:

* **The current task.** During the first step the host is made the loop's
  current task (``asyncio.tasks._enter_task``, exactly what an eager task
  does), and the same host drives every later step, so ``current_task()`` is
  one task for the whole request: anyio's cancel scopes, ``asyncio.timeout``
  and ``uncancel`` work on it as on any task. Cancelling it (the request
  timeout, a client that left, shutdown) cancels what the handler awaits, as
  ``Task.cancel`` does; a cancel requested while the host had not picked the
  handler up yet is delivered at the handler's first await, as a task's
  pending cancel is.
* **A context of its own.** Every step runs inside the request's own copy of
  the context the starter was built in (the server's), so a ContextVar one
  request sets is never seen by the next, even on the same host, on the same
  connection, or when the next is started by the end of the one before
  (pipelined requests), where a task would have copied the ending request's.

`eager_task` does the same for work that wants a task of its own (a
single-flight's fill): the task is made first, its first step runs at once as
that task, and the task drives the rest. A cache fill's upstream request so
leaves before the rest of the loop iteration's callbacks (hundreds of other
clients' requests, in a stampede) have run, not after them.

Invariants
----------
1. A host drives at most one handler at a time; it is in the idle pool only
   while it drives none.
2. A host is reused only if nobody asked to cancel it while it was idle (a
   stray cancel would otherwise reach the next request): such a host ends
   instead, as does every idle host when the loop cancels its tasks at
   shutdown.
3. The pool keeps at most ``MAX_IDLE_HOSTS`` hosts; one more ends when it is
   done.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar, cast

MAX_IDLE_HOSTS = 64

T = TypeVar("T")

_enter_task = asyncio.tasks._enter_task
_leave_task = asyncio.tasks._leave_task
# the loop -> running task map behind current_task() (where Python keeps one): a
# dictionary lookup, where asyncio.current_task is a Python function on 3.11
_RUNNING: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = getattr(
    asyncio.tasks, "_current_tasks", None
)


class EagerStarter:
    """Starts handlers at once and hosts the ones that suspend; one per loop."""

    __slots__ = ("loop", "idle", "base")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: list[_Host] = []
        # each request runs in a copy of this: the context the server was built in
        self.base = contextvars.copy_context()

    def start(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``coroutine``'s first step now, in a fresh copy of the server's
        context; None if it finished, else the task that now drives it to its end."""
        idle = self.idle
        host = idle.pop() if idle else None
        if host is None or host.task.cancelling():  # invariant 2: a cancelled host ends
            host = _Host(self)
        loop, task, context = self.loop, host.task, self.base.copy()
        running = _RUNNING.get(loop) if _RUNNING is not None else asyncio.current_task(loop)
        if running is not None:  # a task runs (one finishing starts the next request)
            return self._start_within(coroutine, host, context, running)
        try:
            _enter_task(loop, task)
        except RuntimeError:  # a Python that keeps the running task elsewhere: ask it
            running = asyncio.current_task(loop)
            if running is None:
                raise
            return self._start_within(coroutine, host, context, running)
        try:
            waiting = context.run(coroutine.send, None)
        except StopIteration:
            _leave_task(loop, task)
            idle.append(host)
            return None
        except BaseException:
            _leave_task(loop, task)
            idle.append(host)
            raise
        _leave_task(loop, task)
        host.take(coroutine, context, waiting)
        return task

    def _start_within(
        self,
        coroutine: Coroutine[Any, Any, None],
        host: _Host,
        context: contextvars.Context,
        outer: asyncio.Task[Any],
    ) -> asyncio.Task[None] | None:
        """`start` from inside a running task: it steps aside for the first step."""
        loop, task = self.loop, host.task
        _leave_task(loop, outer)
        _enter_task(loop, task)
        try:
            waiting = context.run(coroutine.send, None)
        except StopIteration:
            self.idle.append(host)
            return None
        except BaseException:
            self.idle.append(host)
            raise
        finally:
            _leave_task(loop, task)
            _enter_task(loop, outer)
        host.take(coroutine, context, waiting)
        return task


class _Host:
    """A task that drives suspended handlers, one after another (invariant 1)."""

    __slots__ = ("starter", "task", "parked", "job")

    def __init__(self, starter: EagerStarter) -> None:
        self.starter = starter
        self.job: _Continue | None = None
        self.parked: asyncio.Future[None] = starter.loop.create_future()
        body = self._serve()
        body.send(
            None
        )  # to its first suspension: a cancel before the task's first step lands there
        self.task: asyncio.Task[None] = asyncio.Task(body, loop=starter.loop)

    def take(
        self, coroutine: Coroutine[Any, Any, None], context: contextvars.Context, waiting: Any
    ) -> None:
        """Drive ``coroutine`` from here: it suspended on ``waiting``."""
        self.job = _Continue(coroutine, context, waiting)
        if not self.parked.done():
            self.parked.set_result(None)

    async def _serve(self) -> None:
        cancelled = False
        try:
            await _suspend_once()
        except asyncio.CancelledError:
            cancelled = True
        while True:
            if not cancelled:
                try:
                    await self.parked
                except asyncio.CancelledError:
                    cancelled = True
            job = self.job
            if job is None:
                return  # cancelled while idle (invariant 2), or told to end
            job.cancel_first = cancelled
            await job  # the handler's own exceptions end the host, as they would end its task
            self.job = None
            cancelled = False
            task = self.task
            while task.cancelling():  # cancels the handler swallowed: not the next one's
                task.uncancel()
            idle = self.starter.idle
            if len(idle) >= MAX_IDLE_HOSTS:
                return
            self.parked = self.starter.loop.create_future()
            idle.append(self)


def eager_task(
    loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T], name: str | None = None
) -> asyncio.Task[T]:
    """A task of its own for ``coroutine``, whose first step runs now, inline, as
    the task (Python 3.12's ``eager_start``): work that is due at once (a request
    to an upstream) starts before the rest of this loop iteration's callbacks,
    not after them. The task drives the steps that follow; cancelling it before
    it first runs cancels what the first step awaits."""
    context = contextvars.copy_context()
    first = _FirstStep()
    body = _after_first_step(coroutine, context, first)
    body.send(None)  # to its first suspension: a cancel before the task's first step lands there
    task = asyncio.Task(body, loop=loop, name=name)
    outer = asyncio.current_task(loop)
    if outer is not None:
        _leave_task(loop, outer)
    _enter_task(loop, task)
    try:
        first.waiting = context.run(coroutine.send, None)
    except StopIteration as stop:
        first.done, first.value = True, stop.value
    except BaseException as error:  # noqa: BLE001 - the task raises it, as a task would
        first.error = error
    finally:
        _leave_task(loop, task)
        if outer is not None:
            _enter_task(loop, outer)
    return task


class _FirstStep:
    """How an eager task's inline first step ended."""

    __slots__ = ("done", "value", "error", "waiting")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.waiting: Any = None  # what the coroutine awaits, if it suspended


async def _after_first_step(
    coroutine: Coroutine[Any, Any, T], context: contextvars.Context, first: _FirstStep
) -> T:
    cancelled = False
    try:
        await _suspend_once()
    except asyncio.CancelledError:
        cancelled = True
    if first.error is not None:
        raise first.error
    if first.done:
        return cast(T, first.value)
    job = _Continue(coroutine, context, first.waiting)
    job.cancel_first = cancelled
    return cast(T, await job)


@types.coroutine
def _suspend_once() -> Generator[None, None, None]:
    yield


class _Continue:
    """Awaited by a host: drives a suspended handler's steps inside its own context.

    The host's task sends and throws into this as into any coroutine; each is
    passed on to the handler. ``cancel_first``: a cancel came before the host
    picked the handler up, so the future it waits for is cancelled first."""

    __slots__ = ("coroutine", "context", "waiting", "cancel_first")

    def __init__(
        self, coroutine: Coroutine[Any, Any, Any], context: contextvars.Context, waiting: Any
    ) -> None:
        self.coroutine = coroutine
        self.context = context
        self.waiting = waiting
        self.cancel_first = False

    def __await__(self) -> Generator[Any, None, Any]:
        coroutine, run, waiting = self.coroutine, self.context.run, self.waiting
        self.waiting = None
        if self.cancel_first:
            if waiting is None:
                try:
                    waiting = run(coroutine.throw, asyncio.CancelledError())
                except StopIteration as stop:
                    return stop.value
            else:
                waiting.cancel()
        while True:
            try:
                value = yield waiting
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    waiting = run(coroutine.throw, error)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting = run(coroutine.send, value)
                except StopIteration as stop:
                    return stop.value
