"""Readiness-based (Reactor) event loop on epoll."""
