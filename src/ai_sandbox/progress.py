"""Nested, timed steps. The core reports; the CLI decides how to show them (rich) by adding a listener."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("ai_sandbox")

Listener = Callable[[str, str, float], None]  # (event: "start"|"done"|"fail"|"info", title, seconds)
_listeners: list[Listener] = []


def listen(fn: Listener) -> None:
    _listeners.append(fn)


def unlisten(fn: Listener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def _emit(event: str, title: str, seconds: float = 0.0) -> None:
    for fn in list(_listeners):
        fn(event, title, seconds)


def info(message: str) -> None:
    """A notice worth showing the user (not a step)."""
    log.info(message)
    _emit("info", message)


@contextmanager
def step(title: str) -> Iterator[None]:
    """A timed step: start, then done or fail with its duration."""
    t0 = time.monotonic()
    log.debug("step: %s", title)
    _emit("start", title)
    try:
        yield
    except BaseException:
        _emit("fail", title, time.monotonic() - t0)
        raise
    _emit("done", title, time.monotonic() - t0)
