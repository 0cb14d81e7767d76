"""What a load test found: one row per scenario run, tables in Markdown, one plot.

A `ScenarioRun` is one locust run of one scenario against one server (a
backend and a worker count): locust's own numbers (requests, failures,
requests/s, latency percentiles, requests/s second by second) next to the
server's (CPU seconds of its whole process tree, and how its ``/stats``
counters moved during the run). What can be derived from those is derived, not
stored: CPU µs per request, cache hit ratio, cancellations.

How to read the numbers:

- *requests/s* is what locust completed; on one machine the load generator
  competes with the server for the same cores, so the *load gen CPU* column
  says how busy locust was, in % of one core: near 100 % per locust process
  it is saturated, and the rate is the client's limit, not the server's (add
  ``--processes``). It includes locust's start-up, so short runs overstate it.
- *p50/p90/p99* are locust's percentiles, computed as locust does from its
  histogram of rounded response times: whole milliseconds below 100 ms (so
  ``<0.5`` is what locust records as 0), two significant digits above; *max*
  is exact. For ``cancel`` they are the client's own timeout, by design.
- *server CPU µs/req* is user + system time of the server's process tree
  during the run divided by the requests locust sent: what a request costs the
  server, the figure that survives a noisy machine best. ``-`` when the
  server runs elsewhere (``--host``), or when the whole run cost it under 5
  clock ticks of CPU (50 ms; ``/proc`` counts no finer), too little to divide.
- *cache hit ratio* is the share of cache lookups answered from the cache
  (HIT, STALE and UPDATING; coalesced followers are HITs) among all lookups;
  *coalesced* counts requests that waited for another's computation instead of
  computing; *cancelled* counts handlers the server cancelled (client
  disconnects, deadlines, shutdown).

`read_locust_results()` fills a run from the files locust leaves: its final
``--json-file`` statistics (one entry per request name, merged here) and the
failures the locustfile saves beside them. Not its CSV files: locust writes
those once a second and not at exit, so they lack the run's last second.
`markdown()` renders the report; `write_plot()` draws ``report.png`` with
matplotlib, imported only there (the ``Agg`` backend: no display needed).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..server.scoreboard import CANCEL_COUNTERS
from .servers import CLOCK_TICKS

MEASURABLE_CPU_TICKS = 5  # /proc counts CPU in clock ticks (10 ms): fewer is ±20 % or worse
CACHE_LOOKUPS = ("cache_hits", "cache_misses", "cache_stale", "cache_updating", "cache_bypass")
CACHE_ANSWERS = ("cache_hits", "cache_stale", "cache_updating")


@dataclass
class ScenarioRun:
    """One scenario run by locust against one server, and what the server counted meanwhile."""

    scenario: str
    backend: str  # a loop backend, or "remote" for --host
    workers: int | None  # None when the server runs elsewhere
    users: int
    duration: float
    requests: int = 0
    failures: int = 0
    load_seconds: float = 0.0  # first request started to last request answered
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    server_cpu_seconds: float | None = None
    server_counters: dict[str, int] = field(default_factory=dict)  # deltas over the run
    load_generator_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)  # (s into the run, req/s)
    failure_messages: list[str] = field(default_factory=list)
    files: str = ""  # locust's files, as a path prefix relative to the report
    error: str | None = None  # the run could not be made or measured: why
    shared_cache: bool = False  # the server ran --shared-cache on (one fill per key per server)

    @property
    def series(self) -> str:
        """The server this run measured, as a label: ``uvloop``, ``uvloop ×4``,
        ``uvloop ×4 shared`` (``--shared-cache on``), ``remote``."""
        label = self.backend
        if self.workers is not None and self.workers != 1:
            label += f" ×{self.workers}"
        return label + " shared" * self.shared_cache

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.load_seconds if self.load_seconds else 0.0

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def server_cpu_us_per_request(self) -> float | None:
        """None when unknown, or when the run used too few clock ticks of CPU to divide."""
        if self.server_cpu_seconds is None or not self.requests:
            return None
        if self.server_cpu_seconds < MEASURABLE_CPU_TICKS / CLOCK_TICKS:
            return None
        return self.server_cpu_seconds / self.requests * 1e6

    @property
    def load_generator_cpu_percent(self) -> float | None:
        """Locust's CPU time over the load's duration, in % of one core (start-up included)."""
        if not self.load_seconds:
            return None
        return self.load_generator_cpu_seconds / self.load_seconds * 100

    @property
    def cache_lookups(self) -> int:
        return sum(self.server_counters.get(name, 0) for name in CACHE_LOOKUPS)

    @property
    def cache_hit_ratio(self) -> float | None:
        lookups = self.cache_lookups
        if not lookups:
            return None
        return sum(self.server_counters.get(name, 0) for name in CACHE_ANSWERS) / lookups

    @property
    def coalesced(self) -> int:
        return self.server_counters.get("cache_coalesced", 0)

    @property
    def computations(self) -> int:
        """Handler runs that filled the cache: with single-flight, one per cold key (and
        per worker, unless the shared cache is on)."""
        return self.server_counters.get("cache_computations", 0)

    @property
    def cancellations(self) -> int:
        return sum(self.server_counters.get(name, 0) for name in CANCEL_COUNTERS)

    def to_json(self) -> dict[str, Any]:
        """Everything measured, and what is derived from it, for ``results.json``."""
        record = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for derived in (
            "series",
            "requests_per_second",
            "failure_ratio",
            "server_cpu_us_per_request",
            "load_generator_cpu_percent",
            "cache_hit_ratio",
            "coalesced",
            "cancellations",
        ):
            record[derived] = getattr(self, derived)
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in record.items()
        }


# ------------------------------------------------------------------ reading


def percentile(response_times: dict[float, int], fraction: float) -> float:
    """Locust's percentile of a histogram of (rounded) response times: the same figure it prints."""
    total = sum(response_times.values())
    if not total:
        return math.nan
    within = int(total * fraction)
    counted = 0
    for response_time in sorted(response_times, reverse=True):
        counted += response_times[response_time]
        if total - counted <= within:
            return response_time
    return min(response_times)


