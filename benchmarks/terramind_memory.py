"""Peak memory of one ``teacher_forcing`` step per TerraMind size, with and without
gradient checkpointing (``model.gradient_checkpointing``).

Each measurement runs in a fresh process: build TerraMind (random weights, LoRA r=8 on the
default targets), then one forward and backward of the token cross-entropy at batch 1 x
224 x 224, TerraMind's native size. Reported: resident memory after the build (the
weights) and the process's peak resident memory (``ru_maxrss``), on the CPU. On a GPU the
weights and the step's tensors take about the same room, but the CUDA context, about
0.5 GB, comes on top::

    python benchmarks/terramind_memory.py [--sizes tiny small base] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from benchlib import add_common_arguments, finish, ratio_line, start


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(size: str, pixels: int, checkpointing: bool) -> dict:
    """One step in this process; returns memory figures in bytes."""
    import torch
    import torch.nn.functional as F

    from core.config import load_config
    from core.models.terramind import build_terramind, checkpoint_blocks

    torch.manual_seed(0)
    model = build_terramind(
        size,
        pretrained=False,
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=load_config().model.lora_targets,
    )
    if checkpointing:
        checkpoint_blocks(model.terramind)
    weights = resident_bytes()
    sar = torch.randn(1, 2, pixels, pixels)
    logits = model(sar)
    targets = torch.randint(0, logits.shape[-1], logits.shape[:2])
    F.cross_entropy(logits.transpose(1, 2), targets).backward()
    return {"weights": weights, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", nargs="+", default=None)
    parser.add_argument("--size", type=int, default=224, help="tile side in pixels")
    parser.add_argument(
        "--child", nargs=2, metavar=("SIZE", "CHECKPOINTING"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.size, args.child[1] == "1")))
        return
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "small", "base"])
    pixels = 64 if args.quick else args.size
    started = start("TerraMind: peak memory of one teacher_forcing step (CPU)", args.threads)
    print(f"batch 1 x {pixels} x {pixels}, LoRA r=8, fresh process per measurement")
    for size in sizes:
        figures = {}
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--size", str(pixels), "--threads",
                       str(args.threads), "--child", size, str(int(checkpointing))]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            figures[checkpointing] = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"{size}, gradient checkpointing {'on' if checkpointing else 'off'}: "
                f"weights {figures[checkpointing]['weights'] / 2**30:.2f} GiB resident, "
                f"peak {figures[checkpointing]['peak'] / 2**30:.2f} GiB",
                flush=True,
            )
        step = {key: figures[key]["peak"] - figures[key]["weights"] for key in figures}
        ratio_line(
            f"checkpointing_step_memory_vs_plain_{size}",
            [step[True] / step[False]],
            "none (a measurement)",
            None,
        )
    finish(started)


if __name__ == "__main__":
    main()
