"""TerraMind's LoRA adapters outside the run: peft's own format, loading, a merged export.

A run writes its adapters to ``RUN_DIR/adapters/`` as peft's ``PeftModel.save_pretrained``
would (``adapter_config.json`` and ``adapter_model.safetensors``, keys under
``base_model.model.``), so ``peft.PeftModel.from_pretrained(transformer, RUN_DIR/adapters)``
applies them to any TerraMind of the same size, with or without this project::

    python -m core.tasks.sar2opt.adapters RUN_DIR --merged OUT.safetensors [--overwrite]

The export's path is checked as predict's output is, and never lies in the run folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import attrs
import torch
from accelerate.utils import set_seed
from torch import nn

from core.config import Config, load_config
from core.errors import EXIT_OK, CheckpointError, StorageError, UsageError, report_error
from core.run_folder import CHECKPOINT, CONFIG
from core.safe_io import check_output, load_checkpoint, replaced_when_done
from core.tasks.sar2opt.config import TerraMindSection
from core.tasks.sar2opt.terramind import (
    TerraMindSarToOptical,
    fingerprint_differences,
    lora_config,
)
from core.tasks.sar2opt.terratorch_import import import_terratorch

ADAPTERS = "adapters"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PROVENANCE = frozenset({"base_model_name_or_path", "revision", "peft_version", "inference_mode"})
"""Keys of ``adapter_config.json`` that say where the adapters came from, not what they do."""


def save_adapters(terramind: TerraMindSarToOptical, config: Config, folder: Path) -> None:
    """Write the adapters of ``terramind`` in peft's format, replacing ``folder`` whole."""
    import peft
    from safetensors.torch import save_file

    model = config.model
    lora = lora_config(model.lora_rank, model.lora_alpha, model.lora_targets)
    state = peft.get_peft_model_state_dict(terramind.terramind)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    lora.save_pretrained(staging)
    tensors = {PEFT_PREFIX + key: value.detach().cpu().contiguous() for key, value in state.items()}
    save_file(tensors, staging / ADAPTER_WEIGHTS)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def read_adapters(folder: Path, model: TerraMindSection) -> dict[str, torch.Tensor]:
    """The adapters' tensors, once ``folder`` is found to hold what :func:`save_adapters`
    wrote for the run's ``[model]``; anything else is a UsageError naming the file.

    peft would apply an edited ``adapter_config.json`` as it stands (another rank, scaling or
    set of modules: a traceback, or silently other outputs), so every key that says what the
    adapters do must be the run's. The weights are read by safetensors only (a JSON header
    and raw numbers; nothing in the file can run), never from a pickle, and before any model
    is built.
    """
    import_terratorch()  # peft imports torchvision, which needs the shim first
    import peft
    from safetensors.torch import load_file

    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for needed in (config_path, weights_path):
        if not needed.is_file():  # peft would look for a missing file on the Hub
            raise UsageError(f"{needed}: no such file, so no LoRA adapters in {folder}")
    try:
        found = peft.LoraConfig.from_pretrained(str(folder)).to_dict()
    except Exception as error:  # peft raises several types for a malformed file
        raise UsageError(f"{config_path}: not a readable LoRA adapter config ({error})") from None
    expected = lora_config(model.lora_rank, model.lora_alpha, model.lora_targets).to_dict()
    changed = [
        key for key in sorted(expected.keys() - PROVENANCE) if found.get(key) != expected[key]
    ]
    if changed:
        shown = "; ".join(f"{key} {found.get(key)!r}, not {expected[key]!r}" for key in changed[:3])
        raise UsageError(
            f"{config_path}: not the adapters the run's [model] describes ({shown}); "
            "was it edited after training?"
        )
    try:
        return load_file(weights_path)
    except Exception as error:  # safetensors' own error, or an OSError
        raise UsageError(f"{weights_path}: not a readable safetensors file ({error})") from None


