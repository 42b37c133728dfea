"""What the demo accepts from a browser and where it may read and write: the checks, in one place.

The demo is meant for one machine (it binds 127.0.0.1 unless told otherwise), but a browser is still
untrusted input: an uploaded zip may try to write outside its folder (``../``, absolute names,
symlinks) or expand to far more than it weighs (a zip bomb); a typed folder may point anywhere on the
disk. Everything here fails closed with :class:`UnsafeInputError`, whose message can be shown as is.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imaging_ad.io.reader import DICOM_SUFFIXES, RASTER_SUFFIXES

IMAGE_SUFFIXES = tuple(sorted(set(RASTER_SUFFIXES + DICOM_SUFFIXES)))
ZIP_SUFFIXES = (".zip",)
#: what an upload may be: an image, a DICOM file, or a zip of those
UPLOAD_SUFFIXES = IMAGE_SUFFIXES + ZIP_SUFFIXES


class UnsafeInputError(ValueError):
    """An upload, archive or path the demo refuses; the message says why (safe to show to the user)."""


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on what one archive may expand to. Defaults suit a few thousand radiographs."""

    max_files: int = 5000
    max_total_bytes: int = 2 * 1024**3
    max_file_bytes: int = 256 * 1024**2
    # Images are already compressed: real archives of them expand ~1-3x; DICOM maybe 10x. 100x is a bomb.
    max_ratio: float = 100.0


@dataclass
class ExtractedZip:
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # members that are not images (name: reason)


def safe_name(name: str, default: str = "file") -> str:
    """A file or folder name with no path separators, no leading dots and only portable characters."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    return cleaned[:120] or default


def check_upload_name(path: str | os.PathLike, allowed: Sequence[str] = UPLOAD_SUFFIXES) -> str:
    """The lower-case suffix of an uploaded file, if it is one the demo accepts; else refuse."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise UnsafeInputError(
            f"{Path(path).name}: file type {suffix or '(none)'} is not accepted; upload {', '.join(allowed)}"
        )
    return suffix


