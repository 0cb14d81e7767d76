"""The proactor's engines as loop backends: ``proactor-uring``, ``proactor-emulated`` and the alias.

``--loop proactor`` picks the engine when the loop is built; the two engine
backends name theirs, so a deployment (or a test) chooses an engine the way it
chooses any loop, through the backend registry, and no environment variable
carries the choice from the command line into the loop.
"""

from __future__ import annotations

import pytest
from completion_support import new_loop

from forkloop import proactor
from forkloop.proactor import engine
from forkloop.proactor.emulated import EmulatedRing
from forkloop.proactor.ring import Ring
from forkloop.server import backends


def test_the_engine_backends_are_variants_of_the_proactor() -> None:
    assert backends.variants("proactor") == ["proactor-uring", "proactor-emulated"]
    assert backends.get("proactor-uring").variant_of == "proactor"
    assert "proactor-uring" not in backends.available()  # lists name the parent only
    assert "proactor" in backends.available()


@pytest.mark.parametrize(
    ("name", "engine_name", "ring_class"),
    [("proactor-uring", "uring", Ring), ("proactor-emulated", "emulated", EmulatedRing)],
)
def test_an_engine_backend_builds_its_engine_whatever_the_environment_says(
    name: str, engine_name: str, ring_class: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_loop("uring").close()  # fails loudly here if io_uring is missing
    other = "emulated" if engine_name == "uring" else "uring"
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, other)
    loop = backends.get(name).new_event_loop()
    try:
        assert isinstance(loop, proactor.EventLoop)
        assert loop.engine_name == engine_name
        assert isinstance(loop._ring, ring_class)
    finally:
        loop.close()


def test_the_proactor_backend_still_takes_the_environment_as_a_user_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, "emulated")
    loop = backends.get("proactor").new_event_loop()
    try:
        assert loop.engine_name == "emulated"
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("loop", "engine_name", "chosen"),
    [
        ("proactor", None, "proactor"),
        ("proactor", "auto", "proactor"),
        ("proactor", "uring", "proactor-uring"),
        ("proactor", "emulated", "proactor-emulated"),
        ("proactor-uring", "emulated", "proactor-emulated"),
        ("proactor-emulated", "auto", "proactor"),
        ("reactor", "uring", "reactor"),
        ("auto", "emulated", "auto"),
    ],
)
def test_proactor_engine_is_an_alias_of_the_engine_backends(
    loop: str, engine_name: str | None, chosen: str
) -> None:
    assert backends.with_proactor_engine(loop, engine_name) == chosen


def test_an_unknown_proactor_engine_names_the_choices() -> None:
    with pytest.raises(backends.BackendUnavailable, match="auto, uring, emulated"):
        backends.with_proactor_engine("proactor", "iocp")
