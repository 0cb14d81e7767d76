"""``forkloop bench --asgi``: one short real run, and its tables and verdicts on known figures.

The real run is the command a user types, shortened to one one-second round
per workload with no warm-up, on forkloop's asyncio backend and uvicorn: it
must print a table per workload whose rows hold numbers (the figures
themselves are not judged: tests never assert on speed). The other tests
feed the table and the targets known measurements.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from forkloop.loadtest import asgi_bench
from forkloop.loadtest.asgi_bench import WORKLOADS, format_table, target_verdicts, wrk_script
from forkloop.loadtest.bench import Measurement
from forkloop.loadtest.servers import CpuTime

FORKLOOP_HAS_WEBSOCKETS = importlib.util.find_spec("forkloop.server.websocket") is not None
NEEDED = ("uvicorn", "fastapi", "websockets")


def run_bench(*arguments: str, timeout: float = 55) -> subprocess.CompletedProcess[str]:
    """``forkloop bench --asgi ARGUMENTS`` through the ``forkloop`` command's entry point."""
    command = [sys.executable, "-c", "import sys; from forkloop.server.cli import main; "
               "sys.exit(main())", "bench", "--asgi", *arguments]  # fmt: skip
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"forkloop bench --asgi took more than {timeout} s:\n{exc.stderr}")


def tables(output: str) -> dict[str, dict[str, list[str]]]:
    """Each workload's table: row name -> its cells, the header row under ``server``."""
    found: dict[str, dict[str, list[str]]] = {}
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        if line.startswith("**"):
            workload = line.split("(", 1)[1].split(")", 1)[0]
            rows = found[workload] = {}
        elif line.startswith("| "):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return found


def column(table: dict[str, list[str]], row: str, name: str) -> str:
    return table[row][table["server"].index(name)]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


@pytest.mark.timeout(60)
def test_bench_asgi_prints_a_table_of_numbers_per_workload_for_forkloop_and_uvicorn():
    for module in NEEDED:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"forkloop bench --asgi needs {module}: pip install -e '.[loadtest]'")
    if shutil.which("wrk") is None:
        pytest.skip("forkloop bench needs wrk: apt-get install wrk")
    short = ["--duration", "1", "--rounds", "1", "--warmup", "0", "--connections", "4"]
    finished = run_bench("--loops", "asyncio", "--peers", "uvicorn", *short)
    assert finished.returncode == 0, finished.stderr[-3000:]

    found = tables(finished.stdout)
    assert list(found) == list(WORKLOADS)
    for workload, table in found.items():
        unit = "msg" if workload == "websocket" else "req"
        assert list(table) == ["server", "forkloop asyncio", "uvicorn"], workload
        measured = ["uvicorn"]
        if workload != "websocket" or FORKLOOP_HAS_WEBSOCKETS:
            measured.append("forkloop asyncio")
        else:
            assert table["forkloop asyncio"][0].startswith("not supported yet")
        for server in measured:
            assert number(column(table, server, f"{unit}/s")) > 0, (workload, server)
            total = number(column(table, server, f"total µs/{unit}"))
            user = number(column(table, server, f"user µs/{unit}"))
            assert total >= user >= 0, (workload, server)
            assert number(column(table, server, "user vs uvicorn")) >= 0
            assert column(table, server, "errors") == "0", (workload, server)
        assert column(table, "uvicorn", "user vs uvicorn") == "1.00x"
        assert "user vs granian" not in table["server"]  # granian did not run

    verdicts = [line for line in finished.stdout.splitlines() if line.startswith("Target: ")]
    assert len(verdicts) == 2
    assert "forkloop asyncio at " in verdicts[0]
    assert verdicts[1].endswith("not judged (granian was not measured).")


def test_an_unknown_workload_is_refused_with_the_known_names():
    finished = run_bench("--workloads", "hello,graphql", timeout=30)
    assert finished.returncode == 2
    assert "unknown workload 'graphql'; known: hello, fastapi, echo, websocket" in finished.stderr


# ------------------------------------------------------------- known figures


def measured(requests: int, user: float, system: float, rate: float = 1000.0) -> Measurement:
    """A measurement of ``requests`` requests that cost ``user`` and ``system`` CPU seconds."""
    measurement = Measurement()
    run = {"requests": requests, "seconds": 1.0, "rate": rate, "p50_ms": 0.5, "p99_ms": 2.0}
    measurement.add({**run, "errors": 0}, CpuTime(user, system))
    return measurement


def test_the_table_compares_every_row_with_uvicorn_and_granian_and_explains_empty_rows():
    results = {
        "forkloop reactor": measured(1000, 0.004, 0.006),  # 4 + 6 µs per request
        "forkloop uvloop": "did not start (its error is on stderr)",
        "uvicorn": measured(1000, 0.010, 0.010),
        "granian": measured(1000, 0.005, 0.015),
    }
    table = format_table(WORKLOADS["hello"], results, "1 worker(s)", "wrk -c50")
    rows = tables(table)["hello"]
    assert rows["server"][-5:] == [
        "user vs uvicorn", "total vs uvicorn", "user vs granian", "total vs granian", "errors"
    ]  # fmt: skip
    assert rows["forkloop reactor"][3:] == ["4.00", "6.00", "10.00", "0.40x", "0.50x", "0.80x",
                                            "0.50x", "0"]  # fmt: skip
    assert rows["forkloop uvloop"] == ["did not start (its error is on stderr)"] + ["-"] * 10
    assert len({len(cells) for cells in rows.values()}) == 1


def test_targets_are_judged_on_the_best_forkloop_backend_for_each():
    results = {
        "forkloop asyncio": measured(1000, 0.004, 0.010),  # user 4, total 14
        "forkloop reactor": measured(1000, 0.006, 0.006),  # user 6, total 12
        "uvicorn": measured(1000, 0.010, 0.010),
        "granian": measured(1000, 0.005, 0.005),  # total 10
    }
    assert target_verdicts(results) == [
        "Target: forkloop's best backend at <= 0.5x uvicorn's user CPU per request: "
        "forkloop asyncio at 0.40x, met.",
        "Target: forkloop's best backend at <= 1.0x granian's total CPU per request: "
        "forkloop reactor at 1.20x, not met, 1.20x the target.",
    ]


def test_the_echo_script_posts_ten_kibibytes_and_pipelines_when_asked():
    script = wrk_script(WORKLOADS["echo"], pipeline=4)
    assert 'wrk.method = "POST"' in script
    assert f'string.rep("x", {asgi_bench.ECHO_BYTES})' in script
    assert "for i = 1, 4 do batch[i] = wrk.format() end" in script
    assert "init" not in wrk_script(WORKLOADS["hello"], pipeline=1)
