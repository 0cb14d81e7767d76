"""The io_uring kernel ABI as Python numbers: syscalls, opcodes, flags and struct layouts.

Everything here is transcribed from the kernel's UAPI header
``include/uapi/linux/io_uring.h`` (and ``linux/time_types.h``, ``sys/socket.h``
for the structs the operations point at). Nothing is computed at run time
except the syscall numbers, which depend on the machine.

Byte order and layout
---------------------
The kernel writes its rings in the machine's native byte order, so every
``struct`` format here starts with ``=``: native order, standard sizes, no
padding. Padding the C compiler would insert is written out as ``x``. The
struct sizes are checked when this module is imported, so a typo in a format
fails at import rather than handing the kernel a misaligned field.

Kernel versions
---------------
io_uring grew one kernel at a time and the opcode probe
(``IORING_REGISTER_PROBE``) only answers "is this opcode known". Flags added
to existing opcodes are not probed; they arrived in the same release as an
opcode or feature bit that is probed, and ``Capabilities`` (``operations.py``)
reads them off that marker::

    what                                   kernel  marker that came with it
    FEAT_NODROP: overflow CQEs are kept    5.5     the feature bit
    FEAT_FAST_POLL: sockets polled, no     5.7     the feature bit
      io-wq thread per blocked operation
    FEAT_EXT_ARG: wait deadline argument   5.11    the feature bit
    multishot POLL_ADD                     5.13    FEAT_RSRC_TAGS
    OP_MSG_RING                            5.18    the opcode
    multishot ACCEPT, provided-buffer      5.19    OP_SOCKET
      rings, cancel by fd / all / any
    multishot RECV, SEND_ZC                6.0     OP_SEND_ZC
    SETUP_DEFER_TASKRUN; a failed send     6.1     OP_SENDMSG_ZC
      reports the bytes it sent first
    registered ring fds                    5.18    io_uring_register accepts it
    recv and send bundles                  6.10    FEAT_RECVSEND_BUNDLE
    incrementally consumed buffer rings    6.12    io_uring_register accepts it
"""

from __future__ import annotations

import platform
import socket
import struct
from typing import Any

# --- syscalls ---------------------------------------------------------------------

# io_uring was added after the syscall tables of the 64-bit architectures were
# unified, so it has the same three numbers everywhere except the old ABIs.
_SYSCALL_NUMBERS = {
    "x86_64": (425, 426, 427),
    "aarch64": (425, 426, 427),
    "arm64": (425, 426, 427),
    "riscv64": (425, 426, 427),
    "ppc64le": (425, 426, 427),
    "s390x": (425, 426, 427),
    "loongarch64": (425, 426, 427),
}
MACHINE = platform.machine()
NR_IO_URING_SETUP, NR_IO_URING_ENTER, NR_IO_URING_REGISTER = _SYSCALL_NUMBERS.get(
    MACHINE, (None, None, None)
)

# --- opcodes (enum io_uring_op) -------------------------------------------------------

OP_NOP = 0
OP_READV = 1
OP_WRITEV = 2
OP_POLL_ADD = 6
OP_POLL_REMOVE = 7
OP_SENDMSG = 9
OP_RECVMSG = 10
OP_TIMEOUT = 11
OP_TIMEOUT_REMOVE = 12
OP_ACCEPT = 13
OP_ASYNC_CANCEL = 14
OP_LINK_TIMEOUT = 15
OP_CONNECT = 16
OP_CLOSE = 19
OP_READ = 22
OP_WRITE = 23
OP_SEND = 26
OP_RECV = 27
OP_PROVIDE_BUFFERS = 31
OP_SPLICE = 30
OP_SHUTDOWN = 34
OP_MSG_RING = 40
OP_SOCKET = 45
OP_SEND_ZC = 47
OP_SENDMSG_ZC = 48
OP_READ_MULTISHOT = 49
OP_BIND = 56
OP_LISTEN = 57

