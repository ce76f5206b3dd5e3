"""``python -m core.classify PATH...``: the terrain category of each GeoTIFF, then the counts.

Shows what the dataset will see before a run starts: each file's category, whether it came
from its name or was measured from the DEM, the measurements and why (tab-separated), then
every region name the measurements overruled, with the reason. Bad files are reported on
stderr and skipped; the exit status is 2 if any path was bad, else 0.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from core.data.geotiff import read_dem
from core.errors import EXIT_OK, EXIT_USAGE, DataError, report_error
from core.tasks.dem_sr.data.labels import Label, explain_label, terrain_stats
from core.tasks.dem_sr.terrain import TERRAINS

GEOTIFF_SUFFIXES = (".tif", ".tiff")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.classify",
        description="Print the terrain category of GeoTIFF tiles (files or folders, recursive).",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    args = parser.parse_args(argv)

    counts: Counter[str] = Counter()
    overruled: list[str] = []
    failed = 0
    for path in args.paths:
        try:
            files = _expand(path)
        except DataError as error:
            report_error(error)
            failed += 1
            continue
        for file in files:
            try:
                label, line = _classify(file)
            except DataError as error:
                report_error(error)
                failed += 1
                continue
            counts[label.category] += 1
            if label.overruled:
                overruled.append(f"{file.stem}: {label.category} ({label.reason})")
            print(line)

    print(f"\n{sum(counts.values())} tiles: " + ", ".join(f"{t} {counts[t]}" for t in TERRAINS))
    if overruled:
        print(f"{len(overruled)} region name(s) overruled by the measurements:")
        print("\n".join(f"  {line}" for line in overruled))
    if failed:
        print(f"{failed} bad path(s), see the errors above", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _expand(path: Path) -> list[Path]:
    """A file as itself; a folder as its GeoTIFFs, recursively and sorted."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in GEOTIFF_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .tif or .tiff files in this folder")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def _classify(path: Path) -> tuple[Label, str]:
    """(label, printed line) for one file."""
    dem = read_dem(path)
    label = explain_label(path.stem, dem.elevation, dem.cell_size_m())
    stats = terrain_stats(dem.elevation, dem.cell_size_m())
    measured = (
        f"relief {stats.relief_m:.0f} m, roughness {stats.roughness_m:.1f} m, "
        f"slope {stats.mean_slope_deg:.1f}°, hypsometric integral "
        f"{stats.hypsometric_integral:.2f}, top-quarter area {stats.top_quarter_area:.2f}, "
        f"elevation skewness {stats.elevation_skewness:.2f}, "
        f"slope bimodality {stats.slope_bimodality:.2f}"
    )
    return label, f"{path}\t{label.category}\t{label.source}\t{measured}\t{label.reason}"


if __name__ == "__main__":
    sys.exit(main())
