"""The demo's input checks: zip extraction that cannot escape its folder, and server paths outside the
allowed roots refused."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from imaging_ad.app.safety import (
    UnsafeInputError,
    ZipLimits,
    check_upload_name,
    copy_upload,
    resolve_within,
    safe_extract_zip,
    safe_name,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # content does not matter here: names and sizes do


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_extracts_images_and_skips_other_members(tmp_path: Path) -> None:
    archive = _zip(
        tmp_path / "ok.zip",
        {"a.png": PNG, "sub/b.dcm": b"x" * 200, "notes.txt": b"hello", "__MACOSX/._a.png": PNG, "dir/": b""},
    )
    out = tmp_path / "out"
    result = safe_extract_zip(archive, out)
    assert _listing(out) == ["a.png", "sub/b.dcm"]
    assert sorted(p.name for p in result.files) == ["a.png", "b.dcm"]
    assert any("notes.txt" in s for s in result.skipped)
    assert any("__MACOSX" in s for s in result.skipped)


@pytest.mark.parametrize(
    "name",
    [
        "../evil.png",
        "ok/../../evil.png",
        "/etc/evil.png",
        "C:/evil.png",
        "..\\evil.png",
        "a\\..\\..\\evil.png",
    ],
)
def test_zip_path_traversal_and_absolute_names_are_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.png", PNG)  # written first in the archive: must not be left behind either
        zf.writestr(zipfile.ZipInfo(name), PNG)
    out = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeInputError):
        safe_extract_zip(archive, out)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "deep" / "evil.png").exists()
    assert _listing(out) == []  # nothing extracted from a refused archive


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link.png")
    info.create_system = 3  # unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeInputError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "link.png").exists()


def test_zip_bomb_ratio_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", {"zeros.png": b"\x00" * (20 * 1024 * 1024)}, zipfile.ZIP_DEFLATED)
    assert archive.stat().st_size < 100_000  # ~1000:1
    with pytest.raises(UnsafeInputError, match="zip bomb"):
        safe_extract_zip(archive, tmp_path / "out")
    assert _listing(tmp_path / "out") == []


def test_zip_size_and_count_limits(tmp_path: Path) -> None:
    many = _zip(tmp_path / "many.zip", {f"{i}.png": PNG for i in range(12)})
    with pytest.raises(UnsafeInputError, match="members"):
        safe_extract_zip(many, tmp_path / "a", ZipLimits(max_files=10))
    big = _zip(tmp_path / "big.zip", {"a.png": os.urandom(5000), "b.png": os.urandom(5000)})
    with pytest.raises(UnsafeInputError, match="limit"):
        safe_extract_zip(big, tmp_path / "b", ZipLimits(max_total_bytes=8000))
    with pytest.raises(UnsafeInputError, match="per-file"):
        safe_extract_zip(big, tmp_path / "c", ZipLimits(max_file_bytes=4000))


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"not a zip at all")
    with pytest.raises(UnsafeInputError, match="not a zip"):
        safe_extract_zip(fake, tmp_path / "out")


def test_paths_outside_the_allowed_roots_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "escape").symlink_to(outside)  # a link inside the root pointing out of it

    assert resolve_within(str(root / "images"), [root]) == (root / "images").resolve()
    assert resolve_within(str(root), [root]) == root.resolve()
    for bad in (
        str(outside),
        str(root / ".." / "secret"),
        str(root / "escape"),
        str(root / "escape" / "x.png"),
        "/etc",
        "images",  # relative: ambiguous, refused
        "",
    ):
        with pytest.raises(UnsafeInputError):
            resolve_within(bad, [root])
    with pytest.raises(UnsafeInputError, match="--allowed-root"):
        resolve_within(str(root / "images"), [])  # no roots configured: server folders are off


def test_prefix_sibling_is_not_inside(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    with pytest.raises(UnsafeInputError):
        resolve_within(str(tmp_path / "data2"), [tmp_path / "data"])


def test_upload_types_and_names(tmp_path: Path) -> None:
    assert check_upload_name("scan.DCM") == ".dcm"
    assert check_upload_name("a.zip") == ".zip"
    for bad in ("run.sh", "page.html", "model.safetensors", "noext"):
        with pytest.raises(UnsafeInputError):
            check_upload_name(bad)
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("..\\x y.png") == "x_y.png"
    assert safe_name("...") == "file"

    src = tmp_path / "up.png"
    src.write_bytes(PNG)
    first = copy_upload(src, tmp_path / "dest", max_bytes=1000)
    second = copy_upload(src, tmp_path / "dest", max_bytes=1000)
    assert first != second and first.read_bytes() == second.read_bytes() == PNG
    with pytest.raises(UnsafeInputError, match="limit"):
        copy_upload(src, tmp_path / "dest", max_bytes=10)
