"""The readiness poller: every file descriptor the reactor watches goes through here.

Facts about epoll that this module is built on
----------------------------------------------
* epoll watches *file descriptions*, registered by fd number. One
  ``epoll_ctl`` call sets the whole interest mask of an fd, so "add a reader"
  on an fd that already has a writer is a MODIFY with both bits, and removing
  the last interest is a DEL. The poller keeps the reader and writer of each fd
  in two dicts and derives the mask from them; nothing else is stored.
* Closing an fd removes it from the epoll set by itself (when no duplicate of
  the fd is open). The poller's dicts do not know that, so a later
  registration of the same number may find the kernel disagreeing with them:
  MODIFY then fails with ENOENT and ADD with EEXIST. Both are retried with the
  other operation. Owners must unregister *before* they close an fd, or a
  reused fd number would inherit their callbacks.
* The reactor uses level-triggered mode, the contract of ``add_reader``: a
  callback that leaves data unread is called again on the next poll. A
  transport that keeps reading does not pay an ``epoll_ctl`` per read.
* EPOLLHUP and EPOLLERR are reported whether asked for or not. They are handed
  to both the reader and the writer of the fd: the reader's ``recv`` or the
  writer's ``send`` (or ``SO_ERROR`` for a connecting socket) then meets the
  actual error and reports it where it belongs.
* Regular files cannot be registered (EPERM); that error reaches the caller,
  as it does with the standard library's selectors.

Dispatch
--------
``poll(timeout)`` waits, then calls each ready fd's callbacks straight from
the result list: no `selectors.SelectorKey`, no `asyncio.Handle` per event,
one dict lookup per callback. Plain readability, nearly every event, is told
apart with one comparison and dispatched inline; anything else goes through
``_dispatch``. The callback is looked up again for every event, so a callback
that unregisters or closes another fd earlier in the same batch is respected.
A spurious call (the fd number was reused inside one batch) is harmless
because every reader and writer copes with EAGAIN.

A callback that raises is reported through the ``report_error`` function the
loop passes in and the batch goes on; ``SystemExit`` and ``KeyboardInterrupt``
propagate out of ``poll``, and level triggering re-reports the events that were
not dispatched.

Off Linux, `SelectorPoller` offers the same interface over `selectors` (kqueue
on the BSDs and macOS). It is slower and exists so the loop runs everywhere; it
can also be chosen on Linux with ``REACTOR_POLLER=selectors`` for testing.

The interface, as types
-----------------------
`Poller` is what every user of readiness relies on: ``set_reader`` /
``set_writer``, ``clear_reader`` / ``clear_writer`` and ``reader_of`` /
``writer_of``, one reader and one writer per fd, and ``close``. The sock_*
operations, transports, pipes and subprocesses are written against it, so the
proactor can hand them `proactor.readiness.PollWatches` instead.
`WaitingPoller` adds ``poll(timeout)`` and ``fileno()``: a poller that also
waits, as the reactor's I/O layer and the proactor's emulated engine need.
Both pollers here keep their callbacks in one `InterestTable`, which derives
each fd's interest mask from them and leaves only ``_apply`` (tell the kernel)
and ``poll`` to each.
"""

from __future__ import annotations

import os
import select
import selectors
from collections.abc import Callable
from typing import Protocol

Callback = Callable[[], object]
ErrorReporter = Callable[[BaseException, int, Callback], None]

# A poll returns at most this many events; the rest wait for the next poll.
MAX_EVENTS_PER_POLL = 1024


class Poller(Protocol):
    """One reader and one writer callback per fd: the readiness interface every user relies on."""

    def set_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replacing any previous reader)."""

    def set_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (replacing any previous writer)."""

    def clear_reader(self, fd: int, callback: Callback | None = None) -> bool:
        """Stop watching ``fd`` for reading; with ``callback``, only if it is still the reader."""

    def clear_writer(self, fd: int, callback: Callback | None = None) -> bool:
        """Stop watching ``fd`` for writing; with ``callback``, only if it is still the writer."""

    def reader_of(self, fd: int) -> Callback | None:
        """The callback watching ``fd`` for reading, if any."""

    def writer_of(self, fd: int) -> Callback | None:
        """The callback watching ``fd`` for writing, if any."""

    def close(self) -> None:
        """Forget every callback and release what the poller holds."""


