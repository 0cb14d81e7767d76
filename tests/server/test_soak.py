"""The soak script, short: a mixed load on a real master and workers, nothing lost or leaked.

CI runs `loadtest/soak.py --short` (20 s of load) on one backend: forkloop's
own reactor, the loop most likely to leak, or the one named by
``FORKLOOP_SOAK_LOOP``. A backend that cannot be imported fails the test; it is
never replaced by another. Twenty seconds cannot measure a slow leak; they do
catch a failed request, a descriptor left behind and a steep climb. The
10-minute run is in the README.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from forkloop.loadtest.soak import slope_per_minute
from forkloop.server import backends


def soak_loop() -> str:
    """The backend to soak: the reactor, or ``FORKLOOP_SOAK_LOOP``; it must be importable."""
    wanted = os.environ.get("FORKLOOP_SOAK_LOOP", "reactor")
    assert wanted in backends.names(), f"FORKLOOP_SOAK_LOOP={wanted!r} is not a loop backend"
    assert backends.is_available(wanted), f"the {wanted} backend cannot be imported here"
    return wanted


@pytest.mark.timeout(150)
def test_short_soak_fails_no_request_and_leaves_no_descriptor_behind():
    loop = soak_loop()
    result = subprocess.run(
        [sys.executable, "-m", "forkloop.loadtest.soak", "--short", "--loops", loop],
        capture_output=True,
        text=True,
        timeout=140,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {loop} |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert int(cells[1]) > 1000, report  # requests: the load really ran
    assert cells[3] == "0" and cells[-2] == "0" and cells[-1] == "ok", report


def test_slope_is_a_least_squares_fit_per_minute():
    assert slope_per_minute([(0, 10), (30, 15), (60, 20)]) == pytest.approx(10)
    assert slope_per_minute([(0, 5), (10, 7), (20, 3), (30, 5)]) == pytest.approx(-2.4)
    assert slope_per_minute([(5, 1)]) == 0.0