# Every opcode in enum order (6.18), for reports.
OPCODE_NAMES = (
    *("NOP", "READV", "WRITEV", "FSYNC", "READ_FIXED", "WRITE_FIXED", "POLL_ADD"),
    *("POLL_REMOVE", "SYNC_FILE_RANGE", "SENDMSG", "RECVMSG", "TIMEOUT", "TIMEOUT_REMOVE"),
    *("ACCEPT", "ASYNC_CANCEL", "LINK_TIMEOUT", "CONNECT", "FALLOCATE", "OPENAT", "CLOSE"),
    *("FILES_UPDATE", "STATX", "READ", "WRITE", "FADVISE", "MADVISE", "SEND", "RECV"),
    *("OPENAT2", "EPOLL_CTL", "SPLICE", "PROVIDE_BUFFERS", "REMOVE_BUFFERS", "TEE"),
    *("SHUTDOWN", "RENAMEAT", "UNLINKAT", "MKDIRAT", "SYMLINKAT", "LINKAT", "MSG_RING"),
    *("FSETXATTR", "SETXATTR", "FGETXATTR", "GETXATTR", "SOCKET", "URING_CMD", "SEND_ZC"),
    *("SENDMSG_ZC", "READ_MULTISHOT", "WAITID", "FUTEX_WAIT", "FUTEX_WAKE", "FUTEX_WAITV"),
    *("FIXED_FD_INSTALL", "FTRUNCATE", "BIND", "LISTEN", "RECV_ZC", "EPOLL_WAIT"),
    *("READV_FIXED", "WRITEV_FIXED", "PIPE", "NOP128", "URING_CMD128"),
)


def opcode_name(opcode: int) -> str:
    return OPCODE_NAMES[opcode] if opcode < len(OPCODE_NAMES) else f"opcode {opcode}"


# --- sqe->flags ---------------------------------------------------------------------

IOSQE_FIXED_FILE = 1 << 0
IOSQE_IO_DRAIN = 1 << 1
IOSQE_IO_LINK = 1 << 2
IOSQE_IO_HARDLINK = 1 << 3
IOSQE_ASYNC = 1 << 4
IOSQE_BUFFER_SELECT = 1 << 5
IOSQE_CQE_SKIP_SUCCESS = 1 << 6

# --- io_uring_setup() flags ---------------------------------------------------------

SETUP_CQSIZE = 1 << 3
SETUP_CLAMP = 1 << 4
SETUP_R_DISABLED = 1 << 6
SETUP_SUBMIT_ALL = 1 << 7
SETUP_COOP_TASKRUN = 1 << 8
SETUP_TASKRUN_FLAG = 1 << 9
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13

# --- io_uring_params->features ------------------------------------------------------

FEAT_SINGLE_MMAP = 1 << 0
FEAT_NODROP = 1 << 1
FEAT_SUBMIT_STABLE = 1 << 2
FEAT_RW_CUR_POS = 1 << 3
FEAT_CUR_PERSONALITY = 1 << 4
FEAT_FAST_POLL = 1 << 5
FEAT_POLL_32BITS = 1 << 6
FEAT_SQPOLL_NONFIXED = 1 << 7
FEAT_EXT_ARG = 1 << 8
FEAT_NATIVE_WORKERS = 1 << 9
FEAT_RSRC_TAGS = 1 << 10
FEAT_CQE_SKIP = 1 << 11
FEAT_LINKED_FILE = 1 << 12
FEAT_REG_REG_RING = 1 << 13
FEAT_RECVSEND_BUNDLE = 1 << 14
FEAT_MIN_TIMEOUT = 1 << 15
FEAT_RW_ATTR = 1 << 16
FEAT_NO_IOWAIT = 1 << 17

FEATURE_NAMES = {
    value: name[5:]
    for name, value in globals().items()
    if name.startswith("FEAT_") and isinstance(value, int)
}

# --- per-opcode flags ---------------------------------------------------------------

TIMEOUT_ABS = 1 << 0  # sqe->timeout_flags
TIMEOUT_BOOTTIME = 1 << 2
TIMEOUT_REALTIME = 1 << 3

POLL_ADD_MULTI = 1 << 0  # sqe->len of POLL_ADD

ASYNC_CANCEL_ALL = 1 << 0  # sqe->cancel_flags
ASYNC_CANCEL_FD = 1 << 1
ASYNC_CANCEL_ANY = 1 << 2

