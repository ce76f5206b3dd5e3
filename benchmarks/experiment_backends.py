"""Scheduling overhead of ``core.experiment --backend ray`` against the local backend, on the
same tiny experiment: wall time, and how long a run takes to start (from the experiment's
start to the run's ``config.toml``, which ``core.run`` writes once it is up), over the first
wave of runs that start together. Also checks that both backends give the same
``metrics.jsonl`` run for run (timing apart), and says so.

The Ray side runs on a local cluster of two one-core worker nodes (``ray.cluster_utils``),
the local side with ``--jobs 2``: two runs side by side on either.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import ray
from benchlib import add_common_arguments, finish, interleave, paired, ratio_line, spread, start
from ray.cluster_utils import Cluster

from core.experiment import main
from core.run_folder import CONFIG, METRICS
from core.tasks.dem_sr.data.procedural import write_procedural_tiles

TINY = ("model.n_resgroups=1", "model.n_resblocks=1", "model.n_feats=8", "data.batch_size=2")
STORE = 80 * 2**20


def experiment(
    data: Path, out: Path, arms: str, seeds: str, epochs: int, threads: int
) -> list[str]:
    args = ["--arms", arms, "--seeds", seeds, "--epochs", str(epochs)]
    args += ["--data", str(data), "--out", str(out), "--threads", str(threads)]
    for assignment in (*TINY, "train.progress='never'"):
        args += ["--set", assignment]
    return args


def started(out: Path, began: float) -> list[float]:
    """Seconds from the experiment's start to each run's config.toml, earliest first."""
    return sorted(path.stat().st_mtime - began for path in out.glob(f"*/seed*/{CONFIG}"))


def metrics(out: Path) -> dict[str, list[dict]]:
    """Every run's metrics.jsonl rows without their timing, by run folder."""
    return {
        str(path.parent.relative_to(out)): [
            {key: value for key, value in json.loads(line).items() if key != "seconds"}
            for line in path.read_text().splitlines()
        ]
        for path in sorted(out.glob(f"*/seed*/{METRICS}"))
    }


def main_() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    args = parser.parse_args()
    arms, seeds, epochs = ("baseline", "0", 1) if args.quick else ("baseline;stratified", "0,1", 2)
    repeats = args.repeats or (1 if args.quick else 3)
    clock = start("core.experiment: the Ray backend against the local one", args.threads)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = write_procedural_tiles(root / "tiles")
        head = {"num_cpus": 0, "include_dashboard": False, "object_store_memory": STORE}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=STORE)
        cluster.wait_for_nodes()
        latency: dict[str, list[float]] = {"local": [], "ray": []}
        outs: dict[str, Path] = {}

        def side(name: str, *backend: str) -> float:
            out = root / f"{name}{len(latency[name])}"
            began = time.time()
            with contextlib.redirect_stdout(io.StringIO()):  # the progress lines
                command = experiment(data, out, arms, seeds, epochs, args.threads)
                status = main([*command, *backend])
            wall = time.time() - began
            assert status == 0, f"{name}: exit {status}"
            first_wave = started(out, began)[:2]
            latency[name].append(sum(first_wave) / len(first_wave))
            outs[name] = out
            return wall

        try:
            walls = interleave(
                {
                    "local": lambda: side("local", "--jobs", "2"),
                    "ray": lambda: side("ray", "--backend", "ray", "--address", cluster.address),
                },
                repeats,
                warmup=0 if args.quick else 1,
            )
        finally:
            ray.shutdown()
            cluster.shutdown()
        same = metrics(outs["local"]) == metrics(outs["ray"])
    runs = len(seeds.split(",")) * len(arms.split(";"))
    print(f"# {runs} run(s) of {epochs} epoch(s), two side by side; {repeats} repeats")
    for name in ("local", "ray"):
        print(f"# {name}: wall {spread(walls[name], ' s')}")
        print(f"# {name}: first wave's start latency {spread(latency[name][-repeats:], ' s')}")
    print(f"# identical metrics.jsonl run for run: {'yes' if same else 'NO'}")
    ratio_line("ray_wall_vs_local", paired(walls["ray"], walls["local"]), "none", None)
    ratio_line(
        "ray_start_latency_vs_local",
        paired(latency["ray"][-repeats:], latency["local"][-repeats:]),
        "none",
        None,
    )
    finish(clock)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main_())
