"""``python -m core.experiment --backend ray`` on real multi-node Ray clusters on this machine
(``ray.cluster_utils.Cluster``: every node its own raylet and worker processes): the same runs
as the local backend, runs placed on distinct (fake) GPUs, a killed node's run resumed on
another node, SIGINT to the driver, and the shared-storage check."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from core.config import load_config
from core.experiment import main
from core.experiment.ray_backend import placements
from core.run_folder import CHECKPOINT, INTERRUPTED, SUMMARY
from tests.conftest import read_metrics
from tests.test_experiment import tiny_run_args
from tests.test_run import REPO, without_timing
from tests.test_tuned_arms import TRIALS
from tests.test_tuned_arms import command as tuned_arm_command

SEEDS = (0, 1)
EPOCHS = 4
"""Long enough that a node killed, or a driver interrupted, after a run's first epoch finds
the run still going: three epochs are left to it."""
STORE = 80 * 2**20
"""Each node's object store: the runs pass nothing through it."""
DEADLINE = 600
"""Seconds a test waits for a run to reach its first epoch on a loaded 2-core machine."""


def spec(folder: Path, num_gpus: int = 0) -> Path:
    path = folder / "spec.toml"
    path.write_text(f'[[arms]]\nname = "baseline"\n[resources]\nnum_gpus = {num_gpus}\n')
    return path


def args(spec_file: Path, data: Path, out: Path, *extra: str) -> list[str]:
    seeds = ",".join(map(str, SEEDS))
    extra = ("--config", str(spec_file), "--seeds", seeds, "--epochs", str(EPOCHS), *extra)
    return tiny_run_args(data, out, *extra, "--set", "train.progress='never'")


