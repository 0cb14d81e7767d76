"""Fixtures shared by every suite: the loop backends under test, the TLS certificate.

Every test that takes the ``backend`` fixture runs once per registered loop
backend, and a backend with variants (the proactor's engines) once per variant
in its place, so each is held to the same contract. A registered backend that
cannot be built here fails loudly; set ``FORKLOOP_EXPECT_MISSING=name,...`` to
say a backend is known to be missing on this machine.
"""

from __future__ import annotations

import os

import pytest

from forkloop.server import backends
from tests.certificates import Certificate, make_certificate
from tests.loop_under_test import LoopUnderTest


def loops_under_test() -> list[LoopUnderTest]:
    """Each backend, or its variants in its place (``proactor-uring``, ``proactor-emulated``)."""
    tested: list[LoopUnderTest] = []
    for name in backends.names():
        if backends.get(name).variant_of is not None:
            continue  # tested in its parent's place
        tested.extend(LoopUnderTest(each) for each in backends.variants(name) or [name])
    return tested


def _expected_missing() -> set[str]:
    return {n for n in os.environ.get("FORKLOOP_EXPECT_MISSING", "").split(",") if n}


@pytest.fixture(params=loops_under_test(), ids=lambda variant: variant.id)
def backend(request: pytest.FixtureRequest) -> LoopUnderTest:
    variant: LoopUnderTest = request.param
    if not backends.is_available(variant.backend):
        if variant.backend in _expected_missing():
            pytest.skip(f"backend {variant.backend} declared missing by FORKLOOP_EXPECT_MISSING")
        pytest.fail(f"registered backend {variant.backend!r} cannot be imported here")
    return variant


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for localhost and 127.0.0.1 (`tests/certificates.py`)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))
