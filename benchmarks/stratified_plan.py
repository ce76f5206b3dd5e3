"""How long ``stratified`` takes to plan an epoch, against a pure-Python round-robin loop,
and what share of a training epoch over the same tiles that is.

Both build the same kind of plan (full batches dealing the categories out in turn, a
category re-permuted when it runs out) for the same labels, interleaved in the same run.
The epoch it is compared with is ``ceil(tiles / batch size)`` training steps of the
``small`` RCAN at that batch size (48 x 48 HR tiles, scale 3), timed in the same run.

Speed matters less than every process getting the same plan: the trainer gives process
``r`` of ``n`` batches ``r, r+n, ...`` of a plan each process computes itself. So the
script also recomputes the plan in a second Python process and checks that it is the same,
byte for byte, and that every batch holds ``B // K`` or ``B // K + 1`` tiles of each
category::

    python benchmarks/stratified_plan.py [--tiles 1000000] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from benchlib import add_common_arguments, finish, interleave, paired, ratio_line, spread, start

from core.config import Config
from core.tasks.dem_sr.losses import dem_loss_components
from core.tasks.dem_sr.rcan import build_rcan
from core.tasks.dem_sr.task import base_loss_weights
from core.tasks.dem_sr.terrain import TERRAINS
from plugins.samplers.stratified import category_pools, plan_batches

SHARES = (0.11, 0.22, 0.25, 0.21, 0.21)
"""Category shares of the seed's dataset (225, 450, 498, 433, 418 tiles)."""
NEGLIGIBLE = 0.01
"""Planning may take at most 1 % of the epoch it plans."""


def python_plan(labels: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The seed's ``StratifiedBatchSampler`` loop, fixed to fill every batch."""
    rng = random.Random(seed)
    pools: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        pools.setdefault(label, []).append(index)
    categories = sorted(pools)
    queues: dict[int, list[int]] = {category: [] for category in categories}
    plan, turn = [], 0
    for _ in range(math.ceil(len(labels) / batch_size)):
        batch = []
        while len(batch) < batch_size:
            category = categories[turn % len(categories)]
            turn += 1
            if not queues[category]:
                queues[category] = pools[category][:]
                rng.shuffle(queues[category])
            batch.append(queues[category].pop())
        plan.append(batch)
    return plan


def numpy_plan(labels: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    pools = category_pools(labels, np.arange(len(labels)), range(len(TERRAINS)))
    return plan_batches(pools, batch_size, seed, epoch=1)


def labels_for(tiles: int) -> np.ndarray:
    return np.random.default_rng(0).choice(len(TERRAINS), size=tiles, p=SHARES).astype(np.int64)


def plan_digest(tiles: int, batch_size: int) -> str:
    return hashlib.sha256(numpy_plan(labels_for(tiles), batch_size, 0).tobytes()).hexdigest()


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    return run


def training_step(batch_size: int) -> Callable[[], float]:
    """One training step of the small RCAN on a batch of 48 x 48 tiles (what a plan feeds)."""
    model = build_rcan("small", 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    weights = base_loss_weights(Config())
    generator = torch.Generator().manual_seed(0)
    hr = torch.randn(batch_size, 1, 48, 48, generator=generator)
    lr = hr.reshape(batch_size, 1, 16, 3, 16, 3).mean((3, 5))
    mask = torch.ones_like(hr, dtype=torch.bool)

    def step() -> None:
        (dem_loss_components(model(lr), hr, mask) @ weights).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step)


def check_plan(plan: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> None:
    """Full, balanced batches, and the same plan computed by another process."""
    k = len(TERRAINS)
    per_batch = np.stack([(labels[plan] == c).sum(1) for c in range(k)], axis=1)
    balanced = per_batch.min() >= args.batch_size // k and per_batch.max() <= -(
        -args.batch_size // k
    )
    command = [sys.executable, __file__, "--digest", "--tiles", str(args.tiles)]
    command += ["--batch-size", str(args.batch_size)]
    other = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    same = other == hashlib.sha256(plan.tobytes()).hexdigest()
    print(
        f"# correctness: {plan.shape[0]} full batches of {plan.shape[1]}; per batch and "
        f"category {per_batch.min()}-{per_batch.max()} tiles (balanced: {balanced}); "
        f"a second process computed the same plan: {same}"
    )
    if not (balanced and same):
        raise SystemExit("stratified plan check failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--digest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.digest:
        print(plan_digest(args.tiles, args.batch_size))
        return
    if args.quick:
        args.tiles, args.repeats = 20_000, args.repeats or 1
    repeats = args.repeats or 3
    started = start("stratified planning vs a pure-Python round-robin loop", args.threads)
    labels = labels_for(args.tiles)
    as_list = labels.tolist()
    times = interleave(
        {
            "stratified": timed(lambda: numpy_plan(labels, args.batch_size, 0)),
            "python loop": timed(lambda: python_plan(as_list, args.batch_size, 0)),
            "training step": training_step(args.batch_size),
        },
        repeats,
    )
    check_plan(numpy_plan(labels, args.batch_size, 0), labels, args)
    steps = math.ceil(args.tiles / args.batch_size)
    epoch = [steps * step for step in times["training step"]]
    print(
        f"# {args.tiles} tiles, batch size {args.batch_size}, {repeats} interleaved repeats: "
        f"stratified {spread(times['stratified'], ' s')}, python loop "
        f"{spread(times['python loop'], ' s')}, training step "
        f"{spread(times['training step'], ' ms', 1e3, 1)}, so an epoch of {steps} steps "
        f"{spread(epoch, ' s', digits=0)}"
    )
    versus_loop = paired(times["stratified"], times["python loop"])
    ratio_line("stratified_vs_python_loop", versus_loop, "< 1", statistics.median(versus_loop) < 1)
    share = paired(times["stratified"], epoch)
    ratio_line(
        "stratified_share_of_epoch",
        share,
        f"negligible (< {NEGLIGIBLE})",
        statistics.median(share) < NEGLIGIBLE,
    )
    finish(started)


if __name__ == "__main__":
    main()
