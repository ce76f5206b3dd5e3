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
