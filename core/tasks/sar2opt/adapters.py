"""TerraMind's LoRA adapters outside the run: peft's own format, loading, a merged export.

A run writes its adapters to ``RUN_DIR/adapters/`` as peft's ``PeftModel.save_pretrained``
would (``adapter_config.json`` and ``adapter_model.safetensors``, keys under
``base_model.model.``), so ``peft.PeftModel.from_pretrained(transformer, RUN_DIR/adapters)``
applies them to any TerraMind of the same size, with or without this project::

    python -m core.tasks.sar2opt.adapters RUN_DIR --merged OUT.safetensors
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import attrs
from accelerate.utils import set_seed
from torch import nn

from core.config import Config, load_config
from core.errors import EXIT_OK, UsageError, report_error
from core.run_folder import CONFIG
from core.tasks.sar2opt.terramind import TerraMindSarToOptical, lora_parameters
from core.tasks.sar2opt.terratorch_import import import_terratorch

ADAPTERS = "adapters"
PEFT_PREFIX = "base_model.model."


def save_adapters(terramind: TerraMindSarToOptical, config: Config, folder: Path) -> None:
    """Write the adapters of ``terramind`` in peft's format, replacing ``folder`` whole."""
    import peft
    from safetensors.torch import save_file

    model = config.model
    lora = peft.LoraConfig(
        r=model.lora_rank,
        lora_alpha=model.lora_alpha,
        lora_dropout=0.0,
        target_modules=model.lora_targets,
    )
    state = peft.get_peft_model_state_dict(terramind.terramind)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    lora.save_pretrained(staging)
    tensors = {PEFT_PREFIX + key: value.detach().cpu().contiguous() for key, value in state.items()}
    save_file(tensors, staging / "adapter_model.safetensors")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def has_adapters(model: nn.Module) -> bool:
    return any(True for _ in lora_parameters(model))


def load_adapters(terramind: TerraMindSarToOptical, folder: Path) -> nn.Module:
    """Apply the adapters in ``folder`` to a TerraMind built without any; returns peft's
    model around TerraMind's transformer (the transformer itself is adapted in place)."""
    import_terratorch()  # peft imports torchvision, which needs the shim first
    import peft

    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"{folder}: no LoRA adapters (adapter_config.json) there")
    return peft.PeftModel.from_pretrained(terramind.terramind, folder)


def load_run_terramind(run_dir: Path) -> tuple[TerraMindSarToOptical, Config, nn.Module | None]:
    """A sar2opt run's TerraMind from its ``config.toml`` and exported adapters, in eval mode,
    with peft's model around the adapted transformer (None without adapters). Needs neither
    the training data nor the checkpoint."""
    from core.tasks.sar2opt.task import SarToOptical

    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise UsageError(f"{run_dir}: no config.toml there, so not a run folder")
    config = load_config(config_path)
    if config.run.task != "sar2opt":
        raise UsageError(f"{run_dir}: a {config.run.task} run, not sar2opt")
    if "refiner" in config.run.plugins:
        raise UsageError(f"{run_dir}: a refiner run keeps its trained network in the checkpoint")
    bare = attrs.evolve(config, model=attrs.evolve(config.model, lora_rank=0))
    set_seed(config.run.seed)  # random frozen weights (pretrained=false) as the run drew them
    terramind = SarToOptical().build_model(bare)
    adapted = load_adapters(terramind, run_dir / ADAPTERS) if config.model.lora_rank else None
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.tasks.sar2opt.adapters",
        description="Merge a sar2opt run's LoRA adapters into TerraMind's weights.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--merged", type=Path, required=True, metavar="OUT.safetensors")
    args = parser.parse_args(argv)
    try:
        from safetensors.torch import save_file

        save_file(merged_state(args.run_dir), args.merged)
    except UsageError as error:
        return report_error(error)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
