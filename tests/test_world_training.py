"""The multi-region ``world`` source: held-out landscapes, its documented counts, and a run
that trains on it by name."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from core.config import DataSection
from core.run import main
from core.tasks.dem_sr.data.dataset import TileDataset, load_split
from core.tasks.dem_sr.data.labels import name_in_tile_id
from core.tasks.dem_sr.data.sources import ensure_source
from core.tasks.dem_sr.data.world import LANDSCAPES, VALIDATION
from core.tasks.dem_sr.terrain import TERRAINS
from tests.conftest import FAST, read_metrics

DOCS = Path(__file__).parents[1] / "docs" / "data-format.md"


@pytest.fixture(scope="module")
def world_split() -> tuple[TileDataset, TileDataset]:
    folder, data = ensure_source(DataSection(source="world"), quiet=True)
    return load_split(folder, data, seed=0)


def per_class(dataset: TileDataset) -> dict[str, tuple[int, int]]:
    """Windows and landscapes (regions) per class."""
    counts = Counter(TERRAINS[t] for t in dataset.terrains)
    pairs = list(zip(dataset.regions, dataset.terrains, strict=True))
    places = {t: {r for r, k in pairs if TERRAINS[k] == t} for t in TERRAINS}
    return {t: (counts[t], len(places[t])) for t in TERRAINS}


def test_world_validates_on_landscapes_training_never_sees(world_split) -> None:
    train, val = world_split
    assert set(val.regions) == set(VALIDATION)
    assert set(train.regions).isdisjoint(VALIDATION)
    assert set(train.landscapes).isdisjoint(
        {"french_prealps", "southern_england", "hawaii_big_island"}
    )
    for terrain, (_, landscapes) in per_class(val).items():
        assert landscapes >= 3, terrain


def test_the_documented_world_counts_are_the_data(world_split) -> None:
    text = DOCS.read_text()
    for name, dataset in zip(("train", "val"), world_split, strict=True):
        row = re.search(rf"^\| {name} \| (\d+) \((\d+)\) \|.*\| (\d+) \|$", text, re.M)
        assert row is not None, name
        cells = re.findall(r"(\d+) \((\d+)\)", row.group(0))
        documented = {t: (int(n), int(k)) for t, (n, k) in zip(TERRAINS, cells, strict=True)}
        assert documented == per_class(dataset), name
        assert int(row.group(3)) == len(dataset)


def test_core_run_trains_on_the_world_by_name(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "run"), "--epochs", "1", "--set", "data.source='world'"]
    for assignment in (*FAST, "train.max_steps_per_epoch=2"):
        args += ["--set", assignment]
    assert main(args) == 0
    row = read_metrics(tmp_path / "run")[-1]
    assert np.isfinite(row["val_rmse_m"]) and np.isfinite(row["val_rmse_m_bicubic"])
    assert set(row["val_rmse_m_by_terrain"]) == set(TERRAINS)


def test_no_landscape_name_says_a_category() -> None:
    """A world raster's windows are classified from statistics or named boxes; its file name
    (``southern_alps_nz``) is no hint, and must not say a category either."""
    for landscape in LANDSCAPES:
        assert name_in_tile_id(landscape.name) not in TERRAINS, landscape.name
