"""What io_uring is asked for outside its rings: the three system calls, setup, registration.

The three system calls
----------------------
The three system calls go through ``ctypes`` (``syscall(2)`` in libc): one
foreign call per iteration, made with the GIL released, so other threads run
while the loop waits. (The waiting calls of the PyPI ``liburing`` binding hold
the GIL, which would keep a ``call_soon_threadsafe`` caller from ever running;
its calls are cheaper: ``python -m forkloop.loadtest.ringbench`` measures both,
and the README's "Backends" section has the figures.)
``io_uring_enter`` is called without ctypes ``argtypes``, see `_enter`.

Setup
-----
The ring is created with ``IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN`` when
the kernel has them (6.1): completions are then posted only while the loop is
inside ``io_uring_enter`` with ``GETEVENTS``, never behind its back, and only
one thread (the first to call ``submit``, the ring being created disabled
until then) may submit. Older kernels get ``COOP_TASKRUN`` (5.19) or nothing.
A ring also belongs to the process that made it: after ``fork()`` the child's
copy refuses to submit (pre-forking servers create a ring in each worker), and
closing it there only unmaps it.
A flag set the kernel does not know is answered with ``EINVAL``, so `_create`
tries the sets of `_SETUP_ATTEMPTS`, best first; a refusal for any other reason
becomes a `RingUnavailable` that says why (`_setup_failure`).

Registration
------------
`RingRegistration`, mixed into `proactor.ring.Ring`: ``io_uring_register``
for the opcode probe, provided-buffer rings, enabling a ring made disabled,
and registering the ring's own fd with the thread that submits
(``IORING_REGISTER_RING_FDS``, 5.18), so that each enter names the ring by a
slot in that thread's table instead of a file-table lookup. A registered slot
belongs to the thread that registered it: a single-issuer ring has exactly
one such thread, and only such a ring registers. Closing the ring gives the
slot back; a ring closed from another thread cannot, and the kernel frees
the slot when the issuing thread exits.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from typing import TYPE_CHECKING

from . import abi
from .buffers import ProvidedBuffers, pin
from .operations import Capabilities

_MASK32 = 0xFFFFFFFF
_WEAKLY_ORDERED = abi.MACHINE not in ("x86_64", "s390x")  # the machines with TSO-like ordering


class RingUnavailable(OSError):
    """io_uring cannot be used here; the message says why and what would change that."""


# --- system calls ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc_syscall = _libc.syscall
_libc_syscall.restype = ctypes.c_long
_libc_syscall.argtypes = (ctypes.c_long,) * 7
_get_errno = ctypes.get_errno


def _syscall(number: int, a: int, b: int, c: int, d: int, e: int, f: int) -> int:
    """One system call with the GIL released; the result, or minus the errno on failure."""
    result: int = _libc_syscall(number, a, b, c, d, e, f)
    if result == -1:
        return -_get_errno()
    return result


# Where abi knows no syscall numbers for this machine, _create refuses to make a ring
# (RingUnavailable), so no ring ever makes a call with the -1 that stands in here.
_NR_SETUP = -1 if abi.NR_IO_URING_SETUP is None else abi.NR_IO_URING_SETUP
_NR_REGISTER = -1 if abi.NR_IO_URING_REGISTER is None else abi.NR_IO_URING_REGISTER

# io_uring_enter runs every loop iteration, so it skips argtypes: converting seven
# arguments through c_long.from_param costs more than the foreign call itself (the
# README's "Backends" section has the figures). Without argtypes a Python int goes as a
# 32-bit C int, and the upper half of the 64-bit register the kernel reads is NOT
# defined (an argsz passed so came out wrong, EINVAL). The kernel truncates fd,
# to_submit, min_complete and flags to u32, so ints are safe there; the syscall number,
# the argument pointer and its size are 64-bit and go as ctypes objects: a c_long made
# once, a c_void_p made once per ring or None (NULL), a c_size_t made once.
# (A second CDLL object, so that this function pointer has no argtypes.)
_libc_enter = ctypes.CDLL(None, use_errno=True).syscall
_libc_enter.restype = ctypes.c_long
_NR_ENTER = ctypes.c_long(-1 if abi.NR_IO_URING_ENTER is None else abi.NR_IO_URING_ENTER)
_NO_ARGUMENT_SIZE = ctypes.c_size_t(0)
_GETEVENTS_ARG_SIZE = ctypes.c_size_t(abi.GETEVENTS_ARG.size)


def _enter(
    fd: int,
    to_submit: int,
    min_complete: int,
    flags: int,
    argument: ctypes.c_void_p | None = None,
    size: ctypes.c_size_t = _NO_ARGUMENT_SIZE,
) -> int:
    """io_uring_enter with the GIL released; the result, or minus the errno on failure."""
    result: int = _libc_enter(_NR_ENTER, fd, to_submit, min_complete, flags, argument, size)
    if result == -1:
        return -_get_errno()
    return result


def _setup_failure(code: int, entries: int) -> RingUnavailable:
    if code == errno.ENOSYS:
        reason = "this kernel has no io_uring (older than 5.1, or built without CONFIG_IO_URING)"
    elif code == errno.EPERM:
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as setting:
                disabled = setting.read().strip()
        except OSError:
            disabled = "unknown"
        if disabled == "2":
            reason = "kernel.io_uring_disabled=2 turns io_uring off for every process"
        elif disabled == "1":
            reason = (
                "kernel.io_uring_disabled=1 allows io_uring only to members of "
                "kernel.io_uring_group and to CAP_SYS_ADMIN"
            )
        else:
            reason = (
                "the kernel refused io_uring_setup; as kernel.io_uring_disabled is "
                f"{disabled}, a seccomp profile (a container runtime's default) blocks it"
            )
    elif code == errno.ENOMEM:
        reason = (
            f"the kernel could not allocate a ring of {entries} entries; before 5.12 rings "
            "count against RLIMIT_MEMLOCK, so raise `ulimit -l` or ask for fewer entries"
        )
    elif code == errno.EINVAL:
        reason = "the kernel rejected every parameter set tried; its io_uring is too old"
    else:
        reason = f"io_uring_setup failed: {os.strerror(code)}"
    return RingUnavailable(code, f"io_uring is unavailable: {reason}")


# Setup flag sets, best first. The kernel answers EINVAL to any flag it does not know.
_COMMON_SETUP = abi.SETUP_CQSIZE | abi.SETUP_CLAMP
_SETUP_ATTEMPTS = (
    _COMMON_SETUP
    | abi.SETUP_SUBMIT_ALL
    | abi.SETUP_SINGLE_ISSUER
    | abi.SETUP_DEFER_TASKRUN
    | abi.SETUP_TASKRUN_FLAG
    | abi.SETUP_R_DISABLED,
    _COMMON_SETUP | abi.SETUP_SUBMIT_ALL | abi.SETUP_COOP_TASKRUN | abi.SETUP_TASKRUN_FLAG,
    _COMMON_SETUP,
    0,
)


def _create(entries: int, cq_entries: int, single_issuer: bool) -> tuple[int, tuple[int, ...]]:
    """``io_uring_setup`` with the best flags the kernel takes: the fd and the params it filled."""
    if abi.NR_IO_URING_SETUP is None:
        raise RingUnavailable(
            errno.ENOSYS, f"io_uring is unavailable: no syscall numbers known for {abi.MACHINE}"
        )
    params = bytearray(abi.PARAMS.size)
    address, keep = pin(params)
    fd = -errno.EINVAL
    for flags in _SETUP_ATTEMPTS:
        if not single_issuer and flags & abi.SETUP_SINGLE_ISSUER:
            continue
        abi.PARAMS.pack_into(params, 0, entries, cq_entries, flags, *([0] * 25))
        fd = _syscall(_NR_SETUP, entries, address, 0, 0, 0, 0)
        if fd != -errno.EINVAL:
            break
    if fd < 0:
        raise _setup_failure(-fd, entries)
    fields = abi.PARAMS.unpack_from(params)
    del keep
    if _WEAKLY_ORDERED and not fields[2] & abi.SETUP_DEFER_TASKRUN:
        os.close(fd)
        raise RingUnavailable(
            errno.ENOTSUP,
            f"io_uring is unavailable: on {abi.MACHINE} this binding needs "
            "IORING_SETUP_DEFER_TASKRUN (kernel 6.1) for its memory ordering",
        )
    return fd, fields


class RingRegistration:
    """The mappings of a new ring, ``io_uring_register`` on behalf of `proactor.ring.Ring`,
    and the first submit's setup."""

    if not TYPE_CHECKING:  # Ring lists the attributes (hidden from mypy, as in TransportBase)
        __slots__ = ()
    _fd: int
    _owner: int
    _enabled: bool
    _issuer: int
    _enter_fd: int
    _enter_flags: int
    _wait_flags: int
    _deadline_flags: int
    registered_ring_fd: bool
    setup_flags: int
    capabilities: Capabilities
    _buffer_groups: dict[int, ProvidedBuffers]
    # what _map_rings finds and sets up (see Ring)
    sq_entries: int
    cq_entries: int
    features: int
    _mappings: list[mmap.mmap]
    _views: list[memoryview]
    _sq_words: memoryview
    _cq_words: memoryview
    _cqes: memoryview
    _cqes_size: int
    _sqes: memoryview
    _sqes_size: int
    _sq_head_index: int
    _sq_tail_index: int
    _sq_flags_index: int
    _cq_head_index: int
    _cq_tail_index: int
    _cq_overflow_index: int
    _sq_tail_word: memoryview
    _sq_flags_word: memoryview
    _cq_head_word: memoryview
    _cq_tail_word: memoryview
    _sq_tail: int
    _sqe_position: int
    _sq_unpublished: int
    _sq_pending: int
    _sq_space: int
    _cq_head: int
    _cq_position: int

    def register(self, opcode: int, argument_address: int, count: int) -> int:
        """``io_uring_register(fd, opcode, arg, nr_args)``; raises OSError on failure."""
        result = _syscall(_NR_REGISTER, self._fd, opcode, argument_address, count, 0, 0)
        if result < 0:
            raise OSError(-result, f"io_uring_register({opcode}) failed: {os.strerror(-result)}")
        return result

    def probe(self) -> frozenset[int]:
        """The opcodes this kernel supports (``IORING_REGISTER_PROBE``, kernel 5.6+)."""
        size = abi.PROBE_HEADER.size + abi.PROBE_OPS * abi.PROBE_OP.size
        answer = bytearray(size)
        address, keep = pin(answer)
        try:
            self.register(abi.REGISTER_PROBE, address, abi.PROBE_OPS)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            return frozenset()  # before 5.6: no probe, and no SEND/RECV either
        _, ops_len, *_ = abi.PROBE_HEADER.unpack_from(answer)
        supported = set()
        for index in range(ops_len):
            op, _, flags, _ = abi.PROBE_OP.unpack_from(
                answer, abi.PROBE_HEADER.size + index * abi.PROBE_OP.size
            )
            if flags & abi.IO_URING_OP_SUPPORTED:
                supported.add(op)
        del keep
        return frozenset(supported)

    def provide_buffers(self, count: int, size: int, group_id: int = 0) -> ProvidedBuffers:
        """Register a provided-buffer ring of ``count`` buffers of ``size`` bytes."""
        if not self.capabilities.buffer_rings:
            raise OSError(
                errno.ENOTSUP, "provided-buffer rings need kernel 5.19; recv into your own buffer"
            )
        if group_id in self._buffer_groups:
            raise ValueError(f"buffer group {group_id} is registered already")
        buffers = ProvidedBuffers(self.register, group_id, count, size)
        self._buffer_groups[group_id] = buffers
        return buffers

    def _set_enter_flags(self, registered: int) -> None:
        """The flags of each kind of enter; ``registered`` is ENTER_REGISTERED_RING or 0."""
        getevents = abi.ENTER_GETEVENTS
        # Under DEFER_TASKRUN completions are posted only by an enter with GETEVENTS.
        self._enter_flags = registered | (
            getevents if self.setup_flags & abi.SETUP_DEFER_TASKRUN else 0
        )
        self._wait_flags = registered | getevents
        self._deadline_flags = registered | getevents | abi.ENTER_EXT_ARG

    def _enable(self) -> None:
        """The first submit: this thread becomes the ring's issuer, and enters by a registered fd.

        A ring made with ``SETUP_R_DISABLED`` is enabled here. A single-issuer
        ring also registers its fd with this thread (``IORING_REGISTER_RING_FDS``,
        5.18): every enter then names the ring by that slot, and the kernel skips
        looking the fd up in the file table. The slot belongs to this thread,
        the only one that may submit anyway; `close` gives it back.
        """
        if self._owner != os.getpid():
            raise RuntimeError(
                f"this ring belongs to process {self._owner}, which forked this one; "
                "a ring cannot be shared across fork(): create it in the child"
            )
        if self.setup_flags & abi.SETUP_R_DISABLED:
            self.register(abi.REGISTER_ENABLE_RINGS, 0, 0)
        if self.setup_flags & abi.SETUP_SINGLE_ISSUER and not self.registered_ring_fd:
            self._register_ring_fd()
        self._issuer = threading.get_ident()
        self._enabled = True

    def _register_ring_fd(self) -> None:
        update = bytearray(abi.RSRC_UPDATE.size)
        abi.RSRC_UPDATE.pack_into(update, 0, _MASK32, 0, self._fd)  # any free slot
        address, keep = pin(update)
        try:
            self.register(abi.REGISTER_RING_FDS, address, 1)
        except OSError:
            return  # before 5.18, or no slot left for this thread: enter by the fd
        finally:
            del keep
        self._enter_fd = abi.RSRC_UPDATE.unpack_from(update)[0]
        self.registered_ring_fd = True
        self._set_enter_flags(abi.ENTER_REGISTERED_RING)

    def _unregister_ring_fd(self) -> None:
        if not self.registered_ring_fd:
            return
        self.registered_ring_fd = False
        update = bytearray(abi.RSRC_UPDATE.size)
        abi.RSRC_UPDATE.pack_into(update, 0, self._enter_fd, 0, 0)
        address, keep = pin(update)
        try:
            self.register(abi.UNREGISTER_RING_FDS, address, 1)
        except OSError:
            pass  # another thread closes the ring: the slot goes when the issuer exits
        del keep
        self._enter_fd = self._fd
        self._set_enter_flags(0)

    def _map_rings(self, sq: dict[str, int], cq: dict[str, int]) -> None:
        fd, protection = self._fd, mmap.PROT_READ | mmap.PROT_WRITE
        share = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        sq_size = sq["array"] + self.sq_entries * 4
        cq_size = cq["cqes"] + self.cq_entries * abi.CQE_SIZE
        mappings = self._mappings  # appended one by one, so a failure unmaps what exists
        if self.features & abi.FEAT_SINGLE_MMAP:
            sq_map = cq_map = mmap.mmap(fd, max(sq_size, cq_size), share, protection)
            mappings.append(sq_map)
        else:
            sq_map = mmap.mmap(fd, sq_size, share, protection, offset=abi.OFF_SQ_RING)
            mappings.append(sq_map)
            cq_map = mmap.mmap(fd, cq_size, share, protection, offset=abi.OFF_CQ_RING)
            mappings.append(cq_map)
        sqe_map = mmap.mmap(
            fd, self.sq_entries * abi.SQE_SIZE, share, protection, offset=abi.OFF_SQES
        )
        mappings.append(sqe_map)
        self._sq_words = memoryview(sq_map).cast("I")
        cq_bytes = memoryview(cq_map)
        self._cq_words = cq_bytes.cast("I")
        self._cqes_size = self.cq_entries * abi.CQE_SIZE
        self._cqes = cq_bytes[cq["cqes"] : cq["cqes"] + self._cqes_size]
        self._sqes = memoryview(sqe_map)
        self._views.extend((self._sq_words, self._cq_words, self._cqes, cq_bytes, self._sqes))
        self._sq_head_index = sq["head"] >> 2
        self._sq_tail_index = sq["tail"] >> 2
        self._sq_flags_index = sq["flags"] >> 2
        self._cq_head_index = cq["head"] >> 2
        self._cq_tail_index = cq["tail"] >> 2
        self._cq_overflow_index = cq["overflow"] >> 2
        # The words submit_and_reap reads or writes every iteration, each as its own view.
        self._sq_tail_word = self._sq_words[self._sq_tail_index :][:1]
        self._sq_flags_word = self._sq_words[self._sq_flags_index :][:1]
        self._cq_head_word = self._cq_words[self._cq_head_index :][:1]
        self._cq_tail_word = self._cq_words[self._cq_tail_index :][:1]
        self._views[:0] = (
            self._sq_tail_word,
            self._sq_flags_word,
            self._cq_head_word,
            self._cq_tail_word,
        )
        array_index = sq["array"] >> 2
        for slot in range(self.sq_entries):
            self._sq_words[array_index + slot] = slot
        # The SQ: the tail as published, the byte offset of the next SQE to write, and how
        # many SQEs were written since the last publication, wait for the kernel, are free.
        self._sq_tail = self._sq_words[self._sq_tail_index]
        self._sqes_size = self.sq_entries * abi.SQE_SIZE
        mask = self._sq_words[sq["ring_mask"] >> 2]
        self._sqe_position = (self._sq_tail & mask) * abi.SQE_SIZE
        self._sq_unpublished = 0
        self._sq_pending = 0
        self._sq_space = self.sq_entries
        # The CQ: the head as we last wrote it, and the byte offset of the entry it names.
        self._cq_head = self._cq_words[self._cq_head_index]
        self._cq_position = (self._cq_head & self._cq_words[cq["ring_mask"] >> 2]) * abi.CQE_SIZE
