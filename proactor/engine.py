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
``prepare_accept`` (multishot when ``capabilities.multishot_accept``),
``prepare_recv_provided`` from one buffer group per loop (multishot when
``capabilities.multishot_recv``) or ``prepare_recv`` into a buffer of the
caller's, ``prepare_send``, ``prepare_sendmsg``, ``prepare_poll_add`` (one-shot),
``prepare_cancel`` by user_data, ``prepare_close``; ``provide_buffers``;
``submit(wait_for, timeout)`` and ``completions()``; ``close()``. Results are
io_uring's: a byte count or ``-errno``; ``IORING_CQE_F_MORE`` on every
completion of a multishot operation except its last.

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

from . import abi
from .emulated import EmulatedRing
from .ring import Ring, RingUnavailable

ENVIRONMENT_VARIABLE = "FORKLOOP_PROACTOR_ENGINE"
ENGINE_CHOICES = ("auto", "uring", "emulated")

# Submission queue size: more operations than this in one iteration cost an early enter.
RING_ENTRIES = 1024
# One provided-buffer group per loop. Buffers go back to the kernel as soon as
# their bytes are copied out, so they only need to cover the completions of one
# iteration; a group that runs dry ends a multishot recv with -ENOBUFS and the
# transport re-arms it. 512 x 16 KiB is 8 MiB of address space per loop.
RECEIVE_BUFFER_COUNT = 512
RECEIVE_BUFFER_SIZE = 16 * 1024
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

Engine = Ring | EmulatedRing


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


def open_engine(choice: str | None = None) -> tuple[Engine, str]:
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
