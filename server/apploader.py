"""Finding and importing the user's app, as uvicorn and gunicorn users expect.

``forkloop serve mymodule:app`` run from the folder that holds ``mymodule.py``
works: before anything is imported, `prepare_import_path` changes to
``--chdir`` (if given) and puts ``--app-dir`` (the current directory by
default) first on ``sys.path``, the way uvicorn's ``--app-dir .`` and
gunicorn's ``--chdir`` do. forkloop itself installs under the one name
``forkloop``, so a user's ``server.py`` beside the app shadows nothing.

The master never imports the app: each worker does, so a reload (HUP) or a
``--reload`` restart imports the code as it is on disk now. The master does
call `check_importable` before it forks, which finds the module without
running it: a misspelt module name is then one line and exit 3 at once, not a
worker crash loop.

What is served is a front door (`server.frontdoor`): a forkloop `App` as it
is, or an ASGI application (Starlette, FastAPI, a bare ``async def app(scope,
receive, send)``, an ASGI 2 class) wrapped in `server.asgi.AsgiApp` with the
``--lifespan``, ``--root-path`` and ``--ws`` settings.

`load_app` turns every way an import can fail into one `AppLoadError` whose
message is one line a user can act on: which module, which file and line,
which exception (``mymodule.py:3: SyntaxError: invalid syntax``), or what
was expected when the name points at something else (a forkloop `App` or an
ASGI app, or a function returning one with ``--factory``). The full traceback
stays on the exception (``details``) for ``--log-level debug``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

from .config import Config

if TYPE_CHECKING:
    from .app import App
    from .asgi import AsgiApp
    from .asgi_cache import CachedAsgiApp
    from .frontdoor import FrontDoor
    from .proxy import ProxyFrontDoor
    from .proxy_cache import CachingProxy
    from .upstream import UpstreamSettings


class AppLoadError(ImportError):
    """The app cannot be loaded; ``str()`` is one line, ``details`` the traceback if any."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def base_directory(config: Config, launch_dir: str) -> str:
    """The directory the app's relative paths start from: ``--chdir``, else where we started."""
    if config.chdir is None:
        return launch_dir
    return os.path.join(launch_dir, config.chdir)


def prepare_import_path(config: Config, launch_dir: str) -> None:
    """``--chdir``, then ``--app-dir`` first on ``sys.path``; an error names the directory."""
    if config.chdir is not None:
        target = os.path.join(launch_dir, config.chdir)
        try:
            os.chdir(target)
        except OSError as exc:
            raise AppLoadError(f"cannot --chdir to {target}: {exc.strerror}") from None
    app_dir = os.path.abspath(os.path.join(base_directory(config, launch_dir), config.app_dir))
    if not os.path.isdir(app_dir):
        raise AppLoadError(f"--app-dir {app_dir} is not a directory")
    if sys.path[:1] != [app_dir]:
        sys.path.insert(0, app_dir)


def check_importable(config: Config) -> None:
    """The app's module can be found (not run): a cheap check before forking workers."""
    if config.app is None:
        return
    module_name = config.app.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:  # a parent package is missing or broken
        raise AppLoadError(_describe_failure(config.app, module_name, exc)) from None
    if spec is None:
        raise AppLoadError(_not_found(config.app, module_name, module_name))


def load_app(config: Config) -> FrontDoor:
    """The app ``config`` names (the demo app when none), with the config file's
    proxied prefixes in front of it; or an `AppLoadError`."""
    app = _load_front_door(config)
    if not config.proxy_routes:
        return app
    from .app import App
    from .cache import ResponseCache
    from .proxy_routes import ProxyPrefixes, WithProxiedPrefixes, build_proxy

    if isinstance(app, App):
        for route in config.proxy_routes:
            app.proxy(route.prefix, *route.upstreams, cache=route.cache, settings=_upstream(config))
        return app
    prefixes = ProxyPrefixes()
    for route in config.proxy_routes:
        cache = ResponseCache(config.cache_size) if route.cache else None
        prefixes.add(route.prefix, build_proxy(route.upstreams, _upstream(config), cache))
    return WithProxiedPrefixes(app, prefixes)


def _load_front_door(
    config: Config,
) -> App | AsgiApp | CachedAsgiApp | ProxyFrontDoor | CachingProxy:
    if config.upstreams:
        return _proxy(config)
    if config.app is None:
        from .demo import app

        return app
    target = import_app(config.app, factory=config.factory, asgi=config.interface != "native")
    if _is_app(target):
        if config.interface == "asgi":
            raise AppLoadError(
                f"{config.app} is a forkloop App, not an ASGI app (--interface asgi)"
            )
        return target  # type: ignore[no-any-return]
    from .asgi import AsgiApp

    try:
        asgi_app = AsgiApp(
            target,
            name=config.app,
            root_path=config.root_path,
            lifespan=config.lifespan,
            disconnect_grace=config.disconnect_grace,
            proxy_headers=config.proxy_headers,
            forwarded_allow_ips=config.forwarded_allow_ips,
            websocket=config.websocket,
        )
    except ValueError as exc:  # --ws websockets without the library
        raise AppLoadError(str(exc)) from None
    if not config.cache:
        return asgi_app
    from .asgi_cache import CachedAsgiApp
    from .cache import ResponseCache

    return CachedAsgiApp(asgi_app, ResponseCache(config.cache_size), config.cache_prefixes)


