"""Image input: files, DICOM and folders become pixels at full bit depth plus metadata."""

from imaging_ad.io.errors import (
    EmptyImageFileError,
    ImageNotFoundError,
    ImageReadError,
    ImageTooLargeError,
    MultiFrameImageError,
    NonFiniteImageError,
    NotAnImageError,
    SpecialFileError,
    TruncatedImageError,
    UnsupportedCompressionError,
)
from imaging_ad.io.reader import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    is_supported_path,
    read_image,
    read_size,
)
from imaging_ad.io.record import ImageMeta, ImageRecord

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "EmptyImageFileError",
    "ImageMeta",
    "ImageNotFoundError",
    "ImageReadError",
    "ImageRecord",
    "ImageTooLargeError",
    "MultiFrameImageError",
    "NonFiniteImageError",
    "NotAnImageError",
    "SpecialFileError",
    "TruncatedImageError",
    "UnsupportedCompressionError",
    "is_supported_path",
    "read_image",
    "read_size",
]
