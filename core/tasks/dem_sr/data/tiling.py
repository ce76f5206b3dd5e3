"""Cut one elevation raster into labelled GeoTIFF tiles, once, into the cache.

Every built-in DEM source (SRTM 90 m, NOAA GLOBE, the 10 m Colorado raster) goes through this
one path; a ``RasterSource`` says only what differs between them:

- **the lattice**: ``tile_size`` x ``tile_size`` squares anchored at the raster's first cell, so
  tiles never overlap; ``checkerboard`` keeps every other one (no two kept tiles share an edge,
  which halves an epoch without losing any region).
- **labels**: a tile wholly inside a named ``Region`` box takes its category unless its
  measurements clearly contradict it (``labels.explain_label``); any other tile is
  measured by the automatic classifier (``core.tasks.dem_sr.data.labels``) or, with
  ``unnamed=False``, dropped. Tiles are named ``<region>_tile_<n>`` (``<source>_tile_<n>``
  when unnamed), so the dataset reading them back finds the same labels from the names.
- **rejection**: the source's ``reject`` (by default, any tile with a void cell; GLOBE's finds
  sea, seams and interpolated patches).
- **the split**: with ``validation_south_of``, the tiles whose centre lies south of that
  latitude form the validation block (``val/``), the lattice row just north of it is dropped,
  and the rest train (``train/``). Adjacent tiles are strongly correlated, so a block with a
  one-tile gap measures what a model does on terrain it has not seen, the same for every seed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
from affine import Affine
from tqdm.auto import tqdm

from core.data.cache import build_once, cache_root, read_manifest
from core.data.geotiff import cell_size_m, write_dem
from core.errors import DataError
from core.tasks.dem_sr.data.labels import label_tile
from core.tasks.dem_sr.data.regions import Region
from core.tasks.dem_sr.terrain import TERRAINS


@attrs.frozen(eq=False)
class Raster:
    """A whole source raster: elevation (NaN = void, or an integer grid without voids)."""

    elevation: np.ndarray
    transform: Affine
    crs: str


def reject_void(stack: np.ndarray) -> list[str | None]:
    """``"void"`` for each tile with a missing cell: one dataset stacks whole tiles."""
    return ["void" if void else None for void in ~np.isfinite(stack).all(axis=(-2, -1))]


@attrs.frozen
class RasterSource:
    """One built-in elevation source and how it is cut (see the module docstring)."""

    name: str
    """The ``data.source`` value that selects it."""
    title: str
    cache_version: str
    """Bump when regions, rules or the tile format change, so old caches are not reused."""
    load: Callable[[], Raster]
    regions: tuple[Region, ...]
    citation: str
    licence: str
    dtype: str = "float32"
    unnamed: bool = True
    """Classify tiles outside every region (True) or drop them (False)."""
    credit: str = ""
    """One line printed with the tile counts: the data's origin and licence."""
    reject: Callable[[np.ndarray], list[str | None]] = reject_void
    """Per tile of a ``[N, H, W]`` stack: a rejection reason or None."""
    reasons: tuple[str, ...] = ("void",)
    """The reasons ``reject`` can give, reported per region."""
    max_tiles_per_region: int | None = None
    checkerboard: bool = False
    validation_south_of: float | None = None
    settings: dict = attrs.field(factory=dict)
    """Thresholds recorded in the manifest."""

    def default_cache_dir(self) -> Path:
        """``<cache_root()>/<cache_version>``."""
        return cache_root() / self.cache_version


@attrs.frozen
class Tile:
    row: int
    col: int
    """Lattice position (in tiles) of the tile's top-left corner."""
    region: Region | None
    split: str
    """``train``, ``val`` or ``buffer`` (dropped), or ``all`` without a validation block."""


