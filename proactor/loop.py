"""The proactor: `LoopCore` plus completion I/O on io_uring (or its emulation).

The scheduling core (ready queue, timers, run loop, signals, executor) is the
reactor's `reactor.loop.LoopCore`, unchanged. This module is the I/O layer that
fills its seam: ``_poll(timeout)`` submits and waits on the engine
(`proactor.engine`: io_uring, or completions emulated over epoll) and
dispatches the completions.

One iteration
-------------
1. The core picks the timeout: zero if callbacks are ready, the time to the
   nearest timer, or none. Timers stay in the core's heap; only the nearest
   deadline reaches the kernel.
2. ``_poll`` calls ``engine.submit(wait_for, timeout)`` once: *one*
   ``io_uring_enter`` hands the kernel every operation prepared since the last
   one (sends, re-armed receives, cancels, closes, polls) and waits for at
   least one completion (``wait_for=1``), or for none when callbacks are
   ready (``wait_for=0``). It is the only place the loop blocks, and it blocks
   in a foreign call with the GIL released, so another thread's
   ``call_soon_threadsafe`` runs and wakes it (below).
3. ``_poll`` reads the completion queue and dispatches every entry directly:
   ``user_data`` is a plain counter, mapped to the handler (a bound method of a
   transport, acceptor or watch) in ``self._handlers``; a completion costs one
   dict lookup and one call, no `asyncio.Handle`. The handler is dropped with
   the operation's last completion (no ``IORING_CQE_F_MORE``). Handlers prepare
   follow-up operations (a send, a re-armed recv), which wait for the next
   iteration's enter. User_data is never derived from an fd: fd numbers are
   reused while old operations may still complete.
4. The core runs due timers and the ready callbacks; what they prepare joins
   the same next enter.

What it costs
-------------
With io_uring, a request on a keep-alive connection costs no system call of
its own: its bytes arrive as a completion of the connection's standing
multishot recv, and its response's send goes to the kernel in the enter that
the loop makes anyway (at low load, when an iteration brought a single
completion, its first send is a plain ``write`` instead: see
`SEND_THROUGH_RING_FROM`). The whole loop makes one ``io_uring_enter`` per
iteration however many connections were served in it (plus one early enter
per `proactor.engine.RING_ENTRIES` operations queued in one iteration).
Accepting costs no system call either; wrapping the new fd in a socket object
costs a ``getsockname`` and ``TCP_NODELAY`` a ``setsockopt``. (The README's
"Benchmark" section has the system calls per request, measured, beside the
reactor's ``recv``, ``send`` and share of ``epoll_wait``.)

What a request costs instead is Python: two completions (the recv's and the
send's) and one submission, all of it bytecode, where the reactor makes two
calls into C. That is why the dispatch is a dict lookup and a bound-method
call, why transports and the ring keep their attributes in slots (CPython 3.11
stops specialising attribute access on instances with more than 30
attributes), and why a handler's common case is written first.

Who owns what
-------------
* An operation's memory (the bytes being sent, a receive buffer, a sockaddr)
  belongs to the kernel from ``prepare_*`` until its last completion; the ring
  holds it alive that long, cancelled or not (`proactor.ring`).
* An fd with operations in flight belongs to its transport or acceptor,
  which closes it through the engine only after those operations completed,
  after detaching the Python socket (`proactor.transports`,
  `proactor.servers`).
* Provided buffers belong to the kernel except between the completion that
  names one and ``consume()``, which copies the bytes out and gives it back
  within the same dispatch.

Waking up, and signals
----------------------
The core's `reactor.wakeup.WakeupChannel` (a socketpair written by
``call_soon_threadsafe`` and, through ``signal.set_wakeup_fd``, by the C-level
signal handler) is watched with a poll on the engine like any ``add_reader``,
so a thread or a signal ends the enter through an ordinary completion.

Readiness-style API
-------------------
``add_reader``/``add_writer``, the ``sock_*`` coroutines
(`reactor.readiness.ReadinessOperations`), pipes, subprocesses and datagram
endpoints run the reactor's readiness code unchanged, over
`proactor.readiness.PollWatches` (one-shot polls on the engine) standing in for
the reactor's poller. Stream connections and listeners are completion-based.
`reactor.loop_part.LoopPart` names what those shared parts need of this class:
``_poller``, ``_transports``, ``_make_socket_transport``, ``_start_listening``
and ``_stop_listening``.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import operator
import socket
from collections.abc import Callable, Iterator
from typing import IO, Any

from ..reactor.datagrams import Datagrams
from ..reactor.networking import Networking
from ..reactor.readiness import ReadinessOperations, check_sendfile_params, sendfile_transport
from ..reactor.servers import Server
from ..reactor.subprocesses import Subprocesses
from . import abi
from .abi import Completion
from .engine import (
    BUNDLE_BUFFER_COUNT,
    BUNDLE_BUFFER_SIZE,
    RECEIVE_BUFFER_COUNT,
    RECEIVE_BUFFER_GROUP,
    RECEIVE_BUFFER_SIZE,
    CompletionEngine,
    ReceiveBuffers,
    open_engine,
)
from .readiness import PollWatches
from .sending import Sending
from .servers import Acceptor
from .transports import StreamTransport

logger = logging.getLogger("proactor")

# What the dispatch calls for a completion: handler(result, flags).
CompletionHandler = Callable[[int, int], object]

_MORE = abi.CQE_F_MORE
_ENGINE_SENTENCES = {"uring": "io_uring", "emulated": "emulated (epoll readiness)"}
SENDFILE_CHUNK = 256 * 1024
# The first send of an iteration that brought fewer completions than this is
# made at once with write(2) (`proactor.sending`): through the ring it would
# end the next enter by itself, with nothing but its own completion, and a
# lone request would cost two enters and two iterations.
SEND_THROUGH_RING_FROM = 2
CANCEL_RETRY_DELAY = 0.01
# user_data of unconfirmed sends start here (the ring's own start at 2**63).
UNCONFIRMED_USER_DATA = 1 << 62
_user_data_of = operator.itemgetter(0)


class EventLoop(ReadinessOperations, Subprocesses, Networking, Datagrams):
    """forkloop's completion event loop: io_uring (or its emulation) under the asyncio API."""

    _poller: PollWatches

    def __init__(self, engine: str | None = None) -> None:
        ring, name = open_engine(engine)
        self._ring: CompletionEngine = ring
        # Which engine carries this loop's I/O, "uring" or "emulated" (shown in /stats).
        self.engine_name: str = name
        self._handlers: dict[int, CompletionHandler] = {}
        self._new_user_data: Callable[[], int] = itertools.count(1).__next__
        # A transport's unconfirmed sends share one user_data from a range of their own.
        self._new_unconfirmed_user_data: Callable[[], int] = itertools.count(
            UNCONFIRMED_USER_DATA
        ).__next__
        # Completions read but not yet dispatched: left by an interrupted dispatch or read
        # early by _submit_early. Dispatched, oldest first, before the engine is read again.
        self._undelivered: list[Completion] | None = None
        self._send_directly = False  # see SEND_THROUGH_RING_FROM
        # Unconfirmed sends (proactor.sending): whether the engine has them, how many
        # submits _poll has made, the last one whose every completion was dispatched, and
        # the transports to call back once that number moves.
        self._unconfirmed_sends = ring.capabilities.unconfirmed_send
        self._submits = 0
        self._confirmed_through = 0
        self._awaiting_confirmation: list[Sending] = []
        self._transports = {}
        self._acceptors: dict[int, Acceptor] = {}
        self._receive_buffers: ReceiveBuffers | None = None
        self._multishot_recv = False
        self._receive_bundles = False
        self._poller = PollWatches(self)
        try:
            self._choose_receive_mode()
            super().__init__()
        except BaseException:
            ring.close()
            raise
        logger.info("the proactor loop runs on the %s engine", _ENGINE_SENTENCES[name])
        logger.debug("%s", ring.capabilities.describe())

    def _choose_receive_mode(self) -> None:
        """Provided buffers (multishot recv where the kernel has it, in bundles where it has
        those), else a buffer per transport. `proactor.engine` explains the sizes."""
        capabilities = self._ring.capabilities
        if capabilities.buffer_rings:
            self._multishot_recv = capabilities.multishot_recv
            self._receive_bundles = capabilities.multishot_recv and capabilities.receive_bundles
            count, size = (
                (BUNDLE_BUFFER_COUNT, BUNDLE_BUFFER_SIZE)
                if self._receive_bundles
                else (RECEIVE_BUFFER_COUNT, RECEIVE_BUFFER_SIZE)
            )
            self._receive_buffers = self._ring.provide_buffers(count, size, RECEIVE_BUFFER_GROUP)

    @property
    def _accept_wakes_one(self) -> bool:
        """io_uring wakes one accept per connection; see proactor.servers on shared listeners."""
        return self.engine_name == "uring"

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} engine={self.engine_name} running={self.is_running()} "
            f"closed={self._closed} debug={self._debug}>"
        )

    # the core's seam ---------------------------------------------------------------

    def _poll(self, timeout: float | None) -> None:
        ring = self._ring
        while self._undelivered is not None:
            undelivered, self._undelivered = self._undelivered, None
            self._dispatch(undelivered)
            timeout = 0.0
        if self._awaiting_confirmation:
            timeout = 0.0  # the sends they wait for post nothing when all goes well: don't wait
        completions = ring.submit_and_reap(timeout)
        self._send_directly = len(completions) < SEND_THROUGH_RING_FROM
        if self._unconfirmed_sends:
            # Sends prepared from here on are consumed by the next submit.
            self._submits = submits = self._submits + 1
            if ring.settled:
                # Every completion of what this submit (and those before it) handed over
                # is in hand: an unconfirmed send before it that posted none has sent
                # everything. The ones that did not are dispatched first, so no write
                # meets a send as confirmed whose completion is still to come.
                # (A lone completion counts too: a failed send confirmed before its
                # completion is dispatched would lose what it did not send.)
                if (
                    completions
                    and (
                        completions[0][0]
                        if len(completions) == 1
                        else max(map(_user_data_of, completions))
                    )
                    >= UNCONFIRMED_USER_DATA
                ):
                    completions = self._dispatch_unconfirmed_first(completions)
                self._confirmed_through = submits
                if self._awaiting_confirmation:
                    self._confirm_sends()
        # _dispatch(completions), written out: this runs every iteration.
        handlers = self._handlers
        entries = iter(completions)
        try:
            for user_data, result, flags in entries:
                try:
                    if flags & _MORE:
                        handlers[user_data](result, flags)
                    else:
                        handlers.pop(user_data)(result, flags)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._completion_handler_failed(user_data, result, exc)
        except BaseException:
            self._keep_undelivered(entries)
            raise

    def _dispatch_unconfirmed_first(self, completions: list[Completion]) -> list[Completion]:
        """Dispatch the completions of unconfirmed sends; return the others, in order."""
        failed: list[Completion] = []
        others: list[Completion] = []
        for entry in completions:
            (failed if entry[0] >= UNCONFIRMED_USER_DATA else others).append(entry)
        self._dispatch(failed)
        return others

    def _confirm_sends(self) -> None:
        """Call back the transports that wait for their unconfirmed sends (proactor.sending)."""
        waiting, self._awaiting_confirmation = self._awaiting_confirmation, []
        for index, transport in enumerate(waiting):
            try:
                transport._confirmed()
            except (SystemExit, KeyboardInterrupt):
                self._awaiting_confirmation.extend(waiting[index + 1 :])
                raise
            except BaseException as exc:
                self.call_exception_handler(
                    {"message": "Exception in a transport's send confirmation", "exception": exc}
                )

    def _dispatch(self, completions: list[Completion]) -> None:
        """Call each completion's handler; drop it with the operation's last completion."""
        handlers = self._handlers
        entries = iter(completions)
        try:
            for user_data, result, flags in entries:
                try:
                    if flags & _MORE:
                        handlers[user_data](result, flags)
                    else:
                        handlers.pop(user_data)(result, flags)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._completion_handler_failed(user_data, result, exc)
        except BaseException:
            self._keep_undelivered(entries)
            raise

    def _completion_handler_failed(self, user_data: int, result: int, exc: BaseException) -> None:
        self.call_exception_handler(
            {
                "message": f"Exception in the completion handler of operation "
                f"{user_data} (result {result})",
                "exception": exc,
            }
        )

    def _keep_undelivered(self, entries: Iterator[Completion]) -> None:
        """A dispatch was interrupted: the next one starts with what it left."""
        left = list(entries)  # older than anything read early meanwhile
        self._undelivered = left + self._undelivered if self._undelivered else left

    def _submit_early(self, user_data: int) -> tuple[int, int] | None:
        """Hand the engine what is queued now, in the middle of an iteration.

        For a transport whose writes passed the high-water mark: a readiness
        loop's ``write()`` offers the bytes to the kernel at once and pauses
        the protocol only if the kernel would not take them, and so must this
        loop, or a producer would be paused for bytes the kernel was about to
        take. Returns the completion of operation ``user_data`` if it is among
        those posted (its handler is dropped: the caller handles it); the
        others wait in ``_undelivered``, in order, for the next dispatch.
        """
        ring = self._ring
        ring.submit(0)
        found = None
        later = []
        for entry in ring.completions():
            if entry[0] == user_data and found is None:
                found = entry  # a zero-copy send's notification may follow (F_MORE)
            else:
                later.append(entry)
        if later:
            self._undelivered = (self._undelivered or []) + later
        if found is None:
            return None
        if not found[2] & _MORE:
            del self._handlers[user_data]
        return found[1], found[2]

    def _watch_readable(self, fd: int, callback: Callable[[], object]) -> None:
        self._poller.set_reader(fd, callback)

    def _unwatch_readable(self, fd: int) -> None:
        self._poller.clear_reader(fd)

    def _close_io(self) -> None:
        self._poller.close()  # forget the watches; the engine cancels their polls
        try:
            self._ring.close()  # runs the closes still queued, cancels the rest and waits
        finally:
            self._close_child_watchers()  # pidfds of running children, no poll left on them
            for acceptor in self._acceptors.values():
                acceptor.close_at_loop_close()
            self._acceptors.clear()
            for transport in list(self._transports.values()):
                if isinstance(transport, StreamTransport):
                    transport.release_at_loop_close()
            self._handlers.clear()
            self._undelivered = None

    def _cancel_operation(self, target: int) -> None:
        """Cancel operation ``target``; its own handler sees its last completion as usual."""
        user_data = self._new_user_data()
        self._ring.prepare_cancel(user_data, target)
        self._handlers[user_data] = lambda result, flags: self._cancel_answered(target, result)

    def _cancel_answered(self, target: int, result: int) -> None:
        if result == -errno.EALREADY and target in self._handlers and not self._closed:
            # The target is running right now and may not stop; ask again shortly.
            self.call_later(CANCEL_RETRY_DELAY, self._cancel_again, target)

    def _cancel_again(self, target: int) -> None:
        if target in self._handlers:
            self._cancel_operation(target)

    # transports and listeners (used by reactor.networking) ---------------------------

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> StreamTransport:
        return StreamTransport(self, sock, protocol, waiter, extra, server)

    def _start_listening(self, server: Server, sock: socket.socket, backlog: int) -> None:
        sock.listen(backlog)
        acceptor = Acceptor(self, server, sock)
        self._acceptors[sock.fileno()] = acceptor
        acceptor.start()

    def _stop_listening(self, sock: socket.socket) -> None:
        acceptor = self._acceptors.pop(sock.fileno(), None)
        if acceptor is None:
            sock.close()
        else:
            acceptor.stop()

    # sending files over a transport ----------------------------------------------------------

    async def sendfile(
        self,
        transport: asyncio.WriteTransport,
        file: IO[bytes],
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool = True,
    ) -> int:
        """Send a file over a stream transport: with sendfile(2) when it is a regular file
        (`proactor.sending`), else read in chunks and written through the transport."""
        stream = sendfile_transport(
            transport,
            StreamTransport,
            "the proactor sends files only over its own stream transports",
        )
        check_sendfile_params(stream.get_extra_info("socket"), file, offset, count)
        await stream._wait_until_drained()
        try:
            return await stream._send_file(file, offset, count)
        except asyncio.SendfileNotAvailableError:
            if not fallback:
                raise
        file.seek(offset)
        total = 0
        while count is None or total < count:
            want = SENDFILE_CHUNK if count is None else min(SENDFILE_CHUNK, count - total)
            data = await self.run_in_executor(None, file.read, want)
            if not data:
                break
            if stream.is_closing():
                raise ConnectionError("the transport closed while a file was being sent")
            stream.write(data)
            total += len(data)
            await stream._wait_until_drained()
        file.seek(offset + total)
        return total
