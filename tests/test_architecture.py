"""The dependency direction of docs/architecture.md, checked on every module's imports.

The framework (``core/`` outside the task folders) imports no task and no plugin except
through the registries; a task imports no plugin and no other task; nothing under ``core/``
imports the public surface ``terraplug``, which imports no plugin; the architecture page lists
every framework module. An import is any form Python resolves: ``import``, ``from ... import``
(relative ones resolved against the module's package), a string literal given to
``importlib.import_module`` or ``__import__``, and a ``module:attr`` string as entry points and
registries write them.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "core"
ALLOWED = {
    ("core/plugins.py", "plugins"): "the built-in plugin registry, BUILTIN_PLUGINS",
    ("core/tasks/__init__.py", "core.tasks"): "the built-in task registry, BUILTIN_TASKS",
    ("core/classify.py", "core.tasks.dem_sr.classify"): "the command name DESIGN.md fixes",
}
TARGET = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
"""A ``module:attr`` string, as entry points and ``BUILTIN_PLUGINS`` name their targets."""
LOADERS = {"import_module", "__import__"}
"""Functions whose first argument is a module name: ``importlib.import_module``, ``__import__``."""


def allowed(path: str, module: str) -> bool:
    return any(path == where and within(module, target) for where, target in ALLOWED)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def package_of(path: Path, root: Path) -> list[str]:
    """The package ``path`` belongs to, as parts: the folder of a module, the package itself
    for an ``__init__.py``."""
    return list(path.relative_to(root).parent.parts)


def absolute(name: str, level: int, package: list[str]) -> str:
    """``name`` imported ``level`` dots up from ``package`` (0: already absolute)."""
    if not level:
        return name
    base = package[: len(package) - level + 1]
    return ".".join([*base, name] if name else base)


def loaded_name(call: ast.Call, loaders: set[str], package: list[str]) -> str | None:
    """The module a call of ``import_module``/``__import__`` loads, when it is written as a
    string literal (an f-string's literal head counts: ``f"plugins.{name}"`` loads under
    ``plugins``); a relative name is resolved against its ``package`` argument."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in loaders or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.JoinedStr):
        head = first.values[0] if first.values else None
        first = head if isinstance(head, ast.Constant) else None
        name = first.value.rsplit(".", 1)[0] if first is not None else ""
    else:
        name = first.value if isinstance(first, ast.Constant) else ""
    if not isinstance(name, str) or not name:
        return None
    dots = len(name) - len(name.lstrip("."))
    anchor = call.args[1] if len(call.args) > 1 else None
    anchor = next((k.value for k in call.keywords if k.arg == "package"), anchor)
    if dots and isinstance(anchor, ast.Constant) and isinstance(anchor.value, str):
        package = anchor.value.split(".")
    return absolute(name[dots:], dots, package)


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included) and in
    any form (see the module docstring); for ``from package import name``, also
    ``package.name`` (it may be a submodule)."""
    tree = ast.parse(path.read_text())
    package = package_of(path, root)
    loaders = set(LOADERS)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "importlib":
            loaders.update(a.asname for a in node.names if a.name == "import_module" and a.asname)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node.module or "", node.level, package)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and (name := loaded_name(node, loaders, package)):
            found.add(name)
        elif isinstance(node, ast.Constant) and TARGET.fullmatch(str(node.value)):
            found.add(node.value.split(":")[0])
    return found


def tasks_in(root: Path) -> list[str]:
    return sorted(
        path.name for path in (root / "core" / "tasks").iterdir() if (path / "task.py").is_file()
    )


def task_of(path: str) -> str | None:
    """The task whose slice ``path`` (relative to the repository) belongs to; None
    elsewhere."""
    parts = path.split("/")
    return parts[2] if len(parts) > 3 and parts[:2] == ["core", "tasks"] else None


def broken_rule(path: str, module: str, tasks: list[str]) -> str | None:
    """Which rule of docs/architecture.md importing ``module`` from ``path`` breaks."""
    if within(module, "plugins"):
        return "plugins are reached through the plugin registry only"
    if path.startswith("core/") and within(module, "terraplug"):
        return "terraplug is the public surface on top of core, never imported by it"
    own = task_of(path)
    for task in tasks:
        if within(module, f"core.tasks.{task}") and task != own:
            if path.startswith("terraplug/"):
                return None  # the public surface re-exports the tasks' data
            return "a task is reached through the task registry only"
    return None


def checked_modules(root: Path) -> list[Path]:
    return sorted([*(root / "core").rglob("*.py"), *(root / "terraplug").rglob("*.py")])


def violations(root: Path) -> list[str]:
    """Every import under ``root``'s ``core/`` and ``terraplug/`` that breaks a rule."""
    tasks = tasks_in(root)
    found = []
    for path in checked_modules(root):
        where = path.relative_to(root).as_posix()
        for module in sorted(imported_modules(path, root)):
            rule = broken_rule(where, module, tasks)
            if rule and not allowed(where, module):
                found.append(f"{where} imports {module}: {rule}")
    return found


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


