"""Opening a ring loudly, and bounded waits on it, for the engine tests.

The engine's tests never skip quietly. When io_uring cannot be set up here
they fail with the reason, unless ``FORKLOOP_EXPECT_NO_IO_URING=1`` declares
that this machine has no io_uring (a container whose seccomp profile blocks it,
an old kernel); then they are skipped with that reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from forkloop.proactor import abi
from forkloop.proactor.ring import Ring, RingUnavailable

Completion = tuple[int, int, int]
EXPECT_NO_IO_URING = os.environ.get("FORKLOOP_EXPECT_NO_IO_URING") == "1"
# The ring setup modes the engine tests run in: the kernel's default (DEFER_TASKRUN
# since 6.1), COOP_TASKRUN as on 5.19, and no setup flags at all as before 5.5; the
# older modes by narrowing the flag sets Ring tries (kernel._SETUP_ATTEMPTS).
SETUP_MODES = {
    "deferred": None,
    "cooperative": abi.SETUP_SUBMIT_ALL | abi.SETUP_COOP_TASKRUN | abi.SETUP_TASKRUN_FLAG,
    "plain": 0,
}


def open_ring(entries: int = 256, factory: type[Ring] = Ring, **options: object) -> Ring:
    """A Ring, or a loud failure (a declared skip) when io_uring is unavailable."""
    try:
        return factory(entries, **options)  # type: ignore[arg-type]
    except RingUnavailable as error:
        if EXPECT_NO_IO_URING:
            pytest.skip(f"FORKLOOP_EXPECT_NO_IO_URING=1 declares io_uring missing: {error}")
        pytest.fail(
            f"{error}. The io_uring engine tests must run; set FORKLOOP_EXPECT_NO_IO_URING=1 "
            "to declare that this machine has no io_uring.",
            pytrace=False,
        )


def collect(ring: Ring, count: int, timeout: float = 5.0) -> list[Completion]:
    """Submit what is queued and gather exactly the next ``count`` completions or fail."""
    gathered: list[Completion] = []
    deadline = time.monotonic() + timeout
    while len(gathered) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(gathered)} of {count} completions in {timeout} s: {gathered}"
        ring.submit(1, remaining)
        gathered.extend(ring.completions())
    assert len(gathered) == count, f"expected {count} completions, got {gathered}"
    return gathered


def run_until(
    ring: Ring,
    done: Callable[[], bool],
    handle: Callable[[Completion], None],
    timeout: float = 5.0,
) -> None:
    """Feed every completion to ``handle`` until ``done()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"condition not reached within {timeout} s"
        ring.submit(1, remaining)
        for completion in ring.completions():
            handle(completion)


def by_user_data(completions: list[Completion]) -> dict[int, list[Completion]]:
    grouped: dict[int, list[Completion]] = {}
    for completion in completions:
        grouped.setdefault(completion[0], []).append(completion)
    return grouped
