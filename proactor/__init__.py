"""Completion-based (Proactor) event loop: io_uring, with an emulated engine."""
