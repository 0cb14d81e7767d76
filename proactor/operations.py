"""The operations a Ring can queue, what their completions mean, and which kernel has them.

Each ``prepare_*`` method writes one SQE through ``Ring._queue`` (the only
place an SQE is written) and takes the ``user_data`` its completions will
carry. Nothing reaches the kernel before ``Ring.submit``. What the CQE's
``res`` means, per operation:

``ACCEPT``
    the new connection's fd (non-blocking and close-on-exec by default), or
    ``-errno``. Multishot (5.19) keeps accepting until an error ends it; every
    CQE but the last has ``IORING_CQE_F_MORE``. The peer address is not
    captured: ``getpeername`` it when needed.
``RECV`` into a buffer of the caller's
    bytes received, ``0`` at end of stream, or ``-errno``.
``RECV`` from a provided-buffer group
    the same, plus ``IORING_CQE_F_BUFFER`` and the buffer id in the top 16 bits
    of ``flags`` whenever a buffer was used. Multishot (6.0) ends with
    ``-ENOBUFS`` when the group is empty (recycle, then arm a new one), with
    ``0`` at end of stream, or with an error. A multishot recv that reports
    ``IORING_CQE_F_MORE`` is still armed; one without it is over.
``SEND`` / ``SENDMSG``
    bytes sent, possibly fewer than asked on a stream socket whose send buffer
    filled: the caller sends the rest next. Keep one send in flight per socket
    so the bytes stay in order; ``MSG_WAITALL`` makes the kernel finish the
    whole buffer before it completes.
``CONNECT`` ``CLOSE`` ``SHUTDOWN``
    ``0`` or ``-errno``.
``TIMEOUT``
    ``-ETIME`` when the time passed, ``0`` when ``count`` other completions came
    first, ``-ECANCELED`` when cancelled.
``ASYNC_CANCEL``
    its own CQE says ``0`` (found and cancelled), ``-ENOENT`` (nothing in flight
    under that key: it completed already, its CQE is in the ring or on the
    way), ``-EALREADY`` (it is running and may still complete normally), or with
    ``CANCEL_ALL`` the number cancelled. The target posts its own CQE as well,
    in either order, usually ``-ECANCELED`` (``-EINTR`` for some), and a target
    that won the race posts its normal result: the caller must deliver that data
    once. The target's memory stays pinned until the target's CQE.
``POLL_ADD``
    the ready mask (``select.POLL*``). One-shot polls see the readiness at the
    moment they are armed: re-armed after each callback they behave like
    level-triggered ``add_reader``. Multishot polls (5.13) report each wakeup.
``READ``
    bytes read; used on an eventfd to wake the loop (see `Wakeup`).
``MSG_RING``
    ``0`` here, and a CQE ``(target_user_data, result, 0)`` on the other ring.

Test ``flags`` bit by bit: the kernel adds bits such as
``IORING_CQE_F_SOCK_NONEMPTY`` (set even on an end-of-stream recv here). A
``-EAGAIN`` result means the kernel would not wait on that file (a non-blocking
file it cannot poll): arm the operation again later. Sockets do not produce it
on kernels with ``IORING_FEAT_FAST_POLL`` (5.7).

Falling back
------------
`Capabilities` says what the kernel has, from the opcode probe and the feature
bits (``abi`` lists the markers). A missing flag degrades per operation: no
multishot accept means re-arming a single accept per connection, no multishot
recv or buffer rings means single-shot recv into the caller's buffer, no cancel
by fd means cancelling each operation by ``user_data``, no multishot poll means
one-shot polls. A method whose kernel support is missing raises ``OSError``
with ``ENOTSUP`` and says which fallback to take.

Waking the loop
---------------
`Wakeup` is an eventfd with a READ armed on the ring. Another thread's
``wake()`` is one ``write(2)``; the READ completes and ``io_uring_enter`` returns,
because the waiting loop has released the GIL (ctypes foreign calls do). The
eventfd is blocking on purpose: io_uring waits on it either way, and a blocking
one can never complete a READ with ``-EAGAIN``. A signal delivered to the loop's thread ends the wait with
``EINTR``; signals the C runtime hands to other threads need the loop's
``signal.set_wakeup_fd`` socket, with a recv armed on it, to reach it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from . import abi
from .buffers import _BYTES_DATA_OFFSET as _BYTES_AT
from .buffers import Pinned, pin, pin_span

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .buffers import IncomingBuffer, OutgoingBuffer

_MASK32 = 0xFFFFFFFF
_BIG_ENDIAN = sys.byteorder == "big"
# An SQE whose fields after user_data are all zero: the same layout, the rest as padding.
_pack_send_sqe = abi.SQE_TO_USER_DATA.pack_into
# An SQE as its fixed head (opcode .. off), the address and length, and its fixed tail.
_SQE_HEAD_END, _SQE_TAIL_START = 16, 28
_pack_sqe_around_span = struct.Struct(
    f"={_SQE_HEAD_END}sQI{abi.SQE_SIZE - _SQE_TAIL_START}s"
).pack_into
_UNCONFIRMED_SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT | socket.MSG_WAITALL

# --- capabilities ------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What this kernel's io_uring offers, from the opcode probe and the feature bits."""

    opcodes: frozenset[int]
    features: int
    setup_flags: int
    sq_entries: int
    cq_entries: int

    def supports(self, opcode: int) -> bool:
        return opcode in self.opcodes

    # Derived once per ring: the prepare_* methods consult them on every call.
    @cached_property
    def multishot_accept(self) -> bool:
        return abi.OP_SOCKET in self.opcodes

    @cached_property
    def buffer_rings(self) -> bool:
        return abi.OP_SOCKET in self.opcodes

    @cached_property
    def cancel_by_fd(self) -> bool:
        return abi.OP_SOCKET in self.opcodes

    @cached_property
    def multishot_recv(self) -> bool:
        return abi.OP_SEND_ZC in self.opcodes

    @cached_property
    def multishot_poll(self) -> bool:
        return bool(self.features & abi.FEAT_RSRC_TAGS)

    @cached_property
    def wait_deadline_argument(self) -> bool:
        return bool(self.features & abi.FEAT_EXT_ARG)

    @cached_property
    def msg_ring(self) -> bool:
        return abi.OP_MSG_RING in self.opcodes

    @cached_property
    def deferred_task_run(self) -> bool:
        return bool(self.setup_flags & abi.SETUP_DEFER_TASKRUN)

    @cached_property
    def unconfirmed_send(self) -> bool:
        """`prepare_send_unconfirmed`: CQE_SKIP_SUCCESS (5.17), and a send that fails after
        sending part of its bytes reports that part (6.1, whose marker is SENDMSG_ZC)."""
        return bool(self.features & abi.FEAT_CQE_SKIP) and abi.OP_SENDMSG_ZC in self.opcodes

    @cached_property
    def zero_copy_send(self) -> bool:
        return abi.OP_SEND_ZC in self.opcodes

    @cached_property
    def receive_bundles(self) -> bool:
        return bool(self.features & abi.FEAT_RECVSEND_BUNDLE)

    @cached_property
    def splice(self) -> bool:
        return abi.OP_SPLICE in self.opcodes

    def describe(self) -> str:
        """A paragraph for logs and reports."""
        names = [abi.opcode_name(op) for op in sorted(self.opcodes)]
        features = sorted(name for bit, name in abi.FEATURE_NAMES.items() if self.features & bit)
        derived = [
            name
            for name in (
                "multishot_accept",
                "multishot_recv",
                "buffer_rings",
                "cancel_by_fd",
                "multishot_poll",
                "wait_deadline_argument",
                "msg_ring",
                "deferred_task_run",
                "unconfirmed_send",
                "zero_copy_send",
                "receive_bundles",
                "splice",
            )
            if getattr(self, name)
        ]
        return (
            f"io_uring with {self.sq_entries} SQ / {self.cq_entries} CQ entries; "
            f"{len(self.opcodes)} opcodes: {', '.join(names)}; "
            f"features: {', '.join(features)}; engine uses: {', '.join(derived)}"
        )


