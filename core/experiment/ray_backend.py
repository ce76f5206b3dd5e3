"""``--backend ray``: the same runs, each a Ray task on whichever node has its resources.

Only where a run executes changes. The driver plans, restarts and reports as the local
scheduler does (``schedule``), and each task starts ``python -m core.run`` on its node, with
the run's GPUs alone visible, and waits for it. Run folders live on storage every node sees
(checked at start), so the driver follows the runs' ``metrics.jsonl`` for progress, and a task
started again after its node died resumes the run's last checkpoint. Ray is an optional extra:
nothing here imports it before ``connect``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from core.errors import EXIT_FAILED, UsageError
from core.experiment.schedule import Job, Runner, log_of
from core.experiment.spec import Resources
from core.run_folder import CHECKPOINT

INSTALL = 'pip install "terraplug[ray]" -c constraints.txt'
PLACEMENT = "placement: "
"""The line a node's task writes into the run's log before starting it (JSON follows)."""
POLL_SECONDS = 0.5


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start Ray on this machine without one."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--backend ray needs Ray: {INSTALL}") from None
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UsageError(f"--address {address}: no Ray cluster there ({error})") from None


def disconnect() -> None:
    import ray

    ray.shutdown()


def stop_file(job: Job) -> Path:
    """Beside the run's log: the driver writes it to stop the run (SIGINT) on its node."""
    return job.run_dir.parent / f"seed{job.seed}.stop"


def prepare_run_process() -> None:
    """In the run's process before ``core.run`` starts. Ray's worker threads block and
    ignore SIGINT, which a child would inherit: the run gets them back, so a stop reaches
    it. And the run ends with the task that started it: a node that dies leaves no run
    behind holding the run folder while another node resumes it (Linux; elsewhere the
    node's own end takes the process with it)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_on_node(command: list[str], run_dir: str, log: str, stop: str, threads: int) -> int:
    """A Ray task: ``core.run`` on this node, under ``accelerate launch`` when the task holds
    several GPUs; returns its exit status. A retry after a lost node resumes the checkpoint
    the lost attempt left, and the stop file turns into SIGINT (exit 130, a checkpoint)."""
    import ray

    if command[0] != "--resume" and (Path(run_dir) / CHECKPOINT).is_file():
        command = ["--resume", run_dir]
    gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
    launcher = [sys.executable, "-m", "core.run"]
    if len(gpus) > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", str(len(gpus)), "-m", "core.run"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    placement = {
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "devices": env["CUDA_VISIBLE_DEVICES"],
        "pid": os.getpid(),
        "at": time.time(),
        "command": command,
    }
    with open(log, "a") as handle:
        handle.write(f"{PLACEMENT}{json.dumps(placement)}\n")
        handle.flush()
        process = subprocess.Popen(
            [*launcher, *command],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=prepare_run_process,
        )
    stopped = False
    while process.poll() is None:
        if not stopped and Path(stop).exists():
            process.send_signal(signal.SIGINT)
            stopped = True
        time.sleep(POLL_SECONDS)
    Path(stop).unlink(missing_ok=True)
    return process.returncode


def placements(log: Path) -> list[dict[str, Any]]:
    """Every attempt's placement in a run's log, in order: node, host, devices, command."""
    lines = log.read_text().splitlines() if log.is_file() else []
    return [json.loads(line[len(PLACEMENT) :]) for line in lines if line.startswith(PLACEMENT)]


class RayRun:
    """A run submitted as a Ray task, seen through ``subprocess.Popen``'s methods."""

    def __init__(self, ref: Any, stop: Path, log: Path) -> None:
        self.ref, self.stop, self.log = ref, stop, log
        self.status: int | None = None

    def poll(self) -> int | None:
        import ray

        if self.status is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                self.status = ray.get(self.ref)
            except ray.exceptions.RayError as error:  # its retries used up, or Ray failed
                with open(self.log, "a") as handle:
                    handle.write(f"the run's Ray task failed: {error}\n")
                self.status = EXIT_FAILED
        return self.status

    def send_signal(self, sig: int) -> None:
        self.stop.write_text(signal.Signals(sig).name)

    def wait(self) -> int:
        import ray

        ray.wait([self.ref], timeout=None)
        status = self.poll()
        assert status is not None
        return status


class RayRunner(Runner):
    """The local scheduler's loop and progress lines, with each run a Ray task asking for
    ``resources``; Ray queues what the cluster cannot hold yet, so ``jobs`` 0 submits all."""

    def __init__(
        self, pending: list[Job], total_epochs: int, jobs: int, threads: int, resources: Resources
    ) -> None:
        import ray

        super().__init__(pending, total_epochs, jobs or max(1, len(pending)), threads)
        self.threads = threads or max(1, round(resources.num_cpus))
        self.task = ray.remote(run_on_node).options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_retries=resources.retries,
        )

    def launch(self, job: Job) -> RayRun:
        stop = stop_file(job)
        stop.unlink(missing_ok=True)
        log = log_of(job)
        ref = self.task.remote(job.command, str(job.run_dir), str(log), str(stop), self.threads)
        return RayRun(ref, stop, log)


def probe_storage(folder: str, token: str) -> bool:
    """A task pinned to one node: does it read the driver's token, and leave its own?"""
    import ray

    probe = Path(folder)
    seen = (probe / "driver").is_file() and (probe / "driver").read_text() == token
    with contextlib.suppress(OSError):
        probe.mkdir(parents=True, exist_ok=True)
        (probe / ray.get_runtime_context().get_node_id()).write_text(token)
    return seen


def check_shared_storage(out: Path) -> None:
    """Every live node must see ``out`` as the driver does: each reads a token the driver
    wrote there and writes its own back. A path only some nodes share is refused."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = out.resolve() / f".storage-probe-{uuid.uuid4().hex[:8]}"
    probe.mkdir(parents=True)
    token = uuid.uuid4().hex
    (probe / "driver").write_text(token)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    task = ray.remote(probe_storage)
    try:
        seen = ray.get([
            task.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(str(probe), token)
            for node in nodes
        ])  # fmt: skip
        blind = [
            f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
            for node, saw in zip(nodes, seen, strict=True)
            if not saw
            or not (probe / node["NodeID"]).is_file()
            or (probe / node["NodeID"]).read_text() != token
        ]
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if blind:
        raise UsageError(
            f"--out {out}: node(s) {', '.join(blind)} do not see the files written there; "
            "run folders must live on storage every node shares (a network file system)"
        )
