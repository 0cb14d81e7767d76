"""forkloop's HTTP/1.1 server: routing, the connection layer, workers."""

from .app import App, Route
from .http import HeaderError, Headers, Request, Response

__all__ = ["App", "HeaderError", "Headers", "Request", "Response", "Route"]