class WaitingPoller(Poller, Protocol):
    """A `Poller` that also waits for readiness and runs the callbacks (epoll, `selectors`)."""

    def fileno(self) -> int:
        """The fd that becomes readable when a watched fd is ready (-1 if there is none)."""

    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: forever) and run the callbacks of ready fds."""


class InterestTable:
    """The reader and writer of each fd; each fd's interest mask is derived from the two.

    A subclass names its two interest bits (`READ_EVENTS`, `WRITE_EVENTS`) and
    tells the kernel about a new mask in ``_apply``, which is called only when
    the mask changes, before a callback is added and after one is removed.
    """

    READ_EVENTS: int
    WRITE_EVENTS: int

    def __init__(self, report_error: ErrorReporter) -> None:
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._report_error = report_error

    def _apply(self, fd: int, mask: int) -> None:
        """Make the kernel watch ``fd`` for exactly ``mask`` (0: not at all)."""
        raise NotImplementedError

    def set_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replacing any previous reader)."""
        if fd not in self._readers:
            self._apply(fd, self.READ_EVENTS | (self.WRITE_EVENTS if fd in self._writers else 0))
        self._readers[fd] = callback

    def set_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (replacing any previous writer)."""
        if fd not in self._writers:
            self._apply(fd, self.WRITE_EVENTS | (self.READ_EVENTS if fd in self._readers else 0))
        self._writers[fd] = callback

    def clear_reader(self, fd: int, callback: Callback | None = None) -> bool:
        """Stop watching ``fd`` for reading; with ``callback``, only if it is still the reader."""
        current = self._readers.get(fd)
        if current is None or (callback is not None and current != callback):
            return False
        del self._readers[fd]
        self._apply(fd, self.WRITE_EVENTS if fd in self._writers else 0)
        return True

    def clear_writer(self, fd: int, callback: Callback | None = None) -> bool:
        """Stop watching ``fd`` for writing; with ``callback``, only if it is still the writer."""
        current = self._writers.get(fd)
        if current is None or (callback is not None and current != callback):
            return False
        del self._writers[fd]
        self._apply(fd, self.READ_EVENTS if fd in self._readers else 0)
        return True

    def reader_of(self, fd: int) -> Callback | None:
        return self._readers.get(fd)

    def writer_of(self, fd: int) -> Callback | None:
        return self._writers.get(fd)

    def _forget_all(self) -> None:
        self._readers.clear()
        self._writers.clear()

    def _call(self, fd: int, callback: Callback | None) -> None:
        if callback is None:
            return  # unregistered earlier in this batch
        try:
            callback()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report_error(exc, fd, callback)


class EpollPoller(InterestTable):
    """Level-triggered epoll with one reader and one writer callback per fd."""

    READ_EVENTS = select.EPOLLIN
    WRITE_EVENTS = select.EPOLLOUT

    def __init__(self, report_error: ErrorReporter) -> None:
        super().__init__(report_error)
        self._epoll = select.epoll()

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._forget_all()
        self._epoll.close()

    def _apply(self, fd: int, mask: int) -> None:
        epoll = self._epoll
        registered = fd in self._readers or fd in self._writers
        if not mask:
            try:
                epoll.unregister(fd)
            except OSError:
                pass  # the fd was closed first; the kernel already forgot it
        elif registered:
            try:
                epoll.modify(fd, mask)
            except FileNotFoundError:
                epoll.register(fd, mask)
        else:
            try:
                epoll.register(fd, mask)
            except FileExistsError:
                epoll.modify(fd, mask)

    # waiting ----------------------------------------------------------------

    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: forever) and run the callbacks of ready fds."""
        events = self._epoll.poll(-1 if timeout is None else timeout, MAX_EVENTS_PER_POLL)
        readers = self._readers
        only_readable = _ONLY_READABLE
        for fd, mask in events:
            if mask != only_readable:
                self._dispatch(fd, mask)
                continue
            try:
                callback = readers[fd]
            except KeyError:
                continue  # unregistered earlier in this batch
            # _call, written out: a call per event would cost a Python frame on the hot path
            try:
                callback()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report_error(exc, fd, callback)

    def _dispatch(self, fd: int, mask: int) -> None:
        """Any event but plain readability: writability, hang-up, error, urgent data."""
        if mask & _READABLE:
            self._call(fd, self._readers.get(fd))
        if mask & _WRITABLE:
            self._call(fd, self._writers.get(fd))


_READABLE = select.EPOLLIN | select.EPOLLPRI | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# Nearly every event is this one; poll() runs it without a single bit test (an
# int ``&`` is not specialised by the interpreter, an int ``!=`` is).
_ONLY_READABLE = select.EPOLLIN


class SelectorPoller(InterestTable):
    """The same interface over the `selectors` module, for platforms without epoll."""

    READ_EVENTS = selectors.EVENT_READ
    WRITE_EVENTS = selectors.EVENT_WRITE

    def __init__(
        self,
        report_error: ErrorReporter,
        selector_factory: Callable[[], selectors.BaseSelector] = selectors.DefaultSelector,
    ) -> None:
        super().__init__(report_error)
        self._selector = selector_factory()

    def fileno(self) -> int:
        fileno: Callable[[], int] | None = getattr(self._selector, "fileno", None)
        return -1 if fileno is None else fileno()

    def close(self) -> None:
        self._forget_all()
        self._selector.close()

    def _apply(self, fd: int, mask: int) -> None:
        selector = self._selector
        try:
            selector.get_key(fd)
            registered = True
        except KeyError:
            registered = False
        if not mask:
            if registered:
                selector.unregister(fd)
        elif registered:
            try:
                selector.modify(fd, mask)
            except OSError:
                # The fd was closed and reused behind the selector's back.
                selector.unregister(fd)
                selector.register(fd, mask)
        else:
            selector.register(fd, mask)

    def poll(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            timeout = 0
        for key, events in self._selector.select(timeout):
            fd = key.fd
            if events & selectors.EVENT_READ:
                self._call(fd, self._readers.get(fd))
            if events & selectors.EVENT_WRITE:
                self._call(fd, self._writers.get(fd))


def new_poller(report_error: ErrorReporter) -> WaitingPoller:
    """epoll where the platform has it, unless ``REACTOR_POLLER=selectors`` asks otherwise."""
    choice = os.environ.get("REACTOR_POLLER", "")
    if hasattr(select, "epoll") and choice != "selectors":
        return EpollPoller(report_error)
    return SelectorPoller(report_error)
