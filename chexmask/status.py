"""The lifecycle of an image in the index."""

from enum import Enum


class ImageStatus(str, Enum):
    QUEUED = "queued"          # noticed and enqueued, not yet picked up
    PROCESSING = "processing"  # a worker holds it
    DONE = "done"              # segmented (QC may still be pending)
    REFUSED = "refused"        # bad input; refusal_code/reason say why; never retried
    FAILED = "failed"          # an unexpected error after retries; reason says what

    @property
    def final(self) -> bool:
        return self in (ImageStatus.DONE, ImageStatus.REFUSED, ImageStatus.FAILED)
