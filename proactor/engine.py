"""Choosing the proactor's engine: io_uring, or completions emulated on epoll.

An *engine* is whatever carries the loop's operations to the kernel and brings
their completions back. Two exist, with one interface:

``uring``
    `proactor.ring.Ring`: io_uring itself. Everything queued in one loop
    iteration reaches the kernel in the one ``io_uring_enter`` that also
    waits for completions.
``emulated``
    `proactor.emulated.EmulatedRing`: the same ``prepare_*`` / ``submit`` /
    ``completions`` shape, implemented over the reactor's epoll poller by
    performing each system call when its fd is ready and posting the
    completion itself. It exists for the machines where io_uring is refused:
    ``kernel.io_uring_disabled``, a container runtime's seccomp profile,
    kernels before 5.7, other systems.

What the loop relies on, from either engine
-------------------------------------------
`CompletionEngine` declares it, once; mypy checks both engines against it
(`open_engine` returns either), so they cannot drift apart. In words:
``prepare_accept`` (multishot when ``capabilities.multishot_accept``),
``prepare_recv_provided`` from one buffer group per loop (multishot when
``capabilities.multishot_recv``, in bundles when ``capabilities.receive_bundles``)
or ``prepare_recv`` into a buffer of the
caller's, ``prepare_send``, ``prepare_sendmsg``, ``prepare_poll_add`` (one-shot),
``prepare_cancel`` by user_data, ``prepare_close``; ``provide_buffers``
(a `ReceiveBuffers` group); ``submit(wait_for, timeout)`` and
``completions()``; ``close()``. Results are io_uring's: a byte count or
``-errno``; ``IORING_CQE_F_MORE`` on every completion of a multishot operation
except its last. Every operation is named by its ``user_data``, unique among
the operations in flight, and the engine holds what an operation points at
until the operation's last completion.

Choosing
--------
The loop's ``engine`` argument says which (the ``proactor-uring`` and
``proactor-emulated`` backends pass it); without one, ``proactor.new_event_loop``
reads ``FORKLOOP_PROACTOR_ENGINE``, a user's override that nothing in forkloop
sets:

* ``auto`` (the default): io_uring when ``io_uring_setup`` works and the
  kernel has what the loop needs (`REQUIRED_OPCODES`, fast poll); otherwise
  the emulated engine, after a warning that says why.
* ``uring``: io_uring or a loud `EngineUnavailable` that says why and what
  would change that. For deployments that must not quietly run slower.
* ``emulated``: the emulated engine, always.

The engine is chosen when a loop is built, so in a pre-forking server each
worker makes its own ring after the fork: a ring cannot cross ``fork()``.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from . import abi
from .abi import Completion
from .emulated import EmulatedRing
from .ring import Ring, RingUnavailable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .buffers import IncomingBuffer, OutgoingBuffer

ENVIRONMENT_VARIABLE = "FORKLOOP_PROACTOR_ENGINE"
ENGINE_CHOICES = ("auto", "uring", "emulated")

# Submission queue size: more operations than this in one iteration cost an early enter.
RING_ENTRIES = 1024
# One provided-buffer group per loop. Buffers go back to the kernel as soon as
# their bytes are copied out, so they only need to cover the completions of one
# iteration: one buffer per connection that received something in it. A group
# that runs dry ends a multishot recv with -ENOBUFS and the transport re-arms
# it, which costs a completion and a submission more. With recv bundles (6.10)
# one completion carries as many buffers as the data needs, so small buffers
# cost no extra completions on large reads, and the same 8 MiB of memory holds
# four times as many of them: 2048 connections' worth per iteration instead of
# 512. Without bundles a buffer per completion, so larger ones.
RECEIVE_BUFFER_COUNT = 512
RECEIVE_BUFFER_SIZE = 16 * 1024
BUNDLE_BUFFER_COUNT = 2048
BUNDLE_BUFFER_SIZE = 4 * 1024
# What one completion of a bundle recv carries at most, and so what one data_received()
# is handed: a protocol's flow control acts between pieces (asyncio's own loops read
# 256 KiB at most), and a proxy relaying a large answer holds about one piece more.
BUNDLE_LIMIT = 64 * 1024
RECEIVE_BUFFER_GROUP = 0

# What the loop cannot do without (5.7): the network opcodes and fast poll, which
# keeps a socket operation that would block from taking an io-wq thread.
REQUIRED_OPCODES = {
    abi.OP_ACCEPT: "ACCEPT",
    abi.OP_RECV: "RECV",
    abi.OP_SEND: "SEND",
    abi.OP_SENDMSG: "SENDMSG",
    abi.OP_CLOSE: "CLOSE",
    abi.OP_ASYNC_CANCEL: "ASYNC_CANCEL",
    abi.OP_POLL_ADD: "POLL_ADD",
}

logger = logging.getLogger("proactor")


class EngineCapabilities(Protocol):
    """What an engine can do; the loop picks multishot forms and buffer rings by it."""

    @property
    def multishot_accept(self) -> bool: ...
    @property
    def multishot_recv(self) -> bool: ...
    @property
    def buffer_rings(self) -> bool: ...
    @property
    def cancel_by_fd(self) -> bool: ...
    @property
    def multishot_poll(self) -> bool: ...
    @property
    def wait_deadline_argument(self) -> bool: ...
    @property
    def msg_ring(self) -> bool: ...
    @property
    def deferred_task_run(self) -> bool: ...
    @property
    def unconfirmed_send(self) -> bool:
        """``prepare_send_unconfirmed`` works (see `proactor.sending`)."""

    @property
    def zero_copy_send(self) -> bool: ...
    @property
    def receive_bundles(self) -> bool: ...
    @property
    def splice(self) -> bool: ...

    def describe(self) -> str:
        """A paragraph for logs and reports."""


class ReceiveBuffers(Protocol):
    """A provided-buffer group: ``count`` buffers of ``size`` bytes a receive may fill."""

    @property
    def group_id(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def lent(self) -> int:
        """Buffers the application took and has not recycled."""

    def consume(self, cqe_flags: int, length: int) -> bytes:
        """The bytes a completion delivered; the buffer is the engine's again at once."""

    def take(self, cqe_flags: int, length: int) -> tuple[int, memoryview]:
        """Claim the buffer a completion names: its id and a view of its bytes."""

    def recycle(self, buffer_id: int) -> None:
        """Give a taken buffer back."""

    def close(self) -> None: ...