def rate_by_second(
    per_second: dict[int, int], started: float, ended: float
) -> list[tuple[float, float]]:
    """Requests/s for each wall-clock second of a run, as (seconds since its start, rate).

    The first and last seconds are partly outside the run; their counts are
    divided by the part inside (and dropped when it is under a fifth of a second).
    """
    history = []
    for second in range(int(started), int(ended) + 1):
        inside = min(second + 1, ended) - max(second, started)
        if inside >= 0.2:
            history.append((second + 0.5 - started, per_second.get(second, 0) / inside))
    return history


def read_locust_results(run: ScenarioRun, prefix: Path) -> None:
    """Fill ``run`` from locust's final statistics (``--json-file``) and failures.

    Locust writes its CSV files once a second and not again at exit, so they
    lack the run's last second; the JSON file is written after the last user
    stopped. It holds one entry per request name, merged here, and no
    failures: the locustfile saves those next to it (``_failures.json``).
    """
    entries = json.loads(Path(f"{prefix}.json").read_text())
    response_times: Counter[float] = Counter()
    per_second: Counter[int] = Counter()
    for entry in entries:
        run.requests += entry["num_requests"]
        run.failures += entry["num_failures"]
        response_times.update({float(ms): n for ms, n in entry["response_times"].items()})
        per_second.update({int(second): n for second, n in entry["num_reqs_per_sec"].items()})
    if entries:
        run.max_ms = max(entry["max_response_time"] for entry in entries)
        started = min(entry["start_time"] for entry in entries)
        last = max(entry["last_request_timestamp"] or started for entry in entries)
        run.load_seconds = max(last - started, 0.0)
    run.p50_ms = percentile(response_times, 0.50)
    run.p90_ms = percentile(response_times, 0.90)
    run.p99_ms = percentile(response_times, 0.99)
    if per_second and run.load_seconds:
        run.history = rate_by_second(per_second, started, last)
    failures_path = Path(f"{prefix}_failures.json")
    failures = json.loads(failures_path.read_text()) if failures_path.exists() else []
    failures.sort(key=lambda failure: -failure["occurrences"])
    run.failure_messages = [
        f"{failure['occurrences']:,} × {failure['method']} {failure['name']}: {failure['error']}"
        for failure in failures[:10]
    ]
    if run.failures and not failures:
        run.failure_messages.append(f"what failed is in {run.files}.html")