FRAMEWORK = [path for path in sorted(CORE.rglob("*.py")) if task_of(relative(path)) is None]


def test_the_tasks_are_found() -> None:
    assert tasks_in(REPO) == ["dem_sr", "sar2opt"]
    assert len(FRAMEWORK) > 20 and len(FRAMEWORK) < len(list(CORE.rglob("*.py")))


def test_every_import_follows_the_layering() -> None:
    assert not violations(REPO), "\n".join(violations(REPO))


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The repository's ``core/`` and ``terraplug/``, to inject violations into."""
    for package in ("core", "terraplug"):
        shutil.copytree(
            REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


INJECTED = [
    (
        "core/experiment/probe.py",
        "from core.tasks.dem_sr.rcan import RCAN\n",
        "core.tasks.dem_sr.rcan",
    ),
    ("core/probe.py", "def f():\n    import plugins.norms.domain_bn\n", "plugins.norms.domain_bn"),
    ("core/experiment/probe.py", "from ..tasks.dem_sr import rcan\n", "core.tasks.dem_sr"),
    ("core/tasks/probe.py", "from . import sar2opt\n", "core.tasks.sar2opt"),
    (
        "core/tasks/dem_sr/probe.py",
        "from ..sar2opt.terramind import x\n",
        "core.tasks.sar2opt.terramind",
    ),
    ("core/data/probe.py", "import importlib\nimportlib.import_module('plugins.x')\n", "plugins.x"),
    ("core/probe.py", "__import__('core.tasks.sar2opt.task')\n", "core.tasks.sar2opt.task"),
    ("core/probe.py", "from importlib import import_module as load\nload('plugins')\n", "plugins"),
    (
        "core/tasks/dem_sr/probe.py",
        "from importlib import import_module\nimport_module('..sar2opt', 'core.tasks.dem_sr')\n",
        "core.tasks.sar2opt",
    ),
    ("core/probe.py", "import importlib\nimportlib.import_module(f'plugins.{n}')\n", "plugins"),
    ("core/probe.py", "TARGET = 'plugins.norms.domain_bn:DomainBN'\n", "plugins.norms.domain_bn"),
    (
        "core/tasks/sar2opt/probe.py",
        "from plugins.generators import refiner\n",
        "plugins.generators",
    ),
    ("core/probe.py", "from terraplug import Plugin\n", "terraplug"),
    ("core/tasks/dem_sr/probe.py", "import terraplug.data\n", "terraplug.data"),
    ("terraplug/probe.py", "import plugins.samplers.stratified\n", "plugins.samplers.stratified"),
    ("terraplug/probe.py", "from plugins import BUILTIN_PLUGINS\n", "plugins"),
]
"""(module, source, what the checker must see it import): one violation of each form."""


def test_a_copy_of_the_repository_is_clean(copy: Path) -> None:
    assert not violations(copy)


@pytest.mark.parametrize(("where", "source", "module"), INJECTED, ids=[i[1] for i in INJECTED])
def test_the_checker_flags_every_import_form(copy: Path, where: str, source: str, module: str):
    (copy / where).write_text(source)
    found = violations(copy)
    assert any(line.startswith(f"{where} imports {module}:") for line in found), found
    assert all(line.startswith(f"{where} imports ") for line in found), found


NAMED = {
    ("core/config.py", "dem_sr"): "the default task, defined in one place",
    ("core/tasks/__init__.py", "dem_sr"): "the built-in task registry, BUILTIN_TASKS",
    ("core/tasks/__init__.py", "sar2opt"): "the built-in task registry, BUILTIN_TASKS",
}


def test_the_framework_names_no_plugin_task_or_reference_row() -> None:
    """A rule about one plugin or task lives in that plugin or task: no string in the
    framework's code is the name of a built-in plugin, a task or a task's reference row,
    except the registries and the default task."""
    from core.tasks import BUILTIN_TASKS, task_class
    from plugins import BUILTIN_PLUGINS

    references = {task_class(name).reference_name for name in BUILTIN_TASKS}
    names = {*BUILTIN_PLUGINS, *BUILTIN_TASKS, *references} - {""}
    found = sorted(
        f"{relative(path)}:{node.lineno} {node.value!r}"
        for path in FRAMEWORK
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and node.value in names
        and (relative(path), node.value) not in NAMED
    )
    assert not found, f"the framework names a plugin, task or reference row: {found}"


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
