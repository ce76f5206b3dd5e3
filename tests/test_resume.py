"""What ``--resume`` may change: epochs grow and reporting options change, recorded in
``config.toml``; plugins, task, seed, data, model, loss and optimizer settings are refused."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from core.config import load_config
from core.errors import ConfigError
from core.resume import check_resume
from core.run import build_parser, main, resolve_config
from core.runlock import RunLock
from tests.conftest import read_metrics
from tests.test_bad_input import fast_args as cli_args


def test_resume_extends_epochs_records_it_and_refuses_other_plugins(
    procedural_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "run"
    assert main(cli_args(procedural_dir, out)) == 0
    assert main(["--resume", str(out), "--epochs", "2", "--set", "train.progress='never'"]) == 0
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["run"]["epochs"] == 2
    [note] = saved["resumed"]
    assert note["after_epoch"] == 1 and note["changed"] == {"run.epochs": [1, 2]}
    assert note["at"].startswith("20")

    before = (out / "config.toml").read_text(), (out / "metrics.jsonl").read_text()
    refused = ["--resume", str(out), "--epochs", "3", "--plugins", "stratified,pcgrad"]
    assert main(refused) == 2
    err = capsys.readouterr().err
    assert "run.plugins: the run has [], this command asks for ['stratified', 'pcgrad']" in err
    assert "run.epochs" not in err.split("Refused:")[1], "growing epochs is allowed"
    assert ((out / "config.toml").read_text(), (out / "metrics.jsonl").read_text()) == before

    # a resume of a folder that a live process holds is refused like a new run
    holder = RunLock.acquire(out)
    try:
        assert main(["--resume", str(out), "--epochs", "3"]) == 2
    finally:
        holder.release()
    assert f"is in use by another run (pid {os.getpid()}" in capsys.readouterr().err

    # a config.toml edited to another model: the checkpoint does not fit, exit 2 naming it
    (out / "config.toml").write_text(before[0].replace("n_feats = 8", "n_feats = 12"))
    assert main(["--resume", str(out)]) == 2
    assert f"{out / 'checkpoint.pt'} does not match the model" in capsys.readouterr().err
    (out / "config.toml").write_text(before[0])

    # a new run from the resumed run's config.toml starts its own history
    repeat = build_parser().parse_args(["--config", str(out / "config.toml"), "--out", "again"])
    assert resolve_config(repeat).resumed == []


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("run.seed=1", "run.seed: the run has 0, this command asks for 1"),
        ("run.task='sar2opt'", "run.task: the run has 'dem_sr', this command asks for 'sar2opt'"),
        ("run.epochs=2", "run.epochs: the run has 4, this command asks for 2"),
        ("data.dir='/elsewhere'", "data.dir: the run has '', this command asks for '/elsewhere'"),
        ("model.preset='default'", "model.preset"),
        ("loss.edge=0.4", "loss.edge: the run has 0.2, this command asks for 0.4"),
        ("optim.lr=0.5", "optim.lr"),
        ("train.mixed_precision='bf16'", "train.mixed_precision"),
        ("plugins.stratified.batch_size=4", "plugins.stratified.batch_size: the run has None"),
    ],
)
def test_settings_that_define_the_run_are_refused_naming_both_values(override, refused):
    saved = load_config(None, ["run.epochs=4", "run.plugins=['stratified']"])
    resumed = load_config(None, ["run.epochs=4", "run.plugins=['stratified']", override])
    with pytest.raises(ConfigError, match="Refused") as caught:
        check_resume(Path("runs/x"), saved, resumed)
    assert refused in str(caught.value)


def test_longer_runs_and_reporting_options_may_change():
    saved = load_config(None, ["run.epochs=4"])
    resumed = load_config(
        None,
        ["run.epochs=9", "run.out='moved'", "train.progress='always'", "train.plot_every=2"],
    )
    assert check_resume(Path("runs/x"), saved, resumed) == {
        "run.epochs": [4, 9],
        "run.out": ["", "moved"],
        "train.plot_every": [0, 2],
        "train.progress": ["auto", "always"],
    }
