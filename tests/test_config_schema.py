"""Every numeric config key refuses values no run can use, naming the key.

The test walks the schema (core ``Config``, every built-in task's sections and every
built-in plugin's attrs ``Config``, nested classes and lists of classes included), so a
numeric key added without a validator fails here, not in a user's run.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from core.config import Config, load_config, structure, unstructure
from core.errors import ConfigError
from core.plugins import builtin_sources
from core.run import main
from core.tasks import BUILTIN_TASKS, task_class
from tests.conftest import FAST

FLOAT_PROBES = (math.nan, math.inf, -math.inf, -1.0)
"""No float key accepts these: every weight, rate and size here is finite and >= 0."""
INT_PROBES = (-1,)
"""No int key accepts a negative value (counts, sizes, steps, seeds)."""


def task_schema(task: str) -> list[tuple[str, type]]:
    """(section path, attrs class) of each section task ``task`` declares (``Task.sections``):
    ``Config`` holds them as the task's, so its own walk does not reach them."""
    return [(f"config.{name}", cls) for name, cls in task_class(task).sections.items()]


def schema() -> list[tuple[str, type]]:
    """(section path, attrs class) of the run config, of each built-in task's sections and of
    each built-in plugin."""
    sources = builtin_sources().items()
    return [
        ("config", Config),
        *(section for task in BUILTIN_TASKS for section in task_schema(task)),
        *((f"plugins.{name}", s.load().Config) for name, s in sources),
    ]


def _attrs_class(kind: Any) -> type | None:
    """The attrs class inside ``kind`` (``X``, ``X | None``), if any."""
    candidates = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    return next((c for c in candidates if attrs.has(c)), None)


class TableKey(str):
    """A key of a table of attrs classes (``dict[str, X]``), which errors write ``['key']``."""


def numeric_fields(cls: type, path: tuple = ()) -> Iterator[tuple[tuple, type]]:
    """(path, int or float) of every numeric field; a path holds field names, list positions
    (a list of attrs classes is probed at position 0) and table keys (a table of attrs classes
    is probed at the key ``key``)."""
    for field in attrs.fields(attrs.resolve_types(cls)):
        kind = field.type
        scalars = set(typing.get_args(kind)) if isinstance(kind, types.UnionType) else {kind}
        if scalars & {int, float} and bool not in scalars:
            yield (*path, field.name), float if float in scalars else int
        elif (nested := _attrs_class(kind)) is not None:
            yield from numeric_fields(nested, (*path, field.name))
        elif typing.get_origin(kind) is list and attrs.has(item := typing.get_args(kind)[0]):
            yield from numeric_fields(item, (*path, field.name, 0))
        elif typing.get_origin(kind) is dict and attrs.has(item := typing.get_args(kind)[1]):
            yield from numeric_fields(item, (*path, field.name, TableKey("key")))


def with_value(defaults: Any, path: tuple, value: Any) -> Any:
    """``defaults`` (unstructured) with ``value`` at ``path``; absent tables are created."""
    head, *rest = path
    node = dict(defaults) if isinstance(head, str) else list(defaults)
    if not rest:
        node[head] = value
        return node
    if isinstance(head, int) and head == len(node):
        node.append({})  # an empty list: probe a new element of defaults
    child = node[head] if isinstance(head, int) or node.get(head) is not None else {}
    node[head] = with_value(child, tuple(rest), value)
    return node


def key_part(part: str | int) -> str:
    """One step of a key as errors write it: ``.name``, ``[0]``, ``['key']``."""
    if isinstance(part, TableKey):
        return f"[{str(part)!r}]"
    return f"[{part}]" if isinstance(part, int) else f".{part}"


def key_name(where: str, path: tuple) -> str:
    return where + "".join(map(key_part, path))


def unguarded(where: str, cls: type) -> list[str]:
    """Keys of ``cls`` that accept one of the probes, or refuse it without naming the key."""
    defaults = unstructure(cls())
    found = []
    for path, kind in numeric_fields(cls):
        key = key_name(where, path)
        for probe in FLOAT_PROBES if kind is float else INT_PROBES:
            try:
                structure(with_value(defaults, path, probe), cls, where)
            except ConfigError as error:
                if key in str(error):
                    continue
            found.append(f"{key}={probe}")
    return found


