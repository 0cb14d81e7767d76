"""Waking the loop from outside: other threads, and signals.

The loop sleeps in its poll. Two things must be able to end that sleep from
outside the loop's own callbacks: another thread that called
``call_soon_threadsafe``, and a signal. Both go through one `WakeupChannel`, a
non-blocking socketpair whose read end the poll watches.

Threads
-------
A thread appends its callback to the ready queue (a deque append is atomic)
and then calls `WakeupChannel.wake`, which writes one zero byte, unless a
wakeup is already pending, in which case the byte already in flight will do.
The flag that says "pending" is set before the write and cleared by the loop
only *after* it has drained the socket. That order is the whole argument for
why no callback is ever stranded:

* if a thread sees the flag set and skips its write, the byte that set it is
  either still unread (the poll will return), or read but the flag not yet
  cleared, which means the loop is inside its poll phase and will look at the
  ready queue, where the callback already is, before it sleeps again;
* if a thread sees the flag clear, it writes.

A full socket buffer drops the byte silently: a wakeup is pending anyway.

Signals
-------
``add_signal_handler`` points ``signal.set_wakeup_fd`` at the same socket. The
interpreter's C-level handler then writes the signal's number as one byte,
whatever the loop is doing, and the Python-level handler installed by the loop
does nothing at all. The loop finds non-zero bytes when it drains the socket
and queues the registered handler as an ordinary ready callback: a handler only
records; the loop acts. Signals are a main-thread affair in Python, so
``add_signal_handler`` outside the main thread raises `RuntimeError`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from typing import TypeVarTuple

Ts = TypeVarTuple("Ts")

logger = logging.getLogger("asyncio")


class WakeupChannel:
    """A socketpair that ends the loop's poll: coalesced bytes from threads, signal numbers."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._pending = False

    def fileno(self) -> int:
        """The end the loop's poller watches for readability."""
        return self._reader.fileno()

    def wake(self) -> None:
        """Make the loop's current or next poll return (safe from any thread)."""
        if self._pending:
            return
        self._pending = True
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # full: a wakeup is pending anyway; closed: the loop is closing

    def drain(self) -> bytes:
        """Read everything written so far; return the signal numbers among it."""
        signals = b""
        while True:
            try:
                data = self._reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            if data.strip(b"\0"):
                signals += data.replace(b"\0", b"")
        self._pending = False  # only now: see the module's argument
        return signals

    def route_signals_here(self) -> None:
        """Have the interpreter write every caught signal's number into this channel."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


def _signal_recorded(signum: int, frame: object) -> None:
    """Python-level signal handler: the wakeup fd already carries the signal to the loop."""


class SignalHandlers(asyncio.AbstractEventLoop):
    """``add_signal_handler`` and friends, for `reactor.loop.LoopCore`.

    Expects ``self._wakeup`` (a `WakeupChannel`), ``self._signal_handlers``
    (a dict), ``self._ready`` (the ready queue) and ``_check_closed`` from the
    core.
    """

    _wakeup: WakeupChannel
    _signal_handlers: dict[int, asyncio.Handle]
    _ready: collections.deque[asyncio.Handle]

    def _check_closed(self) -> None:
        raise NotImplementedError  # the core's: RuntimeError once the loop is closed

    def add_signal_handler(self, sig: int, callback: Callable[[*Ts], object], *args: *Ts) -> None:
        if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        try:
            self._wakeup.route_signals_here()
        except (ValueError, OSError) as exc:
            raise RuntimeError(f"cannot handle signals here: {exc}") from None
        self._signal_handlers[sig] = asyncio.Handle(callback, args, self, None)
        try:
            signal.signal(sig, _signal_recorded)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                signal.set_wakeup_fd(-1)
            raise RuntimeError(f"signal {sig} cannot be caught: {exc}") from exc

    def remove_signal_handler(self, sig: int) -> bool:
        self._check_signal(sig)
        if self._signal_handlers.pop(sig, None) is None:
            return False
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, default)
        except OSError as exc:
            raise RuntimeError(f"signal {sig} cannot be restored: {exc}") from exc
        if not self._signal_handlers:
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError) as exc:
                logger.info("set_wakeup_fd(-1) failed: %s", exc)
        return True

    def _queue_signal_handlers(self, signals: bytes) -> None:
        handlers = self._signal_handlers
        for signum in signals:
            handle = handlers.get(signum)
            if handle is not None:
                self._ready.append(handle)

    @staticmethod
    def _check_signal(sig: int) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def _remove_all_signal_handlers(self) -> None:
        if not self._signal_handlers:
            return
        if sys.is_finalizing() or threading.current_thread() is not threading.main_thread():
            warnings.warn(
                f"closing {self!r} outside the main thread leaves its signal handlers installed",
                ResourceWarning,
                stacklevel=3,
                source=self,
            )
            return
        for sig in list(self._signal_handlers):
            self.remove_signal_handler(sig)
