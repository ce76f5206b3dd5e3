"""One run per run folder: a second run on a busy ``--out`` stops with exit 2 naming the
holder, with one process or several, and a killed run leaves no stale lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.run import main
from core.runlock import LOCK_FILE, RunLock
from tests.conftest import read_metrics
from tests.distributed.two_processes import launch
from tests.test_run import fast_args

REPO = Path(__file__).resolve().parent.parent


def start_run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "core.run", *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def holds_lock(out: Path, pid: int) -> bool:
    try:
        return json.loads((out / LOCK_FILE).read_text())["pid"] == pid
    except (FileNotFoundError, ValueError):
        return False


@pytest.mark.slow
def test_second_run_on_a_busy_folder_exits_2_and_a_killed_run_leaves_no_lock(
    procedural_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "run"
    first = start_run(fast_args(procedural_dir, out, "--epochs", "3"))
    wait_for(lambda: holds_lock(out, first.pid), first)
    assert main(fast_args(procedural_dir, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"run folder {out} is in use by another run (pid {first.pid} on" in err
    assert socket.gethostname() in err and "started 20" in err
    wait_for(lambda: (out / "metrics.jsonl").exists(), first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    # the kernel dropped the dead run's lock: the run resumes, and its rows are its own
    assert main(["--resume", str(out)]) == 0
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_every_process_of_a_multi_process_run_stops_on_a_busy_folder(
    procedural_dir: Path, tmp_path: Path
):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock.acquire(out)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [*launch(), "-m", "core.run", *fast_args(procedural_dir, out, "--epochs", "1")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
    finally:
        lock.release()
    assert result.returncode != 0
    assert result.stderr.count(f"is in use by another run (pid {os.getpid()}") == 2
    assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (Path.mkdir, "is a folder"),
        (os.mkfifo, "is not a regular file"),
    ],
)
def test_a_lock_file_that_is_no_plain_file_exits_2_naming_it(
    procedural_dir: Path, tmp_path: Path, capsys, make, problem: str
):
    out = tmp_path / "run"
    out.mkdir()
    make(out / LOCK_FILE)
    assert main(fast_args(procedural_dir, out, "--epochs", "1")) == 2
    assert f"{out / LOCK_FILE}: {problem}" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE]