def test_the_walk_finds_numeric_fields_in_nested_classes_and_lists():
    keys = {key_name(where, path) for where, cls in schema() for path, _ in numeric_fields(cls)}
    assert {"config.data.batch_size", "config.optim.lr", "config.run.epochs"} <= keys
    assert "plugins.terrain_loss.profiles['key'].edge" in keys
    assert "plugins.curriculum.phases[0].start" in keys
    assert {"config.model.n_feats", "config.loss.edge", "config.model.lora_rank"} <= keys
    assert "config.resumed[0].after_epoch" in keys
    assert len(keys) > 40


@pytest.mark.parametrize(("where", "cls"), schema(), ids=lambda value: str(value))
def test_every_numeric_key_refuses_out_of_range_values_naming_the_key(where: str, cls: type):
    assert unguarded(where, cls) == []


def test_a_key_without_a_validator_is_found():
    @attrs.define
    class Section:
        guarded: int = attrs.field(default=1, validator=attrs.validators.ge(1))
        loose: float = 0.5

    assert unguarded("config.section", Section) == [
        f"config.section.loose={probe}" for probe in FLOAT_PROBES
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "data.batch_size=0"], "'batch_size' must be >= 1: 0 @ config.data.batch_size"),
        (["--set", "data.batch_size=-2"], "@ config.data.batch_size"),
        (["--set", "optim.accumulation_steps=0"], "@ config.optim.accumulation_steps"),
        (["--set", "optim.lr=nan"], "'lr' must be a finite number: nan @ config.optim.lr"),
        (["--set", "optim.lr=inf"], "'lr' must be a finite number: inf @ config.optim.lr"),
        (["--set", "optim.lr=-1"], "'lr' must be >= 0.0: -1.0 @ config.optim.lr"),
        (["--set", "train.checkpoint_every=0"], "@ config.train.checkpoint_every"),
        (["--epochs", "0"], "'epochs' must be >= 1: 0 @ config.run.epochs"),
        (["--epochs", "-1"], "@ config.run.epochs"),
        (["--seed", str(2**32)], "'seed' must be < 4294967296"),
        (["--plugins", ""], "omit --plugins"),
        (["--plugins", "stratified,,pcgrad"], "empty plugin name"),
        (["--set", "plugins.reinforce.entropy_weight=inf"], "plugins.reinforce.entropy_weight"),
    ],
)
def test_cli_refuses_bad_numbers_with_exit_2(args, message, tmp_path: Path, capsys):
    fast = [item for assignment in FAST for item in ("--set", assignment)]
    plugins = ["--plugins", "reinforce"] if "reinforce" in " ".join(args) else []
    out = tmp_path / "run"
    assert main([*fast, *plugins, *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing is created before the config is valid"


def test_config_folder_and_out_file_exit_2_naming_the_path(tmp_path: Path, capsys):
    assert main(["--config", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a folder" in capsys.readouterr().err
    file = tmp_path / "taken"
    file.write_text("not a folder")
    assert main(["--out", str(file), "--epochs", "1"]) == 2
    assert f"{file} is a file, not a folder" in capsys.readouterr().err
    assert main(["--out", str(file / "run"), "--epochs", "1"]) == 2
    assert str(file / "run") in capsys.readouterr().err


def test_defaults_pass_their_own_validators():
    assert load_config() == Config()


def test_a_section_no_task_declares_names_the_task_and_the_sections_it_takes(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("[void]\nradius = 3\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == (
        "config: unknown section [void]; task 'dem_sr' takes [model], [loss] and the "
        "framework's [run], [data], [optim], [train], [plugins.<name>] "
        f"(in {path})"
    )
    with pytest.raises(ConfigError, match=r"unknown section \[void\]; task 'sar2opt' takes"):
        load_config(None, ["run.task='sar2opt'", "void.radius=3"])
