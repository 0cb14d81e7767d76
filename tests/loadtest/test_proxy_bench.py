"""``forkloop bench --proxy``: a short real run against nginx, and its tables.

nginx and wrk are installed by setup.sh; the run is bounded (1 s per workload,
one round, a stampede of 30 clients on a 100 ms origin).
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_bench(*arguments: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``forkloop bench --proxy ARGUMENTS`` through the ``forkloop`` command's entry point."""
    command = [sys.executable, "-c", "import sys; from forkloop.server.cli import main; "
               "sys.exit(main())", "bench", "--proxy", *arguments]  # fmt: skip
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"forkloop bench --proxy took more than {timeout} s:\n{exc.stderr}")


def rows(output: str) -> list[dict[str, str]]:
    """Every table's rows as {column: cell}, tables one after another."""
    found: list[dict[str, str]] = []
    header: list[str] = []
    for line in output.splitlines():
        if not line.startswith("| "):
            header = [] if not line.startswith("|") else header
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not header:
            header = cells
        else:
            found.append(dict(zip(header, cells, strict=True)))
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


@pytest.mark.timeout(120)
def test_bench_proxy_measures_forkloop_and_nginx_side_by_side():
    finished = run_bench(
        "--loops", "reactor", "--duration", "1", "--rounds", "1", "--connections", "4",
        "--stampede", "30", "--origin-ms", "100",
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    measured = rows(finished.stdout)
    throughput = {row["proxy"]: row for row in measured if "hit req/s" in row}
    stampedes = {row["proxy"]: row for row in measured if "p99 ms" in row}
    assert list(throughput) == list(stampedes) == ["forkloop reactor", "nginx"]
    for proxy, row in throughput.items():
        assert number(row["hit req/s"]) > 0 and number(row["pass req/s"]) > 0, proxy
        assert number(row["hit total µs/req"]) >= number(row["hit user µs/req"]) > 0, proxy
        assert row["errors"] == "0", proxy
    assert throughput["nginx"]["total vs nginx"] == "1.00x"
    for proxy, row in stampedes.items():
        assert row["origin requests per stampede"] == "1", proxy
        assert row["failed"] == "0" and number(row["p99 ms"]) >= 100, proxy


def test_bench_proxy_names_what_it_lacks():
    finished = run_bench("--loops", "reactor", "--stampede", "0", timeout=30)
    assert finished.returncode == 2
    assert (
        finished.stderr.strip().splitlines()[-1]
        == "forkloop bench --proxy: --stampede must be 1 or more"
    )
