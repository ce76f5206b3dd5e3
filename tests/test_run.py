"""``python -m core.run`` end to end: run folder, exit codes, determinism, resume, processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from core.run import main
from core.run_folder import INTERRUPTED
from tests.conftest import FAST, install_distribution, read_metrics
from tests.distributed.two_processes import launch

REPO = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = {
    "epoch", "train_loss", "val_loss", "val_rmse_m", "val_rmse_m_by_terrain",
    "val_slope_rmse_deg_by_terrain", "terrain_counts", "batches_missing_a_terrain",
    "active_terrains", "lr", "seconds",
}  # fmt: skip


def fast_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["--data", str(data), "--out", str(out), "--epochs", "2", *extra]
    for assignment in FAST:
        args += ["--set", assignment]
    return args


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_run_folder_contract(procedural_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    assert main(fast_args(procedural_dir, out)) == 0
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) >= REQUIRED_KEYS
    for name in ("config.toml", "checkpoint.pt", "summary.json", "loss_curves.png",
                 "terrain_rmse.png", "hillshade.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name


def test_same_seed_same_metrics_and_config_repeats_run(procedural_dir: Path, tmp_path: Path):
    assert main(fast_args(procedural_dir, tmp_path / "a", "--seed", "3")) == 0
    assert main(fast_args(procedural_dir, tmp_path / "b", "--seed", "3")) == 0
    repeat = ["--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "c")]
    assert main(repeat) == 0
    reference = without_timing(read_metrics(tmp_path / "a"))
    assert without_timing(read_metrics(tmp_path / "b")) == reference
    assert without_timing(read_metrics(tmp_path / "c")) == reference
    assert main(fast_args(procedural_dir, tmp_path / "d", "--seed", "4")) == 0
    assert without_timing(read_metrics(tmp_path / "d")) != reference


def interrupt_after_first_epoch(args: list[str], sig: signal.Signals) -> int:
    """Start a real run, send ``sig`` once epoch 1 is written, return its exit status."""
    out = Path(args[args.index("--out") + 1])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "core.run", *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    process.wait(timeout=240)
    return process.returncode


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_metrics(procedural_dir, tmp_path, sig):
    epochs = ["--epochs", "4"]
    straight = tmp_path / "straight"
    assert main(fast_args(procedural_dir, straight, *epochs)) == 0
    interrupted = tmp_path / "interrupted"
    status = interrupt_after_first_epoch(fast_args(procedural_dir, interrupted, *epochs), sig)
    assert status == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert len(read_metrics(interrupted)) < 4, "the run must really have been interrupted"
    assert (interrupted / INTERRUPTED).exists() == (sig == signal.SIGINT)
    assert main(["--resume", str(interrupted)]) == 0
    assert not (interrupted / INTERRUPTED).exists()
    assert without_timing(read_metrics(interrupted)) == without_timing(read_metrics(straight))


def test_existing_run_folder_is_not_overwritten(procedural_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(fast_args(procedural_dir, out)) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(fast_args(procedural_dir, out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plugins", "no_such_plugin"], "unknown plugin 'no_such_plugin'"),
        (["--set", "run.epoch=3"], "extra fields found (epoch) @ config.run"),
        (["--set", "data.batch_size='ten'"], "expected int, got str 'ten'"),
        (["--task", "segmentation"], "unknown task 'segmentation'"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
        (["--resume", "/no/such/run"], "/no/such/run"),
    ],
)
def test_usage_errors_exit_2_naming_the_problem(args, message, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_paths_beyond_the_bmp_keep_their_characters(procedural_dir: Path, tmp_path: Path, capsys):
    """An emoji in --data, --out and --resume names the folder it spells (json.dumps writes
    it as a surrogate pair escape, which TOML alone refuses)."""
    data = Path(shutil.copytree(procedural_dir, tmp_path / "tiles🌋"))
    out = tmp_path / "run🌋"
    assert main(fast_args(data, out, "--epochs", "1")) == 0
    saved = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert (saved["data"]["dir"], saved["run"]["out"]) == (str(data), str(out))
    assert main(["--resume", str(out), "--epochs", "2"]) == 0
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run🌋", "tiles🌋"]

    # a quoted value that is neither TOML nor JSON is refused, not kept with its quotes
    assert main(["--set", 'run.out="runs/x\\q"', "--epochs", "1"]) == 2
    assert '--set run.out="runs/x\\q": not a TOML value' in capsys.readouterr().err


def test_list_plugins_prints_name_origin_hooks_summary(capsys):
    assert main(["--list-plugins"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["name", "origin", "hooks", "summary"]


def run_cli(
    *args: str, cwd: Path = REPO, timeout: int = 300, path: Sequence[Path] = ()
) -> subprocess.CompletedProcess:
    """Run a command with this checkout (and ``path``, e.g. installed distributions) first on
    the import path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [REPO, *path]))}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def template_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template third-party distribution, pip-installed for real into a folder of its own."""
    target = tmp_path_factory.mktemp("template-plugin") / "site"
    return install_distribution(REPO / "entrypoints" / "terraplug-example", target)


@pytest.mark.slow
def test_template_plugin_installs_and_runs_by_name(
    template_plugin: Path, procedural_dir: Path, tmp_path: Path
):
    listing = run_cli(sys.executable, "-m", "core.run", "--list-plugins", path=[template_plugin])
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if line.startswith("component_scale"))
    assert "terraplug-example 0.1.0" in line and "loss_weights" in line

    out = tmp_path / "run"
    args = fast_args(procedural_dir, out, "--plugins", "component_scale", "--epochs", "1")
    result = run_cli(sys.executable, "-m", "core.run", *args, "--set",
                     "plugins.component_scale.scales={edge=0.0, spectral=0.0}",
                     path=[template_plugin])  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = (out / "config.toml").read_text()
    assert "component_scale" in config and "spectral = 0.0" in config
    row = read_metrics(out)[0]
    weighted = 1.0 * row["train_loss_elevation"] + 0.5 * row["train_loss_gradient"]
    weighted += 0.2 * row["train_loss_curvature"]
    assert row["train_loss"] == pytest.approx(weighted, rel=1e-5)

    # The template's own tests, written against terraplug and terraplug.testing alone.
    template = REPO / "entrypoints" / "terraplug-example"
    own = run_cli(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                  cwd=template, path=[template_plugin])  # fmt: skip
    assert own.returncode == 0, own.stdout[-3000:]
    assert "2 passed" in own.stdout


@pytest.mark.slow
def test_two_process_accelerate_launch(procedural_dir: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    result = run_cli(*launch(), "-m", "core.run", *fast_args(procedural_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2]
    single = tmp_path / "single"
    assert main(fast_args(procedural_dir, single)) == 0
    # Both runs see the same plan; two processes split it and each runs half the steps.
    for multi_row, single_row in zip(rows, read_metrics(single), strict=True):
        plan_size = sum(single_row["terrain_counts"].values())
        assert sum(multi_row["terrain_counts"].values()) <= plan_size
        assert multi_row["steps"] == single_row["steps"] // 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2


@pytest.mark.parametrize(
    "plugins",
    [
        "stratified,terrain_loss",
        "curriculum,stratified,balanced_grad",
        "stratified,domain_bn,terrain_loss",
        "stratified,pcgrad",
    ],
)
def test_documented_combinations_train(plugins: str, procedural_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    extra = ["--set", "model.norm='batch'"] if "domain_bn" in plugins else []
    assert main(fast_args(procedural_dir, out, "--plugins", plugins, *extra)) == 0
    for row in read_metrics(out):
        assert row["batches_missing_a_terrain"] == 0
        assert set(row["terrain_counts"]) == set(row["active_terrains"])
        assert all(value is not None for value in row["val_rmse_m_by_terrain"].values())


def test_bf16_and_tensorboard(procedural_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = fast_args(procedural_dir, out, "--epochs", "1")
    args += ["--set", "train.mixed_precision='bf16'", "--set", "train.tensorboard=true"]
    assert main(args) == 0
    assert read_metrics(out)[0]["val_rmse_m"] is not None
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
