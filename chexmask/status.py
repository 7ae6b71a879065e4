"""The lifecycles of an image and of its quality control, as the index records them."""

from enum import Enum


class ImageStatus(str, Enum):
    QUEUED = "queued"  # noticed and enqueued, not yet picked up
    PROCESSING = "processing"  # a worker holds it
    DONE = "done"  # segmented (QC may still be pending)
    REFUSED = "refused"  # bad input; refusal_code/reason say why; never retried
    FAILED = "failed"  # an unexpected error after retries; reason says what

    @property
    def final(self) -> bool:
        return self in (ImageStatus.DONE, ImageStatus.REFUSED, ImageStatus.FAILED)


class QCStatus(str, Enum):
    PENDING = "pending"  # segmented, Dice RCA not computed yet
    DONE = "done"
    SKIPPED = "skipped"  # QC deliberately not run (e.g. no reference bank configured)


class PushStatus(str, Enum):
    """Sending a DICOM input's SEG and SR on to a configured destination."""

    PENDING = "pending"  # to be sent (held by a sender until retry_at, should it die)
    DONE = "done"  # the destination acknowledged both
    FAILED = "failed"  # refused or unreachable; reason says why; tried again at retry_at
