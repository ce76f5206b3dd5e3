"""The plugin author's pages hold: the tutorial's files install and pass their own tests,
the reference's example runs, and every public name is in the reference."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import attrs
import pytest

import terraplug
import terraplug.data
import terraplug.testing
from core.context import RunContext, StepInfo
from core.plugins import hook_names
from core.tasks import Task

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


def test_the_tutorial_and_the_templates_require_the_same():
    """The tutorial's pyproject.toml and the templates' declare the same host requirement, and
    a distribution with tests declares pytest as its test extra, as the tutorial's does."""
    (block,) = [b for b in code_blocks("plugin-tutorial.md", "toml") if b.startswith("# pyproject")]
    tutorial = tomllib.loads(block)["project"]
    for folder in sorted((REPO / "entrypoints").iterdir()):
        if folder.is_dir():
            project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
            assert project["dependencies"] == tutorial["dependencies"], folder.name
            if (folder / "tests").is_dir():
                extras = project.get("optional-dependencies", {})
                assert extras.get("test") == tutorial["optional-dependencies"]["test"]


def test_reference_example_runs(tmp_path: Path):
    (example,) = code_blocks("plugin-api.md", "python")
    namespace: dict = {}
    exec(compile(textwrap.dedent(example), "plugin-api.md", "exec"), namespace)
    namespace["test_stratified_batches_hold_every_terrain"](tmp_path)


def public_surface() -> dict[str, list[str]]:
    """What docs/plugin-api.md documents, by the ``## `` section that holds it: the three
    modules' ``__all__``, the context's fields, properties and methods (``ctx.<name>``) and
    the step's (``ctx.step.<name>``), every hook, and every member of the Task protocol."""
    context = [f"ctx.{name}" for name in public_members(RunContext)]
    step = [f"ctx.step.{name}" for name in public_members(StepInfo)]
    task = [*Task.__annotations__, *(name for name in vars(Task) if is_method(Task, name))]
    return {
        "`terraplug`": list(terraplug.__all__),
        "`terraplug.testing`": list(terraplug.testing.__all__),
        "`terraplug.data`": list(terraplug.data.__all__),
        "The context: `ctx`": [*context, *step],
        "Hooks": hook_names(),
        "A task's members": task,
    }


def is_method(cls: type, name: str) -> bool:
    value = vars(cls)[name]
    return not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))


def public_members(cls: type) -> list[str]:
    """An attrs class's public fields, then its public methods and properties."""
    fields = [field.name for field in attrs.fields(cls) if not field.name.startswith("_")]
    return list(dict.fromkeys([*fields, *(name for name in vars(cls) if is_method(cls, name))]))


def documented(page: str) -> dict[str, set[str]]:
    """The names each ``## `` section of ``page`` documents: the leading dotted name of every
    code span in the first cell of its tables' rows (``ctx.log`` for ``ctx.log(key, value)``)."""
    sections: dict[str, set[str]] = {}
    title = ""
    for line in page.splitlines():
        if line.startswith("## "):
            title = line.removeprefix("## ").strip()
        elif line.startswith("|") and not line.startswith("| ---"):
            first_cell = line.split("|")[1]
            sections.setdefault(title, set()).update(re.findall(r"`([\w.]+)", first_cell))
    return sections


def missing_names(page: str) -> dict[str, list[str]]:
    """Per section of plugin-api.md, the names no row of its tables documents."""
    rows = documented(page)
    missing = {
        section: [name for name in names if name not in rows.get(section, set())]
        for section, names in public_surface().items()
    }
    return {section: names for section, names in missing.items() if names}


def test_every_public_name_is_in_the_reference():
    assert "reset_accelerate_state" in terraplug.testing.__all__
    missing = missing_names((DOCS / "plugin-api.md").read_text())
    assert not missing, f"docs/plugin-api.md lacks, by section: {missing}"


def test_a_name_missing_from_the_reference_is_found():
    """The check is not vacuous: without the row of a section's first name, that name is
    missing from that section."""
    page = (DOCS / "plugin-api.md").read_text()
    for section, names in public_surface().items():
        name = names[0]
        documents = re.compile(rf"^\|[^|]*`{re.escape(name)}(?![\w.])")
        without = "\n".join(line for line in page.splitlines() if not documents.match(line))
        assert without != page, f"no row documents {name}"
        assert name in missing_names(without).get(section, []), section
