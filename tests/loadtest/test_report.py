"""The load test's figure: titles, value labels and the time axis, read from the figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from forkloop.loadtest.report import ScenarioRun, plot  # noqa: E402


def run(scenario: str, backend: str, rate: float, p99: float, first_second: float) -> ScenarioRun:
    measured = ScenarioRun(scenario, backend, 1, users=10, duration=5)
    measured.requests = int(rate * 5)
    measured.load_seconds = 5.0
    measured.p99_ms = p99
    measured.history = [(first_second + second, rate) for second in range(5)]
    return measured


def titles(figure) -> list[str]:
    return [axes.get_title() for axes in figure.axes]


def test_titles_mention_only_scenarios_that_ran():
    figure = plot([run("hello", "uvloop", 12345, 0.42, 0.4)], "title")
    try:
        assert not any("cancel" in title for title in titles(figure)), titles(figure)
        assert any("(hello)" in title for title in titles(figure)), titles(figure)
    finally:
        plt.close(figure)
    figure = plot(
        [run("hello", "uvloop", 100, 1, 0.3), run("cancel", "uvloop", 100, 100, 0.3)], "title"
    )
    try:
        assert any("cancel: the client's timeout" in title for title in titles(figure))
        assert any("one after another" in title for title in titles(figure))
    finally:
        plt.close(figure)


def test_value_labels_are_short_and_upright_when_they_fit():
    runs = [run("hello", "uvloop", 12345, 0.42, 0.4), run("hello", "asyncio", 950, 57.3, 0.4)]
    figure = plot(runs, "title")
    try:
        rate_axes, p99_axes = figure.axes[0], figure.axes[1]
        rate_labels = {text.get_text(): text.get_rotation() for text in rate_axes.texts}
        p99_labels = {text.get_text() for text in p99_axes.texts}
    finally:
        plt.close(figure)
    assert rate_labels == {"12k": 0.0, "950": 0.0}, rate_labels
    assert p99_labels == {"0.42", "57"}, p99_labels


def test_each_runs_line_starts_at_its_scenarios_marker():
    runs = [
        run("hello", "uvloop", 1000, 1, 0.45),
        run("hello", "asyncio", 800, 1, 0.2),
        run("cached", "uvloop", 900, 2, 0.35),
    ]
    figure = plot(runs, "title")
    try:
        time_axes = figure.axes[2]
        markers = sorted(line.get_xdata()[0] for line in time_axes.lines if _vertical(line))
        starts = sorted(line.get_xdata()[0] for line in time_axes.lines if not _vertical(line))
    finally:
        plt.close(figure)
    assert len(markers) == 2
    assert starts == [markers[0], markers[0], markers[1]], (starts, markers)


def _vertical(line) -> bool:
    xs = line.get_xdata()
    return len(xs) == 2 and xs[0] == xs[1]
