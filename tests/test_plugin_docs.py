"""The plugin author's pages hold: the tutorial's files install and pass their own tests,
the reference's example runs, and every public name is in the reference."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import terraplug
import terraplug.data
import terraplug.testing

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def code_blocks(page: str, language: str) -> list[str]:
    pattern = rf"```{language}\n(.*?)```"
    return re.findall(pattern, (DOCS / page).read_text(), flags=re.DOTALL)


def editable_install(folder: Path) -> Path:
    """What ``pip install -e .`` gives terraplug: the package importable and its entry points
    registered (a dist-info next to the sources)."""
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    source = folder / "src"
    info = source / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    entries = project["entry-points"]["terraplug.plugins"]
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[terraplug.plugins]\n{lines}\n")
    return source


@pytest.mark.slow
def test_tutorial_files_install_list_and_pass_their_own_tests(tmp_path: Path):
    folder = tmp_path / "terraplug-warmup"
    files = [
        block for block in code_blocks("plugin-tutorial.md", "(?:python|toml)")
        if block.startswith("# ")
    ]  # fmt: skip
    assert len(files) == 3
    for block in files:
        header, _, body = block.partition("\n")
        path = folder / header.removeprefix("# ").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    source = editable_install(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(source)])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True,
            timeout=600, check=False,
        )  # fmt: skip

    tests = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "2 passed" in tests.stdout
    listing = run("-m", "core.run", "--list-plugins")
    line = next(row for row in listing.stdout.splitlines() if row.startswith("component_warmup"))
    assert "terraplug-warmup 0.1.0" in line
    assert "setup, on_epoch_start, loss_weights" in line


def test_reference_example_runs(tmp_path: Path):
    (example,) = code_blocks("plugin-api.md", "python")
    namespace: dict = {}
    exec(compile(textwrap.dedent(example), "plugin-api.md", "exec"), namespace)
    namespace["test_stratified_batches_hold_every_terrain"](tmp_path)


def test_every_public_name_is_in_the_reference():
    reference = (DOCS / "plugin-api.md").read_text()
    harness = ["run_training", "fast_overrides", "FAST", "FAST_ANY_TASK", "read_metrics"]
    harness += ["task_data", "reset_accelerate_state"]
    assert all(hasattr(terraplug.testing, name) for name in harness)
    names = [*terraplug.__all__, *harness, *terraplug.data.__all__]
    missing = [name for name in names if f"`{name}" not in reference]
    assert not missing, f"docs/plugin-api.md lacks {missing}"
