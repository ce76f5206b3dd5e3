"""Packaging: what the distribution installs, how it builds, and what it leaves alone."""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import core
from terraplug._packages import package_folder

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns("__pycache__")


def run_version(pythonpath: list[Path], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    result = subprocess.run(
        [sys.executable, "-m", "core.run", "--version"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_version_names_the_folders_core_and_plugins_come_from(tmp_path: Path) -> None:
    line = run_version([ROOT], cwd=tmp_path)
    folders = f"core: {ROOT / 'core'}, plugins: {ROOT / 'plugins'}"
    assert line == f"terraplug {core.__version__} ({folders})"


def test_version_reveals_a_shadowing_plugins_package(tmp_path: Path) -> None:
    shadow = tmp_path / "plugins"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    line = run_version([tmp_path, ROOT], cwd=tmp_path)
    assert f"core: {ROOT / 'core'}" in line
    assert f"plugins: {shadow}" in line


def test_wheel_builds_without_a_warning_and_declares_ranges(tmp_path: Path) -> None:
    """Every warning raised while setuptools builds the wheel is an error (a deprecated
    ``project.license`` table, for one, stops building after 2027-02-18). The wheel asks for
    torch and terratorch as ranges; the exact versions belong in constraints.txt."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for package in ("core", "plugins"):
        shutil.copytree(ROOT / package, source / package, ignore=IGNORED)
    build = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path)!r}))"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", build],
        cwd=source, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = tmp_path / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        info = email.parser.Parser().parsestr(
            archive.read(f"terraplug-{core.__version__}.dist-info/METADATA").decode()
        )
    assert info["License-Expression"] == "Apache-2.0"
    requirements = [Requirement(text) for text in info.get_all("Requires-Dist")]
    for name in ("torch", "terratorch"):
        for requirement in (r for r in requirements if r.name == name):
            assert {spec.operator for spec in requirement.specifier} == {">=", "<"}, requirement


def installed_closure(name: str) -> list[metadata.Distribution]:
    """``name``'s distribution and, recursively, those its requirements name (markers applied)."""
    seen: dict[str, metadata.Distribution] = {}
    pending = [name]
    while pending:
        wanted = pending.pop()
        key = wanted.lower().replace("_", "-")
        if key in seen:
            continue
        dist = metadata.distribution(wanted)
        seen[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(seen.values())


def link_into(dist: metadata.Distribution, site_packages: Path) -> None:
    """Make an installed distribution part of another environment: link its top-level entries."""
    base = Path(dist.locate_file(""))
    tops = {Path(str(file)).parts[0] for file in dist.files or []}
    for top in sorted(tops - {".."}):
        target = site_packages / top
        if (base / top).exists() and not target.exists():
            target.symlink_to(base / top)


@pytest.mark.slow
def test_installing_terraplug_keeps_the_environments_torch(tmp_path: Path) -> None:
    """A fresh venv holding this environment's torch (the pre-staged CPU build in CI): pip,
    asked for terraplug without the constraints file, installs no other torch.

    The venv holds torch and its dependencies as links to this environment's files, which pip
    sees as installed exactly as after ``pip install torch``; the dry run resolves everything
    else against the real indexes without downloading the large wheels.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert purelib != sysconfig.get_path("purelib")
    for dist in installed_closure("torch"):
        link_into(dist, Path(purelib))
    report = tmp_path / "report.json"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
         str(ROOT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    install = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "terraplug" in install and "accelerate" in install, install
    assert "torch" not in install, f"pip would replace torch {metadata.version('torch')}: {install}"


@pytest.mark.parametrize("package", ["core", "plugins"])
def test_a_project_folder_shadowing_a_package_is_named_in_one_line(
    package: str, tmp_path: Path
) -> None:
    """A user's project with its own ``core`` or ``plugins`` package: ``import terraplug``
    there, and the ``terraplug`` console script with the project first on ``PYTHONPATH``, say
    in one line which folder shadows which and what to do, instead of failing inside the
    user's package. This checkout's terraplug is found through ``PYTHONPATH``, after the
    project."""
    project = tmp_path / "project"
    shadow = project / package
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    console = Path(sys.executable).parent / "terraplug"
    for command, path in (
        ([sys.executable, "-c", "import terraplug"], [ROOT]),  # the current folder comes first
        ([str(console), "--version"], [project, ROOT]),
    ):
        result = run_in(project, command, path)
        assert result.returncode != 0, (command, result.stdout)
        last = result.stderr.strip().splitlines()[-1]
        assert "ShadowedPackageError: " in last, result.stderr[-3000:]
        assert f"{shadow} shadows terraplug's {package!r} package ({ROOT / package})" in last
        assert "run from another folder or rename" in last


def test_a_plain_folder_named_core_shadows_only_where_python_would_import_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder without ``__init__.py`` is a namespace package, which a regular package later
    on ``sys.path`` beats: beside this checkout on the path it is no shadow. Where nothing
    beats it (an editable install imports terraplug through a finder after the path), it is
    the folder Python imports, and the one named."""
    project = tmp_path / "project"
    (project / "core").mkdir(parents=True)
    result = run_in(project, [sys.executable, "-c", "import terraplug"], [ROOT])
    assert result.returncode == 0, result.stderr[-3000:]

    (tmp_path / "plain_folder_xyz").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_folder("plain_folder_xyz") == tmp_path / "plain_folder_xyz"


def run_in(cwd: Path, command: list[str], path: list[Path]) -> subprocess.CompletedProcess:
    """``command`` in ``cwd`` with ``path`` as ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
