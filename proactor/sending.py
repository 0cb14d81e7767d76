"""The sending half of a stream transport: one send at a time, in order; most post nothing.

`Sending` is mixed into `proactor.transports.StreamTransport`, which owns the
socket and the reading half; the closing rules, ``write_eof``, ``writelines``
and the drain wait are `reactor.transport_base.StreamTransportBase`'s, shared
with the reactor. This part moves bytes out and says what "writes in progress"
and "abandon the writes" mean on completions.

``write()`` copies anything that is not ``bytes`` (the caller may reuse its
buffer) and, when nothing else is being sent, hands the bytes to the engine
at once; they reach the kernel with the iteration's single
``io_uring_enter``. While something is being sent, writes queue up and go out
after it as one send (joined when small) or one ``sendmsg`` of up to
`IOV_LIMIT` buffers. Bytes not yet known to be sent count in
``get_write_buffer_size()``, so ``pause_writing()`` and ``resume_writing()``
fire at the high- and low-water marks as with any transport. ``write_eof()``
shuts the socket down for writing once everything before it was sent.

Unconfirmed sends: no completion when all went well
---------------------------------------------------
A response that fits the socket's buffer is the common case, and its
completion would say nothing but "sent". Where the engine has them
(``capabilities.unconfirmed_send``: io_uring 6.1, and the emulated engine), a
write of at most the high-water mark goes out as an *unconfirmed send*
(`proactor.ring.Ring.prepare_send_unconfirmed`): ``IOSQE_CQE_SKIP_SUCCESS``
with ``MSG_DONTWAIT | MSG_WAITALL``. The kernel tries it once, inline, in the
enter that consumes its SQE, and posts a completion only if it could not send
everything: the count it did send, ``-EAGAIN`` for none, or an error. The
transport then sends the rest as an ordinary send, which waits for room and
completes. An unconfirmed send costs no completion, no dispatch and no
handler call; a transport has one ``user_data`` for all of its unconfirmed
sends, since at most one of them is outstanding.

When its buffer may be released, and when it counts as sent
-----------------------------------------------------------
* The buffer: as soon as the ``io_uring_enter`` that consumed the SQE has
  returned. The send never waits in the kernel (``MSG_DONTWAIT``), so by then
  it has sent all of the bytes, or part of them and posted the count. The
  ring keeps the bytes until that enter (all SQEs consumed) and then lets go.
* Sent: when the loop has dispatched every completion posted up to and
  including that enter and none of them was the send's. The loop numbers its
  submits; a send prepared after submit ``k`` is consumed by submit ``k + 1``
  (or an early one), and ``loop._confirmed_through`` reaches ``k + 1`` at the
  end of the iteration that made that submit, dispatched its completions and
  found the engine ``settled`` (nothing left unconsumed, no completion held in
  the kernel's overflow list). Until then the send is *outstanding*: its bytes
  count in ``get_write_buffer_size()``, later writes queue behind it, and
  ``close()``, ``write_eof()`` and a drain wait for it, because its completion
  may yet hand bytes back. The transport asks the loop to call `_confirmed`
  then (``_await_confirmation``), and while any transport waits so, the loop's
  next enter does not wait for completions: a send that succeeds posts none,
  so nothing else might end the wait. A transport that writes once per request
  and no more before the next request never needs to.
* Flow control: writes queued behind an outstanding unconfirmed send that
  pass the high-water mark submit it early (`_settle_unconfirmed_early`), as
  an ordinary send is, so the protocol is paused only for bytes the kernel
  did not take.

Invariants
----------
* At most one send is outstanding per socket: an ordinary SEND or SENDMSG in
  flight (``_send_user_data``) or an unconfirmed send not yet confirmed, never
  both; so bytes leave in the order they were written. A direct ``write(2)``
  (below) is made only when nothing is outstanding or queued, and never once
  the transport is closing (its fd may be on its way to the engine's close).
* ``_sending`` is what the ordinary send in flight points at and
  ``_send_remaining`` how much of it the kernel has yet to take;
  ``_unconfirmed`` is what the last unconfirmed send handed over. Both count,
  with the queued writes, in ``get_write_buffer_size()`` while outstanding.
* Whatever is handed to the kernel stays referenced by the engine until the
  kernel is done with it: an ordinary send's until its completion (including
  after ``abort()`` cancels it), an unconfirmed send's until its enter returned.
* The fd is closed only when no send is outstanding, and the unconfirmed
  sends' handler is dropped with it.
* The protocol is paused when more than the high-water mark is left after
  the kernel was offered the bytes (`Sending._over_high_water`), not merely
  because a send has not been submitted yet.

Engines without unconfirmed sends
---------------------------------
Every write is an ordinary send with a completion. Except at low load: when
the iteration brought fewer than `proactor.loop.SEND_THROUGH_RING_FROM`
completions, its first send is written at once with ``write(2)``, as a
readiness loop would, and only what the kernel did not take goes through the
ring. A lone send through the ring would make the next enter return with
nothing but its own completion: two enters and two loop iterations per
request. (An unconfirmed send has no such completion, so it needs no
exception.) A short send (the socket buffer filled) is resubmitted from where
it stopped.
"""

