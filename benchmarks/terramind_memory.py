"""Peak memory of one ``teacher_forcing`` step per TerraMind size, with and without
gradient checkpointing (``model.gradient_checkpointing``), and with the frozen weights in
bfloat16 (``model.frozen_dtype="bf16"``).

Each measurement runs in a fresh process: build TerraMind (random weights, LoRA r=8 on the
default targets), then one forward and backward of the token cross-entropy at batch 1 x
224 x 224, TerraMind's native size. Reported: the bytes of the weights (parameters and
buffers), resident memory after the build, and the peak resident memory of the step
(``VmHWM``, reset after the build: the weights are built in float32 before a cast to
bfloat16, and the build's own peak would hide what bf16 saves), on the CPU, and the peak
of the tensors the same step allocates, counted by the profiler (``peak_tensor_bytes``):
the resident figure also holds what the allocator keeps and the kernels' scratch memory,
which vary between runs and machines; the tensors' bytes do not. Memory freed
by the cast stays with the allocator, so on the CPU the step reuses it and the resident
figures understate the saving that the weight bytes show. On a GPU the
weights and the step's tensors take about the same room, but the CUDA context, about
0.5 GB, comes on top::

    python benchmarks/terramind_memory.py [--sizes tiny small base] [--size 224]
        [--variants plain checkpointing bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchlib import add_common_arguments, finish, peak_tensor_bytes, ratio_line, start


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


VARIANTS = {"plain": (False, "fp32"), "checkpointing": (True, "fp32"), "bf16": (False, "bf16")}
"""Gradient checkpointing and ``model.frozen_dtype`` of each measured variant."""


def peak_resident_bytes() -> int:
    """Peak resident memory since the last reset (``VmHWM``)."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(size: str, pixels: int, variant: str) -> dict:
    """One step in this process; returns memory figures in bytes."""
    import torch
    import torch.nn.functional as F

    from core.tasks.sar2opt.config import TerraMindSection
    from core.tasks.sar2opt.terramind import (
        FROZEN_DTYPES,
        build_terramind,
        checkpoint_blocks,
        hold_frozen_weights,
    )

    torch.manual_seed(0)
    model = build_terramind(
        size,
        pretrained=False,
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=TerraMindSection().lora_targets,
    )
    checkpointing, frozen_dtype = VARIANTS[variant]
    if checkpointing:
        checkpoint_blocks(model.terramind)
    hold_frozen_weights(model, FROZEN_DTYPES[frozen_dtype])
    weight_bytes = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    weights = resident_bytes()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident memory
    sar = torch.randn(1, 2, pixels, pixels)
    targets = torch.randint(0, len(model.codebook), (1, model.num_tokens(sar)))

    def step() -> None:
        F.cross_entropy(model(sar).transpose(1, 2), targets).backward()

    step()
    peak = peak_resident_bytes()
    tensors = peak_tensor_bytes(step, torch.device("cpu"))  # the same step, gradients kept
    return {"weight_bytes": weight_bytes, "weights": weights, "peak": peak, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", nargs="+", default=None)
    parser.add_argument("--size", type=int, default=224, help="tile side in pixels")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.size, args.child[1])))
        return
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "small", "base"])
    pixels = 64 if args.quick else args.size
    started = start("TerraMind: peak memory of one teacher_forcing step (CPU)", args.threads)
    print(f"batch 1 x {pixels} x {pixels}, LoRA r=8, fresh process per measurement")
    for size in sizes:
        figures = {}
        for variant in args.variants:
            command = [sys.executable, __file__, "--size", str(pixels), "--threads",
                       str(args.threads), "--child", size, variant]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            figures[variant] = json.loads(result.stdout.strip().splitlines()[-1])
            gib = {key: value / 2**30 for key, value in figures[variant].items()}
            print(
                f"{size}, {variant}: weights {gib['weight_bytes']:.2f} GiB, resident after "
                f"build {gib['weights']:.2f} GiB, peak of the step {gib['peak']:.2f} GiB, "
                f"peak of the step's tensors {gib['tensors']:.3f} GiB",
                flush=True,
            )
        if {"plain", "checkpointing"} <= figures.keys():
            step = {key: figures[key]["peak"] - figures[key]["weights"] for key in figures}
            ratio_line(
                f"checkpointing_step_memory_vs_plain_{size}",
                [step["checkpointing"] / step["plain"]],
                "none (a measurement)",
                None,
            )
            ratio_line(
                f"checkpointing_step_tensors_vs_plain_{size}",
                [figures["checkpointing"]["tensors"] / figures["plain"]["tensors"]],
                "none (a measurement)",
                None,
            )
        if {"plain", "bf16"} <= figures.keys():
            for figure in ("weight_bytes", "peak"):
                ratio_line(
                    f"bf16_{figure}_vs_fp32_{size}",
                    [figures["bf16"][figure] / figures["plain"][figure]],
                    "none (a measurement)",
                    None,
                )
    finish(started)


if __name__ == "__main__":
    main()
