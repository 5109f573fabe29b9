"""Wait for something to become true, for the dev scripts, benches and deployment tests that drive services."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(what: str, check: Callable[[], T], timeout_s: float, *, every_s: float = 1.0, hint: str = "") -> T:
    """Call ``check`` every ``every_s`` until it returns something true, and return that.

    Raises:
        TimeoutError: ``check`` stayed false for ``timeout_s``; the message names ``what`` (and adds ``hint``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f"; {hint}" if hint else ""))
        time.sleep(every_s)