from __future__ import annotations

import asyncio
import errno
import io
import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from os import write as write_fd
from typing import IO, TYPE_CHECKING

from ..reactor.loop import logger
from ..reactor.transport_base import LOST_WRITE_LOG_THRESHOLD, StreamTransportBase
from . import abi
from .engine import CompletionEngine

if TYPE_CHECKING:
    from .loop import CompletionHandler, EventLoop

# Ordinary sends of at least this many bytes go zero-copy where the engine can (SEND_ZC)
# and the peer is on another host; README "The proactor at every load" says how it was
# set, with what `python -m forkloop.loadtest.zerocopy` measures.
ZERO_COPY_SEND_FROM = 64 * 1024
NEVER = sys.maxsize
_NOTIF = abi.CQE_F_NOTIF
# _send_user_data while _send_file runs: writes are refused, as asyncio refuses them.
SENDING_FILE = -1
SENDFILE_MAX_CHUNK = 1 << 30
# Writes smaller than this, queued behind a send in flight, are joined into one buffer;
# larger ones go out as one sendmsg without a copy.
JOIN_LIMIT = 64 * 1024
IOV_LIMIT = 1024  # IOV_MAX on Linux


def _as_bytes(data: object) -> bytes:
    """``data`` as bytes (a copy unless it is bytes already); TypeError if it is not bytes-like."""
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")


def result_error(result: int) -> OSError:
    code = -result
    return OSError(code, os.strerror(code))  # OSError picks the subclass (ConnectionResetError...)


