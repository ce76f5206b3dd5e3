"""How long ``stratified`` takes to plan an epoch, against a pure-Python round-robin loop.

Both build the same kind of plan (full batches dealing the categories out in turn, a
category re-permuted when it runs out) for the same labels, in the same run::

    python benchmarks/stratified_plan.py [--tiles 1000000] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable

import numpy as np

from core.terrain import TERRAINS
from plugins.samplers.stratified import category_pools, plan_batches

SHARES = (0.11, 0.22, 0.25, 0.21, 0.21)
"""Category shares of the seed's dataset (225, 450, 498, 433, 418 tiles)."""


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


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.choice(len(TERRAINS), size=args.tiles, p=SHARES).astype(np.int64)
    as_list = labels.tolist()
    vectorised = best_of(args.repeats, lambda: numpy_plan(labels, args.batch_size, 0))
    loop = best_of(args.repeats, lambda: python_plan(as_list, args.batch_size, 0))
    print(
        f"{args.tiles} tiles, batch size {args.batch_size} (best of {args.repeats}): "
        f"numpy {vectorised * 1e3:.1f} ms, pure-Python loop {loop * 1e3:.1f} ms, "
        f"{loop / vectorised:.1f}x faster"
    )


if __name__ == "__main__":
    main()