RECVSEND_POLL_FIRST = 1 << 0  # sqe->ioprio of SEND/RECV
RECV_MULTISHOT = 1 << 1
RECVSEND_FIXED_BUF = 1 << 2
SEND_ZC_REPORT_USAGE = 1 << 3
RECVSEND_BUNDLE = 1 << 4

ACCEPT_MULTISHOT = 1 << 0  # sqe->ioprio of ACCEPT

MSG_RING_DATA = 0  # sqe->addr of MSG_RING: post sqe->len as res, sqe->off as user_data

# --- cqe->flags ---------------------------------------------------------------------

CQE_F_BUFFER = 1 << 0  # the upper 16 bits carry the provided-buffer id
CQE_F_MORE = 1 << 1  # the request stays armed and will post more CQEs
CQE_F_SOCK_NONEMPTY = 1 << 2  # more data was waiting in the socket after this recv
CQE_F_NOTIF = 1 << 3
CQE_F_BUF_MORE = 1 << 4
CQE_BUFFER_SHIFT = 16

# One completion as the engines report it: (cqe->user_data, cqe->res, cqe->flags).
Completion = tuple[int, int, int]

# --- mmap offsets -------------------------------------------------------------------

OFF_SQ_RING = 0
OFF_CQ_RING = 0x8000000
OFF_SQES = 0x10000000

# --- sq_ring->flags -----------------------------------------------------------------

SQ_NEED_WAKEUP = 1 << 0
SQ_CQ_OVERFLOW = 1 << 1  # completions wait in the kernel's overflow list
SQ_TASKRUN = 1 << 2  # deferred task work is pending: enter with GETEVENTS to run it

# --- io_uring_enter() flags ---------------------------------------------------------

ENTER_GETEVENTS = 1 << 0
ENTER_SQ_WAKEUP = 1 << 1
ENTER_SQ_WAIT = 1 << 2
ENTER_EXT_ARG = 1 << 3
ENTER_REGISTERED_RING = 1 << 4

# --- io_uring_register() opcodes ----------------------------------------------------

REGISTER_PROBE = 8
REGISTER_ENABLE_RINGS = 12
REGISTER_RING_FDS = 20
UNREGISTER_RING_FDS = 21
REGISTER_PBUF_RING = 22
UNREGISTER_PBUF_RING = 23

PBUF_RING_INC = 1 << 1  # io_uring_buf_reg->flags: buffers are consumed a piece at a time

IO_URING_OP_SUPPORTED = 1 << 0

# --- struct layouts -----------------------------------------------------------------

# struct io_uring_params: ten u32 (sq_entries, cq_entries, flags, sq_thread_cpu,
# sq_thread_idle, features, wq_fd, resv[3]), then io_sqring_offsets (head, tail,
# ring_mask, ring_entries, flags, dropped, array, resv1, u64 user_addr), then
# io_cqring_offsets (head, tail, ring_mask, ring_entries, overflow, cqes, flags,
# resv1, u64 user_addr).
PARAMS = struct.Struct("=10I 8IQ 8IQ")
SQ_OFFSETS_AT = 10  # index of sq_off.head among the unpacked fields
CQ_OFFSETS_AT = 19  # index of cq_off.head
SQ_OFFSET_FIELDS = ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array")
CQ_OFFSET_FIELDS = ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags")

# struct io_uring_sqe, 64 bytes, every field written on each use so a reused
# slot carries nothing over: opcode, flags, ioprio, fd, off/addr2, addr,
# len, op_flags (msg_flags, timeout_flags, accept_flags, cancel_flags,
# poll32_events, ...), user_data, buf_index/buf_group, personality,
# splice_fd_in/file_index, addr3, pad.
SQE = struct.Struct("=BBHiQQIIQHHiQQ")
SQE_SIZE = 64
# The same, for an SQE whose fields after user_data are zero: written as padding.
SQE_TO_USER_DATA = struct.Struct("=BBHiQQIIQ24x")
SQE_SHIFT = 6

# struct io_uring_cqe (without IORING_SETUP_CQE32): user_data, res, flags.
CQE = struct.Struct("=QiI")
CQE_SIZE = 16
CQE_SHIFT = 4

