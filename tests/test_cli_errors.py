"""Every command reports a usage error one way (``core.errors.report_error``): ``error:
MESSAGE``, then the plugin and hook that raised it when a plugin did, and exit status 2."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from core.classify import main as classify_main
from core.experiment.cli import main as experiment_main
from core.predict import main as predict_main
from core.run import main as run_main
from core.tasks.sar2opt.adapters import main as adapters_main
from tests.test_predict import UTM, UTM_TRANSFORM, terrain, trained_run, write_dem

__all__ = ["trained_run"]  # the fixture: a dem_sr run trained with domain_bn


def reported(err: str) -> list[str]:
    """The lines of stderr from the ``error:`` line on (warnings may come before it)."""
    lines = err.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")) :]


def test_a_plugins_error_reads_the_same_from_run_and_predict(
    trained_run: Path, procedural_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run's config.toml edited to a model domain_bn cannot adapt: training it again and
    predicting with it both name the plugin and the hook, in the same words."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = run / "config.toml"
    config.write_text(config.read_text().replace('norm = "batch"', 'norm = "none"'))
    src = write_dem(tmp_path / "in.tif", terrain((20, 20)), UTM_TRANSFORM, UTM)

    assert predict_main(["--checkpoint", str(run), str(src), str(tmp_path / "out.tif")]) == 2
    predicted = reported(capsys.readouterr().err)
    again = ["--data", str(procedural_dir), "--out", str(tmp_path / "again")]
    assert run_main(["--config", str(config), *again]) == 2
    trained = reported(capsys.readouterr().err)

    assert predicted == trained
    assert predicted[0].startswith("error: ") and "nn.BatchNorm2d" in predicted[0]
    assert predicted[1:] == ["raised by plugin 'domain_bn' in hook 'configure_model'"]


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str, str]] = {
    # name: (main, arguments, the message); {tmp} and {run} are filled in
    "core.run": (run_main, "--plugins nosuch --out {tmp}/run", "unknown plugin 'nosuch'"),
    "core.experiment": (
        experiment_main,
        "--arms baseline;nosuch --out {tmp}/exp",
        "arm 'nosuch': unknown plugin 'nosuch'",
    ),
    "core.predict": (
        predict_main,
        "--checkpoint {tmp}/nowhere {tmp}/in.tif {tmp}/out.tif",
        "--checkpoint {tmp}/nowhere: no config.toml there",
    ),
    "core.classify": (classify_main, "{tmp}/nowhere.tif", "{tmp}/nowhere.tif: no such file"),
    "core.tasks.sar2opt.adapters": (
        adapters_main,
        "{run} --merged {tmp}/merged.safetensors",
        "{run}: a dem_sr run, not sar2opt",
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reports_a_usage_error_as_error_message_with_exit_2(
    command: str, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main, arguments, message = COMMANDS[command]
    (tmp_path / "in.tif").write_bytes(b"")
    names = {"tmp": tmp_path, "run": trained_run}
    assert main(arguments.format(**names).split()) == 2
    first, *_ = reported(capsys.readouterr().err)
    assert first.startswith(f"error: {message.format(**names)}")
