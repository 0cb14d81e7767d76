"""The emulated engine: the ring's submission/completion interface over epoll readiness.

Where io_uring is refused (``kernel.io_uring_disabled``, a container's seccomp
profile, a kernel older than 5.7, not Linux) the proactor still runs, on this
engine. `EmulatedRing` has the shape of `proactor.ring.Ring` that the loop
uses: ``prepare_*`` queue an operation under a ``user_data``, ``submit`` hands
over what was queued and waits, ``completions`` returns ``(user_data, result,
flags)`` tuples with the kernel's meanings (``-errno`` results,
``IORING_CQE_F_MORE`` on every CQE of a multishot operation but its last,
``IORING_CQE_F_BUFFER`` and a buffer id for provided buffers). The loop and its
transports are written once, against that shape, which
`proactor.engine.CompletionEngine` declares and mypy holds both engines to.

How an operation runs
---------------------
``prepare_*`` only appends to a list: nothing happens before ``submit``, as with
the ring. ``submit`` then does what io_uring does with each submission, in
order: it tries the system call at once (``os.read``, ``os.write``,
``accept``), and only if that would block does it *park* the operation on its
file descriptor and register the fd with the reactor's epoll poller
(`reactor.poller`). Finally it polls, with the caller's timeout, or with none
if a completion is already waiting. When the poller reports an fd ready, the
operations parked on it are tried again, oldest first, and each one that
finishes posts its completion. A multishot operation posts a completion with
``F_MORE`` each time it succeeds and stays parked.

An fd is registered with the poller exactly while operations are parked on it
(for reading, writing, or both), and unregistered the moment the last one
leaves. Dropping registrations lazily would save the ``epoll_ctl`` pair of a
re-armed one-shot poll, but an fd that user code closes and whose number is
reused in between would then look registered while epoll has forgotten it,
and its operations would never complete. The hot path does not pay for this:
a connection's multishot recv stays parked for the connection's life, and a
send that the kernel takes at once is never parked at all.

What is emulated how
--------------------
* RECV, READ, SEND, SENDMSG: ``os.readv``/``os.read``/``os.write``/``os.writev``
  on the fd. ``write(2)`` on a socket whose peer is gone raises SIGPIPE, which
  the interpreter ignores from start-up, so the operation fails with
  ``-EPIPE`` as io_uring's ``MSG_NOSIGNAL`` send does.
* RECV from a provided-buffer group: `EmulatedBuffers` holds ``count`` slots;
  a receive takes a free slot for its bytes and posts its id, ``consume``
  frees it. A multishot receive goes on reading while reads fill whole
  buffers (up to `RECEIVE_BURST`), as the kernel's does; with no slot free it
  ends with ``-ENOBUFS``.
* ACCEPT: ``accept4`` through a socket object wrapped around the listening fd
  for as long as the operation lives (and detached afterwards, so it never
  closes the fd); the new fd is made non-blocking, as io_uring's is.
* POLL_ADD: one-shot, completes with the requested event when epoll reports
  it (level-triggered, so a poll re-armed on a still-ready fd completes at
  once).
* CLOSE: ``close(2)`` at submission. Operations still parked on that fd fail
  with ``-EBADF``: with epoll they could never complete (io_uring would keep
  them on the open file), and callers cancel first anyway.
* ASYNC_CANCEL (by user_data or by fd): the parked operation completes with
  ``-ECANCELED``, the cancel with ``0`` (or the count); ``-ENOENT`` when the
  target already completed.

There is no kernel on the other side, so nothing is pinned: buffers are plain
Python objects referenced by their operation until it completes. Only what
the loop uses is emulated (`proactor.engine` lists it); CONNECT, SHUTDOWN,
TIMEOUT and MSG_RING are not, since the loop connects and shuts down with
plain system calls and keeps its timers itself.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import select
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..reactor.poller import new_poller
from . import abi
from .abi import Completion
from .buffers import Pinned

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .buffers import IncomingBuffer, OutgoingBuffer

_MORE = abi.CQE_F_MORE
_BUFFER = abi.CQE_F_BUFFER
_BUFFER_SHIFT = abi.CQE_BUFFER_SHIFT
# A multishot accept takes at most this many connections per readiness report, and a
# multishot recv fills at most this many buffers (the kernel retries a multishot recv too).
ACCEPT_BURST = 64
RECEIVE_BURST = 16


@dataclass(frozen=True)
class EmulatedCapabilities:
    """What the emulated engine offers: the interface of `proactor.ring.Capabilities`."""

    multishot_accept: bool = True
    multishot_recv: bool = True
    buffer_rings: bool = True
    cancel_by_fd: bool = True
    multishot_poll: bool = False
    wait_deadline_argument: bool = True
    msg_ring: bool = False
    deferred_task_run: bool = False
    # Implemented (prepare_send_unconfirmed) but not offered to the loop: here it would be
    # the same write(2) made later and dearer than the loop's own direct write.
    unconfirmed_send: bool = False
    zero_copy_send: bool = False
    receive_bundles: bool = False
    splice: bool = False

    def describe(self) -> str:
        return (
            "emulated engine: completions posted by forkloop over epoll readiness; "
            "multishot accept and recv, provided buffers and cancellation emulated"
        )


class EmulatedBuffers:
    """A provided-buffer group in memory: ``count`` slots a receive may fill."""

    def __init__(self, group_id: int, count: int, size: int) -> None:
        self.group_id = group_id
        self.count = count
        self.size = size
        self._slots: list[bytes | None] = [None] * count
        self._free = list(range(count - 1, -1, -1))
        self._lent = 0

    @property
    def lent(self) -> int:
        """Buffers the application took (`take`) and has not recycled."""
        return self._lent

    @property
    def filled(self) -> int:
        """Slots holding received bytes that nobody consumed yet."""
        return self.count - len(self._free) - self._lent

    def consume(self, cqe_flags: int, length: int) -> bytes:
        """The bytes a completion delivered; the slot is free again."""
        buffer_id = cqe_flags >> _BUFFER_SHIFT
        data = self._slots[buffer_id]
        if not cqe_flags & _BUFFER or data is None:
            raise RuntimeError(f"buffer {buffer_id} of group {self.group_id} holds no data")
        self._slots[buffer_id] = None
        self._free.append(buffer_id)
        return data

    def take(self, cqe_flags: int, length: int) -> tuple[int, memoryview]:
        data = self.consume(cqe_flags, length)
        buffer_id = cqe_flags >> _BUFFER_SHIFT
        self._free.remove(buffer_id)
        self._lent += 1
        return buffer_id, memoryview(data)

    def recycle(self, buffer_id: int) -> None:
        self._lent -= 1
        self._free.append(buffer_id)

    def close(self) -> None:
        self._slots = [None] * self.count


def _data_of(buffer: OutgoingBuffer) -> ReadableBuffer:
    """The object behind a `proactor.buffers.Pinned` wrapper, or the buffer itself."""
    return buffer.buffer if type(buffer) is Pinned else buffer


def _wrap(fd: int) -> socket.socket:
    """A socket object on ``fd`` that the caller must `detach` (never close) when done."""
    return socket.socket(fileno=fd)


class _Operation:
    """One queued or parked operation; ``attempt`` returns True once it posted its last CQE."""

    __slots__ = ("engine", "user_data", "fd")
    writes = False  # parked on the fd's write side (waits for EPOLLOUT)
    holds = False  # ``release`` has something to drop

    def __init__(self, engine: EmulatedRing, user_data: int, fd: int) -> None:
        self.engine = engine
        self.user_data = user_data
        self.fd = fd

    def attempt(self) -> bool:
        raise NotImplementedError

    def post(self, result: int, flags: int = 0) -> None:
        self.engine._completed.append((self.user_data, result, flags))

    def release(self) -> None:
        """The operation is over (completed, cancelled or failed): drop what it holds."""


class _Accept(_Operation):
    __slots__ = ("multishot", "listener")
    holds = True

    def __init__(self, engine: EmulatedRing, user_data: int, fd: int, multishot: bool) -> None:
        super().__init__(engine, user_data, fd)
        self.multishot = multishot
        self.listener: socket.socket | None = None

    def attempt(self) -> bool:
        try:
            if self.listener is None:
                self.listener = _wrap(self.fd)
            accept = self.listener._accept  # type: ignore[attr-defined]
            for _ in range(ACCEPT_BURST):
                fd, _ = accept()
                os.set_blocking(fd, False)
                if not self.multishot:
                    self.post(fd)
                    return True
                self.post(fd, _MORE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.post(-(exc.errno or errno.EIO))
            return True
        return False  # a burst taken; epoll reports the rest at the next poll

    def release(self) -> None:
        if self.listener is not None:
            self.listener.detach()
            self.listener = None


class _ReceiveProvided(_Operation):
    __slots__ = ("buffers", "multishot")

    def __init__(
        self, engine: EmulatedRing, user_data: int, fd: int, buffers: EmulatedBuffers, more: bool
    ) -> None:
        super().__init__(engine, user_data, fd)
        self.buffers = buffers
        self.multishot = more

    def attempt(self) -> bool:
        buffers = self.buffers
        size = buffers.size
        free = buffers._free
        post = self.engine._completed.append
        for _ in range(RECEIVE_BURST):
            if not free:
                post((self.user_data, -errno.ENOBUFS, 0))
                return True
            try:
                data = os.read(self.fd, size)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                post((self.user_data, -(exc.errno or errno.EIO), 0))
                return True
            if not data:
                post((self.user_data, 0, 0))
                return True
            buffer_id = free.pop()
            buffers._slots[buffer_id] = data
            flags = _BUFFER | buffer_id << _BUFFER_SHIFT
            if not self.multishot:
                post((self.user_data, len(data), flags))
                return True
            post((self.user_data, len(data), flags | _MORE))
            if len(data) < size:
                return False  # the socket is drained, most likely: wait for epoll
        return False


class _ReceiveInto(_Operation):
    """RECV and READ into the caller's buffer."""

    __slots__ = ("view",)
    holds = True

    def __init__(self, engine: EmulatedRing, user_data: int, fd: int, view: memoryview) -> None:
        super().__init__(engine, user_data, fd)
        self.view = view

    def attempt(self) -> bool:
        try:
            count = os.readv(self.fd, [self.view])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            count = -(exc.errno or errno.EIO)
        self.post(count)
        return True

    def release(self) -> None:
        self.view.release()


