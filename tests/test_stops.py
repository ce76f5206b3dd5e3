"""Stops of a two-process run: a signal to one process, or to the launcher, stops every
process after the same step within seconds; each saves its share of the epoch, and the
resumed run ends with the uninterrupted run's metrics."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import plugins
from core.run import main
from core.run_folder import INTERRUPTED
from tests.conftest import read_metrics
from tests.distributed.stop_probe import LOG_KEY, PAUSED, StopProbe
from tests.distributed.two_processes import launch
from tests.test_run import REPO, fast_args, run_cli, without_timing

PROBE = REPO / "tests" / "distributed" / "stop_probe.py"
STOP_SECONDS = 60
"""Signal to exit of the whole job: far below gloo's 30-minute collective timeout, which
is how long a process waited for a peer that had stopped alone."""
START_SECONDS = 240


@pytest.fixture(scope="module")
def uninterrupted(procedural_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    args = fast_args(procedural_dir, out, "--plugins", "stop_probe")
    result = run_cli(*launch(), str(PROBE), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert all(LOG_KEY in row for row in rows)
    return rows


@pytest.fixture
def probe_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe by name in this process too, for a resume that is to be refused."""
    monkeypatch.setitem(
        plugins.BUILTIN_PLUGINS, StopProbe.name, f"{StopProbe.__module__}:StopProbe"
    )


def stop_two_processes(
    data: Path,
    out: Path,
    *,
    paused_rank: int,
    step: int,
    signal_launcher: bool,
    sent: signal.Signals = signal.SIGTERM,
) -> tuple[int, float, str]:
    """Start two processes, hold ``paused_rank`` at ``step`` and send ``sent`` to it, or to
    the launcher; returns the launcher's status, seconds from signal to exit, its log."""
    args = fast_args(data, out, "--plugins", "stop_probe", "--set",
                     f"plugins.stop_probe.rank={paused_rank}", "--set",
                     f"plugins.stop_probe.step={step}")  # fmt: skip
    log = out.with_name("launcher.log")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as handle:
        launcher = subprocess.Popen(
            [*launch(), str(PROBE), *args], cwd=REPO, env=env, stdout=handle, stderr=handle,
            start_new_session=True,  # its own process group, so a failed test leaves nothing
        )  # fmt: skip
        try:
            deadline = time.monotonic() + START_SECONDS
            while not (out / PAUSED).exists():
                if launcher.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no process paused at step {step}:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            paused_pid = json.loads((out / PAUSED).read_text())["pid"]
            os.kill(launcher.pid if signal_launcher else paused_pid, sent)
            signalled = time.monotonic()
            status = launcher.wait(timeout=STOP_SECONDS)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
    return status, time.monotonic() - signalled, log.read_text()


def check_stop_and_resume(
    out: Path,
    log: str,
    uninterrupted: list[dict],
    step: int,
    capsys: pytest.CaptureFixture,
    sent: signal.Signals = signal.SIGTERM,
) -> None:
    """Both processes exited 130 after the same mid-epoch step, and the resumed run ends as
    the uninterrupted one did."""
    for rank in (0, 1):
        assert (out / f"exit_rank{rank}").read_text() == "130", log[-3000:]
    reported = re.findall(r"exitcode\s*:\s*(-?\d+)", log)  # torchrun's list of failed ranks
    assert set(reported) <= {"130"}, log[-3000:]
    stopped = json.loads((out / INTERRUPTED).read_text())
    assert stopped["signal"] == sent.name and stopped["epoch"] == 2
    command = f"accelerate launch --multi_gpu --num_processes 2 -m core.run --resume {out}"
    assert stopped["resume"] == command
    assert log.count(f"continue with {command}") == 1  # from the main process only
    assert stopped["steps_done"] == step + 1 - uninterrupted[0]["steps"] < stopped["steps"]
    assert len(read_metrics(out)) == 1
    checkpoint = (out / "checkpoint.pt").read_bytes()
    assert main(["--resume", str(out)]) == 2  # one process cannot take over two shares
    assert "with 2 process(es); resume it with 2" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    resumed = run_cli(*launch(), str(PROBE), "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(read_metrics(out)) == without_timing(uninterrupted)
    assert not (out / INTERRUPTED).exists()


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both(
    procedural_dir, tmp_path, uninterrupted, probe_registered, capsys
):
    step = uninterrupted[0]["steps"]  # the first step of epoch 2
    out = tmp_path / "run"
    status, seconds, log = stop_two_processes(
        procedural_dir, out, paused_rank=0, step=step, signal_launcher=False
    )
    assert seconds < STOP_SECONDS
    assert status == 1, log[-3000:]  # torchrun's status when its workers fail
    check_stop_and_resume(out, log, uninterrupted, step, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_to_the_launcher_stops_both(
    procedural_dir, tmp_path, uninterrupted, probe_registered, capsys, sent
):
    step = uninterrupted[0]["steps"]
    out = tmp_path / "run"
    status, seconds, log = stop_two_processes(
        procedural_dir, out, paused_rank=1, step=step, signal_launcher=True, sent=sent
    )
    assert seconds < STOP_SECONDS
    # accelerate launch exits 128 + the signal once torchrun's agent re-raises the signal it
    # got (accelerate 1.16 and later), and 1 where it lets that exception escape (1.15): the
    # status does not tell a stop from a crash; interrupted.json and each rank's 130 do
    assert status in (1, 128 + sent), log[-3000:]
    check_stop_and_resume(out, log, uninterrupted, step, capsys, sent)


def test_an_interrupted_process_exits_130_through_a_late_sigterm():
    # torchrun sends SIGTERM to the remaining workers once one has exited; one that is
    # already on its way out after saving must still exit 130, not be killed by it
    script = (
        "import atexit, os, signal; from core.run import exit_process; "
        "atexit.register(os.kill, os.getpid(), signal.SIGTERM); exit_process(130)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60, check=False)
    assert result.returncode == 130
