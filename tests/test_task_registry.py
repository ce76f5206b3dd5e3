"""Third-party tasks: the template task distribution installs with pip and trains by name,
and the task registry refuses unknown names, taken names and another task's config keys."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from core.run import main
from terraplug import UsageError
from terraplug.testing import run_training
from tests.conftest import install_distribution, read_metrics
from tests.test_run import REPO, run_cli


@pytest.fixture(scope="module")
def template_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template task distribution, pip-installed for real into a folder of its own."""
    target = tmp_path_factory.mktemp("template-task") / "site"
    return install_distribution(REPO / "entrypoints" / "terraplug-example-task", target)


@pytest.fixture
def template_task_installed(template_task: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The template task visible to in-process runs (its folder on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(template_task))
    return template_task


@pytest.mark.slow
def test_template_task_installs_and_trains_by_name(
    template_task: Path, procedural_dir: Path, tmp_path: Path
):
    out = tmp_path / "run"
    result = run_cli(
        sys.executable, "-m", "core.run", "--task", "dem_denoise", "--data", str(procedural_dir),
        "--epochs", "4", "--out", str(out), "--set", "train.progress='never'",
        "--set", "data.batch_size=4", "--set", "optim.lr=0.003", path=[template_task],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terraplug: dem_denoise" in result.stdout

    config = tomllib.loads((out / "config.toml").read_text())
    assert config["run"]["task"] == "dem_denoise"
    assert {"noise_m", "channels", "depth"} <= set(config["model"])
    assert set(config["loss"]) == {"l1", "gradient"}  # the task's own sections, not dem_sr's

    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert all({"val_rmse_m", "val_rmse_m_noisy", "train_loss_l1"} <= set(row) for row in rows)
    # The validation noise is drawn once per tile: the noisy input scores the same each epoch.
    assert len({row["val_rmse_m_noisy"] for row in rows}) == 1
    noisy = rows[0]["val_rmse_m_noisy"]
    assert noisy == pytest.approx(5.0, rel=0.05)  # model.noise_m's default, in metres
    # What makes it a denoiser: its output is closer to the clean tiles than its input.
    assert rows[-1]["val_rmse_m"] < noisy - 0.1, [row["val_rmse_m"] for row in rows]
    for name in ("denoised.png", "loss_curves.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name


def test_unknown_task_exits_2_listing_every_task(template_task_installed, tmp_path, capsys):
    assert main(["--task", "nosuch", "--out", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err
    assert "unknown task 'nosuch'" in message
    for name in ("dem_sr", "sar2opt", "dem_denoise"):
        assert name in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # dem_sr's [model] and [loss] keys: each task's sections hold only its own keys
        (["--set", "model.preset='small'"], "extra fields found (preset) @ config.model"),
        (["--set", "loss.elevation=1.0"], "extra fields found (elevation) @ config.loss"),
        # the template's attrs validators, reported at the key
        (["--set", "model.noise_m=-1.0"], "'noise_m' must be > 0.0: -1.0 @ config.model.noise_m"),
        ([], "--task dem_denoise needs --data DIR"),
    ],
)
def test_template_task_refuses_bad_config(template_task_installed, args, message, tmp_path, capsys):
    assert main(["--task", "dem_denoise", *args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_distribution_taking_a_task_name_is_refused(tmp_path: Path):
    source = tmp_path / "dup"
    (source / "src" / "terraplug_dup_task").mkdir(parents=True)
    (source / "src" / "terraplug_dup_task" / "__init__.py").write_text("class Dup:\n    pass\n")
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "terraplug-dup-task"\nversion = "0.0.1"\ndependencies = []\n'
        '[project.entry-points."terraplug.tasks"]\ndem_sr = "terraplug_dup_task:Dup"\n'
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n'
    )
    site = install_distribution(source, tmp_path / "site")
    result = run_cli(sys.executable, "-m", "core.run", "--task", "dem_sr",
                     "--out", str(tmp_path / "run"), path=[site])  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "terraplug-dup-task 0.0.1" in result.stderr
    assert "'dem_sr'" in result.stderr and "already taken" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_harness_trains_a_third_party_task_with_a_plugin(
    template_task_installed, procedural_dir: Path, tmp_path: Path
):
    """terraplug.testing serves task authors too: any task by name, with plugins mixed in."""
    rows = run_training(
        tmp_path, ["balanced_grad"], epochs=1, data_dir=procedural_dir, task="dem_denoise"
    )
    assert rows[0]["val_rmse_m_noisy"] > 0 and "train_loss_gradient" in rows[0]
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["run"]["plugins"] == ["balanced_grad"] and "noise_m" in config["model"]


def test_the_harness_leaves_another_task_its_own_default_data(template_task_installed, tmp_path):
    """Procedural DEM tiles are dem_sr's default in the harness; another task gets no
    ``data.dir`` (dem_denoise has no built-in data and says so)."""
    with pytest.raises(UsageError, match="--task dem_denoise needs --data DIR"):
        run_training(tmp_path, epochs=1, task="dem_denoise")
    assert not (tmp_path / "tiles").exists()