def _proxy(config: Config) -> ProxyFrontDoor | CachingProxy:
    from .cache import ResponseCache
    from .proxy import ProxyFrontDoor
    from .proxy_cache import CachingProxy, ProxyCacheSettings, purge_networks
    from .upstream import UpstreamPool

    proxy = ProxyFrontDoor(UpstreamPool(list(config.upstreams), _upstream(config)))
    if not config.cache:
        return proxy
    cache_settings = ProxyCacheSettings(
        prefixes=config.cache_prefixes,
        use_stale=config.proxy_cache_use_stale,
        finish_abandoned_fills=config.finish_abandoned_fills,
        purge_allow=purge_networks(config.purge_allow),
        scheme="https" if config.certfile else "http",
    )
    return CachingProxy(proxy, ResponseCache(config.cache_size), cache_settings)


def _upstream(config: Config) -> UpstreamSettings:
    from .upstream import UpstreamSettings

    return UpstreamSettings(
        connect_timeout=config.proxy_connect_timeout,
        send_timeout=config.proxy_send_timeout,
        read_timeout=config.proxy_read_timeout,
        keepalive=config.proxy_keepalive,
    )


def import_app(spec: str, factory: bool = False, asgi: bool = False) -> Any:
    """``"package.module:attribute"`` → the App it names (or, with ``asgi``, an ASGI
    application), with errors a user can act on."""
    from .asgi import looks_like_asgi

    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "app"
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # noqa: BLE001 - a SystemExit in a module is a failure too
        if not isinstance(exc, Exception | SystemExit):  # a stop signal, not the app's fault
            raise
        raise AppLoadError(
            _describe_failure(spec, module_name, exc), traceback.format_exc()
        ) from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            names = sorted(n for n in vars(module) if not n.startswith("_"))[:8]
            raise AppLoadError(
                f"{spec}: module {module_name!r} has no attribute {attribute!r}"
                + (f" (it has: {', '.join(names)})" if names else "")
            ) from None
    if factory:
        if not callable(target):
            raise AppLoadError(f"{spec} is {_a(target)}: --factory needs a function to call")
        try:
            target = target()
        except Exception as exc:  # noqa: BLE001 - reported as one line, traceback on debug
            raise AppLoadError(
                f"{spec}: the factory failed: {_last_line(exc)}", traceback.format_exc()
            ) from None
    if _is_app(target):
        return target
    if asgi and looks_like_asgi(target):
        return target
    if callable(target) and not factory and _returns_app(target):
        raise AppLoadError(f"{spec} is a function: add --factory to call it for the app")
    raise AppLoadError(
        f"{spec} is {_a(target)}, not a forkloop App (forkloop.server.App) or an ASGI app"
    )


# ---------------------------------------------------------------------- messages


def _describe_failure(spec: str, module_name: str, exc: BaseException) -> str:
    if (
        isinstance(exc, ModuleNotFoundError)
        and exc.name
        and (module_name == exc.name or module_name.startswith(exc.name + "."))
    ):
        return _not_found(spec, module_name, exc.name)
    return f"cannot import app module {module_name!r}: {_last_line(exc)}"


def _not_found(spec: str, module_name: str, missing: str) -> str:
    where = sys.path[0] if sys.path else os.getcwd()
    return (
        f"cannot import app module {module_name!r}: no module named {missing!r} in {where} "
        "or the installed packages (run from the app's folder, or use --app-dir / --chdir)"
    )


def _last_line(exc: BaseException) -> str:
    """``file:line: Type: message`` for the innermost frame (the file's own for a SyntaxError)."""
    if isinstance(exc, SyntaxError):
        where = f"{_short(exc.filename)}:{exc.lineno}: " if exc.filename else ""
        return f"{where}{type(exc).__name__}: {exc.msg}"
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<frozen")
    ]
    where = f"{_short(frames[-1].filename)}:{frames[-1].lineno}: " if frames else ""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{where}{type(exc).__name__}" + (f": {message}" if message else "")


def _short(filename: str) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return relative if not relative.startswith("..") else filename


def _a(value: object) -> str:
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _is_app(target: object) -> bool:
    from .app import App

    return isinstance(target, App)


def _returns_app(target: object) -> bool:
    try:
        return not inspect.signature(target).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
