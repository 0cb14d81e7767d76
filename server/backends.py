"""The one place that decides which event loop runs.

A backend is a name and a loop factory. The server never asks which backend it
runs on: it asks the registry for a factory, builds a loop and talks to it only
through the `asyncio.AbstractEventLoop` interface. That is what keeps stdlib
asyncio, uvloop and forkloop's own loops drop-in peers.

Factories are named as ``"module:attribute"`` and imported on first use, so a
backend whose module is missing (uvloop off CPython, say) costs nothing until it
is asked for, and then fails with a sentence that names the choices.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from dataclasses import dataclass

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# name -> ("module:attribute" of a zero-argument loop factory, one line for --help)
_REGISTRY: dict[str, tuple[str, str]] = {
    "asyncio": ("asyncio:SelectorEventLoop", "the standard library's selector loop"),
    "uvloop": ("uvloop:new_event_loop", "libuv-based loop written in Cython"),
    "reactor": ("forkloop.reactor:new_event_loop", "forkloop's hand-built epoll loop"),
    "proactor": ("forkloop.proactor:new_event_loop", "forkloop's io_uring completion loop"),
}


class BackendUnavailable(LookupError):
    """The requested backend is unknown or cannot be imported here."""


@dataclass(frozen=True)
class Backend:
    name: str
    target: str
    description: str

    def loop_factory(self) -> LoopFactory:
        module_name, _, attribute = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailable(
                f"loop backend {self.name!r} is not available here ({exc}); "
                f"available: {', '.join(available()) or 'none'}"
            ) from exc
        return getattr(module, attribute)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop_factory()()


def register(name: str, target: str, description: str = "") -> None:
    """Add a backend: ``register("myloop", "mypackage:new_event_loop")``."""
    _REGISTRY[name] = (target, description)


def names() -> list[str]:
    """Every registered backend, available here or not."""
    return list(_REGISTRY)


def get(name: str) -> Backend:
    try:
        target, description = _REGISTRY[name]
    except KeyError:
        raise BackendUnavailable(
            f"unknown loop backend {name!r}; choose one of: {', '.join(_REGISTRY)}"
        ) from None
    return Backend(name, target, description)


def is_available(name: str) -> bool:
    module_name = _REGISTRY[name][0].partition(":")[0]
    try:
        importlib.import_module(module_name)
    except ImportError:
        return False
    return True


def available() -> list[str]:
    """Registered backends whose module imports here."""
    return [name for name in _REGISTRY if is_available(name)]


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
