"""The plugin's own tests: the real trainer on procedural tiles, through terraplug.testing.

Run them after ``pip install -e .``: the plugin is found by its entry-point name, as
``--plugins component_scale`` finds it.
"""

from __future__ import annotations

import pytest

from terraplug import ConfigError
from terraplug.testing import run_training


def test_zero_scales_remove_components_from_the_objective(tmp_path):
    overrides = ["plugins.component_scale.scales={edge=0.0, spectral=0.0}"]
    (row,) = run_training(tmp_path, ["component_scale"], overrides, epochs=1)
    # the [loss] base weights of elevation, gradient and curvature; edge and spectral are zeroed
    kept = row["train_loss_elevation"] + 0.5 * row["train_loss_gradient"]
    kept += 0.2 * row["train_loss_curvature"]
    assert row["train_loss"] == pytest.approx(kept, rel=1e-5)


def test_an_unknown_component_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="edgy"):
        run_training(tmp_path, ["component_scale"], ["plugins.component_scale.scales={edgy=2.0}"])
