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
import functools
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

from core.errors import EXIT_FAILED, EXIT_INTERRUPTED, RAY_INSTALL, UsageError
from core.experiment.schedule import Job, Runner, log_of, resume_args
from core.experiment.spec import Resources

PLACEMENT = "placement: "
"""The line a node's task writes into the run's log before starting it (JSON follows)."""
POLL_SECONDS = 0.5
"""How often a node's task looks for the run's stop file."""


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or without one start Ray on this machine: a new
    one (``"local"``), never a cluster some other command left running here.

    ``ray.init`` replaces the SIGTERM handler with ``sys.exit``; the one before it comes
    back, so that SIGTERM still stops the runs as Ctrl-C does (``__main__``)."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--backend ray needs Ray: {RAY_INSTALL}") from None
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"--address {address}: no Ray cluster there" if address else "Ray did not start"
        raise UsageError(f"{where} ({error})") from None
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def disconnect() -> None:
    """Leave the cluster; one that ``connect`` started here stops with it."""
    import ray

    ray.shutdown()


def stop_file(job: Job) -> Path:
    """Beside the run's log: the driver writes it to stop the run (SIGINT) on its node."""
    return job.run_dir.parent / f"seed{job.seed}.stop"


def prepare_run_process(libc: ctypes.CDLL | None) -> None:
    """In the run's process before ``core.run`` starts. Ray's worker threads block and
    ignore SIGINT, which a child would inherit: the run gets them back, so a stop reaches
    it. And the run ends with the task that started it: a node that dies leaves no run
    behind holding the run folder while another node resumes it (Linux, through ``libc``
    loaded before the fork: loading it in a forked copy of a threaded worker can deadlock;
    elsewhere the node's own end takes the process with it)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    if libc is not None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def accelerate_launch(processes: int) -> list[str]:
    """``accelerate launch`` of ``processes`` processes on this machine, followed by the
    script or ``-m module``: every setting given, so no accelerate config file of the node's
    changes the run, and a free port of its own for the processes' rendezvous, so launches
    side by side never meet on torchrun's default port. Through ``python -m
    accelerate.commands.launch``, not the ``accelerate`` script, whose CLI imports timm,
    hence torchvision (which cannot load beside a CPU build of torch)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip


def run_on_node(command: list[str], run_dir: str, log: str, stop: str, threads: int) -> int:
    """A Ray task: ``core.run`` on this node, under ``accelerate launch`` when the task holds
    several GPUs; returns its exit status. A retry after a lost node resumes the checkpoint
    the lost attempt left, and the stop file turns into SIGINT (exit 130, a checkpoint);
    a task that finds it before the run starts returns 130 without starting it."""
    import ray

    command = resume_args(Path(run_dir)) or command
    gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
    launcher = [sys.executable, "-m", "core.run"]
    if len(gpus) > 1:
        launcher = [*accelerate_launch(len(gpus)), "-m", "core.run"]
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
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
        if Path(stop).exists():  # stopped while queued: the driver saw no placement
            Path(stop).unlink(missing_ok=True)
            return EXIT_INTERRUPTED
        process = subprocess.Popen(
            [*launcher, *command],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=functools.partial(prepare_run_process, libc),
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

    def __init__(self, ref: Any, stop: Path, log: Path, placed: int) -> None:
        self.ref, self.stop, self.log = ref, stop, log
        self.placed = placed
        """Placement lines in the log before this task: earlier starts of the run."""
        self.status: int | None = None

    def poll(self) -> int | None:
        import ray

        if self.status is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                self.status = ray.get(self.ref)
            except ray.exceptions.TaskCancelledError:  # stopped while queued
                self.status = EXIT_INTERRUPTED
            except ray.exceptions.RayError as error:  # its retries used up, or Ray failed
                with open(self.log, "a") as handle:
                    handle.write(f"the run's Ray task failed: {error}\n")
                self.status = EXIT_FAILED
        return self.status

    def send_signal(self, sig: int) -> None:
        """The stop file for a started run; a task not yet started is cancelled too, so a
        stop does not wait for the cluster to start every queued run only to stop it (one
        that starts meanwhile finds the stop file written first, and returns 130)."""
        import ray

        self.stop.write_text(signal.Signals(sig).name)
        if len(placements(self.log)) == self.placed:
            ray.cancel(self.ref)

    def wait(self) -> int:
        import ray

        ray.wait([self.ref], timeout=None)
        status = self.poll()
        assert status is not None
        return status


class RayRunner(Runner):
    """The local scheduler's loop and progress lines, with each run a Ray task asking for
    ``resources``; Ray queues what the cluster cannot hold yet, so ``jobs`` 0 submits all,
    and a start line says a run is queued (its log's placement line says where it started)."""

    verbs = ("queued", "queued to resume")

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
        placed = len(placements(log))
        ref = self.task.remote(job.command, str(job.run_dir), str(log), str(stop), self.threads)
        return RayRun(ref, stop, log, placed)


def probe_storage(folder: str, token: str) -> bool:
    """A task pinned to one node: does it read the driver's token, and leave its own?"""
    import ray

    probe = Path(folder)
    seen = (probe / "driver").is_file() and (probe / "driver").read_text() == token
    with contextlib.suppress(OSError):
        probe.mkdir(parents=True, exist_ok=True)
        (probe / ray.get_runtime_context().get_node_id()).write_text(token)
    return seen


def check_resources(resources: Resources, spec: str) -> None:
    """A run asking for more than any live node holds would wait in Ray's queue for ever,
    silently: refused at start (exit 2), naming ``spec``, the experiment file."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    asked = {"CPU": resources.num_cpus, "GPU": resources.num_gpus}
    if not any(all(node.get(key, 0) >= need for key, need in asked.items()) for node in nodes):
        held = "; ".join(
            f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU" for node in nodes
        )
        raise UsageError(
            f"{spec}: [resources] num_cpus = {resources.num_cpus:g}, num_gpus = "
            f"{resources.num_gpus:g}: no node of the cluster holds that much ({held})"
        )


def check_shared_storage(out: Path) -> None:
    """Every live node must see ``out`` (absolute, as the runs get it) as the driver does:
    each reads a token the driver wrote there and writes its own back. A path only some
    nodes share is refused. Nodes that join later are not checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = out / f".storage-probe-{uuid.uuid4().hex[:8]}"  # the path the runs are given
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
