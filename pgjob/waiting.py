"""The one polling helper every wait in pgjob goes through."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def until(predicate: Callable[[], T], timeout: float, interval: float = 0.1,
          max_interval: float | None = None) -> T | None:
    """Call `predicate` until it returns something truthy or `timeout` seconds pass.

    Returns the truthy value, or None on timeout. With `max_interval`, the pause doubles
    after each miss up to that bound (backoff for waits that may be long).
    """
    deadline = time.monotonic() + timeout
    pause = interval
    while True:
        result = predicate()
        if result:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        if max_interval is not None:
            pause = min(pause * 2, max_interval)
