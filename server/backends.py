"""The one place that decides which event loop runs.

A backend is a name and a loop factory. The server never asks which backend it
runs on: it asks the registry for a factory, builds a loop and talks to it only
through the `asyncio.AbstractEventLoop` interface. That is what keeps stdlib
asyncio, uvloop and forkloop's own loops drop-in peers.

Factories are named as ``"module:attribute"`` and imported on first use, so a
backend whose module is missing (uvloop off CPython, say) costs nothing until it
is asked for, and then fails with a sentence that names the choices.

A backend may be a *variant* of another: the proactor runs on io_uring or on
its emulated engine, and each engine is a backend of its own
(``proactor-uring``, ``proactor-emulated``) beside ``proactor``, which picks
the engine when the loop is built. Variants are chosen by name; lists of
"every backend here" (`available`) name only the backends they are variants
of, and the tests run each variant in its parent's place (`variants`).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from dataclasses import dataclass

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# name -> ("module:attribute" of a zero-argument loop factory, one line for --help,
#          the backend this one is a variant of, or None)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "asyncio": ("asyncio:SelectorEventLoop", "the standard library's selector loop", None),
    "uvloop": ("uvloop:new_event_loop", "libuv-based loop written in Cython", None),
    "reactor": ("forkloop.reactor:new_event_loop", "forkloop's hand-built epoll loop", None),
    "proactor": (
        "forkloop.proactor:new_event_loop",
        "forkloop's io_uring completion loop (emulated on epoll where io_uring is refused)",
        None,
    ),
    "proactor-uring": (
        "forkloop.proactor:new_uring_event_loop",
        "the proactor on io_uring, or an error that says why io_uring is refused",
        "proactor",
    ),
    "proactor-emulated": (
        "forkloop.proactor:new_emulated_event_loop",
        "the proactor on its emulated engine (completions over epoll)",
        "proactor",
    ),
}

# ``--proactor-engine``, an older spelling of the proactor's backends: engine -> backend.
PROACTOR_ENGINE_BACKENDS = {
    "auto": "proactor",
    "uring": "proactor-uring",
    "emulated": "proactor-emulated",
}


class BackendUnavailable(LookupError):
    """The requested backend is unknown or cannot be imported here."""


@dataclass(frozen=True)
class Backend:
    name: str
    target: str
    description: str
    variant_of: str | None = None

    def loop_factory(self) -> LoopFactory:
        module_name, _, attribute = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailable(
                f"loop backend {self.name!r} is not available here ({exc}); "
                f"available: {', '.join(available()) or 'none'}"
            ) from exc
        factory: LoopFactory = getattr(module, attribute)
        return factory

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop_factory()()


def register(name: str, target: str, description: str = "", variant_of: str | None = None) -> None:
    """Add a backend: ``register("myloop", "mypackage:new_event_loop")``."""
    _REGISTRY[name] = (target, description, variant_of)


def names() -> list[str]:
    """Every registered backend, variants included, available here or not."""
    return list(_REGISTRY)


def variants(name: str) -> list[str]:
    """The backends registered as variants of ``name`` (the proactor's engines), in order."""
    return [other for other, entry in _REGISTRY.items() if entry[2] == name]


def get(name: str) -> Backend:
    try:
        target, description, variant_of = _REGISTRY[name]
    except KeyError:
        raise BackendUnavailable(
            f"unknown loop backend {name!r}; choose one of: {', '.join(_REGISTRY)}"
        ) from None
    return Backend(name, target, description, variant_of)


def is_available(name: str) -> bool:
    module_name = _REGISTRY[name][0].partition(":")[0]
    try:
        importlib.import_module(module_name)
    except ImportError:
        return False
    return True


def available() -> list[str]:
    """Registered backends whose module imports here, variants left out (they go by name)."""
    return [name for name, entry in _REGISTRY.items() if entry[2] is None and is_available(name)]


def loop_factory(name: str) -> LoopFactory:
    """The loop factory registered under ``name``; `BackendUnavailable` if none works."""
    return get(name).loop_factory()


def resolve(name: str) -> Backend:
    """``auto`` is the fastest backend available here; any other name is looked up."""
    if name == "auto":
        for preferred in ("uvloop", "asyncio"):
            if is_available(preferred):
                return get(preferred)
    return get(name)


def with_proactor_engine(name: str, engine: str | None) -> str:
    """The backend ``--loop name --proactor-engine engine`` asks for.

    ``--proactor-engine`` is an alias: on a proactor backend it chooses the
    proactor backend of that engine; on any other backend, as without it, it
    changes nothing.
    """
    if engine is None or name not in PROACTOR_ENGINE_BACKENDS.values():
        return name
    try:
        return PROACTOR_ENGINE_BACKENDS[engine]
    except KeyError:
        raise BackendUnavailable(
            f"unknown proactor engine {engine!r}; choose one of: "
            f"{', '.join(PROACTOR_ENGINE_BACKENDS)}"
        ) from None
