"""The dependency direction of docs/architecture.md, checked on every module's imports.

The framework (``core/`` outside the task folders) imports no task and no plugin except
through the registries; a task imports no plugin and no other task; the architecture page
lists every framework module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "core"
TASKS = sorted(path.name for path in (CORE / "tasks").iterdir() if (path / "task.py").is_file())
ALLOWED = {
    ("core/plugins.py", "plugins"): "the built-in plugin registry, BUILTIN_PLUGINS",
    ("core/classify.py", "core.tasks.dem_sr.classify"): "the command name DESIGN.md fixes",
}


def allowed(path: str, module: str) -> bool:
    return any(
        path == where and (module == target or module.startswith(f"{target}."))
        for where, target in ALLOWED
    )


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included); for
    ``from package import name``, also ``package.name`` (it may be a submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def task_of(path: Path) -> str | None:
    """The task whose slice ``path`` belongs to; None for framework modules."""
    parts = path.relative_to(CORE).parts
    return parts[1] if len(parts) > 2 and parts[0] == "tasks" else None


def is_task_module(module: str, task: str) -> bool:
    return module == f"core.tasks.{task}" or module.startswith(f"core.tasks.{task}.")


def is_plugin_module(module: str) -> bool:
    return module == "plugins" or module.startswith("plugins.")


MODULES = sorted(CORE.rglob("*.py"))
FRAMEWORK = [path for path in MODULES if task_of(path) is None]


def test_the_tasks_are_found() -> None:
    assert TASKS == ["dem_sr", "sar2opt"]
    assert len(FRAMEWORK) > 20 and len(FRAMEWORK) < len(MODULES)


@pytest.mark.parametrize("path", FRAMEWORK, ids=relative)
def test_the_framework_imports_no_task_and_no_plugin(path: Path) -> None:
    wrong = sorted(
        module
        for module in imported_modules(path)
        if (is_plugin_module(module) or any(is_task_module(module, t) for t in TASKS))
        and not allowed(relative(path), module)
    )
    assert not wrong, f"{relative(path)} imports {wrong}: go through a registry instead"


@pytest.mark.parametrize("task", TASKS)
def test_a_task_imports_no_plugin_and_no_other_task(task: str) -> None:
    others = [other for other in TASKS if other != task]
    for path in sorted((CORE / "tasks" / task).rglob("*.py")):
        wrong = sorted(
            module
            for module in imported_modules(path)
            if is_plugin_module(module) or any(is_task_module(module, o) for o in others)
        )
        assert not wrong, f"{relative(path)} imports {wrong}"


def test_the_checks_see_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text(
        "def f():\n    from core.tasks.dem_sr.rcan import RCAN\n    import plugins.norms\n"
    )
    found = imported_modules(module)
    assert "core.tasks.dem_sr.rcan" in found and "plugins.norms" in found


def test_the_architecture_page_names_every_framework_module() -> None:
    page = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([\w/]+(?:\.py)?)`", page))
    missing = []
    for path in FRAMEWORK:
        parts = path.relative_to(CORE).parts
        if parts[-1] == "__init__.py" and parts[:-1] != ("tasks",):
            continue  # a package is named by its folder; core/__init__.py holds the version
        if parts[0] in ("data", "experiment") and len(parts) > 1:
            name = parts[0] + "/" if parts[-1] in ("__init__.py", "__main__.py") else path.stem
        elif parts == ("tasks", "__init__.py"):
            name = "tasks/__init__.py"
        else:
            name = path.name
        if name not in named and name.removesuffix("/") + "/" not in named:
            missing.append(relative(path))
    assert not missing, f"docs/architecture.md does not describe {missing}"
