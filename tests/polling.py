"""Waiting on a condition instead of sleeping a fixed time."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` passes (False)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True
