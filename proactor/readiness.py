"""Readiness on a completion engine: the reactor poller's interface over one-shot POLL_ADD.

Some of the asyncio API is about readiness, not completions: ``add_reader``
and ``add_writer`` call back *when* an fd is ready and leave the system call to
the user, and the ``sock_*`` coroutines, pipes, subprocess exit watching
(pidfds) and datagram sockets are written that way in the reactor. The
proactor runs all of those unchanged by giving them, as ``loop._poller``, an
object with the reactor poller's interface (`reactor.poller.Poller`, which
mypy holds this class to): ``set_reader``/``set_writer``,
``clear_reader``/``clear_writer``, ``reader_of``/``writer_of``. Each watch is
a one-shot ``POLL_ADD`` on the engine.

Level-triggered, as ``add_reader`` promises
-------------------------------------------
A one-shot poll looks at the fd's readiness when it is armed, and completes at
once if the fd is ready. A watch re-arms its poll after every callback, so a
callback that leaves data unread is called again in the next iteration: the
level-triggered contract of ``add_reader``, at the price of one SQE and one
CQE per event and no extra system call (the re-armed poll goes to the kernel
in the iteration's one ``io_uring_enter``).

Removing a watch
----------------
``clear_*`` forgets the watch at once and cancels its poll if one is in
flight. A completion of a watch that is no longer registered is dropped, so a
callback is never called after its removal, even when the poll won the race
against its cancel. ``set_*`` on an fd that is already watched only swaps the
callback; the poll in flight stays.

A poll that fails (``-EBADF``: the fd was closed while watched) drops its
watch, as epoll forgets a closed fd. Owners unregister before they close, as
with the reactor; an fd number reused meanwhile would otherwise inherit the
watch.
"""

from __future__ import annotations

import errno
import select
from typing import TYPE_CHECKING

from ..reactor.poller import Callback

if TYPE_CHECKING:
    from .loop import EventLoop

_CANCELLED = -errno.ECANCELED


class _Watch:
    """One fd watched for one direction: the callback and its poll in flight, if any."""

    __slots__ = ("watches", "table", "fd", "events", "callback", "user_data")

    def __init__(
        self,
        watches: PollWatches,
        table: dict[int, _Watch],
        fd: int,
        events: int,
        callback: Callback,
    ) -> None:
        self.watches = watches
        self.table = table
        self.fd = fd
        self.events = events
        self.callback = callback
        self.user_data = 0

    def arm(self) -> None:
        loop = self.watches._loop
        user_data = loop._new_user_data()
        loop._ring.prepare_poll_add(user_data, self.fd, self.events)
        loop._handlers[user_data] = self.fire
        self.user_data = user_data

    def fire(self, result: int, flags: int) -> None:
        """The poll completed: run the callback, then re-arm while still registered."""
        self.user_data = 0
        table, fd = self.table, self.fd
        if table.get(fd) is not self:
            return  # removed meanwhile
        if result < 0 and result != _CANCELLED:
            del table[fd]  # the fd is gone (EBADF) or cannot be polled
            return
        try:
            if result >= 0:
                self.callback()
        finally:
            if table.get(fd) is self and not self.user_data:
                self.arm()


class PollWatches:
    """``set_reader``/``set_writer`` and their removals, as one-shot polls on the loop's engine."""

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._readers: dict[int, _Watch] = {}
        self._writers: dict[int, _Watch] = {}

    def set_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replacing any previous reader)."""
        self._watch(self._readers, fd, callback, select.POLLIN)

    def set_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (replacing any previous writer)."""
        self._watch(self._writers, fd, callback, select.POLLOUT)

    def clear_reader(self, fd: int, callback: Callback | None = None) -> bool:
        """Stop watching ``fd`` for reading; with ``callback``, only if it is still the reader."""
        return self._unwatch(self._readers, fd, callback)

    def clear_writer(self, fd: int, callback: Callback | None = None) -> bool:
        """Stop watching ``fd`` for writing; with ``callback``, only if it is still the writer."""
        return self._unwatch(self._writers, fd, callback)

    def reader_of(self, fd: int) -> Callback | None:
        watch = self._readers.get(fd)
        return None if watch is None else watch.callback

    def writer_of(self, fd: int) -> Callback | None:
        watch = self._writers.get(fd)
        return None if watch is None else watch.callback

    def __len__(self) -> int:
        return len(self._readers) + len(self._writers)

    def _watch(self, table: dict[int, _Watch], fd: int, callback: Callback, events: int) -> None:
        watch = table.get(fd)
        if watch is None:
            watch = table[fd] = _Watch(self, table, fd, events, callback)
            watch.arm()
        else:
            watch.callback = callback

    def _unwatch(self, table: dict[int, _Watch], fd: int, callback: Callback | None) -> bool:
        watch = table.get(fd)
        if watch is None or (callback is not None and watch.callback != callback):
            return False
        del table[fd]
        if watch.user_data:
            self._loop._cancel_operation(watch.user_data)
            watch.user_data = 0
        return True

    def close(self) -> None:
        """Forget every watch (the loop is closing and its engine cancels what is in flight)."""
        self._readers.clear()
        self._writers.clear()
