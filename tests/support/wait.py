"""Waiting for a condition: ``poll`` returns the last value, for a caller that asserts with its own message;
``wait_for`` raises ``WaitTimeout`` naming what it waited for; ``wait_for_async`` is ``wait_for`` inside an
event loop. Given the process a condition depends on, a wait ends with ``ProcessExited`` (and its output) as
soon as that process is gone, instead of running out the clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from tests.support.process import Proc, ProcessExited

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold in time: in a test, a failed expectation like any other (and not an OSError,
    as TimeoutError is, that a handler for network errors would swallow)."""


def poll(check: Callable[[], T], timeout: float, interval: float = 0.1, proc: Proc | None = None) -> T:
    """Call ``check`` every ``interval`` s until it returns a truthy value or ``timeout`` passes; the last
    value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise ProcessExited(f"{proc.name} exited with {proc.returncode}:\n{proc.tail()}")
        time.sleep(interval)
        value = check()
    return value


def wait_for(
    check: Callable[[], T], timeout: float, what: str, *, interval: float = 0.3, proc: Proc | None = None
) -> T:
    """``poll``, raising ``WaitTimeout`` when the condition never held. The default interval suits a check
    that runs a program (kubectl); a cheap check can poll faster."""
    value = poll(check, timeout, interval, proc)
    if not value:
        tail = f"\n{proc.tail()}" if proc is not None else ""
        raise WaitTimeout(f"timed out after {timeout} s waiting for {what} (last: {value!r}){tail}")
    return value


async def wait_for_async(check: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """``wait_for`` without blocking the event loop the condition depends on."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)
        value = check()
    return value