def load_adapters(
    terramind: TerraMindSarToOptical, folder: Path, weights: dict[str, torch.Tensor]
) -> nn.Module:
    """Apply the adapters in ``folder`` (read by :func:`read_adapters` as ``weights``) to a
    TerraMind built without any; returns peft's model around TerraMind's transformer (the
    transformer itself is adapted in place). Weights that do not fit the modules they name
    are a UsageError naming the file."""
    import peft

    path = folder / ADAPTER_WEIGHTS
    try:
        adapted = peft.PeftModel.from_pretrained(terramind.terramind, folder)
    except RuntimeError as error:  # torch lists every tensor of another shape
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise UsageError(f"{path}: does not fit TerraMind's modules ({lines[:1]})") from None
    expected = {
        key: tuple(value.shape) for key, value in peft.get_peft_model_state_dict(adapted).items()
    }
    found = {key: tuple(value.shape) for key, value in weights.items()}
    if found != expected:
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        raise UsageError(
            f"{path}: does not fit TerraMind's modules: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    return adapted


def trained_fingerprint(path: Path) -> dict[str, Any]:
    """The fingerprint of the frozen weights the run trained with, from its checkpoint."""
    meta = load_checkpoint(path).get("task")
    fingerprint = meta.get("frozen_weights") if isinstance(meta, dict) else None
    if not isinstance(fingerprint, dict):
        raise CheckpointError(
            f"{path}: holds no fingerprint of TerraMind's frozen weights (an older terraplug "
            "wrote it), so what config.toml rebuilds cannot be checked; train the run again"
        )
    return fingerprint


def load_run_terramind(run_dir: Path) -> tuple[TerraMindSarToOptical, Config, nn.Module | None]:
    """A sar2opt run's TerraMind from its ``config.toml`` and exported adapters, in eval mode,
    with peft's model around the adapted transformer (None without adapters). Needs no
    training data; of the checkpoint, only the fingerprint of the frozen weights, which are
    not saved but rebuilt from ``config.toml`` (random ones from ``run.seed``): an edit of
    it after training would change every output silently, so it is refused."""
    from core.tasks.sar2opt.task import SarToOptical

    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise UsageError(f"{run_dir}: no config.toml there, so not a run folder")
    config = load_config(config_path)
    if config.run.task != "sar2opt":
        raise UsageError(f"{run_dir}: a {config.run.task} run, not sar2opt")
    if "refiner" in config.run.plugins:
        raise UsageError(f"{run_dir}: a refiner run keeps its trained network in the checkpoint")
    checkpoint = run_dir / CHECKPOINT
    trained = trained_fingerprint(checkpoint)
    folder = run_dir / ADAPTERS
    weights = read_adapters(folder, config.model) if config.model.lora_rank else None
    bare = attrs.evolve(config, model=attrs.evolve(config.model, lora_rank=0))
    set_seed(config.run.seed)  # random frozen weights (pretrained=false) as the run drew them
    task = SarToOptical()
    terramind = task.build_model(bare)
    differ = fingerprint_differences(trained, task.frozen_weights)
    if differ:
        raise CheckpointError(
            f"{checkpoint}: TerraMind's frozen weights rebuilt from {config_path} differ from "
            f"those the run trained with ({len(differ)} of {len(trained)} tensors, such as "
            f"{differ[0]}): config.toml edited after training? (run.seed, model.terramind, "
            "model.pretrained)"
        )
    adapted = load_adapters(terramind, folder, weights) if weights is not None else None
    return terramind.eval(), config, adapted


def untie_logit_heads(transformer: nn.Module) -> None:
    """Give each token-logit head its own copy of the weight it shares with the token
    embedding: merging an adapter into the head must not change the embedding."""
    for name, module in transformer.named_modules():
        if name.endswith(("to_logits", "to_logits.base_layer")) and isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def merged_state(run_dir: Path) -> dict:
    """TerraMind's transformer with the run's adapters merged into its weights (peft's
    ``merge_and_unload``): a plain state dict for ``terramind_v1_<size>`` whose logit heads
    are untied from the token embeddings (load it with :func:`load_merged`)."""
    _, _, adapted = load_run_terramind(run_dir)
    if adapted is None:
        raise UsageError(f"{run_dir}: trained without adapters (model.lora_rank = 0)")
    untie_logit_heads(adapted.base_model.model)
    merged = adapted.merge_and_unload()
    return {key: value.contiguous() for key, value in merged.state_dict().items()}


def load_merged(terramind: TerraMindSarToOptical, state: dict) -> None:
    """Load a merged export into a TerraMind built without adapters."""
    untie_logit_heads(terramind.terramind)
    terramind.terramind.load_state_dict(state, strict=True)


def check_export_path(output: Path, run_dir: Path, overwrite: bool) -> None:
    """predict's rules for its output (:func:`core.safe_io.check_output`), and never a path
    inside the run folder, even with ``--overwrite`` and by any name: its files (checkpoint,
    config, metrics, adapters) are what serves and resumes the run."""
    where = Path(os.path.realpath(output.parent), output.name)
    if where.is_relative_to(os.path.realpath(run_dir)):
        raise UsageError(
            f"{output}: inside the run folder {run_dir}, whose files are the run's own "
            f"({CHECKPOINT}, {CONFIG}, {ADAPTERS}/, ...); write the export elsewhere"
        )
    check_output(output, run_dir, overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.tasks.sar2opt.adapters",
        description="Merge a sar2opt run's LoRA adapters into TerraMind's weights.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--merged", type=Path, required=True, metavar="OUT.safetensors")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT.safetensors if it exists"
    )
    args = parser.parse_args(argv)
    try:
        from safetensors.torch import save_file

        check_export_path(args.merged, args.run_dir, args.overwrite)
        state = merged_state(args.run_dir)
        with replaced_when_done(args.merged) as tmp:
            save_file(state, tmp)
    except (UsageError, StorageError) as error:
        return report_error(error)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
