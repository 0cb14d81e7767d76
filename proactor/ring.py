"""The io_uring ring: three shared mappings, one system call per loop iteration.

The ring
--------
``io_uring_setup`` returns a file descriptor and fills ``io_uring_params`` with
the offsets of everything inside three mappings of that descriptor (one for the
two rings when the kernel reports ``IORING_FEAT_SINGLE_MMAP``, 5.4+):

``SQ ring`` (mmap offset 0)
    ``head``      u32, written by the kernel as it consumes submissions
    ``tail``      u32, written by us to publish submissions
    ``ring_mask`` ``ring_entries`` u32, constant
    ``flags``     u32, kernel-set: ``CQ_OVERFLOW`` (completions wait in the
                  kernel's overflow list), ``TASKRUN`` (deferred work pending)
    ``dropped``   u32, submissions the kernel rejected as invalid indices
    ``array``     u32[entries], SQE index per slot. We fill it once with
                  ``array[i] = i`` and always use slot ``tail & mask``, so it is
                  never written again.
``CQ ring`` (mmap offset 0x8000000)
    ``head``      u32, written by us when we have read completions
    ``tail``      u32, written by the kernel when it posts completions
    ``ring_mask`` ``ring_entries`` u32, constant
    ``overflow``  u32, completions lost for good (only without ``FEAT_NODROP``)
    ``cqes``      16-byte entries ``{u64 user_data, s32 res, u32 flags}``
``SQE array`` (mmap offset 0x10000000)
    64-byte submission entries, written by us only.

Head and tail are free-running u32 counters; a slot is ``counter & mask``. The
rings are empty when head == tail. Both counters are read and written through a
``memoryview`` cast to ``'I'``: one aligned 32-bit load or store each.

One system call per iteration
-----------------------------
``prepare_*`` only writes an SQE into the next free slot: no system call, no
foreign call, one ``struct.pack_into``. ``submit`` publishes the tail and makes
the one ``io_uring_enter`` that both hands the kernel everything queued and
waits for completions (``IORING_ENTER_GETEVENTS``, with the deadline passed as
``IORING_ENTER_EXT_ARG`` or, before 5.11, as an internal TIMEOUT SQE).
``completions`` then reads the CQ ring and advances its head once: one
``iter_unpack`` over the entries, then one short loop letting go of the pins
of the operations that ended. The loop makes both in one call,
``submit_and_reap``. Only when
more operations are queued in one iteration than the SQ has slots does a
``prepare_*`` submit early to make room. ``submit`` skips the system call
entirely when there is nothing to submit, nothing to wait for and the kernel
has flagged no pending work. How the system calls are made, how a ring is set
up and what is registered with it (the ring's own fd, among others) is
`proactor.kernel`'s.

Memory ordering
---------------
The kernel reads head and tail with acquire and writes them with release
semantics; Python has no such loads or stores. What this module relies on:

* Submissions: there is no ``SQPOLL`` thread, so the kernel reads the SQ ring
  only inside ``io_uring_enter`` called by this very thread. Program order
  makes every SQE store visible to it, on any machine.
* Completions under ``DEFER_TASKRUN``: the kernel posts CQEs while running
  this thread's task work inside ``io_uring_enter``, so by the time the call
  returns they are ordinary earlier stores of the same thread. The same holds
  for the provided-buffer rings the kernel reads. Only the SQ ``flags`` word
  is set from other CPUs; reading it late delays a non-blocking ``submit``'s
  system call to the next iteration, nothing worse.
* Otherwise (kernel older than 6.1) CQEs may be posted from another CPU while
  we read. On x86-64 (TSO) loads are not reordered with older loads and stores
  not with older stores, so loading the tail and then the entries, and storing
  entries and then a tail, is enough. On weakly ordered machines (aarch64,
  POWER, RISC-V) it is not, and the ring refuses to start there without
  ``DEFER_TASKRUN``.

Who owns a buffer
-----------------
Every operation is identified by its ``user_data``, unique among operations in
flight (values from ``2**63`` up are the ring's own). The ring keeps the objects an operation points at
(the buffer, the sockaddr, the timespec, the msghdr) in ``_in_flight`` from
``prepare_*`` until the operation's *last* CQE: the first CQE without
``IORING_CQE_F_MORE``. Until then the kernel owns the memory and the caller
must not reuse it; after it, the caller does. In particular:

* Cancelling does not end ownership. ``ASYNC_CANCEL`` posts two CQEs in either
  order: its own (``0``, ``-ENOENT``, ``-EALREADY``, or a count with
  ``CANCEL_ALL``) and the target's (``-ECANCELED``, ``-EINTR``, or a normal
  result if the data won the race). The target's buffer is released only with
  the target's CQE, and data that completes after a cancel must be delivered.
* Closing an fd does not cancel what is in flight on it: a recv stays armed on
  the open file description and later consumes data. Cancel by fd (or shut the
  socket down), wait for the completions, and only then close, so the fd number
  cannot be reused while old operations still point at it.
* An unconfirmed send (``prepare_send_unconfirmed``) is never parked: the
  kernel tries it inline in the enter that consumes its SQE. Its bytes are
  held until that enter returns, not until a completion, since success posts
  none (`proactor.sending` says when such a send counts as sent).
* ``Ring.close`` cancels everything still in flight and waits for it. If the
  kernel has not answered in time, the pinned objects move to a module-level
  list and are never freed, rather than freed under the kernel.

Errors from io_uring_enter
--------------------------
``EINTR`` (a signal arrived while waiting) and ``ETIME`` (the deadline passed)
return normally with the SQEs consumed as the SQ head says. ``EAGAIN`` and
``EBUSY`` mean the kernel cannot take submissions now (no memory, or completions
stuck in overflow): the SQEs stay queued for the next ``submit`` after
``completions`` has drained the CQ. The CQ overflow flag makes ``completions``
enter the kernel to flush the overflow list. Everything else raises.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
import weakref

from . import abi
from .abi import Completion
from .buffers import ProvidedBuffers, pin
from .kernel import (
    _GETEVENTS_ARG_SIZE,
    _NO_ARGUMENT_SIZE,
    _NR_ENTER,
    RingRegistration,
    RingUnavailable,
    _create,
    _enter,
    _get_errno,
    _libc_enter,
)
from .operations import Capabilities, Operations, Wakeup

__all__ = [
    "Capabilities",
    "INTERNAL_USER_DATA",
    "ProvidedBuffers",
    "Ring",
    "RingUnavailable",
    "Wakeup",
]

_MASK32 = 0xFFFFFFFF
_pack_sqe = abi.SQE.pack_into
_pack_timespec = abi.TIMESPEC.pack_into
_iter_unpack_cqes = abi.CQE.iter_unpack
_unpack_cqe = abi.CQE.unpack_from
_F_MORE = abi.CQE_F_MORE
# user_data from here up is reserved for the ring's own operations (deadline timeouts,
# the cancels of close()); their CQEs are never reported.
INTERNAL_USER_DATA = 1 << 63

# Memory the kernel may still write after its ring was closed without answering.
_ABANDONED: list[object] = []
# Rings of this process; a forked child must not submit to its parent's rings.
_LIVE_RINGS: weakref.WeakSet[Ring] = weakref.WeakSet()


def _disown_rings_after_fork() -> None:
    for ring in _LIVE_RINGS:
        ring._enabled = False  # the next submit meets the ownership check in _enable


os.register_at_fork(after_in_child=_disown_rings_after_fork)


class Ring(Operations, RingRegistration):
    """An io_uring instance: queue operations with ``prepare_*``, then `submit` and read `completions`.

    Not thread-safe: one thread prepares, submits and reads completions. Other
    threads wake it through an eventfd (see `Wakeup`).
    """

    # Slots, not a dict: CPython 3.11 stops specialising attribute access on instances
    # with more than 30 attributes in their dict, and _queue and submit run all the time.
    __slots__ = tuple(
        "_fd sq_entries cq_entries setup_flags features _closed _owner _mappings _views "
        "_enabled _issuer _enter_fd _enter_flags _wait_flags _deadline_flags registered_ring_fd "
        "_in_flight _backlog _buffer_groups _internal_serial _internal "
        "_deadline _deadline_pin _getevents_arg _getevents_arg_pointer _getevents_arg_pin "
        "_sq_words _cq_words _sqes _sq_head_index _sq_tail_index _sq_flags_index "
        "_sq_tail_word _sq_flags_word _cq_head_word _cq_tail_word "
        "_cq_head_index _cq_tail_index _cq_overflow_index _cqes _cqes_size "
        "_sqe_position _sqes_size _sq_tail _sq_unpublished _sq_pending _sq_space "
        "_cq_head _cq_position _unconfirmed_pins settled capabilities _ext_arg __weakref__".split()
    )

    def __init__(
        self, entries: int = 1024, *, cq_entries: int | None = None, single_issuer: bool = True
    ) -> None:
        fd, fields = _create(entries, cq_entries or entries * 4, single_issuer)
        self._fd = fd
        self.sq_entries, self.cq_entries, self.setup_flags = fields[0], fields[1], fields[2]
        self.features = fields[5]
        self._closed = False
        self._owner = os.getpid()
        _LIVE_RINGS.add(self)
        self._mappings: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._enabled = False  # the first submit enables it (see _enable)
        self._issuer = 0  # the thread that did, by threading.get_ident()
        self._enter_fd = fd  # or the slot of the registered ring fd, once _enable made one
        self.registered_ring_fd = False
        self._set_enter_flags(0)
        self._in_flight: dict[int, object] = {}
        self._backlog: list[Completion] = []
        self._buffer_groups: dict[int, ProvidedBuffers] = {}
        # The bytes of unconfirmed sends (prepare_send_unconfirmed) until the enter that
        # consumed their SQEs has returned; see that method.
        self._unconfirmed_pins: list[bytes] = []
        # Every SQE handed over was consumed and no CQE waits in the kernel's overflow
        # list, so every completion of the unconfirmed sends submitted so far was reaped.
        # Set false where either may have happened; re-derived (_settle) only then.
        self.settled = True
        self._internal_serial = 0
        self._internal: set[int] = set()  # in-flight user_data of the ring's own operations
        # The wait deadline: one timespec and one io_uring_getevents_arg, reused.
        self._deadline = bytearray(abi.TIMESPEC.size)
        deadline_address, self._deadline_pin = pin(self._deadline)
        self._getevents_arg = bytearray(abi.GETEVENTS_ARG.size)
        abi.GETEVENTS_ARG.pack_into(self._getevents_arg, 0, 0, 8, 0, deadline_address)
        getevents_arg_address, self._getevents_arg_pin = pin(self._getevents_arg)
        self._getevents_arg_pointer = ctypes.c_void_p(getevents_arg_address)
        try:
            sq_offsets = fields[abi.SQ_OFFSETS_AT : abi.SQ_OFFSETS_AT + len(abi.SQ_OFFSET_FIELDS)]
            cq_offsets = fields[abi.CQ_OFFSETS_AT : abi.CQ_OFFSETS_AT + len(abi.CQ_OFFSET_FIELDS)]
            self._map_rings(
                dict(zip(abi.SQ_OFFSET_FIELDS, sq_offsets, strict=True)),
                dict(zip(abi.CQ_OFFSET_FIELDS, cq_offsets, strict=True)),
            )
            opcodes = self.probe()
        except BaseException:
            self._release()
            raise
        self.capabilities = Capabilities(
            opcodes=opcodes,
            features=self.features,
            setup_flags=self.setup_flags,
            sq_entries=self.sq_entries,
            cq_entries=self.cq_entries,
        )
        self._ext_arg = self.capabilities.wait_deadline_argument

    def fileno(self) -> int:
        return self._fd

    # --- the one place an SQE is written ---------------------------------------------

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
        in_flight = self._in_flight
        if user_data in in_flight:
            raise ValueError(
                f"user_data {user_data} is in flight already; every operation needs its own"
            )
        if not self._sq_space:
            self._make_room()
        position = self._sqe_position
        _pack_sqe(
            self._sqes,
            position,
            opcode,
            sqe_flags,
            ioprio,
            fd,
            offset,
            address,
            length,
            op_flags,
            user_data,
            buffer_group,
            0,
            0,
            0,
            0,
        )
        position += 64  # abi.SQE_SIZE
        self._sqe_position = 0 if position == self._sqes_size else position
        self._sq_unpublished += 1
        self._sq_space -= 1
        in_flight[user_data] = keep

    def _make_room(self) -> None:
        """The SQ is full in the middle of an iteration: submit early (the only extra enter)."""
        for _ in range(3):
            self.submit()
            if self._sq_space:
                return
            self._backlog.extend(self._reap())  # the kernel may be waiting for CQ space
        raise OSError(errno.EBUSY, "the kernel takes no more submissions; the SQ stays full")

    # --- submission and completion ---------------------------------------------------

    def _publish(self) -> int:
        """Make the SQEs written since the last call visible to the kernel; how many wait."""
        unpublished = self._sq_unpublished
        if unpublished:
            self._sq_unpublished = 0
            tail = (self._sq_tail + unpublished) & _MASK32
            self._sq_tail = tail
            self._sq_words[self._sq_tail_index] = tail
            self._sq_pending += unpublished
        return self._sq_pending

    def _submitted(self, pending: int, result: int) -> int:
        """Account for an enter that was handed ``pending`` SQEs; how many it consumed."""
        if result == pending:
            if pending:
                self._sq_pending = 0
                self._sq_space = self.sq_entries - self._sq_unpublished
                if self._unconfirmed_pins:
                    self._unconfirmed_pins = []  # their enter has returned: see that method
            return pending
        if result < 0:
            self._enter_failed(-result)
        left = (self._sq_tail - self._sq_words[self._sq_head_index]) & _MASK32
        self._sq_pending = left
        self._sq_space = self.sq_entries - left - self._sq_unpublished
        if not left and self._unconfirmed_pins:
            self._unconfirmed_pins = []
        if left:
            self.settled = False
        return pending - left

    def submit(self, wait_for: int = 0, timeout: float | None = None) -> int:
        """Hand the kernel everything queued and wait for ``wait_for`` completions, in one call.

        ``timeout`` (seconds) bounds the wait; ``None`` waits as long as it takes.
        The wait also ends early when a signal arrives. Returns how many SQEs the
        kernel consumed.
        """
        if not self._enabled:
            self._enable()
        if wait_for and timeout is not None:
            if timeout <= 0:
                wait_for = 0
            elif not self._ext_arg:
                self._queue_wait_deadline(timeout)
                wait_for = 1
        pending = self._publish()
        if wait_for:
            if timeout is not None and self._ext_arg:
                self._set_deadline(timeout)
                result = _enter(
                    self._enter_fd,
                    pending,
                    wait_for,
                    self._deadline_flags,
                    self._getevents_arg_pointer,
                    _GETEVENTS_ARG_SIZE,
                )
            else:
                result = _enter(self._enter_fd, pending, wait_for, self._wait_flags)
        elif pending or self._sq_words[self._sq_flags_index] & (
            abi.SQ_TASKRUN | abi.SQ_CQ_OVERFLOW
        ):
            result = _enter(self._enter_fd, pending, 0, self._enter_flags)
        else:
            return 0
        return self._submitted(pending, result)

    def submit_and_reap(self, timeout: float | None) -> list[Completion]:
        """One loop iteration's I/O: `submit` what is queued, wait, then return `completions`.

        Waits up to ``timeout`` seconds for a completion (``None``: as long as it
        takes; ``0``: not at all). The loop calls this once per iteration, so it
        is `submit` and `completions` written out for their common case, the
        system call included (`proactor.kernel._enter`).
        """
        if not self._enabled:
            self._enable()
        pending = self._sq_pending
        unpublished = self._sq_unpublished
        if unpublished:
            self._sq_unpublished = 0
            self._sq_tail = tail = (self._sq_tail + unpublished) & _MASK32
            self._sq_tail_word[0] = tail
            pending += unpublished
        if timeout is None:
            result = _libc_enter(
                _NR_ENTER, self._enter_fd, pending, 1, self._wait_flags, None, _NO_ARGUMENT_SIZE
            )
        elif timeout > 0.0:
            if not self._ext_arg:  # before 5.11: the deadline is a TIMEOUT SQE
                self._sq_pending = pending
                self.submit(1, timeout)
                return self.completions()
            seconds = int(timeout)
            _pack_timespec(self._deadline, 0, seconds, int((timeout - seconds) * 1e9))
            result = _libc_enter(
                _NR_ENTER,
                self._enter_fd,
                pending,
                1,
                self._deadline_flags,
                self._getevents_arg_pointer,
                _GETEVENTS_ARG_SIZE,
            )
        elif pending or self._sq_flags_word[0]:  # TASKRUN or CQ_OVERFLOW
            result = _libc_enter(
                _NR_ENTER, self._enter_fd, pending, 0, self._enter_flags, None, _NO_ARGUMENT_SIZE
            )
        else:
            result = 0
        if result != pending:
            if result == -1:
                result = -_get_errno()
            self._sq_pending = pending
            self._submitted(pending, result)
        elif pending:
            self._sq_pending = 0
            self._sq_space = self.sq_entries
            if self._unconfirmed_pins:
                self._unconfirmed_pins = []  # their enter has returned: see that method
        if self._backlog:
            return self.completions()
        tail = self._cq_tail_word[0]
        if tail == self._cq_head:
            if not self.settled:
                self._settle()
            return []
        sq_flags = self._sq_flags_word[0]
        if tail - self._cq_head == 1 and not sq_flags:
            # One completion, the common case at low load: read it here.
            start = self._cq_position
            entry = _unpack_cqe(self._cqes, start)
            start += 16  # abi.CQE_SIZE
            self._cq_position = 0 if start == self._cqes_size else start
            self._cq_head = tail
            self._cq_head_word[0] = tail
            if not entry[2] & _F_MORE:
                self._in_flight.pop(entry[0], None)
            if not self.settled:
                self._settle()
            return [entry]
        ready = self._reap()
        if sq_flags and self._sq_flags_word[0] & abi.SQ_CQ_OVERFLOW:
            self._flush_overflow(ready)
        if not self.settled:
            self._settle()
        return ready

    def _settle(self) -> None:
        self.settled = not self._sq_pending and not (
            self._sq_words[self._sq_flags_index] & abi.SQ_CQ_OVERFLOW
        )

    def _set_deadline(self, timeout: float) -> None:
        seconds = int(timeout)
        _pack_timespec(self._deadline, 0, seconds, int((timeout - seconds) * 1e9))

    def _enter_failed(self, code: int) -> None:
        if code in (errno.EINTR, errno.ETIME, errno.EAGAIN, errno.EBUSY):
            return
        if code == errno.EEXIST or (
            self.registered_ring_fd and threading.get_ident() != self._issuer
        ):  # a second thread: refused outright, or its registered ring slot is not there
            raise RuntimeError(
                "io_uring_enter refused this thread: the ring is single-issuer and another "
                "thread submitted first; drive a ring from one thread only "
                "(or create it with single_issuer=False)"
            )
        if code in (errno.EBADF, errno.EBADFD, errno.ENXIO):
            raise OSError(code, "io_uring_enter on a ring that is closed or disabled")
        raise OSError(code, f"io_uring_enter failed: {os.strerror(code)}")

    def _internal_user_data(self) -> int:
        self._internal_serial += 1
        user_data = INTERNAL_USER_DATA + self._internal_serial
        self._internal.add(user_data)
        return user_data

    def _queue_wait_deadline(self, timeout: float) -> None:
        """Before 5.11 the wait deadline is a TIMEOUT SQE, whose CQE `completions` drops."""
        self.prepare_timeout(self._internal_user_data(), timeout, count=1)

    def completions(self) -> list[Completion]:
        """Every completion posted so far as ``(user_data, res, flags)``, oldest first.

        Reading them advances the CQ head once. An operation's pinned memory is
        released with its last CQE (no ``IORING_CQE_F_MORE``). Under
        ``DEFER_TASKRUN`` the kernel posts completions only during `submit`, so
        an iteration is ``submit`` then ``completions``.
        """
        ready = self._backlog
        if ready:
            self._backlog = []
            ready.extend(self._reap())
        else:
            ready = self._reap()
        if self._sq_words[self._sq_flags_index] & abi.SQ_CQ_OVERFLOW:
            self._flush_overflow(ready)
        if self._internal:
            ready = self._drop_internal(ready)
        self._settle()
        return ready

    def _reap(self) -> list[Completion]:
        """The CQEs between our head and the kernel's tail, in one pass; then move the head.

        The entries are unpacked by one ``iter_unpack`` over the CQ's memory; the
        pinned memory of every operation whose last CQE is among them is let go
        of in one short loop over them (a chain of ``map`` and ``compress`` over
        the list, which runs no bytecode per CQE, makes four C calls per CQE
        instead and costs more). A lone CQE, the common case at low load, is
        read directly.
        """
        tail = self._cq_tail_word[0]
        count = tail - self._cq_head
        if count < 0:
            count += 0x100000000
        start = self._cq_position
        if count == 1:
            entry = _unpack_cqe(self._cqes, start)
            start += 16  # abi.CQE_SIZE
            self._cq_position = 0 if start == self._cqes_size else start
            self._cq_head = tail
            self._cq_head_word[0] = tail
            if not entry[2] & _F_MORE:
                self._in_flight.pop(entry[0], None)
            return [entry]
        if not count:
            return []
        end = start + count * 16
        size = self._cqes_size
        if end < size:
            ready = list(_iter_unpack_cqes(self._cqes[start:end]))
            self._cq_position = end
        else:  # the entries reach the end of the array, and may wrap around to its start
            ready = list(_iter_unpack_cqes(self._cqes[start:size]))
            end -= size
            if end:
                ready.extend(_iter_unpack_cqes(self._cqes[:end]))
            self._cq_position = end
        self._cq_head = tail
        self._cq_head_word[0] = tail  # the slots are the kernel's again
        release = self._in_flight.pop
        for entry in ready:
            if not entry[2] & _F_MORE:
                release(entry[0], None)
        return ready

    def _flush_overflow(self, ready: list[Completion]) -> None:
        """Completions wait in the kernel's overflow list: enter to move them into the CQ."""
        for _ in range(64):
            result = _enter(self._enter_fd, 0, 0, self._wait_flags)
            if result < 0 and -result not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                self._enter_failed(-result)
            ready.extend(self._reap())
            if not self._sq_words[self._sq_flags_index] & abi.SQ_CQ_OVERFLOW:
                return
        self.settled = False

    def _drop_internal(self, ready: list[Completion]) -> list[Completion]:
        internal = self._internal
        kept = []
        for entry in ready:
            if entry[0] in internal:
                if not entry[2] & abi.CQE_F_MORE:
                    internal.discard(entry[0])
            else:
                kept.append(entry)
        return kept

    # --- state -----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Operations submitted or queued whose last CQE has not been read."""
        return len(self._in_flight) - len(self._internal)

    def owns(self, user_data: int) -> bool:
        """True while the kernel may still touch the memory of operation ``user_data``."""
        return user_data in self._in_flight

    @property
    def completions_lost(self) -> int:
        """CQEs the kernel dropped for lack of memory (the CQ ring's overflow counter)."""
        return self._cq_words[self._cq_overflow_index]

    # --- teardown --------------------------------------------------------------------

    def close(self, drain_timeout: float = 1.0) -> None:
        """Cancel what is in flight, wait up to ``drain_timeout`` for it, unregister, unmap, close."""
        if self._closed:
            return
        if self._owner != os.getpid():
            # A forked child's copy: the operations, and the memory the kernel
            # writes, are the parent's. Let go of the mappings and the fd only.
            self._in_flight.clear()
            self._buffer_groups.clear()
            self._release()
            return
        try:
            self._drain(drain_timeout)
        finally:
            for buffers in self._buffer_groups.values():
                if self._in_flight:
                    _ABANDONED.append(buffers)  # a recv may still pick one of its buffers
                else:
                    buffers.close()
            self._buffer_groups.clear()
            self._unregister_ring_fd()
            self._release()

    def _drain(self, timeout: float) -> None:
        if self._sq_unpublished or self._sq_pending:
            try:
                self.submit()  # what was queued goes out: unconfirmed sends are in no list
            except (OSError, RuntimeError):
                return
        if not self._in_flight:
            return
        deadline = time.monotonic() + timeout
        try:
            if self.capabilities.cancel_by_fd:
                self._prepare_cancel_everything(self._internal_user_data())
            else:
                for target in list(self._in_flight):
                    self.prepare_cancel(self._internal_user_data(), target)
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.submit(1, remaining)
                self.completions()
        except (OSError, RuntimeError):
            return  # a foreign thread or a dead ring: the pinned memory is abandoned

    def _release(self) -> None:
        self._closed = True
        if self._in_flight:
            _ABANDONED.append(self._in_flight)
        self._in_flight = {}
        for view in self._views:
            view.release()
        for mapping in self._mappings:
            mapping.close()
        os.close(self._fd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._release()