def region_corners(
    transform: Affine, shape: tuple[int, int], region: Region, tile_size: int
) -> list[tuple[int, int]]:
    """(row, col) of the top-left cell of every lattice tile wholly inside ``region``."""
    left, top = ~transform @ (region.west, region.north)
    right, bottom = ~transform @ (region.east, region.south)
    top, bottom = max(round(top), 0), min(round(bottom), shape[0])
    left, right = max(round(left), 0), min(round(right), shape[1])
    first_row, first_col = -(-top // tile_size), -(-left // tile_size)
    return [
        (i * tile_size, j * tile_size)
        for i in range(first_row, bottom // tile_size)
        for j in range(first_col, right // tile_size)
    ]


def lattice(source: RasterSource, raster: Raster, tile_size: int) -> list[Tile]:
    """Every tile of the lattice the source keeps, with its region and split."""
    shape = raster.elevation.shape
    rows, cols = shape[0] // tile_size, shape[1] // tile_size
    named: dict[tuple[int, int], Region] = {}
    for region in source.regions:
        for r, c in region_corners(raster.transform, shape, region, tile_size):
            named.setdefault((r // tile_size, c // tile_size), region)
    val_rows = _validation_rows(source, raster.transform, rows, tile_size)
    buffer_rows = {r + d for r in val_rows for d in (-1, 1)} - val_rows
    tiles = []
    for i in range(rows):
        split = "val" if i in val_rows else "buffer" if i in buffer_rows else "train"
        if source.validation_south_of is None:
            split = "all"
        for j in range(cols):
            if source.checkerboard and (i + j) % 2:
                continue
            region = named.get((i, j))
            if region is not None or source.unnamed:
                tiles.append(Tile(i, j, region, split))
    return tiles


def _validation_rows(
    source: RasterSource, transform: Affine, rows: int, tile_size: int
) -> set[int]:
    if source.validation_south_of is None:
        return set()
    centre_lat = [(transform @ (0, (i + 0.5) * tile_size))[1] for i in range(rows)]
    return {i for i, lat in enumerate(centre_lat) if lat < source.validation_south_of}


def ensure_tiles(
    source: RasterSource,
    cache_dir: Path | None = None,
    *,
    tile_size: int = 48,
    quiet: bool = False,
) -> Path:
    """Cut ``source`` into tiles once; return ``<cache_dir>/tiles<tile_size>``.

    ``cache_dir`` defaults to ``source.default_cache_dir()``. The folder holds the tiles (in
    ``train/`` and ``val/`` when the source has a validation block) and a ``manifest.json``;
    it is built in a temporary folder and renamed into place, so an interrupted or concurrent
    first run never leaves a partial dataset, and a later call only reads the manifest.
    """
    if tile_size < 9:
        raise DataError(f"tile_size must be at least 9 cells, got {tile_size}")
    folder = Path(cache_dir or source.default_cache_dir()) / f"tiles{tile_size}"

    def read(folder: Path) -> dict | None:
        def complete(manifest: dict) -> bool:
            expected = sum(manifest["tiles_per_category"].values())
            return sum(1 for _ in folder.rglob("*_tile_*.tif")) == expected

        return read_manifest(folder, source.cache_version, complete)

    manifest = build_once(folder, lambda out: _build(source, out, tile_size, quiet), read)
    if not quiet:
        report(folder, manifest)
    return folder


def _build(source: RasterSource, out: Path, tile_size: int, quiet: bool) -> dict:
    raster = source.load()
    tiles = lattice(source, raster, tile_size)
    by_region: dict[str, list[Tile]] = {}
    for tile in tiles:
        if tile.split != "buffer":
            by_region.setdefault(tile.region.name if tile.region else source.name, []).append(tile)
    regions = {region.name: region for region in source.regions}
    counts: dict[str, Counter[str]] = {split: Counter() for split in ("train", "val", "all")}
    region_rows = []
    positions: dict[str, list] = {}
    candidates = sum(len(members) for members in by_region.values())
    bar = tqdm(total=candidates, desc=f"cutting {source.name} tiles", unit="tile", disable=quiet)
    for name, members in by_region.items():
        stack = np.stack([_cells(raster, tile, tile_size) for tile in members])
        reasons = source.reject(stack)
        kept = [i for i, reason in enumerate(reasons) if reason is None]
        if source.max_tiles_per_region and len(kept) > source.max_tiles_per_region:
            picks = np.linspace(0, len(kept) - 1, source.max_tiles_per_region)
            kept = [kept[i] for i in picks.round().astype(int)]
        bar.update(len(members) - len(kept))  # the candidates left out are done too
        categories: Counter[str] = Counter()
        for n, i in enumerate(kept):
            tile = members[i]
            tile_name = f"{name}_tile_{n}"
            category = _write(source, raster, tile, stack[i], out, tile_name, tile_size)
            positions[tile_name] = [tile.split, tile.row, tile.col]
            counts[tile.split][category] += 1
            categories[category] += 1
            bar.update()
        row = {"name": name, "category": regions[name].category if name in regions else None}
        if name in regions:
            row |= attrs.asdict(regions[name])
        rejected = Counter(reason for reason in reasons if reason is not None)
        region_rows.append(
            {
                **row,
                "candidates": len(members),
                "tiles": len(kept),
                "tiles_per_category": dict(categories),
                "rejected": {reason: rejected[reason] for reason in source.reasons},
            }
        )
    bar.close()
    total = counts["train"] + counts["val"] + counts["all"]
    manifest = {
        "version": source.cache_version,
        "source": source.title,
        "citation": source.citation,
        "licence": source.licence,
        "credit": source.credit,
        "tile_size": tile_size,
        "crs": raster.crs,
        "checkerboard": source.checkerboard,
        "detectors": source.settings,
        "tiles_per_category": {category: total[category] for category in TERRAINS},
        "rejected": {
            reason: sum(r["rejected"][reason] for r in region_rows) for reason in source.reasons
        },
        "regions": region_rows,
        "tiles": positions,
    }
    if source.validation_south_of is not None:
        manifest["split"] = {
            "validation_south_of": source.validation_south_of,
            "buffer_tiles": sum(1 for tile in tiles if tile.split == "buffer"),
            **{
                split: {category: counts[split][category] for category in TERRAINS}
                for split in ("train", "val")
            },
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _cells(raster: Raster, tile: Tile, tile_size: int) -> np.ndarray:
    r, c = tile.row * tile_size, tile.col * tile_size
    return raster.elevation[r : r + tile_size, c : c + tile_size]


def _write(
    source: RasterSource,
    raster: Raster,
    tile: Tile,
    cells: np.ndarray,
    out: Path,
    name: str,
    tile_size: int,
) -> str:
    """Write one tile; return its category, decided as the dataset will decide it."""
    transform = raster.transform @ Affine.translation(tile.col * tile_size, tile.row * tile_size)
    elevation = np.asarray(cells, dtype=np.float32)
    category, label = label_tile(name, elevation, cell_size_m(transform, raster.crs, cells.shape))
    folder = out if tile.split == "all" else out / tile.split
    write_dem(
        folder / f"{name}.tif",
        cells,
        transform,
        raster.crs,
        tags={
            "region": tile.region.name if tile.region else "",
            "category": category,
            "label": label,
            "source": source.title,
            "lattice_row": tile.row,
            "lattice_col": tile.col,
        },
        dtype=source.dtype,
    )
    return category


def report(folder: Path, manifest: dict) -> None:
    """Print where the tiles are and how many of each category train and validate."""

    def counts(per_category: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in per_category.items())

    print(f"{manifest['source']}: {folder}")
    split = manifest.get("split")
    if split:
        print(f"  training tiles per category: {counts(split['train'])}")
        print(
            f"  validation tiles per category: {counts(split['val'])} "
            f"(the block south of {split['validation_south_of']}°, one tile row apart)"
        )
    else:
        print(f"  tiles per category: {counts(manifest['tiles_per_category'])}")
    if any(manifest["rejected"].values()):
        print(f"  rejected tiles: {counts(manifest['rejected'])}")
    print(f"  data: {manifest['credit']}")
