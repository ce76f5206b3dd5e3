"""What ``--resume`` may change: epochs grow and reporting options change, recorded in
``config.toml``; plugins, task, seed, data, model, loss and optimizer settings are refused."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from core.config import load_config
from core.errors import ConfigError
from core.resume import check_resume
from core.run import build_parser, main, resolve_config
from core.runlock import RunLock
from core.safe_io import load_checkpoint
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

    # a config.toml edited to another model: refused against the checkpoint's config
    (out / "config.toml").write_text(before[0].replace("n_feats = 8", "n_feats = 12"))
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"model.n_feats: the run has 8, {out / 'config.toml'} has 12" in err
    (out / "config.toml").write_text(before[0])

    # a new run from the resumed run's config.toml starts its own history
    repeat = build_parser().parse_args(["--config", str(out / "config.toml"), "--out", "again"])
    assert resolve_config(repeat)[0].resumed == []


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


def test_a_resume_reads_the_data_the_run_started_with(
    procedural_dir: Path, tmp_path: Path, monkeypatch, capsys
):
    """``--data tiles`` is kept as the folder it named where the run started, and a resume
    checks that it still holds the same GeoTIFFs (count, names, sizes, modification times)."""
    start, elsewhere, out = tmp_path / "start", tmp_path / "elsewhere", tmp_path / "run"
    tiles = Path(shutil.copytree(procedural_dir, start / "tiles"))
    (elsewhere / "tiles").mkdir(parents=True)
    for tile in sorted(procedural_dir.glob("*.tif"))[:8]:  # a folder of the same name
        shutil.copy2(tile, elsewhere / "tiles")
    monkeypatch.chdir(start)
    assert main(cli_args(Path("tiles"), out)) == 0
    assert tomllib.loads((out / "config.toml").read_text())["data"]["dir"] == str(tiles)

    monkeypatch.chdir(elsewhere)
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    first, second = read_metrics(out)
    assert second["terrain_counts"] == first["terrain_counts"], "trained on other tiles"

    count = len(list(tiles.glob("*.tif")))
    gone = tiles / "alpine_tile_0.tif"
    kept = gone.read_bytes(), gone.stat().st_mtime_ns
    gone.unlink()
    assert main(["--resume", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert f"data.dir {tiles} holds {count - 1} GeoTIFFs, the run trained on {count}" in err
    gone.write_bytes(kept[0])  # the same name and size, written again
    assert main(["--resume", str(out), "--epochs", "3"]) == 2
    assert "modified since the run started" in capsys.readouterr().err
    assert len(read_metrics(out)) == 2

    os.utime(gone, ns=(kept[1], kept[1]))  # restored as it was
    assert main(["--resume", str(out), "--epochs", "3"]) == 0
    assert len(read_metrics(out)) == 3


def test_edits_to_config_toml_before_a_resume_follow_the_resume_rules(
    procedural_dir: Path, tmp_path: Path, capsys
):
    """The checkpoint carries the config it was trained with; config.toml edited since is
    held to the rules ``--set`` follows."""
    out = tmp_path / "run"
    assert main(cli_args(procedural_dir, out)) == 0
    config = out / "config.toml"
    original = config.read_text()
    edits = [
        ("lr = 0.001", "lr = 0.5", "optim.lr: the run has 0.001, {config} has 0.5"),
        ("\nseed = 0\n", "\nseed = 7\n", "run.seed: the run has 0, {config} has 7"),
    ]
    for before, after, refused in edits:
        config.write_text(original.replace(before, after, 1))
        assert main(["--resume", str(out), "--epochs", "2"]) == 2
        assert refused.format(config=config) in capsys.readouterr().err
        assert len(read_metrics(out)) == 1

    # a reporting option edited there may change, and the history records it
    config.write_text(original.replace("plot_every = 0", "plot_every = 1", 1))
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    [note] = tomllib.loads(config.read_text())["resumed"]
    assert note["changed"] == {"run.epochs": [1, 2], "train.plot_every": [0, 1]}

    # a checkpoint that does not record its config cannot be checked: refused, naming it
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    saved_config = state.pop("config")
    torch.save(state, checkpoint)
    assert main(["--resume", str(out), "--epochs", "3"]) == 2
    assert f"{checkpoint}: it does not record the config" in capsys.readouterr().err

    # one of an earlier layout (format 1 had no probe loss in its process states) would fail
    # with a KeyError deep in the restore: refused up front, naming it
    state = load_checkpoint(checkpoint) | {"config": saved_config}
    del state["format"]
    for process in state["processes"]:
        del process["probe_last"]
    torch.save(state, checkpoint)
    assert main(["--resume", str(out), "--epochs", "3"]) == 2
    assert f"{checkpoint}: checkpoint format 1, this terraplug resumes format 2" in (
        capsys.readouterr().err
    )


def test_a_resume_blames_the_command_for_its_own_mistakes(
    procedural_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "run"
    assert main(cli_args(procedural_dir, out)) == 0
    assert main(["--resume", str(out), "--set", "data.batch_size='ten'"]) == 2
    err = capsys.readouterr().err
    assert "expected int, got str 'ten' @ config.data.batch_size" in err
    assert "config.toml" not in err
    assert main(["--resume", str(out), "--task", "sar2opt"]) == 2
    err = capsys.readouterr().err
    assert "a resume keeps its task: the run has 'dem_sr', this command asks for 'sar2opt'" in err
    assert "extra fields" not in err
    config = out / "config.toml"
    config.write_text(config.read_text().replace('task = "dem_sr"', 'task = "sar2opt"'))
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"a resume keeps its task: the run has 'dem_sr', {config} has 'sar2opt'" in err


def test_cuda_generator_states_round_trip_through_a_checkpoint_and_a_resume(
    procedural_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Exact resume on a GPU needs CUDA's generators too. Without a GPU, a fake CUDA with two
    devices (``train.cpu`` keeps the model on the CPU) shows the states reach the real
    checkpoint file, read weights-only, and come back on a real resume."""
    devices = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(devices))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    out = tmp_path / "run"
    assert main(cli_args(procedural_dir, out, "--set", "train.cpu=true")) == 0
    [process] = load_checkpoint(out / "checkpoint.pt")["processes"]
    assert [state.tolist() for state in process["rng"]["cuda"]] == [s.tolist() for s in devices]

    saved = [s.clone() for s in devices]
    devices[0] += 1  # the generators moved on after the checkpoint
    assert main(["--resume", str(out), "--epochs", "2", "--set", "train.progress='never'"]) == 0
    assert [state.tolist() for state in restored[0]] == [s.tolist() for s in saved]
