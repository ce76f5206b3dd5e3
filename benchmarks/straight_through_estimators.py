"""``straight_through``'s estimators against the exact gradient of the objective they share.

The hard Gumbel-softmax sample is distributed as ``softmax(logits)`` whatever the
temperature, so its forward value estimates ``E_{softmax(logits)} ||c_j - c_t||^2``; the
``expected`` estimator computes that objective (at temperature 1) exactly. Here the
gradient with respect to the logits of TerraMind tiny (random weights) on two tiles of the
embedded default is taken exactly, and from ``--samples`` Gumbel draws per temperature:
the bias of the Gumbel mean, its per-draw variance, and its cosine with the exact gradient,
all relative to the exact gradient's norm::

    python benchmarks/straight_through_estimators.py [--samples 200]
"""

from __future__ import annotations

import argparse

import torch
from benchlib import add_common_arguments, finish, ratio_line, start

from core.tasks.sar2opt.data import TERRAMIND_V1, PairDataset, ensure_default_pairs
from core.tasks.sar2opt.terramind import build_terramind
from plugins.generators.straight_through import expected_code_error, gumbel_code_error

TEMPERATURES = (1.0, 0.5, 0.2)


def logits_gradient(estimator, logits, codebook, targets, tau: float) -> torch.Tensor:
    leaf = logits.clone().requires_grad_(True)
    estimator(leaf, codebook, targets, tau).mean().backward()
    return leaf.grad.flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--samples", type=int, help="Gumbel draws per temperature (200)")
    args = parser.parse_args()
    samples = args.samples or (10 if args.quick else 200)
    started = start("straight_through: Gumbel vs exact expected code-space error", args.threads)
    torch.manual_seed(0)
    model = build_terramind(
        "tiny", pretrained=False, lora_rank=0, lora_alpha=1.0, lora_targets="to_logits"
    )
    dataset = PairDataset.from_folder(ensure_default_pairs(64, quiet=True), TERRAMIND_V1, size=64)
    sar = torch.stack([dataset[i]["sar"] for i in range(2)])
    optical = torch.stack([dataset[i]["optical"] for i in range(2)])
    with torch.no_grad():
        logits = model(sar, output="logits").float()
    targets, codebook = model.target_tokens(optical), model.codebook.float()
    exact = logits_gradient(expected_code_error, logits, codebook, targets, 1.0)
    norm = exact.norm()
    print(f"2 tiles x 64 x 64 ({logits.shape[1]} positions, {logits.shape[2]} tokens), "
          f"{samples} Gumbel draws per temperature")  # fmt: skip
    for tau in TEMPERATURES:
        draws = torch.stack(
            [
                logits_gradient(gumbel_code_error, logits, codebook, targets, tau)
                for _ in range(samples)
            ]
        )
        mean = draws.mean(0)
        bias = float((mean - exact).norm() / norm)
        cosine = float(torch.nn.functional.cosine_similarity(mean, exact, dim=0))
        per_draw = ((draws - exact).norm(dim=1) / norm).square().tolist()
        print(
            f"tau {tau}: relative bias of the Gumbel mean {bias:.3f} (includes the mean's own "
            f"noise, 1/{samples} of the variance), cosine(mean, exact) {cosine:.3f}"
        )
        ratio_line(
            f"gumbel_squared_error_vs_exact_gradient_tau{tau:g}",
            per_draw,
            "none (the exact estimator's is 0)",
            None,
        )
    finish(started)


if __name__ == "__main__":
    main()