# ---------------------------------------------------------------- rendering


def _number(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _latency(value: float) -> str:
    """A percentile as locust measures it: whole ms below 100 ms, so 0 means under half a ms."""
    if math.isnan(value):
        return "-"
    return "<0.5" if value == 0 else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


TABLE_HEAD = (
    "| backend | workers | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | failures "
    "| server CPU µs/req | cache hit ratio | coalesced | computations | cancelled "
    "| load gen CPU |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _workers(run: ScenarioRun) -> str:
    """The workers cell: ``4``, or ``4 + shared cache`` with ``--shared-cache on``."""
    return str(run.workers or "-") + " + shared cache" * run.shared_cache


def table_row(run: ScenarioRun) -> str:
    if run.error is not None:
        return f"| {run.backend} | {_workers(run)} | {run.error} |" + " |" * 12
    failures = f"{run.failures:,}" + (f" ({run.failure_ratio:.2%})" if run.failures else "")
    cells = [
        run.backend,
        _workers(run),
        f"{run.requests:,}",
        _number(run.requests_per_second),
        _latency(run.p50_ms),
        _latency(run.p90_ms),
        _latency(run.p99_ms),
        _number(run.max_ms, 1),
        failures,
        _number(run.server_cpu_us_per_request, 1),
        _ratio(run.cache_hit_ratio),
        f"{run.coalesced:,}" if run.server_counters else "-",
        f"{run.computations:,}" if run.server_counters else "-",
        f"{run.cancellations:,}" if run.server_counters else "-",
        _number(run.load_generator_cpu_percent) + " %",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(
    runs: list[ScenarioRun],
    scenarios: dict[str, str],
    metadata: dict[str, str],
    violations: list[str],
) -> str:
    """``report.md``: a verdict, one table per scenario, the failures seen, the run's metadata."""
    lines = ["# forkloop load test", ""]
    if violations:
        lines += ["**Failed:**", ""] + [f"- {violation}" for violation in violations] + [""]
    else:
        lines += ["**Passed:** no failed request, every SLO met.", ""]
    lines += ["![requests/s, p99 and requests/s over time](report.png)", ""]
    for scenario, description in scenarios.items():
        rows = [run for run in runs if run.scenario == scenario]
        if not rows:
            continue
        lines += [f"## {scenario}", "", description, "", TABLE_HEAD]
        lines += [table_row(run) for run in rows]
        lines.append("")
        for run in rows:
            for message in run.failure_messages:
                if "\n" in message:  # a log's tail: keep its lines
                    lines += [
                        f"- {run.series}:",
                        "",
                        "  ```",
                        *textwrap.indent(message, "  ").splitlines(),
                        "  ```",
                    ]
                else:
                    lines.append(f"- {run.series}: {message}")
        links = [f"[{run.series}]({run.files}.html)" for run in rows if run.error is None]
        if links:
            lines += ["", "locust's reports: " + ", ".join(links), ""]
    lines += ["## Run", ""]
    lines += [f"- {name}: {value}" for name, value in metadata.items()]
    return "\n".join(lines) + "\n"


def _short_number(value: float) -> str:
    """``950``, ``12.3k``, ``1.2M``: a bar label that fits above a narrow bar."""
    if value is None or math.isnan(value) or value <= 0:
        return ""
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _short_latency(milliseconds: float) -> str:
    """Two significant figures: ``0.42``, ``3.1``, ``57``, ``1.2k`` (milliseconds)."""
    if milliseconds is None or math.isnan(milliseconds) or milliseconds <= 0:
        return ""
    if milliseconds >= 1000:
        return _short_number(milliseconds)
    return f"{milliseconds:.2g}" if milliseconds < 100 else f"{milliseconds:.0f}"


def write_plot(runs: list[ScenarioRun], path: str, title: str) -> None:
    """``report.png``: requests/s and p99 per scenario and server, and requests/s over time."""
    import matplotlib.pyplot as plt

    figure = plot(runs, title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot(runs: list[ScenarioRun], title: str) -> Any:
    """The report's figure: titles name only the scenarios that ran, each run's line
    starts at its scenario's marker on the time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [run for run in runs if run.error is None]
    scenarios = list(dict.fromkeys(run.scenario for run in measured))
    series = list(dict.fromkeys(run.series for run in measured))
    colours = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(series)}
    by_key = {(run.scenario, run.series): run for run in measured}

    figure = plt.figure(figsize=(13, 8.5), layout="constrained")
    grid = figure.add_gridspec(2, 2)
    rate_axes = figure.add_subplot(grid[0, 0])
    p99_axes = figure.add_subplot(grid[0, 1])
    time_axes = figure.add_subplot(grid[1, :])
    figure.suptitle(title, fontsize=11)

    width = 0.8 / max(len(series), 1)
    # Upright labels while they fit beside each other; turned when the bars are narrow.
    upright = len(series) * len(scenarios) <= 12
    label_style: dict[str, Any] = {
        "fontsize": 8 if upright else 7,
        "rotation": 0 if upright else 90,
        "padding": 2,
    }
    for index, name in enumerate(series):
        positions = [s + (index - (len(series) - 1) / 2) * width for s in range(len(scenarios))]
        rates = [getattr(by_key.get((s, name)), "requests_per_second", 0) for s in scenarios]
        p99s = [getattr(by_key.get((s, name)), "p99_ms", math.nan) for s in scenarios]
        bars = rate_axes.bar(positions, rates, width, label=name, color=colours[name])
        rate_axes.bar_label(bars, labels=[_short_number(r) for r in rates], **label_style)
        bars = p99_axes.bar(positions, p99s, width, label=name, color=colours[name])
        p99_axes.bar_label(bars, labels=[_short_latency(p) for p in p99s], **label_style)
    for axes, label in ((rate_axes, "requests/s"), (p99_axes, "p99 latency, ms (log)")):
        axes.set_xticks(range(len(scenarios)), scenarios)
        axes.set_ylabel(label)
        axes.grid(axis="y", alpha=0.3)
    rate_axes.set_title("requests/s per scenario")
    rate_axes.margins(y=0.25)
    p99_axes.set_title(
        "p99 latency per scenario"
        + (" (cancel: the client's timeout)" if "cancel" in scenarios else "")
    )
    p99_axes.set_yscale("log")
    p99_axes.margins(y=0.25)
    if series:
        rate_axes.legend(fontsize=8)

    # each scenario gets a slot of the same length on the time axis, in run order
    slot = max((run.duration for run in measured), default=1.0) * 1.1 + 1
    for position, scenario in enumerate(scenarios):
        start = position * slot
        time_axes.axvline(start, color="grey", alpha=0.3, linestyle="--")
        time_axes.text(start + 0.2, 1.0, scenario, transform=time_axes.get_xaxis_transform(),
                       va="top", fontsize=8, color="dimgrey")  # fmt: skip
        for name in series:
            run = by_key.get((scenario, name))
            if run is not None and run.history:
                seconds, run_rates = zip(*run.history, strict=True)
                # from the scenario's marker: the run's first rate holds from its start
                time_axes.plot(
                    [start, *(start + second for second in seconds)],
                    [run_rates[0], *run_rates],
                    color=colours[name],
                    label=name if position == 0 else None,
                    linewidth=1.2,
                )
    time_axes.set_title(
        "requests/s over time, second by second"
        + (" (scenarios one after another)" if len(scenarios) > 1 else f" ({', '.join(scenarios)})")
    )
    time_axes.set_xlabel("seconds")
    time_axes.set_ylabel("requests/s (log)")
    time_axes.grid(alpha=0.3)
    time_axes.set_yscale("log")
    if series:
        time_axes.legend(fontsize=8, loc="upper right")
    return figure
