"""When a failed step is tried again, and after how long: one policy for the
Celery tasks and the embedded server alike.

A refusal (bad input) and a missing record are never retried; a storage or
network hiccup (``TransientError``) is retried often; any other error a couple
of times, in case it was a passing fault, then the image is failed with the
reason. Delays grow exponentially with jitter, so the retries of a burst spread out.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from chexmask.errors import NotFound, RefusedInput, TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    transient_retries: int = 5  # TransientError: a storage or network hiccup
    unexpected_retries: int = 2  # any other error but a refusal or a missing record
    backoff_s: float = 5.0
    backoff_max_s: float = 600.0  # stays under the broker's visibility timeout
    # Attempts that may end with no outcome at all (the worker process died, e.g. an
    # image that crashes a decoder) before the image is failed instead of redelivered.
    max_attempts: int = 10

    def retries_for(self, exc: BaseException) -> int:
        if isinstance(exc, (RefusedInput, NotFound)):
            return 0
        return self.transient_retries if isinstance(exc, TransientError) else self.unexpected_retries

    def delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (0-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2**retry) * random.uniform(0.5, 1.0)

    def next_delay(self, exc: BaseException, retries_done: int) -> float | None:
        """Seconds to wait before trying again after ``exc``, or None to give up."""
        return self.delay(retries_done) if retries_done < self.retries_for(exc) else None

    def run(
        self,
        work: Callable[[], T],
        on_retry: Callable[[BaseException, float], None] = lambda e, d: None,
        sleep: Callable[[float], object] = time.sleep,
    ) -> T:
        """``work()`` in this thread, waiting and trying again as the policy says;
        the last error is raised once the retries are spent."""
        retries = 0
        while True:
            try:
                return work()
            except Exception as exc:
                delay = self.next_delay(exc, retries)
                if delay is None:
                    raise
                on_retry(exc, delay)
                sleep(delay)
                retries += 1


RETRY = RetryPolicy()


# A full or read-only disk, a flaky network filesystem, a database or store that is
# down: failures that a later try may not meet, unlike a bug or a bad input.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
        errno.EACCES,
        errno.EIO,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EBUSY,
        errno.ENOMEM,
    }
)


def transient_cause(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is worth trying again later."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (TransientError, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if type(exc).__name__ == "OperationalError":  # SQLAlchemy: the database went away
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def next_failed_retry(
    failing_since: datetime | None,
    now: datetime,
    retry_for_s: float,
    min_delay_s: float = 60.0,
    max_delay_s: float = 3600.0,
) -> datetime | None:
    """When a failed image with a transient cause is tried again: after as long as it
    has been failing (so the waits double), within [min, max]; None once it has been
    failing for ``retry_for_s``."""
    failing_for = 0.0 if failing_since is None else (now - failing_since).total_seconds()
    if failing_for >= retry_for_s:
        return None
    return now + timedelta(seconds=min(max_delay_s, max(min_delay_s, failing_for)))
