"""The scheduling core of forkloop's event loops.

`LoopCore` is everything an asyncio event loop does that is not I/O: the ready
queue, the timer heap, the run loop, ``stop``/``close``, thread-safe wakeups,
signal handlers, the default executor (and name resolution through it),
async-generator finalisation, debug mode and the exception handler. It knows
nothing about sockets. The reactor's
`reactor.eventloop.EventLoop` adds readiness I/O on epoll; the io_uring
proactor adds completion I/O on its ring. Both inherit this module unchanged.

One iteration
-------------
`run_forever` calls `_run_once` until `stop` has been asked for. One iteration
does four things, in this order:

1. **Choose the poll timeout.** Zero if a callback is already waiting in the
   ready queue or a stop was requested; otherwise the time left until the
   deadline at the top of the timer heap; otherwise no timeout at all. The top
   entry may belong to a cancelled timer: that costs one early wakeup, in
   which step 3 discards it, and saves a check on every iteration. The timeout
   is capped at a day so that a clock oddity cannot park the loop forever.
2. **Poll and dispatch.** ``self._poll(timeout)`` belongs to the I/O layer. It
   is the only place the loop blocks. It waits for I/O and calls the ready
   I/O callbacks directly from its results: a readable socket's transport
   reads and hands the bytes to its protocol inside this call. There is no
   `asyncio.Handle` per I/O event. I/O callbacks therefore run before the
   timers and ready callbacks of the same iteration, as in stdlib asyncio.
3. **Timers due.** Every live timer whose deadline is no later than now moves
   to the end of the ready queue, earliest deadline first; cancelled ones met
   on the way are dropped. When the top deadline is still in the future this
   costs one comparison.
4. **Ready callbacks.** The callbacks in the ready queue *at this moment* run
   in FIFO order. Callbacks they schedule wait for the next iteration.

Invariants
----------
* Nothing but the poll blocks. Callbacks must not block either: name
  resolution, ``shutdown_default_executor`` and the user's blocking calls go to
  the executor, and the wakeup channel is non-blocking.
* A callback scheduled during step 4 runs in the next iteration, never the
  current one, so a callback that reschedules itself cannot starve I/O: the
  next poll has a zero timeout but still happens.
* ``stop()`` takes effect at the end of the iteration that saw it. Calling it
  before ``run_forever()`` makes the loop run exactly one iteration, polling
  with a zero timeout.
* Only the loop's own thread runs callbacks and pops the ready queue. Other
  threads only append to it (``call_soon_threadsafe``) and then wake the poll
  through a socketpair; signals arrive through the same socketpair and are
  queued as ordinary callbacks. `reactor.wakeup` explains why no callback
  appended from another thread can be stranded.
* No exception from a callback escapes the loop, except ``SystemExit`` and
  ``KeyboardInterrupt``, which stop ``run_forever`` where they were raised.
  Everything else goes to the exception handler.

The I/O seam
------------
A subclass must provide, before calling ``LoopCore.__init__``:
``_poll(timeout)`` (wait at most ``timeout`` seconds, None meaning forever,
then run the ready I/O callbacks), ``_watch_readable(fd, callback)`` and
``_unwatch_readable(fd)`` (used here for the wakeup socket) and ``_close_io()``
(release the I/O layer when the loop closes). What the parts mixed into a loop
need beyond the core (a poller, transports by fd, listeners) is
`reactor.loop_part.LoopPart`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import socket
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from contextvars import Context
from time import monotonic
from types import TracebackType
from typing import Any, Literal, TypeVar, TypeVarTuple

from .timers import CLOCK_RESOLUTION, TimerQueue
from .wakeup import SignalHandlers, WakeupChannel

# Loop errors go where asyncio users already look for them.
logger = logging.getLogger("asyncio")

MAXIMUM_POLL_TIMEOUT = 24 * 3600.0
DEBUG_STACK_DEPTH = 10

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
# The context of an error report: "message", "exception" and whatever else the
# reporter adds ("transport", "handle", "socket", ...), values of any type.
ErrorContext = dict[str, Any]
ExceptionHandler = Callable[[asyncio.AbstractEventLoop, ErrorContext], object]
# A task factory is called (loop, coroutine) and, from 3.13 on, context=...; what
# it returns is the task of a coroutine of any result type.
TaskFactory = Callable[..., "asyncio.Future[Any]"]
AsyncgenHook = Callable[[AsyncGenerator[Any, Any]], None] | None
# One entry of getaddrinfo(): (family, type, proto, canonical name, address), as typeshed has it.
AddressInfo = (
    tuple[Literal[socket.AddressFamily.AF_INET], socket.SocketKind, int, str, tuple[str, int]]
    | tuple[
        Literal[socket.AddressFamily.AF_INET6],
        socket.SocketKind,
        int,
        str,
        tuple[str, int, int, int] | tuple[int, bytes],
    ]
)


def _stop_loop_when_done(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and isinstance(future.exception(), (SystemExit, KeyboardInterrupt)):
        return  # the exception already left run_forever(); stopping now would stop the next run
    future.get_loop().stop()


def _set_result_unless_cancelled(future: asyncio.Future[None], result: None) -> None:
    if not future.cancelled():
        future.set_result(result)


class LoopCore(SignalHandlers, asyncio.AbstractEventLoop):
    """Ready queue, timers, run loop, signals and executor; I/O comes from a subclass."""

    def __init__(self) -> None:
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._timers = TimerQueue()
        self._stopping = False
        self._closed = False
        self._thread_id: int | None = None
        self._debug = sys.flags.dev_mode or (
            not sys.flags.ignore_environment and bool(os.environ.get("PYTHONASYNCIODEBUG"))
        )
        self.slow_callback_duration = 0.1
        self._exception_handler: ExceptionHandler | None = None
        self._task_factory: TaskFactory | None = None
        self._default_executor: concurrent.futures.Executor | None = None
        self._executor_shutdown_called = False
        self._asyncgens: weakref.WeakSet[AsyncGenerator[Any, Any]] = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._previous_asyncgen_hooks: tuple[AsyncgenHook, AsyncgenHook] = (None, None)
        self._previous_origin_tracking_depth: int | None = None
        self._signal_handlers: dict[int, asyncio.Handle] = {}
        self._wakeup = WakeupChannel()
        self._watch_readable(self._wakeup.fileno(), self._on_wakeup)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} running={self.is_running()} "
            f"closed={self._closed} debug={self._debug}>"
        )

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_closed", True):
            return
        _warn(f"unclosed event loop {self!r}", ResourceWarning, source=self)
        if not self.is_running():
            self.close()

    # the I/O seam ------------------------------------------------------------

    def _poll(self, timeout: float | None) -> None:
        raise NotImplementedError

    def _watch_readable(self, fd: int, callback: Callable[[], object]) -> None:
        raise NotImplementedError

    def _unwatch_readable(self, fd: int) -> None:
        raise NotImplementedError

    def _close_io(self) -> None:
        raise NotImplementedError

    # running and stopping ----------------------------------------------------

    def run_forever(self) -> None:
        self._check_closed()
        self._check_not_running()
        self._set_coroutine_origin_tracking(self._debug)
        self._previous_asyncgen_hooks = sys.get_asyncgen_hooks()
        self._thread_id = threading.get_ident()
        sys.set_asyncgen_hooks(
            firstiter=self._asyncgen_firstiter_hook, finalizer=self._asyncgen_finalizer_hook
        )
        asyncio._set_running_loop(self)
        try:
            while True:
                self._run_once()
                if self._stopping:
                    break
        finally:
            self._stopping = False
            self._thread_id = None
            asyncio._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*self._previous_asyncgen_hooks)

    def run_until_complete(self, future: Awaitable[T] | Generator[Any, None, T]) -> T:
        self._check_closed()
        self._check_not_running()
        new_task = not asyncio.isfuture(future)
        # typeshed's ensure_future leaves out generator-based coroutines; it takes them.
        running = asyncio.ensure_future(future, loop=self)  # type: ignore[arg-type]
        running.add_done_callback(_stop_loop_when_done)
        try:
            self.run_forever()
        except BaseException:
            if new_task and running.done() and not running.cancelled():
                running.exception()  # the caller sees this exception; don't log it again
            raise
        finally:
            running.remove_done_callback(_stop_loop_when_done)
        if not running.done():
            raise RuntimeError("Event loop stopped before Future completed.")
        return running.result()

    def _run_once(self) -> None:
        ready = self._ready
        heap = self._timers.heap
        if ready or self._stopping:
            timeout: float | None = 0.0
        elif heap:
            # The top entry may be a cancelled timer: waking for it once is cheaper
            # than checking every iteration, and pop_due() discards it then.
            timeout = heap[0][0] - monotonic()
            if timeout < 0.0:
                timeout = 0.0
            elif timeout > MAXIMUM_POLL_TIMEOUT:
                timeout = MAXIMUM_POLL_TIMEOUT
        else:
            timeout = None
        poll = self._poll  # a plain load: the I/O layer may bind it per instance
        poll(timeout)
        if heap and heap[0][0] <= monotonic() + CLOCK_RESOLUTION:
            self._timers.pop_due(monotonic(), ready.append)
        if not ready:
            return
        if self._debug:
            self._run_ready_timed(len(ready))
            return
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle.cancelled():
                handle._run()

    def _run_ready_timed(self, count: int) -> None:
        """The debug-mode ready phase: the same, and slow callbacks are named in the log."""
        for _ in range(count):
            handle = self._ready.popleft()
            if handle.cancelled():
                continue
            started = monotonic()
            handle._run()
            took = monotonic() - started
            if took >= self.slow_callback_duration:
                logger.warning("Executing %s took %.3f seconds", handle, took)

    def stop(self) -> None:
        self._stopping = True

    def is_running(self) -> bool:
        return self._thread_id is not None

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self._closed:
            return
        if self._debug:
            logger.debug("Close %r", self)
        self._closed = True
        self._ready.clear()
        self._timers.clear()
        self._executor_shutdown_called = True
        executor, self._default_executor = self._default_executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        self._remove_all_signal_handlers()
        self._unwatch_readable(self._wakeup.fileno())
        self._close_io()
        self._wakeup.close()

    def _check_closed(self) -> None:
        if self._closed:
            raise RuntimeError("Event loop is closed")

    def _check_not_running(self) -> None:
        if self.is_running():
            raise RuntimeError("This event loop is already running")
        if asyncio._get_running_loop() is not None:
            raise RuntimeError("Cannot run the event loop while another loop is running")

    def _check_thread(self) -> None:
        """Debug mode: the non-thread-safe API was called from a foreign thread."""
        if self._thread_id is not None and self._thread_id != threading.get_ident():
            raise RuntimeError(
                "Non-thread-safe operation invoked on an event loop other than the current one"
            )

    # scheduling callbacks ------------------------------------------------------

    def time(self) -> float:
        return monotonic()

    def call_soon(
        self,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: Context | None = None,
    ) -> asyncio.Handle:
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_soon")
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(
        self,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: Context | None = None,
    ) -> asyncio.Handle:
        self._check_closed()
        if self._debug:
            self._check_callback(callback, "call_soon_threadsafe")
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        self._wakeup.wake()
        return handle

    def call_later(
        self,
        delay: float,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        if delay is None:
            raise TypeError("delay must not be None")
        return self.call_at(monotonic() + delay, callback, *args, context=context)

    def call_at(
        self,
        when: float,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_at")
        timer = asyncio.TimerHandle(when, callback, args, self, context)
        self._timers.push(when, timer)
        return timer

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        """Called by `asyncio.TimerHandle.cancel`: let the heap count its dead entries."""
        self._timers.note_cancelled(handle)

    def _check_callback(self, callback: object, method: str) -> None:
        if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
            raise TypeError(f"coroutines cannot be used with {method}()")
        if not callable(callback):
            raise TypeError(f"a callable object was expected by {method}(), got {callback!r}")

    def _on_wakeup(self) -> None:
        signals = self._wakeup.drain()
        if signals:
            self._queue_signal_handlers(signals)

    # futures and tasks ------------------------------------------------------------

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(
        self,
        coro: Coroutine[Any, Any, T] | Generator[Any, None, T],
        *,
        name: str | None = None,
        context: Context | None = None,
    ) -> asyncio.Task[T]:
        self._check_closed()
        if self._task_factory is None:
            return asyncio.Task(coro, loop=self, name=name, context=context)
        if context is None:
            task = self._task_factory(self, coro)
        else:
            task = self._task_factory(self, coro, context=context)
        if name is not None and hasattr(task, "set_name"):
            task.set_name(name)
        # A factory may return any future, as with asyncio's own loops; typeshed promises a Task.
        return task  # type: ignore[return-value]

    def set_task_factory(self, factory: TaskFactory | None) -> None:
        if factory is not None and not callable(factory):
            raise TypeError("task factory must be a callable or None")
        self._task_factory = factory

    def get_task_factory(self) -> TaskFactory | None:
        return self._task_factory

    # asynchronous generators -----------------------------------------------------------

    def _asyncgen_firstiter_hook(self, agen: AsyncGenerator[Any, Any]) -> None:
        if self._asyncgens_shutdown_called:
            warnings.warn(
                f"asynchronous generator {agen!r} was scheduled after "
                "loop.shutdown_asyncgens() call",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        self._asyncgens.add(agen)

    def _asyncgen_finalizer_hook(self, agen: AsyncGenerator[Any, Any]) -> None:
        self._asyncgens.discard(agen)
        if not self._closed:
            self.call_soon_threadsafe(self.create_task, agen.aclose())

    async def shutdown_asyncgens(self) -> None:
        self._asyncgens_shutdown_called = True
        if not self._asyncgens:
            return
        closing = list(self._asyncgens)
        self._asyncgens.clear()
        results = await asyncio.gather(*[agen.aclose() for agen in closing], return_exceptions=True)
        for result, agen in zip(results, closing, strict=True):
            if isinstance(result, Exception):
                self.call_exception_handler(
                    {
                        "message": f"an error occurred during closing of "
                        f"asynchronous generator {agen!r}",
                        "exception": result,
                        "asyncgen": agen,
                    }
                )

    # the executor ------------------------------------------------------------------------

    def run_in_executor(
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[[*Ts], T],
        *args: *Ts,
    ) -> asyncio.Future[T]:
        self._check_closed()
        if self._debug:
            self._check_callback(func, "run_in_executor")
        if executor is None:
            executor = self._default_executor
            if executor is None:
                if self._executor_shutdown_called:
                    raise RuntimeError("Executor shutdown has been called")
                executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="reactor")
                self._default_executor = executor
        return asyncio.wrap_future(executor.submit(func, *args), loop=self)

    def set_default_executor(self, executor: concurrent.futures.Executor) -> None:
        if not isinstance(executor, concurrent.futures.Executor):
            raise TypeError("executor must be a concurrent.futures.Executor")
        self._default_executor = executor

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is None:
            return
        done = self.create_future()
        thread = threading.Thread(target=self._shut_down_executor, args=(executor, done))
        thread.start()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(done)
        except TimeoutError:
            warnings.warn(
                f"the default executor did not finish joining its threads within {timeout} seconds",
                RuntimeWarning,
                stacklevel=2,
            )
            executor.shutdown(wait=False)
        else:
            thread.join()

    def _shut_down_executor(
        self, executor: concurrent.futures.Executor, done: asyncio.Future[None]
    ) -> None:
        try:
            executor.shutdown(wait=True)
            if not self._closed:
                self.call_soon_threadsafe(_set_result_unless_cancelled, done, None)
        except Exception as exc:
            if not self._closed:
                self.call_soon_threadsafe(done.set_exception, exc)

    # name resolution, through the executor ------------------------------------------------------

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[AddressInfo]:
        return await self.run_in_executor(
            None, socket.getaddrinfo, host, port, family, type, proto, flags
        )

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int = 0
    ) -> tuple[str, str]:
        return await self.run_in_executor(None, socket.getnameinfo, sockaddr, flags)

    async def _resolve_address(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[AddressInfo]:
        """getaddrinfo, in this thread for a numeric host and port, else in the executor.

        ``AI_NUMERICHOST | AI_NUMERICSERV`` never touches DNS, so ``127.0.0.1``
        and ``::1`` cost no trip through the executor; anything else goes there,
        so a slow resolver cannot stall the loop.
        """
        numeric = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        try:
            return socket.getaddrinfo(host, port, family, type, proto, flags | numeric)
        except (socket.gaierror, UnicodeError):
            pass  # not numeric: ask the resolver, off the loop's thread
        infos = await self.getaddrinfo(
            host, port, family=family, type=type, proto=proto, flags=flags
        )
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        return infos

    # errors and debug mode ------------------------------------------------------------------------

    def get_exception_handler(self) -> ExceptionHandler | None:
        return self._exception_handler

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        if handler is not None and not callable(handler):
            raise TypeError(f"a callable object or None is expected, got {handler!r}")
        self._exception_handler = handler

    def default_exception_handler(self, context: ErrorContext) -> None:
        message = context.get("message") or "Unhandled exception in event loop"
        exception = context.get("exception")
        exc_info: bool | tuple[type[BaseException], BaseException, TracebackType | None] = False
        if exception is not None:
            exc_info = (type(exception), exception, exception.__traceback__)
        lines = [message]
        for key in sorted(context):
            if key in ("message", "exception"):
                continue
            value = context[key]
            if key in ("source_traceback", "handle_traceback"):
                what = "Object" if key == "source_traceback" else "Handle"
                stack = "".join(traceback.format_list(value)).rstrip()
                lines.append(f"{key}: {what} created at (most recent call last):\n{stack}")
            else:
                lines.append(f"{key}: {value!r}")
        logger.error("\n".join(lines), exc_info=exc_info)

    def call_exception_handler(self, context: ErrorContext) -> None:
        if self._exception_handler is None:
            try:
                self.default_exception_handler(context)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                logger.error("Exception in default exception handler", exc_info=True)
            return
        try:
            self._exception_handler(self, context)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            try:
                self.default_exception_handler(
                    {
                        "message": "Unhandled error in exception handler",
                        "exception": exc,
                        "context": context,
                    }
                )
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                logger.error(
                    "Exception in default exception handler while handling an "
                    "unexpected error in a custom exception handler",
                    exc_info=True,
                )

    def get_debug(self) -> bool:
        return self._debug

    def set_debug(self, enabled: bool) -> None:
        self._debug = enabled
        if self.is_running():
            self.call_soon_threadsafe(self._set_coroutine_origin_tracking, enabled)

    def _set_coroutine_origin_tracking(self, enabled: bool) -> None:
        if enabled == (self._previous_origin_tracking_depth is not None):
            return
        if enabled:
            self._previous_origin_tracking_depth = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(DEBUG_STACK_DEPTH)
        else:
            sys.set_coroutine_origin_tracking_depth(self._previous_origin_tracking_depth or 0)
            self._previous_origin_tracking_depth = None