class Sending(StreamTransportBase):
    """write(), flow control and write_eof() on completions (mixed into StreamTransport)."""

    if not TYPE_CHECKING:  # StreamTransport lists the attributes (see TransportBase)
        __slots__ = ()
    _loop: EventLoop
    _ring: CompletionEngine
    _handlers: dict[int, CompletionHandler]
    _new_user_data: Callable[[], int]
    _fd: int
    _sent_handler: CompletionHandler
    _send_user_data: int
    _sending: bytes | list[bytes]  # what the send in flight points at (b"" when none is)
    _send_remaining: int
    _pending: list[bytes]
    _pending_size: int
    _write_abandoned: bool
    _unconfirmed: bytes  # what the last unconfirmed send handed over
    _unconfirmed_at: int  # loop._submits when it was prepared (-1: never)
    _unconfirmed_user_data: int  # the user_data of this transport's unconfirmed sends, or 0
    _unconfirmed_handler: CompletionHandler
    _send_unconfirmed: Callable[[bytes], None]  # the engine's unconfirmed_sender for this fd
    _awaiting_confirmation: bool  # on the loop's list: _confirmed() will be called
    _released: bool
    _lost_called: bool
    _sock: socket.socket
    _zero_copy_from: int  # ordinary sends this large go zero-copy (NEVER: none do)

    def _release(self) -> None:
        raise NotImplementedError  # StreamTransport's: close the fd once nothing is in flight

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            data = _as_bytes(data)
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._conn_lost:
            if self._conn_lost >= LOST_WRITE_LOG_THRESHOLD:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        if not data:
            return
        if self._send_user_data or self._pending:
            self._queue_behind(data)
            return
        loop = self._loop
        if self._unconfirmed_user_data:
            if self._unconfirmed_at >= loop._confirmed_through:
                self._queue_behind(data)  # behind an unconfirmed send that may hand bytes back
                return
            if len(data) <= self._high_water:
                # The common case: all of it is sent in the next enter, which posts nothing.
                self._send_unconfirmed(data)
                self._unconfirmed = data
                self._unconfirmed_at = loop._submits
                return
        if loop._send_directly and not self._closing:
            loop._send_directly = False  # one per quiet iteration: a burst still shares an enter
            try:
                sent = write_fd(self._fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal_error(exc, "Fatal write error on socket transport")
                return
            if sent == len(data):
                return
            data = data[sent:]  # the kernel's buffer is full: the rest goes through the ring
        # _send(data), written out: on an engine without unconfirmed sends, the common case
        user_data = self._new_user_data()
        size = len(data)
        if size < self._zero_copy_from or not self._zero_copy_pays():
            self._ring.prepare_send(user_data, self._fd, data)
            self._handlers[user_data] = self._sent_handler
        else:
            self._ring.prepare_send_zero_copy(user_data, self._fd, data)
            self._handlers[user_data] = self._on_sent_zero_copy
        self._send_user_data = user_data
        self._sending = data
        self._send_remaining = size
        if size > self._high_water:
            self._over_high_water()

    def _queue_behind(self, data: bytes) -> None:
        """A send is outstanding: ``data`` waits for it (and for what was queued before)."""
        if self._send_user_data == SENDING_FILE:
            raise RuntimeError("unable to write; sendfile is in progress")
        self._pending.append(data)
        self._pending_size += len(data)
        if not self._send_user_data:
            self._await_confirmation()  # nothing completes to send the queue: be called back
        if self.get_write_buffer_size() > self._high_water:
            self._over_high_water()

    def _await_confirmation(self) -> None:
        """Have the loop call `_confirmed` once the outstanding unconfirmed send is confirmed."""
        if not self._awaiting_confirmation:
            self._awaiting_confirmation = True
            self._loop._awaiting_confirmation.append(self)

    def _unconfirmed_outstanding(self) -> bool:
        """An unconfirmed send may still post a completion that hands bytes back."""
        return self._unconfirmed_at >= self._loop._confirmed_through

    def _confirmed(self) -> None:
        """Called by the loop: the unconfirmed sends so far are settled (see the module)."""
        self._awaiting_confirmation = False
        if self._unconfirmed_outstanding():
            self._await_confirmation()  # another was prepared since: wait for that one too
            return
        self._unconfirmed = b""
        if self._send_user_data:
            return  # an ordinary send took over (a failure); its completion carries on
        if self._lost_called:
            self._release()  # connection_lost came while the send was outstanding
            return
        if self._pending and not self._conn_lost:
            self._send_queued()
        self._all_sent()

    def _send_queued(self) -> None:
        """Send what waits: as one unconfirmed send when it may be, else as ordinary ones."""
        if self._unconfirmed_user_data and self._pending_size <= self._high_water:
            pending = self._pending
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._pending_size = 0
            self._send_unconfirmed(data)
            self._unconfirmed = data
            self._unconfirmed_at = self._loop._submits
        else:
            self._send_pending()

    def _on_unconfirmed_failed(self, result: int, flags: int) -> None:
        """An unconfirmed send did not send everything: send the rest as an ordinary send.

        ``result`` is the count it sent, ``-EAGAIN`` (none: the socket's buffer
        was full), or an error. The handler stays registered for the next one.
        """
        if self._conn_lost:
            return  # aborted, or failed already: nobody sends any more
        self._handlers[self._unconfirmed_user_data] = self._unconfirmed_handler
        data = self._unconfirmed
        if result >= 0:
            rest = data[result:]
        elif result == -errno.EAGAIN or result == -errno.EINTR:
            rest = data
        else:
            self._fatal_error(result_error(result), "Fatal write error on socket transport")
            return
        if rest:
            self._pending.insert(0, rest)
            self._pending_size += len(rest)
            self._send_pending()

    def _over_high_water(self) -> None:
        """More than the high-water mark waits: pause the protocol unless the kernel takes it now.

        The send in flight may not have reached the kernel yet (it goes with
        the iteration's enter), so it is submitted early, and the protocol is
        paused only if the kernel left more than the mark unsent, as it would
        be by a readiness loop whose ``write()`` calls ``send`` at once. Costs
        one enter per write that crosses the mark; small writes never do. An
        unconfirmed send is settled the same way (`_settle_unconfirmed_early`).
        """
        if not self._protocol_paused and not self._closing:
            if self._send_user_data:
                completion = self._loop._submit_early(self._send_user_data)
                if completion is not None:
                    self._on_sent(*completion)
            elif self._unconfirmed_outstanding():
                self._settle_unconfirmed_early()
        self._maybe_pause_protocol()

    def _settle_unconfirmed_early(self) -> None:
        """Submit now to learn whether the outstanding unconfirmed send sent everything.

        It runs inline in that enter, so a completion for it is among those the
        enter left, or there is none and, once the engine is ``settled``, it
        sent everything: confirmed here, a little before the loop would have,
        and the writes queued behind it go out as the next send.
        """
        loop = self._loop
        completion = loop._submit_early(self._unconfirmed_user_data)
        if completion is not None:
            self._on_unconfirmed_failed(*completion)  # its rest becomes an ordinary send
        elif loop._ring.settled:
            self._unconfirmed_at = -1
            self._unconfirmed = b""
            if self._pending and not self._send_user_data:
                self._send_queued()

    def _send(self, data: bytes) -> None:
        self._sending = data
        self._send_remaining = len(data)
        self._submit_send(data, 0)

    def _submit_send(self, data: bytes, offset: int) -> None:
        """Hand the engine an ordinary send of ``data[offset:]``: zero-copy when it pays."""
        user_data = self._new_user_data()
        if len(data) - offset >= self._zero_copy_from and self._zero_copy_pays():
            self._ring.prepare_send_zero_copy(user_data, self._fd, data, offset=offset)
            self._handlers[user_data] = self._on_sent_zero_copy
        else:
            self._ring.prepare_send(user_data, self._fd, data, offset=offset)
            self._handlers[user_data] = self._sent_handler
        self._send_user_data = user_data

    def _zero_copy_pays(self) -> bool:
        """Asked at the first send big enough: not to a peer on this host, where the
        kernel copies anyway (at delivery). Decided once per transport."""
        try:
            peer = self._sock.getpeername()
            local = self._sock.family not in (socket.AF_INET, socket.AF_INET6) or (
                ipaddress.ip_address(peer[0]).is_loopback
            )
        except (OSError, ValueError):
            local = True
        if local:
            self._zero_copy_from = NEVER
        return not local

    def _on_sent_zero_copy(self, result: int, flags: int) -> None:
        """A zero-copy send's completions: its result, then (``F_NOTIF``) the pages' release."""
        if not flags & _NOTIF:
            self._on_sent(result, flags)

    def _send_pending(self) -> None:
        pending = self._pending
        if len(pending) == 1 or self._pending_size <= JOIN_LIMIT:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._pending_size = 0
            self._send(data)
            return
        chunks = pending[:IOV_LIMIT]
        del pending[:IOV_LIMIT]
        size = sum(map(len, chunks))
        self._pending_size -= size
        user_data = self._new_user_data()
        self._ring.prepare_sendmsg(user_data, self._fd, chunks)
        self._handlers[user_data] = self._sent_handler
        self._send_user_data = user_data
        self._sending = chunks
        self._send_remaining = size

    def _send_rest(self) -> None:
        sending = self._sending
        if isinstance(sending, list):
            self._send(b"".join(sending)[-self._send_remaining :])
            return
        self._submit_send(sending, len(sending) - self._send_remaining)

    def _on_sent(self, result: int, flags: int) -> None:
        self._send_user_data = 0
        if result == self._send_remaining and not (self._pending or self._write_abandoned):
            # The common case: everything handed over went out and nothing waits.
            self._sending = b""
            self._send_remaining = 0
            if self._protocol_paused or self._drain_waiters or self._closing or self._eof_written:
                self._all_sent()
            return
        self._send_progressed(result)

    def _send_progressed(self, result: int) -> None:
        """A send completed short, failed, was abandoned, or more writes wait behind it."""
        if self._write_abandoned:
            self._sending = b""
            self._release()
            return
        if result < 0:
            if result in (-errno.EAGAIN, -errno.EINTR):
                self._send_rest()
                return
            self._sending = b""
            self._send_remaining = 0
            self._fatal_error(result_error(result), "Fatal write error on socket transport")
            return
        self._send_remaining -= result
        if self._send_remaining > 0:
            self._send_rest()
        else:
            self._sending = b""
            self._send_remaining = 0
            if self._pending:
                self._send_pending()
        self._all_sent()

    def _all_sent(self) -> None:
        """A send completed: resume the protocol, and if nothing is left to send, finish up."""
        if self._protocol_paused:
            self._maybe_resume_protocol()  # the protocol may write more right here
        if self._send_user_data or self._pending:
            return
        if self._unconfirmed_outstanding():
            self._await_confirmation()
            return
        self._wake_drain_waiters()
        if self._closing:
            self._conn_lost += 1
            self._call_connection_lost(None)
        elif self._eof_written:
            self._shutdown_write()

    # what writing means on completions (see SocketTransportBase) -------------------

    def _writes_in_progress(self) -> bool:
        """A send is outstanding or writes are queued; `_all_sent` will follow when they are done."""
        if self._send_user_data or self._pending:
            return True
        if self._unconfirmed_outstanding():
            self._await_confirmation()
            return True
        return False

    def _abandon_writes(self) -> None:
        if self._send_user_data:
            self._write_abandoned = True
            if self._send_user_data != SENDING_FILE:  # _send_file sees it and stops
                self._loop._cancel_operation(self._send_user_data)
        self._pending.clear()
        self._pending_size = self._send_remaining = 0
        self._unconfirmed = b""  # it cannot be called back; its completion will be ignored
        self._wake_drain_waiters()

    def get_write_buffer_size(self) -> int:
        size = self._send_remaining + self._pending_size
        if self._unconfirmed_at >= self._loop._confirmed_through:
            size += len(self._unconfirmed)
        return size

    # sending a file (loop.sendfile) ---------------------------------------------------

    async def _send_file(self, file: IO[bytes], offset: int, count: int | None) -> int:
        """Send part of a regular file with sendfile(2): from the page cache, no copy here.

        Called with nothing else being sent (the loop waits for that). Each
        ``sendfile`` takes what the socket's buffer has room for; when it has
        none, the transport waits for writability with a poll on the engine.
        Writes meanwhile raise RuntimeError, as asyncio's do; ``close()`` waits
        for the file, ``abort()`` ends it with ConnectionError. Raises
        `asyncio.SendfileNotAvailableError` before sending anything when the
        file cannot be sent so (not a regular file, or the kernel refuses).
        """
        try:
            file_fd = file.fileno()
            size = os.fstat(file_fd).st_size
        except (AttributeError, io.UnsupportedOperation, OSError) as exc:
            raise asyncio.SendfileNotAvailableError("not a regular file") from exc
        end = offset + count if count else size
        position = offset
        self._send_user_data = SENDING_FILE
        try:
            while position < end:
                if self._write_abandoned:
                    raise ConnectionError("the transport was aborted while a file was being sent")
                try:
                    sent = os.sendfile(
                        self._fd, file_fd, position, min(end - position, SENDFILE_MAX_CHUNK)
                    )
                except (BlockingIOError, InterruptedError):
                    await self._until_writable()
                    continue
                except OSError as exc:
                    if position == offset and exc.errno in (errno.EINVAL, errno.ENOSYS):
                        raise asyncio.SendfileNotAvailableError("sendfile(2) refused") from exc
                    self._fatal_error(exc, "Fatal write error on socket transport")
                    raise
                if not sent:
                    break  # the file ended early
                position += sent
        finally:
            self._send_user_data = 0
            if position > offset:
                file.seek(position)
            if self._write_abandoned:
                self._release()
            else:
                self._all_sent()
        return position - offset

    async def _until_writable(self) -> None:
        """Wait for room in the socket's buffer (or for ``abort()``, which wakes drain waiters)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        poller = self._loop._poller
        fd = self._fd

        def writable() -> None:
            if not waiter.done():
                waiter.set_result(None)

        poller.set_writer(fd, writable)
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            poller.clear_writer(fd, writable)