class _Send(_Operation):
    """SEND and SENDMSG (without an address): one ``writev``, possibly short."""

    __slots__ = ("buffers",)
    writes = True

    def __init__(
        self, engine: EmulatedRing, user_data: int, fd: int, buffers: list[ReadableBuffer]
    ) -> None:
        self.engine = engine  # written out: this runs once per send
        self.user_data = user_data
        self.fd = fd
        self.buffers = buffers

    def attempt(self) -> bool:
        try:
            buffers = self.buffers
            sent = (
                os.write(self.fd, buffers[0]) if len(buffers) == 1 else os.writev(self.fd, buffers)
            )
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            sent = -(exc.errno or errno.EIO)
        self.engine._completed.append((self.user_data, sent, 0))
        return True


class _UnconfirmedSend(_Operation):
    """`EmulatedRing.prepare_send_unconfirmed`: one ``write`` at submission, never parked."""

    __slots__ = ("data",)

    def __init__(self, engine: EmulatedRing, user_data: int, fd: int, data: bytes) -> None:
        self.engine = engine
        self.user_data = user_data
        self.fd = fd
        self.data = data

    def attempt(self) -> bool:
        try:
            sent = os.write(self.fd, self.data)
        except (BlockingIOError, InterruptedError):
            sent = -errno.EAGAIN
        except OSError as exc:
            sent = -(exc.errno or errno.EIO)
        if sent != len(self.data):
            self.engine._completed.append((self.user_data, sent, 0))
        return True