class Operations:
    """The ``prepare_*`` half of `Ring`: one method per operation, one SQE each."""

    if not TYPE_CHECKING:  # Ring lists the attributes (hidden from mypy, as in TransportBase)
        __slots__ = ()
    capabilities: Capabilities
    # What prepare_send_unconfirmed writes its SQE with, itself (see Ring).
    _sqes: memoryview
    _sqe_position: int
    _sqes_size: int
    _sq_unpublished: int
    _sq_space: int
    _unconfirmed_pins: list[bytes]

    def _make_room(self) -> None:
        raise NotImplementedError  # Ring's: submit early when the SQ is full

    def _queue(
        self,
        user_data: int,
        opcode: int,
        fd: int,
        address: int,
        length: int,
        op_flags: int,
        keep: object,
        offset: int = 0,
        ioprio: int = 0,
        sqe_flags: int = 0,
        buffer_group: int = 0,
    ) -> None:
        raise NotImplementedError  # Ring writes the SQE

    def prepare_nop(self, user_data: int) -> None:
        self._queue(user_data, abi.OP_NOP, -1, 0, 0, 0, None)

    def prepare_accept(
        self,
        user_data: int,
        fd: int,
        *,
        multishot: bool = False,
        flags: int = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
    ) -> None:
        """Accept on listening socket ``fd``; each CQE's ``res`` is a new connected fd.

        With ``multishot`` (5.19) one SQE keeps accepting; it posts CQEs with
        ``IORING_CQE_F_MORE`` until an error (or a cancel) ends it.
        """
        ioprio = 0
        if multishot:
            if not self.capabilities.multishot_accept:
                raise _unsupported("multishot accept needs kernel 5.19; arm one accept at a time")
            ioprio = abi.ACCEPT_MULTISHOT
        self._queue(user_data, abi.OP_ACCEPT, fd, 0, 0, flags, None, ioprio=ioprio)

    def prepare_connect(self, user_data: int, fd: int, family: int, address: Any) -> None:
        """Connect ``fd`` to a numeric ``address``; ``res`` is 0 or minus the errno."""
        raw = abi.sockaddr(family, address)
        raw_address, keep = pin(raw)
        self._queue(user_data, abi.OP_CONNECT, fd, raw_address, 0, 0, keep, offset=len(raw))

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
        """Receive into ``buffer[offset:offset + length]``, a buffer the caller owns again at the CQE.

        ``buffer`` is writable: a ``bytearray``, a view of one, an ``mmap``, or a
        `Pinned` wrapper of one (no allocation per call).
        """
        address, length, keep = pin_span(buffer, offset, length, writable=True)
        self._queue(user_data, abi.OP_RECV, fd, address, length, flags, keep)

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
        """Receive into a buffer the kernel picks from group ``group_id`` (see `ProvidedBuffers`).

        Multishot (6.0) keeps posting CQEs with ``IORING_CQE_F_MORE``; it ends
        with ``-ENOBUFS`` when the group runs dry, ``0`` at end of stream, or an
        error. Each CQE with ``IORING_CQE_F_BUFFER`` names a buffer to recycle.
        With ``bundle`` (6.10) one CQE may fill several buffers: the one it
        names and those after it in ring order, all full but the last; ``res``
        counts the bytes of all of them, at most ``length`` (0: no limit but
        what the socket holds and the group has).
        """
        ioprio = 0
        if multishot:
            if not self.capabilities.multishot_recv:
                raise _unsupported("multishot recv needs kernel 6.0; arm one recv at a time")
            ioprio = abi.RECV_MULTISHOT
        if bundle:
            if not self.capabilities.receive_bundles:
                raise _unsupported("recv bundles need kernel 6.10; receive a buffer per CQE")
            ioprio |= abi.RECVSEND_BUNDLE
        self._queue(
            user_data,
            abi.OP_RECV,
            fd,
            0,
            length,
            flags,
            None,
            ioprio=ioprio,
            sqe_flags=abi.IOSQE_BUFFER_SELECT,
            buffer_group=group_id,
        )

    def prepare_read(
        self,
        user_data: int,
        fd: int,
        buffer: IncomingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        file_offset: int = 0,
    ) -> None:
        """``read(2)`` into ``buffer[offset:offset + length]`` (for an eventfd, a pipe, a file)."""
        address, length, keep = pin_span(buffer, offset, length, writable=True)
        self._queue(user_data, abi.OP_READ, fd, address, length, 0, keep, offset=file_offset)

    def prepare_send(
        self,
        user_data: int,
        fd: int,
        buffer: OutgoingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = socket.MSG_NOSIGNAL,
    ) -> None:
        """Send ``buffer[offset:offset + length]``; ``res`` may be short of it.

        On a stream socket a short ``res`` means the rest was not sent: send it
        next (``offset=offset + res``) with no other send in flight on the
        socket, or order is lost. ``flags=MSG_WAITALL | MSG_NOSIGNAL`` makes
        the kernel finish the whole buffer before it posts the CQE.
        """
        if type(buffer) is bytes and not offset and length is None and _BYTES_AT is not None:
            # The common case, a whole bytes object: its address is known without a call.
            self._queue(
                user_data, abi.OP_SEND, fd, id(buffer) + _BYTES_AT, len(buffer), flags, buffer
            )
            return
        address, length, keep = pin_span(buffer, offset, length)
        self._queue(user_data, abi.OP_SEND, fd, address, length, flags, keep)

    def prepare_send_zero_copy(
        self,
        user_data: int,
        fd: int,
        buffer: OutgoingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = socket.MSG_NOSIGNAL,
    ) -> None:
        """`prepare_send` without the copy into the socket (``SEND_ZC``, 6.0).

        The kernel sends from ``buffer``'s own pages, so it needs them until the
        data has left: the first CQE carries the count sent and, when a
        notification follows, ``IORING_CQE_F_MORE``; the notification is a
        second CQE with ``IORING_CQE_F_NOTIF``, posted when the pages are free.
        The ring holds ``buffer`` until then. (To a peer on this host the kernel
        copies after all, at delivery.)
        """
        if not self.capabilities.zero_copy_send:
            raise _unsupported("zero-copy send needs kernel 6.0; send with prepare_send")
        address, length, keep = pin_span(buffer, offset, length)
        self._queue(user_data, abi.OP_SEND_ZC, fd, address, length, flags, keep)

    def prepare_send_unconfirmed(self, user_data: int, fd: int, data: bytes) -> None:
        """Send all of ``data`` now or report why not; success posts no completion.

        The SQE carries ``IOSQE_CQE_SKIP_SUCCESS`` and ``MSG_DONTWAIT |
        MSG_WAITALL``. ``MSG_DONTWAIT`` makes the kernel try the send exactly
        once, inline, in the ``io_uring_enter`` that consumes the SQE (a socket
        without room fails it with ``-EAGAIN`` instead of parking it on a poll);
        ``MSG_WAITALL`` makes a send that took only part of ``data`` a failure,
        whose completion reports how many bytes it did send (the kernel keeps
        that count since 6.1). So when that enter returns the kernel is done
        with ``data``, whatever happened, and a completion exists exactly when
        something is left to send: the ring lets go of ``data`` then, and a
        completion for ``user_data`` is ``-EAGAIN`` (nothing sent), the count
        sent, or ``-errno``. Several of these may share a ``user_data``, one
        per enter. `proactor.sending` builds on this; needs
        ``capabilities.unconfirmed_send``.
        """
        if type(data) is not bytes or _BYTES_AT is None:
            raise TypeError("an unconfirmed send takes bytes")
        if not self._sq_space:
            self._make_room()
        position = self._sqe_position
        _pack_send_sqe(
            self._sqes,
            position,
            abi.OP_SEND,
            abi.IOSQE_CQE_SKIP_SUCCESS,
            0,
            fd,
            0,
            id(data) + _BYTES_AT,
            len(data),
            _UNCONFIRMED_SEND_FLAGS,
            user_data,
        )
        position += 64  # abi.SQE_SIZE
        self._sqe_position = 0 if position == self._sqes_size else position
        self._sq_unpublished += 1
        self._sq_space -= 1
        self._unconfirmed_pins.append(data)

    def unconfirmed_sender(self, user_data: int, fd: int) -> Callable[[bytes], None]:
        """`prepare_send_unconfirmed` for one ``user_data`` and ``fd``: a function of the data.

        A transport makes an unconfirmed send per response, always with the
        same ``user_data`` and fd. Their SQE's other fields are packed here,
        once; each call writes the data's address and length between them.
        """
        if _BYTES_AT is None:
            raise TypeError("unconfirmed sends need the address of a bytes object's data")
        fixed = bytearray(abi.SQE_SIZE)
        _pack_send_sqe(
            fixed,
            0,
            abi.OP_SEND,
            abi.IOSQE_CQE_SKIP_SUCCESS,
            0,
            fd,
            0,
            0,
            0,
            _UNCONFIRMED_SEND_FLAGS,
            user_data,
        )
        head, tail = bytes(fixed[:_SQE_HEAD_END]), bytes(fixed[_SQE_TAIL_START:])
        data_at = _BYTES_AT
        ring = self
        sqes = self._sqes  # mapped for the ring's life (released when it closes)
        last_position = self._sqes_size - abi.SQE_SIZE

        def send_unconfirmed(data: bytes) -> None:
            if type(data) is not bytes:
                raise TypeError("an unconfirmed send takes bytes")
            if not ring._sq_space:
                ring._make_room()
            position = ring._sqe_position
            _pack_sqe_around_span(sqes, position, head, id(data) + data_at, len(data), tail)
            ring._sqe_position = 0 if position == last_position else position + 64
            ring._sq_unpublished += 1
            ring._sq_space -= 1
            ring._unconfirmed_pins.append(data)

        return send_unconfirmed

    def prepare_sendmsg(
        self,
        user_data: int,
        fd: int,
        buffers: Iterable[ReadableBuffer],
        *,
        address: bytes | None = None,
        flags: int = socket.MSG_NOSIGNAL,
    ) -> None:
        """Send several buffers in one ``sendmsg`` (and to ``address``, a raw sockaddr, if given).

        ``res`` counts bytes over all buffers and may be short, as with `prepare_send`.
        """
        # Every buffer has a length; typeshed's Buffer does not say so.
        pins = [pin(buffer) + (len(buffer),) for buffer in buffers]  # type: ignore[arg-type]
        name = address or b""
        header_size = abi.MSGHDR.size + abi.IOVEC.size * len(pins)
        message = bytearray(header_size + len(name))
        message_address, message_pin = pin(message)
        for index, (buffer_address, _, size) in enumerate(pins):
            abi.IOVEC.pack_into(
                message, abi.MSGHDR.size + index * abi.IOVEC.size, buffer_address, size
            )
        message[header_size:] = name
        abi.MSGHDR.pack_into(
            message,
            0,
            message_address + header_size if name else 0,
            len(name),
            message_address + abi.MSGHDR.size,
            len(pins),
            0,
            0,
            0,
        )
        keep = (message_pin, [keep for _, keep, _ in pins])
        self._queue(user_data, abi.OP_SENDMSG, fd, message_address, 1, flags, keep)

    def prepare_close(self, user_data: int, fd: int) -> None:
        """``close(fd)`` in the kernel. Like close(2) it cancels nothing in flight on ``fd``."""
        self._queue(user_data, abi.OP_CLOSE, fd, 0, 0, 0, None)

    def prepare_shutdown(self, user_data: int, fd: int, how: int = socket.SHUT_RDWR) -> None:
        """``shutdown(fd, how)``: receives in flight on ``fd`` then complete with 0."""
        self._queue(user_data, abi.OP_SHUTDOWN, fd, 0, how, 0, None)

    def prepare_timeout(
        self, user_data: int, seconds: float, *, count: int = 0, absolute: bool = False
    ) -> None:
        """Complete after ``seconds`` (``res == -ETIME``), or after ``count`` other CQEs (``res == 0``).

        ``absolute`` reads ``seconds`` as a CLOCK_MONOTONIC time (``time.monotonic()``).
        """
        timespec = bytearray(abi.TIMESPEC.size)
        abi.TIMESPEC.pack_into(timespec, 0, *split_seconds(seconds))
        address, keep = pin(timespec)
        flags = abi.TIMEOUT_ABS if absolute else 0
        self._queue(user_data, abi.OP_TIMEOUT, -1, address, 1, flags, keep, offset=count)

    def prepare_cancel(self, user_data: int, target_user_data: int, *, every: bool = False) -> None:
        """Cancel the operation queued as ``target_user_data`` (``every``: all that share it).

        Two CQEs follow, in either order (see "Who owns a buffer" in ``ring.py``).
        """
        flags = abi.ASYNC_CANCEL_ALL if every else 0
        self._queue(user_data, abi.OP_ASYNC_CANCEL, -1, target_user_data, 0, flags, None)

    def prepare_cancel_fd(self, user_data: int, fd: int) -> None:
        """Cancel every operation in flight on ``fd`` (5.19); this CQE's ``res`` counts them."""
        if not self.capabilities.cancel_by_fd:
            raise _unsupported("cancelling by fd needs kernel 5.19; cancel each by its user_data")
        flags = abi.ASYNC_CANCEL_FD | abi.ASYNC_CANCEL_ALL
        self._queue(user_data, abi.OP_ASYNC_CANCEL, fd, 0, 0, flags, None)

    def _prepare_cancel_everything(self, user_data: int) -> None:
        flags = abi.ASYNC_CANCEL_ANY | abi.ASYNC_CANCEL_ALL
        self._queue(user_data, abi.OP_ASYNC_CANCEL, -1, 0, 0, flags, None)

    def prepare_poll_add(
        self, user_data: int, fd: int, events: int = select.POLLIN, *, multishot: bool = False
    ) -> None:
        """Wait until ``fd`` reports one of ``events`` (``select.POLL*``); ``res`` is the mask.

        A one-shot poll checks readiness when it is armed, so re-arming it
        after each CQE gives level-triggered ``add_reader`` semantics. A
        multishot poll (5.13) posts a CQE per wakeup: edge-triggered.
        """
        if _BIG_ENDIAN:
            events = ((events << 16) | (events >> 16)) & _MASK32  # poll32_events is word-swapped
        length = 0
        if multishot:
            if not self.capabilities.multishot_poll:
                raise _unsupported("multishot poll needs kernel 5.13; re-arm a one-shot poll")
            length = abi.POLL_ADD_MULTI
        self._queue(user_data, abi.OP_POLL_ADD, fd, 0, length, events, None)

    def prepare_msg_ring(
        self, user_data: int, ring_fd: int, result: int, target_user_data: int
    ) -> None:
        """Post the CQE ``(target_user_data, result, 0)`` on another ring (5.18): a cross-loop wakeup."""
        if not self.capabilities.msg_ring:
            raise _unsupported(
                "MSG_RING needs kernel 5.18; wake the other loop through its eventfd"
            )
        self._queue(
            user_data,
            abi.OP_MSG_RING,
            ring_fd,
            abi.MSG_RING_DATA,
            result,
            0,
            None,
            offset=target_user_data,
        )


def _unsupported(sentence: str) -> OSError:
    return OSError(errno.ENOTSUP, sentence)


def split_seconds(seconds: float) -> tuple[int, int]:
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


class Wakeup:
    """An eventfd another thread writes to end the loop's wait; re-arm after each completion."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._counter = Pinned(bytearray(8))  # the eventfd's count lands here; never read

    def fileno(self) -> int:
        return self._fd

    def arm(self, ring: Operations, user_data: int) -> None:
        """Queue the READ whose completion is the wakeup (one in flight at a time)."""
        ring.prepare_read(user_data, self._fd, self._counter)

    def wake(self) -> None:
        """Wake the loop; safe from any thread and from a signal handler.

        Wakes before the READ completes add up in the eventfd: one completion.
        """
        os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        """Close the eventfd; cancel its READ and read that CQE first."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