class CompletionEngine(Protocol):
    """Operations in, completions out: io_uring's interface, which both engines implement.

    ``prepare_*`` queue an operation under ``user_data`` and nothing more;
    `submit` hands over everything queued and waits; `completions` returns
    ``(user_data, result, flags)`` for each completion posted, oldest first.
    """

    @property
    def capabilities(self) -> EngineCapabilities: ...

    def prepare_nop(self, user_data: int) -> None: ...

    def prepare_accept(
        self, user_data: int, fd: int, *, multishot: bool = False, flags: int = ...
    ) -> None: ...

    def prepare_recv(
        self,
        user_data: int,
        fd: int,
        buffer: IncomingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = 0,
    ) -> None: ...

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
    ) -> None: ...

    def prepare_send(
        self,
        user_data: int,
        fd: int,
        buffer: OutgoingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = ...,
    ) -> None: ...

    def prepare_sendmsg(
        self,
        user_data: int,
        fd: int,
        buffers: Iterable[ReadableBuffer],
        *,
        address: bytes | None = None,
        flags: int = ...,
    ) -> None: ...

    def prepare_poll_add(
        self, user_data: int, fd: int, events: int = select.POLLIN, *, multishot: bool = False
    ) -> None: ...

    def prepare_close(self, user_data: int, fd: int) -> None: ...

    def prepare_cancel(
        self, user_data: int, target_user_data: int, *, every: bool = False
    ) -> None: ...

    def prepare_cancel_fd(self, user_data: int, fd: int) -> None: ...

    def provide_buffers(self, count: int, size: int, group_id: int = 0) -> ReceiveBuffers: ...

    def prepare_send_zero_copy(
        self,
        user_data: int,
        fd: int,
        buffer: OutgoingBuffer,
        *,
        offset: int = 0,
        length: int | None = None,
        flags: int = ...,
    ) -> None:
        """A send from the buffer's own pages (``capabilities.zero_copy_send``); its
        buffer is held until a notification completion (``IORING_CQE_F_NOTIF``)."""

    def prepare_send_unconfirmed(self, user_data: int, fd: int, data: bytes) -> None:
        """Send all of ``data`` when submitted, or post a completion saying how much went out.

        Tried once, never parked; a completion (the count sent, ``-EAGAIN``, or
        ``-errno``) is posted only when not everything was sent, and by the time
        `submit` returns it is posted or there is none. `proactor.sending`.
        """

    def unconfirmed_sender(self, user_data: int, fd: int) -> Callable[[bytes], None]:
        """`prepare_send_unconfirmed` with ``user_data`` and ``fd`` fixed: one call per send."""

    def submit(self, wait_for: int = 0, timeout: float | None = None) -> int:
        """Hand over what was queued; wait (up to ``timeout``) for ``wait_for`` completions."""

    def completions(self) -> list[Completion]:
        """Every completion posted so far, oldest first."""

    def submit_and_reap(self, timeout: float | None) -> list[Completion]:
        """`submit`, waiting up to ``timeout`` (None: no limit; 0: not at all) for a
        completion, then `completions`: one loop iteration's I/O in one call."""

    @property
    def settled(self) -> bool:
        """Everything submitted was taken, and every completion posted so far was reaped."""

    @property
    def in_flight(self) -> int:
        """Operations queued or submitted whose last completion has not been read."""

    def owns(self, user_data: int) -> bool:
        """True while operation ``user_data`` still holds what it points at."""

    def fileno(self) -> int: ...

    def close(self, drain_timeout: float = 1.0) -> None:
        """End every operation (cancel, wait up to ``drain_timeout``), then release the engine."""