def is_within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path``, with every symlink resolved, lies inside ``root`` (also resolved)."""
    real = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    return real == real_root or real.is_relative_to(real_root)


def resolve_within(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Path:
    """``path`` resolved (symlinks included) if it lies inside one of ``roots``; else refuse.

    Resolving first means ``root/../etc`` and a symlink inside a root pointing outside are both refused.
    """
    roots = [Path(r) for r in roots]
    if not roots:
        raise UnsafeInputError(
            "reading server folders is off: start the demo with --allowed-root DIR to allow it"
        )
    text = os.fspath(path).strip()
    if not text or "\x00" in text:
        raise UnsafeInputError("empty or invalid path")
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        raise UnsafeInputError(f"{text}: give an absolute path inside an allowed folder")
    for root in roots:
        if is_within(candidate, root):
            return Path(os.path.realpath(candidate))
    raise UnsafeInputError(f"{text} is outside the allowed folders ({', '.join(str(r) for r in roots)})")


def _member_target(info: zipfile.ZipInfo, dest: Path) -> Path:
    """Where a member would land in ``dest``, refusing every way out of it."""
    name = info.filename
    if "\x00" in name:
        raise UnsafeInputError(f"zip member {name!r}: invalid name")
    posix = name.replace("\\", "/")  # archives made on Windows may use backslashes
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeInputError(f"zip member {name!r}: absolute paths are not allowed")
    parts = PurePosixPath(posix).parts
    if any(part == ".." for part in parts):
        raise UnsafeInputError(f"zip member {name!r}: '..' (path traversal) is not allowed")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeInputError(f"zip member {name!r}: symbolic links are not allowed")
    target = dest.joinpath(*[safe_name(p, "_") for p in parts if p not in ("", ".")])
    if not is_within(target, dest):  # belt and braces: no name may resolve outside dest
        raise UnsafeInputError(f"zip member {name!r} would be written outside the extraction folder")
    return target


def safe_extract_zip(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    limits: ZipLimits = ZipLimits(),  # noqa: B008  (frozen dataclass: immutable default)
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> ExtractedZip:
    """Extract the image files of ``archive`` into ``dest`` (created), refusing unsafe archives.

    Refused outright (nothing is kept): absolute or ``..`` member names, symlinks, more than
    ``limits.max_files`` members, declared or actual sizes over the limits, a compression ratio above
    ``limits.max_ratio``. Members with other suffixes (``.txt``, ``__MACOSX`` resource forks, ...) are
    skipped and listed. Sizes are counted while decompressing, so a header that lies does not help.
    """
    archive, dest = Path(archive), Path(dest)
    if not zipfile.is_zipfile(archive):
        raise UnsafeInputError(f"{archive.name}: not a zip archive")
    dest.mkdir(parents=True, exist_ok=True)
    result = ExtractedZip()
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_files:
                raise UnsafeInputError(
                    f"{archive.name}: {len(infos)} members, more than the limit of {limits.max_files}"
                )
            planned: list[tuple[zipfile.ZipInfo, Path]] = []
            declared = 0
            for info in infos:
                target = _member_target(info, dest)  # validates every member before writing any
                if info.is_dir():
                    continue
                parts = PurePosixPath(info.filename.replace("\\", "/")).parts
                if Path(info.filename).suffix.lower() not in suffixes:
                    result.skipped.append(f"{info.filename}: not an image")
                    continue
                if parts[0] == "__MACOSX" or parts[-1].startswith("._"):
                    result.skipped.append(f"{info.filename}: macOS metadata")
                    continue
                if info.file_size > limits.max_file_bytes:
                    raise UnsafeInputError(
                        f"zip member {info.filename!r}: {info.file_size} bytes, over the per-file limit"
                    )
                if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
                    raise UnsafeInputError(
                        f"zip member {info.filename!r}: compression ratio "
                        f"{info.file_size / info.compress_size:.0f}:1 looks like a zip bomb"
                    )
                declared += info.file_size
                planned.append((info, target))
            if declared > limits.max_total_bytes:
                raise UnsafeInputError(
                    f"{archive.name}: expands to {declared} bytes, over the limit of {limits.max_total_bytes}"
                )
            budget = min(limits.max_total_bytes, int(archive.stat().st_size * limits.max_ratio) + (1 << 20))
            written = 0
            for info, target in planned:
                target = _unique(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    result.files.append(target)  # listed at once, so a refusal midway removes it too
                    member_bytes = 0
                    while chunk := src.read(1 << 20):
                        member_bytes += len(chunk)
                        written += len(chunk)
                        # actual bytes, whatever the header claimed
                        if member_bytes > max(info.file_size, 0) or written > budget:
                            raise UnsafeInputError(
                                f"zip member {info.filename!r} expands beyond its declared size or the "
                                "archive's budget (zip bomb?)"
                            )
                        out.write(chunk)
    except UnsafeInputError:
        _remove_tree_contents(dest, result.files)
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
        _remove_tree_contents(dest, result.files)
        raise UnsafeInputError(f"{archive.name}: cannot be extracted ({exc})") from exc
    return result


def copy_upload(src: str | os.PathLike, dest_dir: str | os.PathLike, max_bytes: int) -> Path:
    """Copy one uploaded file into ``dest_dir`` under a sanitised, unique name; refuse oversized files."""
    src, dest_dir = Path(src), Path(dest_dir)
    check_upload_name(src, IMAGE_SUFFIXES)
    size = src.stat().st_size
    if size > max_bytes:
        raise UnsafeInputError(f"{src.name}: {size} bytes, over the upload limit of {max_bytes}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = _unique(dest_dir / safe_name(src.name))
    shutil.copyfile(src, target)
    return target


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(1, 100_000):
        candidate = path.with_name(f"{path.stem}_{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise UnsafeInputError(f"too many files named {path.name}")


def _remove_tree_contents(dest: Path, files: list[Path]) -> None:
    """Undo a refused extraction: the files written so far (all inside ``dest`` by construction)."""
    for path in files:
        if is_within(path, dest):
            path.unlink(missing_ok=True)
