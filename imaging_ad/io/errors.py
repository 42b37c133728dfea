"""One exception family for every way an input file can fail to become pixels.

Each error names the file and the reason, so a batch scan can record it in a row and move on.
"""

from __future__ import annotations

from pathlib import Path


class ImageReadError(Exception):
    """Base class: the file at ``path`` could not be read as an image."""

    reason_code = "unreadable"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    reason_code = "missing"


class EmptyImageFileError(ImageReadError):
    reason_code = "empty"


class TruncatedImageError(ImageReadError):
    reason_code = "truncated"


class NotAnImageError(ImageReadError):
    reason_code = "not_an_image"


class UnsupportedCompressionError(ImageReadError):
    """A DICOM transfer syntax no installed decoder plugin can read."""

    reason_code = "unsupported_compression"


class ImageTooLargeError(ImageReadError):
    """Dimensions beyond the decompression-bomb guard."""

    reason_code = "too_large"


class MultiFrameImageError(ImageReadError):
    """A multi-frame file was read without saying which frame to take."""

    reason_code = "multi_frame"


class SpecialFileError(ImageReadError):
    """Not a regular file (a FIFO, device, socket or a symbolic link loop): refused before any read,
    since reading it could block forever (a FIFO) or never end (``/dev/zero``)."""

    reason_code = "special_file"


class NonFiniteImageError(ImageReadError):
    """Pixels that are NaN or infinite (a float image holding them, or a DICOM rescale that makes them):
    no score computed from them would mean anything."""

    reason_code = "non_finite"
