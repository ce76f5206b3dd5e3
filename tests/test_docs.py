"""The docs' examples run: TOML configs load with their plugins, hooks are all documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import load_config
from core.plugins import PluginManager, hook_names

DOCS = Path(__file__).resolve().parent.parent / "docs"


def toml_blocks(page: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", ["strategies.md", "getting-started.md"])
def test_toml_examples_load_with_their_plugins(page: str, tmp_path: Path):
    blocks = [block for block in toml_blocks(page) if block.lstrip().startswith("[run]")]
    assert blocks, f"{page} has no complete config example"
    for number, block in enumerate(blocks):
        path = tmp_path / f"example{number}.toml"
        path.write_text(block)
        config = load_config(path)
        PluginManager.from_names(config.run.plugins, config.plugins)


def test_every_hook_is_in_the_reference():
    reference = (DOCS / "hooks.md").read_text()
    missing = [name for name in hook_names() if f"### `{name}(" not in reference]
    assert not missing, f"docs/hooks.md lacks {missing}"


def test_every_test_the_safety_page_names_exists():
    """The fault-case table re-runs from the tests it names: each file exists and defines
    each named test function."""
    page = (DOCS / "safety.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)(?:::(test_\w+))?`", page))
    assert len(named) > 30
    root = DOCS.parent
    missing = [
        f"{path}::{test}" if test else path
        for path, test in sorted(named)
        if not (root / path).is_file()
        or (test and not re.search(rf"^def {test}\(", (root / path).read_text(), re.M))
    ]
    assert not missing, f"docs/safety.md names tests that do not exist: {missing}"
