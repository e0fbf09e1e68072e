"""Retrying transient store errors: exponential backoff with jitter, bounded in total time.

A request is retried while its errors are transient (the store's `classify` says so) and the
request's budget (`RetryPolicy.max_seconds`, `max_attempts`) is not spent; then the last error
is raised as `StoreUnavailableError`, naming the request, the attempts and the time spent.
Permanent errors are raised at once by the caller's classification.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ksuit.storage.errors import StoreUnavailableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request keeps trying: at most `max_attempts` attempts within `max_seconds`,
    waiting `first_delay`, then twice as long each time up to `max_delay` (with jitter)."""

    max_seconds: float = 120.0
    max_attempts: int = 20
    first_delay: float = 0.1
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.max_seconds <= 0 or self.max_attempts < 1 or self.first_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self!r}: budgets must be positive")

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (1-based), with full jitter above half."""
        base = min(self.max_delay, self.first_delay * 2.0 ** (attempt - 1))
        return float(base * (0.5 + random.random() / 2))


class Attempts:
    """Counts the attempts of one request (so a caller can tell a first try from a retry)."""

    def __init__(self) -> None:
        self.count = 0

    @property
    def retried(self) -> bool:
        return self.count > 1


async def with_retries(
    request: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    what: str,
    attempts: Attempts | None = None,
) -> T:
    """`await request()`, retried on transient errors within the policy's budget."""
    attempts = attempts if attempts is not None else Attempts()
    start = time.monotonic()
    while True:
        attempts.count += 1
        try:
            return await request()
        except Exception as e:
            if not is_transient(e):
                raise
            spent = time.monotonic() - start
            wait = policy.delay(attempts.count)
            if attempts.count >= policy.max_attempts or spent + wait > policy.max_seconds:
                raise StoreUnavailableError(
                    f"{what} failed {attempts.count} times in {spent:.1f} s with transient errors, the "
                    f"last: {describe(e)}; the store is unavailable or overloaded: try again later, or raise "
                    "the retry budget (RetryPolicy.max_seconds)"
                ) from e
            await asyncio.sleep(wait)


def describe(error: BaseException) -> str:
    """`Type: first line` of an error, for messages."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
