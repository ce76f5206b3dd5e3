"""The keyed per-tile cache: reused under the same key, recomputed under any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from core.keyed_cache import cached_rows, fingerprint


class CountingCompute:
    """``rows * scale`` for the asked rows; counts the rows it computed."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.computed: list[int] = []

    def __call__(self, indices: np.ndarray) -> torch.Tensor:
        self.computed += indices.tolist()
        return torch.from_numpy(indices).float()[:, None].repeat(1, 3) * self.scale


def test_same_key_reuses_and_any_changed_setting_recomputes(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    path = tmp_path / "cache" / "values.npy"
    key = {"model": "terramind_v1_tiny", "pretrained": False, "diffusion_steps": 2}
    first = CountingCompute(1.0)
    values = cached_rows(path, key, 5, first, accelerator)
    assert first.computed == [0, 1, 2, 3, 4]
    assert isinstance(values, np.memmap) and values.shape == (5, 3)  # read back mapped

    again = CountingCompute(1.0)
    np.testing.assert_array_equal(cached_rows(path, dict(key), 5, again, accelerator), values)
    assert again.computed == []

    for change in ({"pretrained": True}, {"model": "terramind_v1_small"}, {"diffusion_steps": 50}):
        changed = CountingCompute(2.0)
        recomputed = cached_rows(path, {**key, **change}, 5, changed, accelerator)
        assert changed.computed == [0, 1, 2, 3, 4], change
        np.testing.assert_array_equal(recomputed[:, 0], 2.0 * np.arange(5))


def test_a_half_written_cache_never_matches(tmp_path: Path) -> None:
    """The key is written after the values: values without a key file are recomputed."""
    accelerator = Accelerator(cpu=True)
    path = tmp_path / "values.npy"
    cached_rows(path, {"k": 1}, 3, CountingCompute(1.0), accelerator)
    path.with_name(path.name + ".key.json").unlink()
    redo = CountingCompute(3.0)
    cached_rows(path, {"k": 1}, 3, redo, accelerator)
    assert redo.computed == [0, 1, 2]


def test_weight_fingerprint_sees_any_changed_weight() -> None:
    """Loading other weights (pretrained instead of random) changes the key."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = fingerprint(model)
    assert fingerprint(model) == before
    with torch.no_grad():
        model[1].bias[0] += 1e-6
    assert fingerprint(model) != before
    assert fingerprint(model.half()) != fingerprint(model.float())  # dtype counts too
