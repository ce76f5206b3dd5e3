"""Config: strict structuring, overrides, and the resolved file repeating a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Config, dump_config, load_config, parse_override
from core.errors import ConfigError


def test_every_key_has_a_default():
    config = load_config()
    assert config == Config()
    assert config.run.task == "dem_sr" and config.data.batch_size >= 5


def test_toml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nepochs = 7\nplugins = ["a"]\n[data]\nbatch_size = 12\n')
    config = load_config(path, ["data.batch_size=20", "optim.lr=0.5", "plugins.x.k=1"])
    assert config.run.epochs == 7
    assert config.run.plugins == ["a"]
    assert config.data.batch_size == 20
    assert config.optim.lr == 0.5
    assert config.plugins == {"x": {"k": 1}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.epoch=3", r"extra fields found \(epoch\) @ config.run"),
        ("nosuch.key=1", r"unknown section \[nosuch\]; task 'dem_sr' takes \[model\]"),
        ('run.epochs="3"', r"expected int, got str '3' @ config.run.epochs"),
        ("run.epochs=2.5", r"expected int, got float 2.5 @ config.run.epochs"),
        ("data.strict=1", r"expected bool, got int 1 @ config.data.strict"),
        ("loss.edge=true", r"expected float, got a boolean @ config.loss.edge"),
        ("optim.schedule='linear'", r"'schedule' must be in .*'linear'"),
        ("model.norm=layer", r"'norm' must be in"),
        ("run.plugins=[1]", r"expected str.*config.run.plugins"),
    ],
)
def test_bad_values_name_the_key_and_type(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_malformed_override_and_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="must name a section"):
        load_config(None, ["epochs=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="one table per plugin"):
        load_config(None, ["plugins.stratified=3"])


def test_override_value_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=plain words") == (["a", "b"], "plain words")
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])


def test_resolved_config_round_trips(tmp_path: Path):
    config = load_config(None, ["run.plugins=['x', 'y']", "plugins.x.scales={edge=2.0}"])
    dump_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config


@pytest.mark.parametrize(
    ("task", "key", "section"),
    [
        ("sar2opt", "model.preset='small'", "TerraMindSection"),  # an RCAN key
        ("dem_sr", "model.lora_rank=4", "RcanSection"),  # a TerraMind key
        ("sar2opt", "loss.edge=0.3", "NoLossSection"),  # a dem_sr loss weight
    ],
)
def test_model_and_loss_are_the_tasks_own_sections(task: str, key: str, section: str):
    """Each task declares its [model] and [loss]; another task's keys are refused by name."""
    config = load_config(None, [f"run.task='{task}'"])
    assert type(config.model).__name__ == section or type(config.loss).__name__ == section
    name = key.partition("=")[0]
    section_name, _, field = name.partition(".")
    expected = rf"extra fields found \({field}\) @ config\.{section_name}"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"run.task='{task}'", key])


def test_the_resolved_file_holds_the_tasks_sections(tmp_path: Path):
    config = load_config(None, ["run.task='sar2opt'", "model.lora_rank=4"])
    dump_config(config, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again == config and again.model.lora_rank == 4
    assert "preset" not in (tmp_path / "config.toml").read_text()


def test_an_unknown_task_is_named():
    with pytest.raises(ConfigError, match=r"run\.task: unknown task 'nosuch'\. Available: dem_sr"):
        load_config(None, ["run.task='nosuch'"])


def test_a_file_of_another_layout_is_refused_naming_the_file(tmp_path: Path):
    """A terraplug 0.1 config.toml held both tasks' [model] keys: refused, naming key and file."""
    path = tmp_path / "config.toml"
    dump_config(load_config(), path)
    path.write_text(path.read_text().replace("[model]\n", '[model]\nterramind = "tiny"\n'))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert "extra fields found (terramind) @ config.model" in str(refused.value)
    assert str(path) in str(refused.value)
