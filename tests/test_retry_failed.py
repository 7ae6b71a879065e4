"""Which failures are retried later, and when."""

from __future__ import annotations

import errno
from datetime import datetime, timedelta, timezone

from chexmask.errors import TransientError
from chexmask.retry import next_failed_retry, transient_cause


def test_full_read_only_or_unreachable_stores_are_transient_bugs_are_not():
    assert transient_cause(OSError(errno.ENOSPC, "No space left on device"))
    assert transient_cause(PermissionError(errno.EROFS, "Read-only file system"))
    assert transient_cause(TransientError("S3 503"))
    wrapped = RuntimeError("while writing")
    wrapped.__cause__ = OSError(errno.EDQUOT, "quota")
    assert transient_cause(wrapped)
    assert not transient_cause(ValueError("bad landmarks"))
    assert not transient_cause(OSError(errno.ENOTDIR, "not a directory"))


def test_waits_grow_with_the_failing_time_and_stop_after_the_window():
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert next_failed_retry(None, now, 86_400) == now + timedelta(seconds=60)
    assert next_failed_retry(now - timedelta(minutes=10), now, 86_400) == now + timedelta(minutes=10)
    assert next_failed_retry(now - timedelta(hours=5), now, 86_400) == now + timedelta(hours=1)
    assert next_failed_retry(now - timedelta(days=1), now, 86_400) is None
