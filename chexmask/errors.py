"""Every exception the package raises on purpose, in one place."""


class ChexmaskError(Exception):
    """Base class: an expected failure with a message meant for a person."""


class RefusedInput(ChexmaskError):
    """The input is not something we segment. Recorded with its code; never retried.

    ``code`` is short and machine-readable (``not_an_image``, ``truncated``,
    ``wrong_modality``, ...); ``message`` is one human sentence.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NotFound(ChexmaskError):
    """An image, segmentation or stored object that does not exist. Never retried:
    asking again finds nothing either."""


class WeightsError(ChexmaskError):
    """Model weights are missing, unreadable or fail their pinned checksum."""


class TransientError(ChexmaskError):
    """A storage or network hiccup worth retrying with backoff."""


class ConfigError(ChexmaskError):
    """A setting is missing or malformed."""


class NotARegularFile(ChexmaskError, OSError):
    """A source path that is a FIFO, a device, a socket or a folder (or a link to one):
    never opened for reading, since a FIFO would block and a device never end."""


class PushFailed(ChexmaskError):
    """A destination did not take the DICOM outputs sent to it (down, refused the
    association, or answered a failure status): recorded with this reason, and
    tried again later."""
