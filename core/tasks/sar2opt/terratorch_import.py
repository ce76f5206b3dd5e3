"""Import terratorch beside a CPU build of torch whose torchvision is a CUDA build.

PyPI's torchvision wheels are CUDA builds. Beside a CPU build of torch their compiled ops
(``torchvision/_C.so``) cannot load, as they need ``libtorch_cuda.so``; torchvision then still
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, whose schemas only the
compiled ops define, so ``import torchvision`` (and with it terratorch, transformers and peft)
fails with ``RuntimeError: operator torchvision::nms does not exist`` (pytorch/vision #9077).

``shim_torchvision_ops`` defines those two schemas before torchvision is first imported, with
kernels that fail with a message saying why. TerraMind calls no torchvision op, so the sar2opt
task runs as if the compiled ops were there.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from core.errors import UsageError

if TYPE_CHECKING:
    from terratorch.registry.registry import MultiSourceRegistry

# The ops torchvision refers to while it is imported without its compiled ops:
# ``_meta_registrations.py`` registers fake kernels for these two unconditionally (every other
# op it and ``_autograd_registrations.py`` touch is behind ``extension._has_ops()``). The
# schemas are the ones ``torchvision/csrc/ops`` defines.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_INSTALL_HINT = 'the sar2opt task needs the sar2opt extra: pip install -e ".[sar2opt]"'

# Dropping the library object would unregister the schemas and kernels it holds.
_shim_lib: torch.library.Library | None = None


def _extension_path() -> Path | None:
    """torchvision's compiled ops library, found as torchvision finds it, without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = next(iter(spec.submodule_search_locations))
    finder = importlib.machinery.FileFinder(
        package_dir,
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    ext_spec = finder.find_spec("_C")
    return Path(ext_spec.origin) if ext_spec is not None and ext_spec.origin else None


def compiled_ops_loadable() -> bool:
    """Whether torchvision's compiled ops load in this process; False when it is not installed.

    A successful probe leaves the library loaded and its real ops registered. torchvision's own
    import then loads the same path again, which the dynamic loader turns into a no-op.
    """
    path = _extension_path()
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except OSError:
        return False
    return True


def _missing_compiled_op(name: str) -> Callable[..., NoReturn]:
    """A kernel for ``torchvision::name`` that says why the real one is absent."""

    def kernel(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError(
            f"torchvision::{name} is unavailable: torchvision's compiled ops could not load "
            "(a CUDA build of torchvision beside a CPU build of torch); install a torchvision "
            "built for this torch to use it"
        )

    return kernel


def shim_torchvision_ops() -> bool:
    """Define the op schemas torchvision needs at import time when its compiled ops cannot load.

    Returns whether it defined them. It does nothing once torchvision is imported (its ops are
    then settled either way), once it has run, or when the compiled ops load.
    """
    global _shim_lib
    if _shim_lib is not None or "torchvision" in sys.modules:
        return False
    if _extension_path() is None or compiled_ops_loadable():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        name = lib.define(schema)
        # CompositeExplicitAutograd serves every backend (CPU, CUDA, quantized) without
        # shadowing the Meta kernel torchvision registers for fake tensors.
        lib.impl(name, _missing_compiled_op(name), "CompositeExplicitAutograd")
    _shim_lib = lib
    return True


@functools.cache
def import_terratorch() -> MultiSourceRegistry:
    """Import terratorch (shimming torchvision first if needed) and return its full-model registry.

    The registry is what the sar2opt task builds TerraMind from, e.g.
    ``import_terratorch().build("terramind_v1_tiny_generate", ...)``. Cached, so later calls cost
    nothing. A missing or broken terratorch or peft is a ``UsageError`` with the install hint.

    The process's float32 matmul precision is kept: terratorch's Clay v1.5 backbone sets it to
    ``"medium"`` when imported, which lets oneDNN compute float32 matmuls in bfloat16 on CPUs
    with AVX512-BF16 or AMX, for every model in the process, not only TerraMind.
    """
    shim_torchvision_ops()
    precision = torch.get_float32_matmul_precision()
    try:
        importlib.import_module("terratorch")
        importlib.import_module("peft")
        registry = importlib.import_module("terratorch.registry")
    except ImportError as err:
        raise UsageError(f"{_INSTALL_HINT} ({type(err).__name__}: {err})") from None
    finally:
        torch.set_float32_matmul_precision(precision)
    return registry.FULL_MODEL_REGISTRY