@pytest.fixture(scope="module")
def reference(procedural_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment under the local backend."""
    out = tmp_path_factory.mktemp("local")
    assert main(args(spec(out), procedural_dir, out / "exp", "--jobs", "2")) == 0
    return out / "exp"


@contextlib.contextmanager
def cluster(*nodes: dict) -> Iterator[Cluster]:
    """A head that takes no run (the driver's node, whose loss would end the cluster) and
    ``nodes``, each started as processes of its own."""
    head = {"num_cpus": 0, "include_dashboard": False, "object_store_memory": STORE}
    started = Cluster(initialize_head=True, head_node_args=head)
    try:
        for node in nodes:
            started.add_node(object_store_memory=STORE, **node)
        started.wait_for_nodes()
        yield started
    finally:
        ray.shutdown()
        started.shutdown()


def run_dirs(out: Path) -> list[Path]:
    return [out / "baseline" / f"seed{seed}" for seed in SEEDS]


def assert_same_runs(out: Path, reference: Path) -> None:
    """Run for run, the metrics the local backend wrote (timing apart, as in the resume
    tests)."""
    for run, local in zip(run_dirs(out), run_dirs(reference), strict=True):
        assert without_timing(read_metrics(run)) == without_timing(read_metrics(local)), run


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def is_core_run(process: psutil.Process) -> bool:
    """``python -m core.run`` itself (not a launcher of it, nor a process that just ended)."""
    with contextlib.suppress(psutil.Error):
        command = process.cmdline()
        return command[1:3] == ["-m", "core.run"]
    return False


def freeze_after_first_epoch(*runs: Path) -> list[psutil.Process]:
    """Each run's ``core.run`` process, stopped (SIGSTOP) as soon as its first checkpoint is
    written: a tiny run's last epochs take a fraction of a second, and a frozen run is
    mid-run whatever the machine's load when the test acts on it."""
    frozen: dict[Path, psutil.Process] = {}

    def freeze_the_ready() -> bool:
        for run in set(runs) - set(frozen):
            attempts = placements(run.with_suffix(".log"))
            children = psutil.Process(attempts[-1]["pid"]).children() if attempts else []
            runs_process = [child for child in children if is_core_run(child)]
            if runs_process and (run / CHECKPOINT).is_file():
                runs_process[0].suspend()
                frozen[run] = runs_process[0]
                assert not (run / SUMMARY).exists(), f"{run} ended before it was frozen"
        return len(frozen) == len(runs)

    wait_for(freeze_the_ready, "the runs' first checkpoints")
    return [frozen[run] for run in runs]


def pending(process: psutil.Process, sig: signal.Signals) -> bool:
    """Whether ``sig`` waits for a stopped process (Linux's /proc status masks)."""
    status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in status if line[:6] in ("SigPnd", "ShdPnd")]
    return any(mask & (1 << (sig - 1)) for mask in masks)


SIGNAL_DEADLINE = 120
"""Seconds from the driver's signal to SIGINT at its frozen runs: the driver writes a stop
file at once and each task looks for it every half second; two minutes cover a driver and
tasks starved of CPU on a loaded machine."""


def wait_for_sigint(frozen: list[psutil.Process], out: Path, driver_log: Path) -> None:
    """Until every frozen run has SIGINT pending; otherwise fail with what the chain from the
    driver's stop file to the run's signal shows: the stop files, each task's process, the
    driver's output."""
    deadline = time.monotonic() + SIGNAL_DEADLINE
    while True:
        try:
            if all(pending(process, signal.SIGINT) for process in frozen):
                return
            late = time.monotonic() > deadline
        except FileNotFoundError:  # a run ended, which a frozen one cannot by itself
            late = True
        if late:
            tasks = []
            for process in frozen:
                try:
                    parent = process.parent()
                    task = f"{parent.pid} {parent.status()} {' '.join(parent.cmdline())[:80]}"
                    tasks.append(f"run {process.pid} ({process.status()}), task {task}")
                except (psutil.Error, AttributeError):
                    tasks.append(f"run {process.pid} or its task gone")
            pytest.fail(
                f"no SIGINT at the runs within {SIGNAL_DEADLINE} s; stop files: "
                f"{sorted(p.name for p in out.glob('*/*.stop'))}; {'; '.join(tasks)}; "
                f"driver: {driver_log.read_text()[-2000:]}"
            )
        time.sleep(0.01)


def start_driver(command: list[str], log: Path) -> subprocess.Popen:
    """``python -m core.experiment`` as a process of its own, to signal as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "core.experiment", *command],
            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_two_nodes_give_the_local_backends_runs(
    reference: Path, procedural_dir: Path, tmp_path: Path
):
    with cluster({"num_cpus": 1}, {"num_cpus": 1}) as two:
        out = tmp_path / "exp"
        command = args(spec(tmp_path), procedural_dir, out, "--backend", "ray")
        assert main([*command, "--address", two.address]) == 0
        workers = {node.node_id for node in two.worker_nodes}
    assert_same_runs(out, reference)
    nodes = {p["node"] for run in run_dirs(out) for p in placements(run.with_suffix(".log"))}
    assert nodes == workers  # a run per one-core node, side by side
    assert (out / "results.md").is_file()
    assert not list(out.glob(".storage-probe*"))  # the check leaves nothing behind


def node_processes(node) -> list[psutil.Process]:
    """A node's raylet and everything under it: its workers and the runs they started."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_without_an_address_ray_starts_on_this_machine(
    reference: Path, procedural_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A Ray of its own, even where another cluster runs here and RAY_ADDRESS names it (as
    ``ray.init()`` without an address would join)."""
    out = tmp_path / "exp"
    with cluster({"num_cpus": 1}) as other:
        monkeypatch.setenv("RAY_ADDRESS", other.address)
        assert main(args(spec(tmp_path), procedural_dir, out, "--backend", "ray")) == 0
        theirs = {node.node_id for node in other.list_all_nodes()}
    assert not ray.is_initialized()  # and leaves again
    assert_same_runs(out, reference)
    nodes = {p["node"] for run in run_dirs(out) for p in placements(run.with_suffix(".log"))}
    assert len(nodes) == 1 and not nodes & theirs


@contextlib.contextmanager
def a_node_killed_mid_run(nodes: list, out: Path) -> Iterator[dict[str, str]]:
    """While the body runs the experiment in ``out``: once a run has a checkpoint, SIGKILL
    its node's raylet and workers, but not the run's own process, which must end with the
    task that started it. Yields the run, the node and whether the run's process outlived
    them (``orphan``), filled in when the body is done; the killer's own failure fails the
    test with its message."""
    killed: dict[str, str] = {}

    def kill() -> None:
        try:
            wait_for(lambda: any((r / CHECKPOINT).is_file() for r in run_dirs(out)), "a run")
            run = next(run for run in run_dirs(out) if (run / CHECKPOINT).is_file())
            [frozen] = freeze_after_first_epoch(run)  # so the node dies mid-run
            node_id = placements(run.with_suffix(".log"))[-1]["node"]
            node = next(node for node in nodes if node.node_id == node_id)
            for process in node_processes(node):
                if process.pid != frozen.pid:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.send_signal(signal.SIGKILL)
            _, alive = psutil.wait_procs([frozen], timeout=DEADLINE)
            killed.update(run=str(run), node=node_id, orphan=str(bool(alive)))
        except BaseException as error:  # pytest.fail's too
            killed["error"] = repr(error)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield killed
    finally:
        killer.join()
    assert "error" not in killed, killed["error"]


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_a_killed_nodes_run_resumes_on_the_other_node(
    reference: Path, procedural_dir: Path, tmp_path: Path
):
    out = tmp_path / "exp"
    with (
        cluster({"num_cpus": 1}, {"num_cpus": 1}) as two,
        a_node_killed_mid_run(list(two.worker_nodes), out) as killed,
    ):
        command = args(spec(tmp_path), procedural_dir, out, "--backend", "ray")
        status = main([*command, "--address", two.address])
    assert status == 0
    assert killed["orphan"] == "False"  # nothing of the lost attempt kept running
    run = Path(killed["run"])
    first, *retries = placements(run.with_suffix(".log"))
    assert first["node"] == killed["node"] and retries
    assert retries[-1]["node"] != killed["node"]
    assert retries[-1]["command"] == ["--resume", str(run)]  # from the checkpoint it left
    assert_same_runs(out, reference)


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_a_run_whose_retries_are_used_up_fails_and_the_others_finish(
    reference: Path, procedural_dir: Path, tmp_path: Path, capsys
):
    """``retries = 0``: the killed node's run is not started again; the experiment ends with
    exit 1 naming its log, which says why, and the other run finishes as it would alone."""
    out = tmp_path / "exp"
    path = tmp_path / "spec.toml"
    path.write_text('[[arms]]\nname = "baseline"\n[resources]\nretries = 0\n')
    with (
        cluster({"num_cpus": 1}, {"num_cpus": 1}) as two,
        a_node_killed_mid_run(list(two.worker_nodes), out) as killed,
    ):
        command = args(path, procedural_dir, out, "--backend", "ray")
        status = main([*command, "--address", two.address])
    assert status == 1
    run = Path(killed["run"])
    assert len(placements(run.with_suffix(".log"))) == 1 and not (run / SUMMARY).exists()
    assert "the run's Ray task failed" in run.with_suffix(".log").read_text()
    assert f"FAILED baseline seed {run.name[4:]}" in capsys.readouterr().err
    [other] = set(run_dirs(out)) - {run}
    local = reference / "baseline" / other.name
    assert without_timing(read_metrics(other)) == without_timing(read_metrics(local))


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_sigint_stops_every_run_and_a_rerun_continues_on_distinct_gpus(
    reference: Path, procedural_dir: Path, tmp_path: Path
):
    """Two runs asking for one GPU each on a node with two (fake ones: Ray hands out their
    ids all the same) run side by side, each seeing its own device; SIGINT to the driver
    stops both with their own exit 130 and interrupted.json, and the same command again
    finishes them with the uninterrupted runs' metrics."""
    out = tmp_path / "exp"
    with cluster({"num_cpus": 2, "num_gpus": 2}) as one:
        command = [*args(spec(tmp_path, num_gpus=1), procedural_dir, out, "--backend", "ray")]
        command += ["--address", one.address]
        driver = start_driver(command, tmp_path / "driver.log")
        try:
            frozen = freeze_after_first_epoch(*run_dirs(out))
            driver.send_signal(signal.SIGINT)
            wait_for_sigint(frozen, out, tmp_path / "driver.log")
            for process in frozen:
                process.resume()
            assert driver.wait(timeout=DEADLINE) == 130, (tmp_path / "driver.log").read_text()
        finally:
            if driver.poll() is None:
                driver.kill()
        for run in run_dirs(out):
            stopped = json.loads((run / INTERRUPTED).read_text())
            assert stopped["signal"] == "SIGINT"
            assert not (run / SUMMARY).exists()
        devices = [placements(run.with_suffix(".log"))[0] for run in run_dirs(out)]
        assert len({placement["node"] for placement in devices}) == 1
        assert sorted(placement["devices"] for placement in devices) == ["0", "1"]
        assert main(command) == 0
    assert_same_runs(out, reference)
    for run in run_dirs(out):
        assert placements(run.with_suffix(".log"))[-1]["command"] == ["--resume", str(run)]


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_sigterm_stops_the_running_run_and_cancels_the_queued_one(
    reference: Path, procedural_dir: Path, tmp_path: Path
):
    """One one-core node, two runs: one runs, one waits in Ray's queue. SIGTERM to the driver
    stops the running one as SIGINT does (exit 130, interrupted.json) and cancels the queued
    one, which never starts; the same command again finishes both."""
    out = tmp_path / "exp"
    with cluster({"num_cpus": 1}) as one:
        command = [*args(spec(tmp_path), procedural_dir, out, "--backend", "ray")]
        command += ["--address", one.address]
        driver = start_driver(command, tmp_path / "driver.log")
        try:
            wait_for(lambda: any(placements(r.with_suffix(".log")) for r in run_dirs(out)), "a run")
            running = next(r for r in run_dirs(out) if placements(r.with_suffix(".log")))
            [frozen] = freeze_after_first_epoch(running)
            driver.send_signal(signal.SIGTERM)
            wait_for_sigint([frozen], out, tmp_path / "driver.log")
            frozen.resume()
            assert driver.wait(timeout=DEADLINE) == 130, (tmp_path / "driver.log").read_text()
        finally:
            if driver.poll() is None:
                driver.kill()
        [queued] = set(run_dirs(out)) - {running}
        assert json.loads((running / INTERRUPTED).read_text())["signal"] == "SIGINT"
        assert not placements(queued.with_suffix(".log")) and not queued.exists()
        assert main(command) == 0
    assert_same_runs(out, reference)


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_relative_paths_reach_the_nodes_as_absolute_ones(
    procedural_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """A node's working directory is not the driver's: --out and --data reach the runs as
    the absolute paths they name on the driver. The start line says the run is queued."""
    with cluster({"num_cpus": 1}) as one:  # started elsewhere than the driver's directory
        monkeypatch.chdir(tmp_path)
        data = Path(os.path.relpath(procedural_dir, tmp_path))
        command = args(spec(tmp_path), data, Path("exp"), "--seeds", "0", "--epochs", "1")
        assert main([*command, "--backend", "ray", "--address", one.address]) == 0
    assert f"queued baseline seed 0 -> {tmp_path / 'exp'}" in capsys.readouterr().out
    config = load_config(tmp_path / "exp" / "baseline" / "seed0" / "config.toml")
    assert config.data.dir == str(procedural_dir)
    assert config.run.out == str(tmp_path / "exp" / "baseline" / "seed0")


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_a_request_no_node_can_meet_exits_2(procedural_dir: Path, tmp_path: Path, capsys):
    """One GPU per run on a cluster without one: refused at start, not queued for ever."""
    out = tmp_path / "exp"
    with cluster({"num_cpus": 1}) as one:
        command = args(spec(tmp_path, num_gpus=1), procedural_dir, out, "--backend", "ray")
        assert main([*command, "--address", one.address]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'spec.toml'}: [resources] num_cpus = 1, num_gpus = 1: no node" in err
    assert not list(out.rglob("*.log"))


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_a_run_asking_for_two_gpus_starts_a_process_on_each(procedural_dir: Path, tmp_path: Path):
    """``accelerate launch`` inside the run's allocation: two processes (on the CPU over
    gloo here, as on a machine without GPUs), seeing the run's two devices."""
    out = tmp_path / "exp"
    with cluster({"num_cpus": 2, "num_gpus": 2}) as one:
        command = args(spec(tmp_path, num_gpus=2), procedural_dir, out, "--seeds", "0")
        command += ["--epochs", "1", "--backend", "ray", "--address", one.address]
        assert main(command) == 0
    log = out / "baseline" / "seed0.log"
    [placement] = placements(log)
    assert placement["devices"] == "0,1"
    assert "2 process(es) on cpu" in log.read_text()
    assert len(read_metrics(out / "baseline" / "seed0")) == 1


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_a_tuned_arms_search_runs_its_trials_on_the_cluster(
    procedural_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "exp"
    with cluster({"num_cpus": 1}, {"num_cpus": 1}) as two:
        tuned = tuned_arm_command(procedural_dir, out)
        assert main([*tuned, "--backend", "ray", "--address", two.address]) == 0
    search = json.loads((out / "tuned" / "tuning" / "search.json").read_text())
    assert len(search["trials"]) == TRIALS and search["chosen"]
    assert f"search tuned: trial {TRIALS - 1} val_rmse_m" in capsys.readouterr().out
    for trial in range(TRIALS):
        assert placements(out / "tuned" / "tuning" / f"trial{trial}" / "seed1000.log")
    assert placements(out / "tuned" / "seed0.log")


def can_mount_privately() -> bool:
    """Whether this process may mount a file system in a mount namespace of its own (root
    with unshare, and a container that allows mounts)."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs tmpfs {folder}"]  # fmt: skip
        return subprocess.run(command, capture_output=True, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.ray_cluster
@pytest.mark.skipif(
    not can_mount_privately(),
    reason="a node with a file system of its own needs a mount namespace (root and unshare)",
)
def test_a_folder_one_node_cannot_see_is_refused(procedural_dir: Path, tmp_path: Path, capsys):
    """A node whose raylet lives in a mount namespace of its own, with an empty file system
    over the experiment's folder, like a machine whose local disk holds that path."""
    with cluster() as head:
        ray_cli = Path(sys.executable).parent / "ray"  # this environment's, activated or not
        own_disk = (
            f"mount -t tmpfs tmpfs {tmp_path} && exec {ray_cli} start --block "
            f"--address {head.address} --num-cpus 1 --object-store-memory {STORE}"
        )
        node = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", own_disk],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: len(ray_nodes(head.address)) == 2, "the second node")
            out = tmp_path / "exp"
            command = args(spec(tmp_path), procedural_dir, out, "--backend", "ray")
            assert main([*command, "--address", head.address]) == 2
        finally:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    err = capsys.readouterr().err
    assert f"--out {out}: node(s)" in err and "storage every node shares" in err
    assert not list(out.rglob("metrics.jsonl"))


def ray_nodes(address: str) -> list[dict]:
    """The cluster's live nodes, from a connection closed again for the driver's own."""
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        return [node for node in ray.nodes() if node["Alive"]]
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ("num_gpus = 1.5", "'num_gpus' above 1 must be a whole number, got 1.5"),
        ("num_cpus = 0", "'num_cpus' must be > 0.0"),
        ("retries = -1", "'retries' must be >= 0"),
    ],
)
def test_bad_resources_exit_2_naming_the_file(resources: str, message: str, tmp_path: Path, capsys):
    """Checked as the file is read, whichever the backend."""
    path = tmp_path / "spec.toml"
    path.write_text(f'[[arms]]\nname = "baseline"\n[resources]\n{resources}\n')
    out = tmp_path / "exp"
    assert main(["--config", str(path), "--out", str(out), "--check"]) == 2
    err = capsys.readouterr().err
    assert message in err and f"@ {path}.resources" in err
    assert not out.exists()


def test_without_ray_the_backend_exits_2_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray imports
    command = ["--arms", "baseline", "--epochs", "1", "--out", str(tmp_path / "exp")]
    assert main([*command, "--backend", "ray"]) == 2
    assert '--backend ray needs Ray: pip install "terraplug[ray]"\n' in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_the_local_backend_needs_neither_ray_nor_optuna(
    monkeypatch: pytest.MonkeyPatch, procedural_dir: Path, tmp_path: Path, capsys
):
    """Without either installed the local backend plans as before, and a tuned arm's search
    stops with the install command before any run."""
    for name in ("ray", "optuna"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "exp"
    plain = args(spec(tmp_path), procedural_dir, out)
    assert main([*plain, "--check"]) == 0
    assert "0 of 2 runs already finished, 2 to run, 1 at a time" in capsys.readouterr().out
    assert main(tuned_arm_command(procedural_dir, out)) == 2
    err = capsys.readouterr().err
    assert "arm 'tuned' declares a search, which needs Optuna: pip install" in err
    assert not list(out.rglob("metrics.jsonl"))