class _Poll(_Operation):
    """One-shot POLL_ADD: parked until epoll reports the fd, then it completes."""

    __slots__ = ("events", "reported")

    def __init__(self, engine: EmulatedRing, user_data: int, fd: int, events: int) -> None:
        super().__init__(engine, user_data, fd)
        self.events = events
        self.reported = False

    @property
    def writes(self) -> bool:  # type: ignore[override]
        return not self.events & (select.POLLIN | select.POLLPRI)

    def attempt(self) -> bool:
        if not self.reported:  # the first attempt is the submission: wait for epoll
            self.reported = True
            return False
        self.post(self.events & (select.POLLIN | select.POLLPRI | select.POLLOUT))
        return True


class _FdQueue:
    """The operations parked on one fd, in arrival order, on its read and write sides."""

    __slots__ = ("engine", "fd", "readers", "writers", "reading", "writing")

    def __init__(self, engine: EmulatedRing, fd: int) -> None:
        self.engine = engine
        self.fd = fd
        self.readers: collections.deque[_Operation] = collections.deque()
        self.writers: collections.deque[_Operation] = collections.deque()
        self.reading = False  # registered with the poller for EPOLLIN
        self.writing = False

    def readable(self) -> None:
        self._run(self.readers)

    def writable(self) -> None:
        self._run(self.writers)

    def _run(self, parked: collections.deque[_Operation]) -> None:
        operations = self.engine._operations
        while parked:
            operation = parked[0]
            if not operation.attempt():
                return
            parked.popleft()
            del operations[operation.user_data]
            if operation.holds:
                operation.release()
        self.engine._register(self)


