"""Fixtures shared by every suite: the loop backends under test.

Every test that takes the ``backend`` fixture runs once per registered loop
backend (and once per engine for backends that have several), so each backend
is held to the same contract. A registered backend that cannot be built here
fails loudly; set ``FORKLOOP_EXPECT_MISSING=name,...`` to say a backend is
known to be missing on this machine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from forkloop.server import backends


@dataclass(frozen=True)
class LoopUnderTest:
    """One backend (and engine) as the tests see it."""

    id: str
    backend: str
    env: dict[str, str] = field(default_factory=dict)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return backends.get(self.backend).new_event_loop()

    def run(self, main: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
        """Run ``main()`` to completion on a fresh loop of this backend."""

        async def bounded() -> Any:
            async with asyncio.timeout(timeout):
                return await main()

        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(bounded())


# Backends with more than one engine list one LoopUnderTest per engine here.
ENGINE_VARIANTS: dict[str, list[LoopUnderTest]] = {}
ENGINE_VARIANTS["proactor"] = [
    LoopUnderTest("proactor-uring", "proactor", {"FORKLOOP_PROACTOR_ENGINE": "uring"}),
    LoopUnderTest("proactor-emulated", "proactor", {"FORKLOOP_PROACTOR_ENGINE": "emulated"}),
]


def loops_under_test() -> list[LoopUnderTest]:
    variants: list[LoopUnderTest] = []
    for name in backends.names():
        variants.extend(ENGINE_VARIANTS.get(name, [LoopUnderTest(name, name)]))
    return variants


def _expected_missing() -> set[str]:
    return {n for n in os.environ.get("FORKLOOP_EXPECT_MISSING", "").split(",") if n}


@pytest.fixture(params=loops_under_test(), ids=lambda variant: variant.id)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> LoopUnderTest:
    variant: LoopUnderTest = request.param
    if not backends.is_available(variant.backend):
        if variant.backend in _expected_missing():
            pytest.skip(f"backend {variant.backend} declared missing by FORKLOOP_EXPECT_MISSING")
        pytest.fail(f"registered backend {variant.backend!r} cannot be imported here")
    for key, value in variant.env.items():
        monkeypatch.setenv(key, value)
    return variant