class EngineUnavailable(RuntimeError):
    """The engine that was asked for cannot run here; the message says why."""


def requested_engine(choice: str | None = None) -> str:
    """The engine asked for: ``choice``, else the environment variable, else ``auto``."""
    if choice is None:
        choice = os.environ.get(ENVIRONMENT_VARIABLE, "") or "auto"
    normalized = choice.strip().lower()
    if normalized not in ENGINE_CHOICES:
        raise ValueError(
            f"unknown proactor engine {choice!r} (from {ENVIRONMENT_VARIABLE} or engine=); "
            f"choose one of: {', '.join(ENGINE_CHOICES)}"
        )
    return normalized


def _missing_features(ring: Ring) -> list[str]:
    capabilities = ring.capabilities
    missing = [name for op, name in REQUIRED_OPCODES.items() if not capabilities.supports(op)]
    if not ring.features & abi.FEAT_FAST_POLL:
        missing.append("FEAT_FAST_POLL")
    if not ring.features & abi.FEAT_NODROP:
        missing.append("FEAT_NODROP")
    return missing


def open_uring() -> Ring:
    """A ring the loop can use, or `RingUnavailable` saying why not."""
    ring = Ring(RING_ENTRIES)
    missing = _missing_features(ring)
    if missing:
        ring.close()
        raise RingUnavailable(
            0,
            f"this kernel's io_uring lacks {', '.join(missing)}, which the proactor needs "
            "(Linux 5.7 or newer)",
        )
    return ring


def open_engine(choice: str | None = None) -> tuple[CompletionEngine, str]:
    """The engine for a new loop and its name, ``"uring"`` or ``"emulated"``."""
    wanted = requested_engine(choice)
    if wanted == "emulated":
        return EmulatedRing(), "emulated"
    try:
        return open_uring(), "uring"
    except RingUnavailable as exc:
        if wanted == "uring":
            raise EngineUnavailable(
                "the uring engine (forkloop serve --loop proactor-uring, "
                f"{ENVIRONMENT_VARIABLE}=uring or engine='uring') asks for io_uring, but "
                f"{exc.strerror or exc}. The auto engine (--loop proactor, "
                f"{ENVIRONMENT_VARIABLE}=auto) falls back to the emulated engine; "
                "--loop proactor-emulated (=emulated) chooses it outright."
            ) from exc
        logger.warning(
            "the proactor uses its emulated engine (epoll) because %s", exc.strerror or exc
        )
        return EmulatedRing(), "emulated"