class EmulatedRing:
    """`proactor.ring.Ring`'s interface, completed by system calls on epoll readiness."""

    def __init__(self) -> None:
        self._poller = new_poller(self._report_error)
        # Operations to start, and (kind, user_data, argument) for those that run at once.
        self._queued: list[_Operation | tuple[str, int, int]] = []
        self._completed: list[Completion] = []
        self._operations: dict[int, _Operation] = {}  # queued or parked, by user_data
        self._fds: dict[int, _FdQueue] = {}
        self._buffer_groups: dict[int, EmulatedBuffers] = {}
        self._closed = False
        self.capabilities = EmulatedCapabilities()
        self.settled = True  # always: submit runs every operation queued before it returns

    def _report_error(self, exc: BaseException, fd: int, callback: object) -> None:
        raise exc  # an engine bug: let it reach the loop's error handling

    # --- queueing -----------------------------------------------------------------

    def _queue(self, operation: _Operation) -> None:
        if operation.user_data in self._operations:
            raise ValueError(
                f"user_data {operation.user_data} is in flight already; "
                "every operation needs its own"
            )
        self._operations[operation.user_data] = operation
        self._queued.append(operation)

    def prepare_nop(self, user_data: int) -> None:
        self._queued.append(("nop", user_data, 0))

    def prepare_accept(
        self, user_data: int, fd: int, *, multishot: bool = False, flags: int = 0
    ) -> None:
        self._queue(_Accept(self, user_data, fd, multishot))

    def prepare_recv(
        self,
        user_data: int,
        fd: int,
        buffer: IncomingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = 0,
    ) -> None:
        view = memoryview(_data_of(buffer)).cast("B")
        end = len(view) if length is None else offset + length
        self._queue(_ReceiveInto(self, user_data, fd, view[offset:end]))

    prepare_read = prepare_recv

    def prepare_recv_provided(
        self,
        user_data: int,
        fd: int,
        group_id: int,
        *,
        multishot: bool = True,
        bundle: bool = False,
        length: int = 0,
        flags: int = 0,
    ) -> None:
        buffers = self._buffer_groups[group_id]
        self._queue(_ReceiveProvided(self, user_data, fd, buffers, multishot))

    def prepare_send(
        self,
        user_data: int,
        fd: int,
        buffer: OutgoingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = 0,
    ) -> None:
        if type(buffer) is bytes and not offset and length is None:
            self._queue(_Send(self, user_data, fd, [buffer]))
            return
        data = _data_of(buffer)
        if offset or length is not None:
            view = memoryview(data).cast("B")
            data = view[offset : len(view) if length is None else offset + length]
        self._queue(_Send(self, user_data, fd, [data]))

    def prepare_send_zero_copy(
        self,
        user_data: int,
        fd: int,
        buffer: OutgoingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = 0,
    ) -> None:
        """A plain send: one completion, without ``F_MORE``, so no notification follows."""
        self.prepare_send(user_data, fd, buffer, offset=offset, length=length, flags=flags)

    def prepare_send_unconfirmed(self, user_data: int, fd: int, data: bytes) -> None:
        """As `proactor.ring.Ring.prepare_send_unconfirmed`: tried once when submitted; a
        completion only when not everything was sent (the count, ``-EAGAIN`` or ``-errno``)."""
        self._queue(_UnconfirmedSend(self, user_data, fd, data))

    def unconfirmed_sender(self, user_data: int, fd: int) -> Callable[[bytes], None]:
        """`prepare_send_unconfirmed` for one ``user_data`` and ``fd``."""
        return functools.partial(self.prepare_send_unconfirmed, user_data, fd)

    def prepare_sendmsg(
        self,
        user_data: int,
        fd: int,
        buffers: Iterable[ReadableBuffer],
        *,
        address: bytes | None = None,
        flags: int = 0,
    ) -> None:
        if address is not None:
            raise NotImplementedError("the emulated engine sends to an address only by sendto()")
        self._queue(_Send(self, user_data, fd, [_data_of(buffer) for buffer in buffers]))

    def prepare_poll_add(
        self, user_data: int, fd: int, events: int = select.POLLIN, *, multishot: bool = False
    ) -> None:
        if multishot:
            raise OSError(errno.ENOTSUP, "the emulated engine has one-shot polls only")
        self._queue(_Poll(self, user_data, fd, events))

    def prepare_close(self, user_data: int, fd: int) -> None:
        self._queued.append(("close", user_data, fd))

    def prepare_cancel(self, user_data: int, target_user_data: int, *, every: bool = False) -> None:
        self._queued.append(("cancel", user_data, target_user_data))

    def prepare_cancel_fd(self, user_data: int, fd: int) -> None:
        self._queued.append(("cancel_fd", user_data, fd))

    def provide_buffers(self, count: int, size: int, group_id: int = 0) -> EmulatedBuffers:
        if group_id in self._buffer_groups:
            raise ValueError(f"buffer group {group_id} is registered already")
        buffers = EmulatedBuffers(group_id, count, size)
        self._buffer_groups[group_id] = buffers
        return buffers

    # --- submission and completion ----------------------------------------------------

    def submit(self, wait_for: int = 0, timeout: float | None = None) -> int:
        """Run what was queued, then wait (up to ``timeout``) until a completion is posted."""
        if self._closed:
            raise OSError(errno.EBADF, "submit on a closed emulated ring")
        queued = self._queued
        if queued:
            self._queued = []
            start = self._start
            for item in queued:
                if isinstance(item, tuple):
                    self._run_immediate(*item)
                else:
                    start(item)
        if self._completed or not wait_for:
            if self._fds:
                self._poller.poll(0)
        else:
            self._poller.poll(timeout)
        return len(queued)

    def submit_and_reap(self, timeout: float | None) -> list[Completion]:
        """`submit`, waiting up to ``timeout`` for a completion, then `completions`."""
        self.submit(0 if timeout == 0 else 1, timeout)
        completed = self._completed
        if completed:
            self._completed = []
        return completed

    def completions(self) -> list[Completion]:
        completed = self._completed
        if completed:
            self._completed = []
        return completed

    def _start(self, operation: _Operation) -> None:
        if operation.attempt():
            del self._operations[operation.user_data]
            if operation.holds:
                operation.release()
            return
        queue = self._fds.get(operation.fd)
        if queue is None:
            queue = self._fds[operation.fd] = _FdQueue(self, operation.fd)
        if operation.writes:
            queue.writers.append(operation)
        else:
            queue.readers.append(operation)
        self._register(queue)

    def _register(self, queue: _FdQueue) -> None:
        """Make the poller watch ``queue.fd`` for exactly the sides that have parked operations."""
        poller = self._poller
        fd = queue.fd
        if queue.readers:
            if not queue.reading:
                queue.reading = True
                poller.set_reader(fd, queue.readable)
        elif queue.reading:
            queue.reading = False
            poller.clear_reader(fd)
        if queue.writers:
            if not queue.writing:
                queue.writing = True
                poller.set_writer(fd, queue.writable)
        elif queue.writing:
            queue.writing = False
            poller.clear_writer(fd)
        if not (queue.reading or queue.writing) and self._fds.get(fd) is queue:
            del self._fds[fd]

    def _run_immediate(self, kind: str, user_data: int, argument: int) -> None:
        post = self._completed.append
        if kind == "nop":
            post((user_data, 0, 0))
        elif kind == "cancel":
            post((user_data, 0 if self._cancel(argument) else -errno.ENOENT, 0))
        elif kind == "cancel_fd":
            targets = [op.user_data for op in self._operations.values() if op.fd == argument]
            post((user_data, sum(self._cancel(target) for target in targets), 0))
        elif kind == "close":
            post((user_data, self._close_fd(argument), 0))

    def _cancel(self, target: int, result: int = -errno.ECANCELED) -> bool:
        operation = self._operations.pop(target, None)
        if operation is None:
            return False
        queue = self._fds.get(operation.fd)
        if queue is not None:
            for parked in (queue.readers, queue.writers):
                if operation in parked:
                    parked.remove(operation)
            self._register(queue)
        operation.release()
        operation.post(result)
        return True

    def _close_fd(self, fd: int) -> int:
        for operation in [op for op in self._operations.values() if op.fd == fd]:
            self._cancel(operation.user_data, -errno.EBADF)
        queue = self._fds.pop(fd, None)
        if queue is not None:
            if queue.reading:
                self._poller.clear_reader(fd)
            if queue.writing:
                self._poller.clear_writer(fd)
        try:
            os.close(fd)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    # --- state and teardown --------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Operations queued or parked whose last completion has not been posted."""
        return len(self._operations) + sum(type(item) is tuple for item in self._queued)

    def owns(self, user_data: int) -> bool:
        return user_data in self._operations

    def fileno(self) -> int:
        return self._poller.fileno()

    def close(self, drain_timeout: float = 1.0) -> None:
        """Run the closes and unconfirmed sends still queued, drop every other operation,
        close the poller."""
        if self._closed:
            return
        for item in self._queued:
            if type(item) is tuple and item[0] == "close":
                self._close_fd(item[2])
            elif type(item) is _UnconfirmedSend:
                item.attempt()  # as io_uring's close submits what was queued
        self._queued = []
        for operation in self._operations.values():
            operation.release()
        self._operations.clear()
        self._fds.clear()
        self._completed = []
        for buffers in self._buffer_groups.values():
            buffers.close()
        self._closed = True
        self._poller.close()
