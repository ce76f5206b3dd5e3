"""What the generator plugins (``plugins/generators``) need beyond :class:`core.tasks.Task`:
a task that tokenizes targets and caches per tile (:class:`TokenGeneration`), and a model
that is TerraMind or declares the TerraMind it wraps (:class:`WrapsTerraMind`).

The plugins check a run's task by these members, not by its class, so any task that
implements them serves them; one that does not is refused naming the plugin, the task and
each member it lacks, before anything is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from core.errors import PluginError
from core.tasks.sar2opt.terramind import TerraMindSarToOptical

if TYPE_CHECKING:
    from core.config import Config
    from core.context import RunContext
    from core.tasks import Batch


class TokenGeneration(Protocol):
    """The task's side: ``sar2opt``'s ``SarToOptical`` implements it."""

    def cache_key(
        self,
        what: str,
        weights: nn.Module | Mapping[str, torch.Tensor],
        tiles: str,
        config: Config,
        dataset: Any = None,
        **settings: Any,
    ) -> dict:
        """The key of a per-tile cache ``what``, made by ``weights`` from the ``tiles``
        (``"sar"`` or ``"optical"``) of ``dataset`` (default: training) with ``settings``."""

    def cached_per_tile(
        self,
        name: str,
        key: dict,
        compute: Callable[[np.ndarray], torch.Tensor],
        ctx: RunContext,
        dataset: Any = None,
    ) -> np.ndarray:
        """``compute`` over every tile of ``dataset`` (default: training), kept in the run
        folder and computed again whenever ``key`` changes."""

    def prepare_target_tokens(self, terramind: TerraMindSarToOptical, ctx: RunContext) -> None:
        """Tokenize every training target once, before ``target_tokens`` is read."""

    def target_tokens(self, batch: Batch) -> torch.Tensor:
        """``[B, T]`` token ids of a training batch's targets, on its device."""


@runtime_checkable
class WrapsTerraMind(Protocol):
    """The model's side, for a plugin's ``configure_model`` that puts TerraMind inside a
    model of its own (``refiner``): the task validates and draws through the model's
    ``generate``, and reaches TerraMind's tokens and logits through this attribute."""

    terramind_generator: TerraMindSarToOptical


def generation_task(task: object, plugin: str) -> TokenGeneration:
    """``task``, once it implements :class:`TokenGeneration`; else a PluginError naming
    ``plugin``, the task and what it lacks."""
    wanted = [name for name in vars(TokenGeneration) if not name.startswith("_")]
    missing = [name for name in wanted if not callable(getattr(task, name, None))]
    if missing:
        raise PluginError(
            f"plugin {plugin!r} trains TerraMind past its token sampling and needs a task "
            f"implementing {__name__}.TokenGeneration ({', '.join(wanted)}); task "
            f"{getattr(task, 'name', type(task).__name__)!r} lacks {', '.join(missing)}: "
            "run it with --task sar2opt"
        )
    return task


def terramind_in(model: nn.Module) -> TerraMindSarToOptical:
    """TerraMind itself, or the one a :class:`WrapsTerraMind` model declares; any other
    model is a PluginError naming its type (a plugin wrapped TerraMind without saying so)."""
    inner = model.terramind_generator if isinstance(model, WrapsTerraMind) else model
    if not isinstance(inner, TerraMindSarToOptical):
        raise PluginError(
            f"the model is a {type(model).__name__}, neither TerraMind nor a model that "
            f"declares the TerraMind inside it ({__name__}.WrapsTerraMind)"
        )
    return inner
