"""Waiting inside a running loop for something the loop does, without a timed sleep.

`until` is the one way the suites wait for a condition from inside a loop: it
turns the loop (``await asyncio.sleep(0)``, never a sleep on the clock) until
the condition holds, and fails the test when it does not hold in time. Every
wait is bounded by the loop's clock; a test that says how *soon* something
happens (the waiters are woken within five turns) bounds it by turns as well.

Waits that span processes poll from outside any loop instead
(`tests/server/master_support.py`'s ``wait_for``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(
    predicate: Callable[[], object], *, timeout: float = 5.0, turns: int | None = None
) -> None:
    """Turn the loop until ``predicate()`` holds.

    Fails with an AssertionError after ``timeout`` seconds of the loop's clock;
    with ``turns``, also when ``predicate()`` was asked ``turns`` times (once
    before the loop first turns, then after each turn) and never held.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    asked = 1
    while not predicate():
        if turns is not None and asked >= turns:
            raise AssertionError(f"condition not reached within {turns} turns of the loop")
        if loop.time() >= deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(0)
        asked += 1