# struct __kernel_timespec: s64 seconds, long long nanoseconds.
TIMESPEC = struct.Struct("=qq")

# struct io_uring_getevents_arg: u64 sigmask, u32 sigmask_sz, u32 min_wait_usec
# (was pad), u64 ts (pointer to a __kernel_timespec).
GETEVENTS_ARG = struct.Struct("=QIIQ")

# struct io_uring_probe: u8 last_op, u8 ops_len, u16 resv, u32 resv2[3], then
# ops_len times struct io_uring_probe_op: u8 op, u8 resv, u16 flags, u32 resv2.
PROBE_HEADER = struct.Struct("=BBH3I")
PROBE_OP = struct.Struct("=BBHI")
PROBE_OPS = 256

# struct io_uring_buf_reg: u64 ring_addr, u32 ring_entries, u16 bgid, u16 flags,
# u64 resv[3].
BUF_REG = struct.Struct("=QIHH3Q")

# struct io_uring_rsrc_update: u32 offset, u32 resv, u64 data. Registering a ring fd,
# data is the fd and offset the slot (-1: any free slot, written back by the kernel).
RSRC_UPDATE = struct.Struct("=IIQ")

# struct io_uring_buf: u64 addr, u32 len, u16 bid, u16 resv. The resv field of
# entry 0 is the ring's tail, so an entry is written as its first 14 bytes only.
BUF_ENTRY = struct.Struct("=QIH")
BUF_ENTRY_SIZE = 16
BUF_RING_TAIL_OFFSET = 14

# struct msghdr (LP64): void *name, u32 namelen (+4 pad), struct iovec *iov,
# size_t iovlen, void *control, size_t controllen, int flags (+4 pad).
MSGHDR = struct.Struct("=QI4xQQQQi4x")
IOVEC = struct.Struct("=QQ")

for _name, _value in list(globals().items()):
    if _name.startswith("OP_") and OPCODE_NAMES[_value] != _name[3:]:  # pragma: no cover
        raise AssertionError(f"{_name} = {_value} disagrees with the opcode table")

for _layout, _size in (
    (PARAMS, 120),
    (SQE, SQE_SIZE),
    (SQE_TO_USER_DATA, SQE_SIZE),
    (CQE, CQE_SIZE),
    (TIMESPEC, 16),
    (GETEVENTS_ARG, 24),
    (PROBE_HEADER, 16),
    (PROBE_OP, 8),
    (BUF_REG, 40),
    (RSRC_UPDATE, 16),
    (MSGHDR, 56),
    (IOVEC, 16),
):
    if _layout.size != _size:  # pragma: no cover - a transcription error
        raise AssertionError(f"struct {_layout.format!r} is {_layout.size} bytes, not {_size}")


# ``address`` is Any: its shape depends on ``family``, as with the socket module's addresses.
def sockaddr(family: int, address: Any) -> bytes:
    """The ``struct sockaddr`` bytes for ``address`` as the socket module spells it.

    Only numeric addresses: resolving names is the caller's business (it may
    block). AF_INET takes ``(host, port)``, AF_INET6 ``(host, port[, flowinfo,
    scope_id])``, AF_UNIX a path as str or bytes (a leading NUL means the
    abstract namespace).
    """
    if family == socket.AF_INET:
        host, port = address
        return (
            struct.pack("=H", family)
            + struct.pack("!H", port)
            + socket.inet_pton(socket.AF_INET, host)
            + bytes(8)
        )
    if family == socket.AF_INET6:
        host, port, flowinfo, scope_id = (*address, 0, 0)[:4]
        return (
            struct.pack("=H", family)
            + struct.pack("!HI", port, flowinfo)
            + socket.inet_pton(socket.AF_INET6, host)
            + struct.pack("=I", scope_id)
        )
    if family == socket.AF_UNIX:
        path = address.encode() if isinstance(address, str) else bytes(address)
        if path[:1] != b"\0":
            path += b"\0"
        return struct.pack("=H", family) + path
    raise ValueError(f"cannot build a socket address for address family {family}")
