"""``python -m core.experiment`` end to end: real runs in subprocesses, a report whose numbers
are recomputed here from each run's metrics.jsonl, restarts that skip or resume runs."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import attrs
import pytest

from core.errors import UsageError
from core.experiment import (
    build_experiment,
    build_parser,
    check_arms,
    control_verdict,
    main,
    markdown,
    parse_arms,
    summarise,
)
from core.experiment.plots import (
    arm_colours,
    plot_domain_metrics_by_arm,
    plot_loss_curves_by_arm,
    plot_step_losses_by_arm,
    questions_figure,
    region_gains_figure,
    step_loss_figure,
)
from core.experiment.report import primary_column
from core.experiment.spec import run_overrides
from core.experiment.stats import adjust, paired_test
from core.experiment.summary import Column
from core.plots import run_step_losses
from core.run_folder import CHECKPOINT, INTERRUPTED, SUMMARY
from core.spikes import batch_loss_outliers
from core.tasks import get_task
from core.tasks.dem_sr.terrain import TERRAINS
from tests.conftest import read_metrics
from tests.test_run import run_cli
from tests.test_task_registry import template_task  # noqa: F401  (a fixture)

TINY = [
    "model.n_resgroups=1",
    "model.n_resblocks=1",
    "model.n_feats=8",
    "data.batch_size=2",  # 15 steps per epoch: enough for the outlier detector's warm-up
]
ARMS = "baseline;stratified,terrain_loss"
SEEDS = (0, 1)
SLUGS = ("baseline", "stratified+terrain_loss")


def experiment_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["--arms", ARMS, "--seeds", "0,1", "--epochs", "2", "--data", str(data)]
    args += ["--out", str(out), "--jobs", "4", "--threads", "1", *extra]
    for assignment in TINY:
        args += ["--set", assignment]
    return args


@pytest.fixture(scope="module")
def experiment(procedural_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experiment")
    assert main(experiment_args(procedural_dir, out)) == 0
    return out


def csv_rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "results.csv", newline="") as handle:
        return {(row["arm"], row["seed"]): row for row in csv.DictReader(handle)}


def recomputed(run_dir: Path, goal: float) -> dict[str, float | None]:
    """The per-run numbers from metrics.jsonl, by the definitions in docs/experiments.md;
    ``goal``: the baseline's mean final gain over bicubic."""
    rows = read_metrics(run_dir)
    final = rows[-1]
    outliers = sum(row["batch_loss_outliers"] for row in rows)
    spikes, steps = sum(row["model_spikes"] for row in rows), sum(row["steps"] for row in rows)
    curve = [(p["step"], p["val_rmse_m"]) for row in rows for p in row["val_curve"]]
    gains = [(step, final["val_rmse_m_bicubic"] - rmse) for step, rmse in curve]
    reached = [step for step, gain in gains if gain >= 0.5 * goal]
    (x0, _), (x1, _) = curve[0], curve[-1]
    area = sum((b[1] + a[1]) / 2 * (b[0] - a[0]) for a, b in itertools.pairwise(curve))
    probe = [v for row in rows for v in row["probe_loss"]]
    values = {
        "batch_loss_outliers_per_1000_steps": 1000 * outliers / steps,
        "model_spikes_per_1000_steps": 1000 * spikes / steps,
        "probe_rise": sum(max(0.0, math.log(b / a)) for a, b in itertools.pairwise(probe)),
        "steps": steps,
        "steps_to_50pct": reached[0] if reached else None,
        "val_auc": area / (x1 - x0),
        "val_rmse_m": final["val_rmse_m"],
        "val_slope_rmse_deg": final["val_slope_rmse_deg"],
    }
    for terrain in TERRAINS:
        values[f"val_rmse_m_{terrain}"] = final["val_rmse_m_by_terrain"][terrain]
        values[f"val_slope_rmse_deg_{terrain}"] = final["val_slope_rmse_deg_by_terrain"][terrain]
    values["region_gain_spread"] = statistics.stdev(region_gains(run_dir))
    return values


def region_gains(run_dir: Path) -> list[float]:
    """Each validation region's gain over bicubic in %, from val_tiles.csv.gz: the RMSE and
    bicubic's, each pooled over the region's pixels (procedural tiles: a region per file)."""
    with gzip.open(run_dir / "val_tiles.csv.gz", "rt", newline="") as handle:
        tiles = [row for row in csv.DictReader(handle) if float(row["pixels"]) > 0]
    gains = []
    for region in {row["region"] for row in tiles}:
        inside = [row for row in tiles if row["region"] == region]
        pixels = sum(float(row["pixels"]) for row in inside)
        model = math.sqrt(sum(float(row["sq_err_m2"]) for row in inside) / pixels)
        squares = (float(row["bicubic_rmse_m"]) ** 2 * float(row["pixels"]) for row in inside)
        bicubic = math.sqrt(sum(squares) / pixels)
        gains.append(100 * (bicubic - model) / bicubic)
    assert len(gains) > 1
    return gains


@pytest.mark.slow
def test_report_matches_the_runs(experiment: Path):
    for name in ("results.md", "results.csv", "loss_curves_by_arm.png", "terrain_rmse_by_arm.png"):
        assert (experiment / name).stat().st_size > 0, name
    for name in ("step_losses_by_arm.png", "probe_losses_by_arm.png", "questions.png"):
        assert (experiment / name).stat().st_size > 0, name
    assert (experiment / "region_gains_by_arm.png").stat().st_size > 0
    for slug in SLUGS:  # the per-step losses the plot marks are the ones the trainer counted
        for seed in SEEDS:
            metrics = read_metrics(experiment / slug / f"seed{seed}")
            assert len(run_step_losses(metrics)) == sum(row["steps"] for row in metrics)
            outliers = batch_loss_outliers(run_step_losses(metrics))
            assert len(outliers) == sum(row["batch_loss_outliers"] for row in metrics)
            assert (experiment / slug / f"seed{seed}" / "val_tiles.csv.gz").is_file()
    rows = csv_rows(experiment)
    finals = [read_metrics(experiment / "baseline" / f"seed{seed}")[-1] for seed in SEEDS]
    goal = statistics.fmean(row["val_rmse_m_bicubic"] - row["val_rmse_m"] for row in finals)
    per_arm = {
        (slug, arm): [recomputed(experiment / slug / f"seed{s}", goal) for s in SEEDS]
        for slug, arm in zip(SLUGS, ARMS.split(";"), strict=True)
    }
    means = {}
    for (_, arm), runs in per_arm.items():
        for seed, run in zip(SEEDS, runs, strict=True):
            for key, value in run.items():
                written = rows[(arm, str(seed))][key]
                assert (written == "") if value is None else float(written) == pytest.approx(value)
        for key in runs[0]:
            values = [run[key] for run in runs if run[key] is not None]
            if not values:
                continue
            means[(arm, key)] = statistics.fmean(values)
            assert float(rows[(arm, "mean")][key]) == pytest.approx(means[(arm, key)])
            assert float(rows[(arm, "std")][key]) == pytest.approx(statistics.stdev(values))
    arm = ARMS.split(";")[1]
    for key in per_arm[(SLUGS[0], "baseline")][0]:
        base = means.get(("baseline", key))
        if base and key != "steps_to_50pct":  # a censored column: medians, no change of means
            change = (means[(arm, key)] - base) / base * 100
            assert float(rows[(arm, "delta_pct")][key]) == pytest.approx(change)

    table = (experiment / "results.md").read_text().split("## Headline")[1]
    header = next(line for line in table.splitlines() if "val RMSE (m)" in line).split("|")
    line = next(line for line in table.splitlines() if line.startswith(f"| `{arm}`"))
    rmse_cell = line.split("|")[header.index(" val RMSE (m) ")]
    mean, std, change = map(float, re.findall(r"[-+]?\d+\.\d+", rmse_cell)[:3])
    assert mean == pytest.approx(means[(arm, "val_rmse_m")], abs=0.01)
    assert std == pytest.approx(float(rows[(arm, "std")]["val_rmse_m"]), abs=0.01)
    assert change == pytest.approx(float(rows[(arm, "delta_pct")]["val_rmse_m"]), abs=0.05)
    # the interval over seeds and tiles, for the metrics that follow from val_tiles.csv.gz
    for key in ("val_rmse_m", "val_slope_rmse_deg", "val_rmse_m_extreme"):
        low, high = (float(rows[(arm, row)][key]) for row in ("boot_low", "boot_high"))
        assert math.isfinite(low) and low <= high, key
    assert rows[(arm, "boot_low")]["val_tile_median_rmse_m"] == ""  # a median: seeds only
    # the bicubic reference row is the same split's interpolation, from the runs' own rows
    bicubic = read_metrics(experiment / "baseline" / "seed0")[-1]["val_rmse_m_bicubic"]
    assert float(rows[("bicubic", "0")]["val_rmse_m"]) == pytest.approx(bicubic)
    # every seed validates on the same tiles (data.split_seed): the same interpolation error
    assert rows[("bicubic", "1")]["val_rmse_m"] == rows[("bicubic", "0")]["val_rmse_m"]
    # the equal-steps view reads every run within the fewest steps any arm took
    for seed in SEEDS:
        budget = min(int(float(rows[(arm, str(seed))]["steps"])) for arm in ARMS.split(";"))
        for arm in ARMS.split(";"):
            assert int(float(rows[(arm, str(seed))]["steps@equal_steps"])) <= budget
    assert "## At equal optimizer steps" in table
    assert "## Controls" in (experiment / "results.md").read_text()


@pytest.mark.slow
def test_restart_skips_finished_runs_and_resumes_the_rest(
    experiment: Path, procedural_dir: Path, capsys
):
    runs = [experiment / slug / f"seed{seed}" for slug in SLUGS for seed in SEEDS]
    before = {path: path.stat().st_mtime_ns for run in runs for path in run.iterdir()}
    metrics = read_metrics(runs[-1])
    (runs[-1] / "summary.json").unlink()  # as if that run died after its last checkpoint
    assert main(experiment_args(procedural_dir, experiment)) == 0
    printed = capsys.readouterr().out
    assert "3 of 4 runs already finished, 1 to run" in printed
    assert f"resuming {ARMS.split(';')[1]} seed {SEEDS[-1]}" in printed
    assert "starting" not in printed
    for path, mtime in before.items():
        if path.parent != runs[-1]:
            assert path.stat().st_mtime_ns == mtime, f"{path} was touched again"
    assert json.loads((runs[-1] / "summary.json").read_text())["epochs"] == 2
    assert read_metrics(runs[-1]) == metrics
    # the resume left its note in the run's config.toml, a history and no setting: the
    # folder is still this experiment's
    assert tomllib.loads((runs[-1] / "config.toml").read_text())["resumed"]
    assert main(experiment_args(procedural_dir, experiment, "--report-only")) == 0


@pytest.mark.slow
def test_an_archive_holds_what_the_report_is_made_of(
    experiment: Path, procedural_dir: Path, tmp_path: Path, capsys
):
    """--archive copies each finished run's records, its metrics gzipped and no checkpoint;
    the report written from the archive alone is the report of the runs."""
    archive = tmp_path / "archive"
    args = experiment_args(procedural_dir, experiment, "--report-only")
    assert main([*args, "--report-dir", str(tmp_path / "first"), "--archive", str(archive)]) == 0
    assert f"archive: 4 runs in {archive}" in capsys.readouterr().out
    for slug in SLUGS:
        for seed in SEEDS:
            kept = archive / slug / f"seed{seed}"
            assert sorted(p.name for p in kept.iterdir()) == [
                "config.toml", "metrics.jsonl.gz", "summary.json", "val_tiles.csv.gz"
            ]  # fmt: skip
            original = (experiment / slug / f"seed{seed}" / "metrics.jsonl").read_bytes()
            assert gzip.decompress((kept / "metrics.jsonl.gz").read_bytes()) == original
    again = experiment_args(procedural_dir, archive, "--report-only")
    assert main([*again, "--report-dir", str(tmp_path / "again")]) == 0
    for name in ("results.csv", "results.md"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "first" / name).read_text()
    # the experiment folder is no archive of itself
    assert main([*args, "--report-dir", str(tmp_path / "x"), "--archive", str(experiment)]) == 2
    assert "is the experiment folder itself" in capsys.readouterr().err


@pytest.mark.slow
def test_other_settings_in_an_existing_folder_are_refused(
    experiment: Path, procedural_dir: Path, capsys
):
    args = experiment_args(procedural_dir, experiment, "--set", "optim.lr=0.01", "--report-only")
    assert main(args) == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ("baseline;stratified,no_such_plugin", "arm 'stratified,no_such_plugin': unknown plugin"),
        ("baseline;balanced_grad,pcgrad", "arm 'balanced_grad,pcgrad'"),
        ("baseline;stratified|data.batch_size='ten'", "expected int, got str 'ten'"),
        ("baseline;baseline,stratified", "'baseline' means no plugins"),
        ("baseline;stratified;stratified", "share a folder name"),
    ],
)
def test_bad_arms_exit_2_before_any_run(arms: str, message: str, tmp_path: Path, capsys):
    assert main(["--arms", arms, "--out", str(tmp_path / "exp")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_check_runs_nothing_and_report_only_needs_a_finished_run(tmp_path: Path, capsys):
    out = tmp_path / "exp"
    assert (
        main(["--arms", "baseline;stratified", "--seeds", "0,1", "--out", str(out), "--check"]) == 0
    )
    assert "2 arms x 2 seeds" in capsys.readouterr().out
    assert not any(out.rglob("metrics.jsonl"))
    assert main(["--arms", "baseline", "--out", str(out), "--report-only"]) == 2
    assert f"--report-only: no finished run in {out}" in capsys.readouterr().err
    assert main(["--arms", "baseline", "--out", str(out), "--report-only", "--check"]) == 0
    assert not (out / "results.md").exists()  # --check writes nothing, not even a report


def test_toml_arms_carry_their_own_overrides(tmp_path: Path):
    """TOML arms carry their own overrides and nothing else: ``domain_bn`` states its own
    needs (it stops a run whose model has no BatchNorm)."""
    path = tmp_path / "arms.toml"
    path.write_text(
        'seeds = [3, 4]\nepochs = 5\nset = ["optim.lr=0.01"]\n'
        '[[arms]]\nname = "baseline_bn"\nset = ["model.norm=\'batch\'"]\n'
        '[[arms]]\nname = "dbn"\nplugins = ["stratified", "domain_bn"]\n'
    )
    args = build_parser().parse_args(["--config", str(path), "--out", "x", "--epochs", "2"])
    experiment = build_experiment(args)
    assert (experiment.seeds, experiment.epochs, experiment.common) == (
        (3, 4),
        2,
        ("optim.lr=0.01",),
    )
    assert [(arm.name, arm.plugins, arm.overrides) for arm in experiment.arms] == [
        ("baseline_bn", (), ("model.norm='batch'",)),
        ("dbn", ("stratified", "domain_bn"), ()),
    ]
    assert experiment.baseline == "baseline_bn"  # no arm is called baseline: the first one
    sham = attrs.evolve(experiment.arms[0], name="sham", control="sham", seed_offset=1000)
    assert "run.seed=1003" in run_overrides(experiment, sham, 3, tmp_path)
    path.write_text('[[arms]]\nname = "a"\nplugin = ["stratified"]\n')
    with pytest.raises(UsageError, match=r"extra fields found \(plugin\) @ .*arms\[0\]"):
        build_experiment(build_parser().parse_args(["--config", str(path), "--out", "x"]))


def test_the_experiment_knows_no_plugin_and_takes_the_reference_row_from_the_task(
    tmp_path: Path,
):
    """A sar2opt experiment's ``domain_bn`` arm keeps the overrides it was given (no
    ``model.norm``, a key sar2opt lacks), and the arm name reserved for the reference row is
    the task's (dem_sr: bicubic; sar2opt has no reference row)."""

    path = tmp_path / "arms.toml"
    path.write_text(
        '[[arms]]\nname = "baseline"\n[[arms]]\nname = "domain_bn"\nplugins = ["domain_bn"]\n'
        '[[arms]]\nname = "bicubic"\nset = ["optim.lr=0.01"]\n'
    )

    def checked(*argv: str):
        args = build_parser().parse_args(["--config", str(path), *argv, "--out", "x"])
        experiment = build_experiment(args)
        check_arms(experiment, tmp_path / "x")
        return experiment

    sar2opt = checked("--set", "run.task='sar2opt'")
    assert [(arm.name, arm.overrides) for arm in sar2opt.arms] == [
        ("baseline", ()),
        ("domain_bn", ()),
        ("bicubic", ("optim.lr=0.01",)),
    ]
    with pytest.raises(UsageError, match="arm name 'bicubic' is reserved for the reference row"):
        checked()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('epochs = "8"\n', "expected int, got str '8' @ {path}.epochs"),
        (
            '[[arms]]\nname = "a"\nplugins = "stratified"\n',
            "expected a list, got str 'stratified' @ {path}.arms[0].plugins",
        ),
        ('[[arms]]\nname = "a"\ncontrol = "fake"\n', "'control' must be in ('sham', 'harmful', "),
        ('correction = "bonferroni"\n[[arms]]\nname = "a"\n', "@ {path}.correction"),
        ('seed = [1]\n[[arms]]\nname = "a"\n', "extra fields found (seed) @ {path}"),
        (
            '[[arms]]\nname = "a"\ncontrol = "sham"\n[[arms]]\nname = "b"\ncontrol = "sham"\n',
            "marked control = 'sham'",
        ),
    ],
)
def test_bad_experiment_files_exit_2_naming_the_key(
    text: str, message: str, tmp_path: Path, capsys
):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    assert main(["--config", str(path), "--out", str(tmp_path / "exp")]) == 2
    assert message.format(path=path) in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def tiny_run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """One short epoch per run: what a refusal must stop before it starts."""
    args = ["--epochs", "1", "--data", str(data), "--out", str(out), "--threads", "1", *extra]
    for assignment in TINY:
        args += ["--set", assignment]
    return args


@pytest.mark.parametrize("name", ["..", ".", ". ."])
def test_an_arm_whose_folder_would_leave_out_exits_2_naming_it_and_the_file(
    name: str, procedural_dir: Path, tmp_path: Path, capsys
):
    path = tmp_path / "spec.toml"
    path.write_text(f'seeds = [0]\n[[arms]]\nname = "baseline"\n[[arms]]\nname = "{name}"\n')
    out = tmp_path / "experiments" / "exp"
    assert main(tiny_run_args(procedural_dir, out, "--config", str(path))) == 2
    err = capsys.readouterr().err
    assert f"{name!r}" in err and f"{path}.arms[1].name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


@pytest.mark.parametrize(
    ("text", "option", "message"),
    [
        ('seeds = []\n[[arms]]\nname = "baseline"\n', [], "'seeds' must list at least one"),
        ('[[arms]]\nname = "baseline"\n', ["--seeds", ""], "--seeds names no seed"),
        ('[[arms]]\nname = "baseline"\n', ["--seeds", " , "], "--seeds names no seed"),
    ],
)
def test_no_seeds_exit_2_naming_the_key_or_option(
    text: str, option: list[str], message: str, procedural_dir: Path, tmp_path: Path, capsys
):
    """An empty list of seeds is a mistake, not a request for the default seeds."""
    path = tmp_path / "spec.toml"
    path.write_text(text)
    out = tmp_path / "exp"
    assert main(tiny_run_args(procedural_dir, out, "--config", str(path), *option)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert (f"@ {path}.seeds" in err) == (not option)
    assert not out.exists()


def test_paired_test_matches_the_closed_form():
    """Differences 1, 2, 3: t = 2 / (1 / sqrt 3); with 2 degrees of freedom Student's t has
    P(|T| >= t) = 1 - t / sqrt(t^2 + 2), and the 95 % interval is 2 ± 4.3027 / sqrt 3."""
    values, reference = {0: 11.0, 1: 12.0, 2: 13.0, 3: 5.0}, {0: 10.0, 1: 10.0, 2: 10.0}
    result = paired_test(values, reference, test="t")
    t = 2 * 3**0.5
    assert result.n == 3 and result.mean == pytest.approx(2.0) and result.std == pytest.approx(1)
    assert result.p == pytest.approx(1 - t / (t * t + 2) ** 0.5)
    assert (result.low, result.high) == pytest.approx(
        (2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5)
    )
    wilcoxon = paired_test({0: 1.0, 1: 2.5, 2: 4.0}, {0: 0.0, 1: 0.0, 2: 0.0}, test="wilcoxon")
    assert wilcoxon.p == pytest.approx(0.25)  # all 3 signs positive: 2 / 2**3, exactly
    five = paired_test(
        dict.fromkeys(range(5), 1.0) | {4: 2.0}, dict.fromkeys(range(5), 0.0), "wilcoxon"
    )
    assert five.p == pytest.approx(0.0625)  # the smallest two-sided p with 5 seeds
    assert paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p == 1.0  # identical runs
    assert paired_test(values, reference).p == 0.25  # sign-flip: 2 of 8 patterns as far
    assert paired_test({0: 1.0}, {0: 2.0}) is None


def test_corrections_on_a_crafted_family():
    p_values = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted p x (4, 3, 2, 1) = 0.02, 0.03, 0.06, 0.04 -> running max 0.02 0.03 0.06 0.06
    assert adjust(p_values, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted p x 4 / rank = 0.02, 0.02, 0.04, 0.04 (already monotone)
    assert adjust(p_values, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust(p_values, "none") == p_values


def test_the_documented_experiment_files_load(tmp_path: Path):
    page = (Path(__file__).resolve().parent.parent / "docs" / "experiments.md").read_text()
    examples = re.findall(r"```toml\n(.*?)```", page, flags=re.DOTALL)
    paths = []
    for number, example in enumerate(examples):
        paths.append(tmp_path / f"example{number}.toml")
        paths[-1].write_text(example)
    results = Path(__file__).resolve().parent.parent / "docs" / "results"
    paths += [results / "globe" / "experiment.toml", results / "srtm" / "experiment.toml"]
    for path in paths:
        experiment = build_experiment(
            build_parser().parse_args(["--config", str(path), "--out", "x"])
        )
        check_arms(experiment, tmp_path / "x")  # every arm's plugins and keys resolve
        assert experiment.arms and experiment.baseline == "baseline", path
    srtm = build_experiment(build_parser().parse_args(["--config", str(paths[-1]), "--out", "x"]))
    assert len(srtm.seeds) >= 5 and srtm.control("sham") and srtm.control("harmful")
    names = {arm.name for arm in srtm.arms}
    assert {"terrain_embedding", "terrain_head", "pcgrad", "domain_bn", "baseline_bn"} <= names


DEM = get_task("dem_sr")


def summarise_dem(experiment, runs):
    return summarise(experiment, runs, DEM.report_metrics, DEM.terrains, DEM.reference_name)


def report(experiment, summary) -> str:
    return markdown(experiment, summary, primary_column(DEM.report_metrics))


def synthetic_rows(level: float, epochs: int = 3) -> list[dict]:
    """metrics.jsonl-shaped rows whose errors scale with ``level``."""
    by_terrain = {terrain: level * (i + 1) for i, terrain in enumerate(TERRAINS)}
    return [
        {
            "epoch": epoch,
            "train_loss": level / epoch,
            "val_loss": level / epoch,
            "batch_loss_outliers": epoch % 2,
            "steps": 10,
            "step_losses": [level / epoch] * 10,
            "val_rmse_m": level,
            "val_slope_rmse_deg": level / 10,
            "val_rmse_m_by_terrain": by_terrain,
            "val_slope_rmse_deg_by_terrain": by_terrain,
            "val_rmse_m_bicubic": 2 * level,
            "val_rmse_m_bicubic_by_terrain": by_terrain,
        }
        for epoch in range(1, epochs + 1)
    ]


def test_a_partial_experiment_still_gives_a_report(tmp_path: Path):
    """Arms with missing seeds and a missing arm: the finished runs are reported as they are."""
    args = ["--arms", "baseline;stratified;curriculum,stratified", "--seeds", "0,1", "--out", "x"]
    experiment = build_experiment(build_parser().parse_args(args))
    runs = {
        "baseline": {0: synthetic_rows(1.0), 1: synthetic_rows(1.2)},
        "stratified": {1: synthetic_rows(0.6, epochs=2)},
    }
    summary = summarise_dem(experiment, runs)
    assert summary.stats["stratified"]["count"]["val_rmse_m"] == 1
    assert summary.stats["stratified"]["delta_pct"]["val_rmse_m"] == pytest.approx(-50 / 1.1)
    assert summary.stats["stratified"]["paired_p"]["val_rmse_m"] is None  # one pair: no test
    # the baseline's mean gain over bicubic (2 x level) is 1.1 m; stratified's 1.2 - 0.6 at its
    # first validation (step 10) is more than half of it, and never 80 % of it (0.88 m)
    assert summary.per_seed["stratified"][1]["steps_to_50pct"] == 10
    assert summary.per_seed["stratified"][1]["steps_to_80pct"] is None
    table = report(experiment, summary)
    assert "3 of 6 runs complete" in table
    assert "| `stratified` | 1 |" in table and "curriculum" not in table
    plot_loss_curves_by_arm(runs, tmp_path / "curves.png", baseline="baseline")
    task = get_task("dem_sr")
    plot_domain_metrics_by_arm(
        runs, tmp_path / "bars.png", task.report_metrics, task.terrains, "bicubic", "baseline"
    )
    assert (tmp_path / "curves.png").stat().st_size and (tmp_path / "bars.png").stat().st_size


def test_a_baseline_no_better_than_bicubic_gives_no_fractions_of_a_gain():
    """The baseline ends worse than bicubic (as on the world's pooled validation set): there
    is no gain to take fractions of, so no run gets a steps-to cell or a sign test (not a
    column of "never" for every arm), and the legend says why with both numbers."""
    args = ["--arms", "baseline;stratified", "--seeds", "0,1", "--out", "x"]
    experiment = build_experiment(build_parser().parse_args(args))
    runs = {arm: {s: synthetic_rows(1.0 + s) for s in (0, 1)} for arm in ("baseline", "stratified")}
    for seeds in runs.values():
        for rows in seeds.values():
            for row in rows:
                row["val_rmse_m_bicubic"] = 0.5 * row["val_rmse_m"]  # bicubic twice as good
    summary = summarise_dem(experiment, runs)
    for arm in ("baseline", "stratified"):
        for run in summary.per_seed[arm].values():
            assert not [name for name in run if name.startswith("steps_to_")], arm
        assert summary.stats[arm]["paired_p"]["steps_to_50pct"] is None
    table = report(experiment, summary)
    assert "never" not in table
    headline = table.split("## Headline")[1].splitlines()
    line = next(row for row in headline if row.startswith("| `stratified` |"))
    assert "| – | – | – |" in line  # the three fractions
    assert (
        "none, since `baseline` ends no better than bicubic in val RMSE (m) (1.5 against 0.75)"
        in (table)
    )


def test_arm_syntax():
    arms = parse_arms(" baseline ; stratified,terrain_loss|optim.lr=5e-4|data.batch_size=20 ;")
    assert [(a.name, a.plugins, a.overrides, a.slug) for a in arms] == [
        ("baseline", (), (), "baseline"),
        (
            "stratified,terrain_loss|optim.lr=5e-4|data.batch_size=20",
            ("stratified", "terrain_loss"),
            ("optim.lr=5e-4", "data.batch_size=20"),
            "stratified+terrain_loss__optim.lr=5e-4__data.batch_size=20",
        ),
    ]


def controlled(
    sham_shift: float, harmful_shift: float, seeds: int = 7, stratified_shift: float = -0.5
):
    """An experiment with sham and harmful controls whose final RMSE is the baseline's per
    seed plus a shift and a seed-dependent wobble (differences with a spread, as real runs)."""
    spec = "baseline;stratified;sham;harmful"
    args = ["--arms", spec, "--seeds", ",".join(map(str, range(seeds))), "--out", "x"]
    experiment = build_experiment(build_parser().parse_args(args))
    roles = {"sham": "sham", "harmful": "harmful"}
    experiment = attrs.evolve(
        experiment,
        arms=tuple(attrs.evolve(arm, control=roles.get(arm.name)) for arm in experiment.arms),
    )
    wobble = [0.03, -0.02, 0.01, -0.04, 0.02, 0.0, -0.01][:seeds]
    level = {seed: 10.0 + 3 * seed for seed in range(seeds)}  # seeds differ a lot: pairing
    shifts = {
        "baseline": 0.0,
        "stratified": stratified_shift,
        "sham": sham_shift,
        "harmful": harmful_shift,
    }
    runs = {
        arm: {s: synthetic_rows(level[s] + shift + (wobble[s] if arm != "baseline" else 0))
              for s in range(seeds)}
        for arm, shift in shifts.items()
    }  # fmt: skip
    return experiment, summarise_dem(experiment, runs)


def test_the_controls_verdict_follows_the_tests():
    experiment, summary = controlled(sham_shift=0.0, harmful_shift=4.0)
    primary = primary_column(DEM.report_metrics)
    assert primary.name == "val_rmse_m"
    stats = summary.stats
    assert stats["sham"]["paired_p"]["val_rmse_m"] > 0.05
    assert stats["harmful"]["paired_p"]["val_rmse_m"] < 0.05
    verdict = " ".join(control_verdict(experiment, summary, primary))
    assert "controls hold" in verdict and "no power" not in verdict
    assert f"p = {stats['sham']['paired_p']['val_rmse_m']:.3g}" in verdict

    # a harmful arm as good as the baseline, a sham that differs: no power, both named
    experiment, summary = controlled(sham_shift=0.3, harmful_shift=0.0)
    verdict = " ".join(control_verdict(experiment, summary, primary))
    assert "**The experiment has no power:**" in verdict and "controls hold" not in verdict
    assert "sham arm `sham` differs significantly" in verdict
    assert "harmful arm `harmful` is not significantly worse" in verdict
    assert "## Controls" in report(experiment, summary)

    # a harmful arm significantly *better* is no evidence of power either
    experiment, summary = controlled(sham_shift=0.0, harmful_shift=-4.0)
    assert "no power" in " ".join(control_verdict(experiment, summary, primary))


def test_an_arm_normalised_otherwise_is_not_compared_in_loss_units():
    """An arm whose losses are in other units (another data.normalisation) gets no change or
    test in the val_loss columns, and the report says why; its metres still compare."""
    experiment, plain = controlled(sham_shift=0.0, harmful_shift=4.0)
    runs = {arm: {s: synthetic_rows(run["val_rmse_m"]) for s, run in seeds.items()}
            for arm, seeds in plain.per_seed.items() if arm != "bicubic"}  # fmt: skip
    summary = summarise(
        experiment, runs, DEM.report_metrics, DEM.terrains, "bicubic", other_units={"stratified"}
    )
    stats = summary.stats["stratified"]
    for column in ("final_val_loss", "val_loss@equal_steps"):
        assert stats["paired_p"][column] is None and stats["delta_pct"][column] is None, column
    assert stats["paired_p"]["val_rmse_m"] == plain.stats["stratified"]["paired_p"]["val_rmse_m"]
    assert "`stratified` normalise the elevations otherwise" in report(experiment, summary)


def test_the_questions_plot_shows_each_seeds_pair_and_what_survives():
    """stratified is 0.5 m better than the baseline on every seed (a question that survives
    the correction): its seven paired differences are drawn, in % of the baseline's mean,
    around a filled marker at their mean; the controls ask no question and get no row."""
    experiment, summary = controlled(sham_shift=0.0, harmful_shift=4.0)
    figure = questions_figure(summary, "baseline", experiment.alpha, {"stratified": "C1"})
    [ax] = figure.axes
    assert [tick.get_text() for tick in ax.get_yticklabels()] == [
        "stratified: val RMSE (m) (lower is better)"
    ]
    dots, mean = ax.collections
    base_mean = summary.stats["baseline"]["mean"]["val_rmse_m"]
    arm, base = (summary.per_seed[name] for name in ("stratified", "baseline"))
    expected = [(arm[s]["val_rmse_m"] - base[s]["val_rmse_m"]) * 100 / base_mean for s in range(7)]
    # the same float64 differences scaled once: a few ulps
    assert list(dots.get_offsets()[:, 0]) == pytest.approx(expected, rel=1e-12)
    assert mean.get_offsets()[0, 0] == pytest.approx(statistics.fmean(expected), rel=1e-12)
    assert tuple(mean.get_facecolor()[0]) != (1.0, 1.0, 1.0, 1.0)  # filled: it survives

    # stratified as good as the baseline (the wobble alone): the same row, an open marker
    experiment, summary = controlled(sham_shift=0.0, harmful_shift=4.0, stratified_shift=0.0)
    assert summary.stats["stratified"]["adjusted_p"]["val_rmse_m"] > experiment.alpha
    figure = questions_figure(summary, "baseline", experiment.alpha, {"stratified": "C1"})
    _, mean = figure.axes[0].collections
    assert tuple(mean.get_facecolor()[0]) == (1.0, 1.0, 1.0, 1.0)  # white: it does not


def test_the_region_gains_plot_draws_each_regions_mean_over_seeds():
    """Per region, each arm's marker is its mean gain over the seeds, with their std."""
    gains = {
        "baseline": {0: {"alps": -9.0, "sierra": 20.0}, 1: {"alps": -11.0, "sierra": 22.0}},
        "global_scale": {0: {"alps": 4.0, "sierra": 18.0}, 1: {"alps": 6.0, "sierra": 16.0}},
    }
    figure = region_gains_figure(gains, {}, "bicubic", "val RMSE (m)")
    [ax] = figure.axes
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["alps", "sierra"]
    markers = [list(bars.lines[0].get_ydata()) for bars in ax.containers]
    assert markers == [[-10.0, 21.0], [5.0, 17.0]]  # means of two exact binary fractions
    spans = [top - bottom for bars in ax.containers for (_, bottom), (_, top) in
             bars.lines[2][0].get_segments()]  # fmt: skip
    assert spans == pytest.approx([2 * math.sqrt(2)] * 4, rel=1e-12)  # ± sqrt(2), 2 seeds 2 apart


def test_the_correction_marks_what_survives():
    """stratified is 0.5 m better on every seed: its primary endpoint (val RMSE) is a family
    of one and survives. Its other columns here are the same test again (val_loss, slope
    RMSE, the curve's mean, every terrain and the equal-steps view move by multiples of the
    same differences) or null by construction (batch-loss outliers the same in every run):
    no family holds them; optimizer steps, a budget, get no test; the controls are in no
    family, and the † follows adjusted_p."""
    experiment, summary = controlled(sham_shift=0.0, harmful_shift=4.0)
    stats = summary.stats["stratified"]
    assert summary.questions == {"stratified": "val_rmse_m"}
    assert stats["adjusted_p"]["val_rmse_m"] == stats["paired_p"]["val_rmse_m"] == 2 / 2**7
    assert stats["paired_p"]["steps"] is None and stats["primary"]["val_rmse_m"] == 1
    duplicates = ["final_val_loss", "val_auc", "val_slope_rmse_deg", "val_rmse_m@equal_steps"]
    duplicates += [f"val_rmse_m_{terrain}" for terrain in TERRAINS]
    for name in [*duplicates, "batch_loss_outliers_per_1000_steps"]:
        assert stats["paired_p"][name] is not None and stats["adjusted_p"][name] is None, name
    assert stats["paired_p"]["batch_loss_outliers_per_1000_steps"] == 1.0
    lines = report(experiment, summary).split("## Headline")[1].splitlines()
    line = next(row for row in lines if row.startswith("| `stratified` |"))
    assert "*†)**" in line  # the bold primary endpoint, significant after the correction
    assert "6.166 ± 2.158 (-2.6%*) |" in line  # final val_loss: significant, no family
    harmful_line = next(row for row in lines if "[harmful]" in row)
    assert "*)" in harmful_line and "†" not in harmful_line  # a control: never in a family


def test_the_step_loss_plot_marks_the_spikes(tmp_path: Path):
    calm = [1.0 - 0.01 * i for i in range(40)]
    spiky = list(calm)
    spiky[25], spiky[33] = 5.0, None  # a spike and a non-finite loss (written as null)
    rows = [
        {"epoch": 1, "step_losses": spiky[:20]},
        {"epoch": 2, "step_losses": spiky[20:]},
    ]
    runs = {"baseline": {0: [{"epoch": 1, "step_losses": calm}]}, "spiky": {3: rows}}
    assert batch_loss_outliers(run_step_losses(rows)) == [25, 33]
    figure = step_loss_figure(runs)
    calm_axes, spiky_axes = figure.axes
    assert calm_axes.collections[0].get_offsets().shape[0] == 0
    marked = spiky_axes.collections[0].get_offsets()
    assert marked[:, 0].tolist() == [26, 34]  # optimizer steps count from 1
    assert marked[:, 1].tolist() == [5.0, 5.0]  # the non-finite one at the curve's top
    assert "2 batch-loss outliers" in spiky_axes.get_title()
    plot_step_losses_by_arm(runs, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 0


def test_a_sar2opt_experiment_reports_the_tasks_own_columns():
    """The task supplies the columns: sar2opt's L1 (lower is better, the primary one) and PSNR
    and SSIM (higher is better); no per-terrain tables, no reference row."""
    task = get_task("sar2opt")
    args = ["--arms", "baseline;harmful", "--seeds", "0,1,2,3", "--out", "x"]
    experiment = build_experiment(build_parser().parse_args(args))
    experiment = attrs.evolve(
        experiment,
        arms=(experiment.arms[0], attrs.evolve(experiment.arms[1], control="harmful")),
        test="t",  # 4 seeds: no sign-flip p can go below 2 / 2**4 = 0.125
    )

    def rows(l1: float, psnr: float) -> list[dict]:
        return [
            {"epoch": 1, "train_loss": l1, "val_loss": l1, "batch_loss_outliers": 0, "steps": 4,
             "val_l1": l1, "val_psnr": psnr, "val_ssim": 0.5, "step_losses": [l1] * 4}
        ]  # fmt: skip

    def verdict(harmful_l1: float, harmful_psnr: float, primary: Column) -> str:
        runs = {
            "baseline": {s: rows(0.1 + 0.05 * s, 20.0 + s) for s in range(4)},
            "harmful": {
                s: rows(
                    0.1 + 0.05 * s + harmful_l1 + 0.001 * s * s,
                    20.0 + s + harmful_psnr + 0.1 * s * s,
                )
                for s in range(4)
            },
        }
        summary = summarise(experiment, runs, task.report_metrics, task.terrains, "")
        assert [t.title for t in summary.tables] == ["Headline", "At equal optimizer steps"]
        assert "val PSNR (dB)" in markdown(experiment, summary, primary)
        assert set(summary.per_seed) == {"baseline", "harmful"}
        return " ".join(control_verdict(experiment, summary, primary))

    l1 = primary_column(task.report_metrics)
    assert (l1.name, l1.higher_is_better) == ("val_l1", False)
    assert "harmful arm `harmful` is significantly worse in val L1" in verdict(0.2, -3.0, l1)
    assert "not significantly worse" in verdict(-0.2, 3.0, l1)  # better is not harm
    psnr = Column("val_psnr", "val PSNR (dB)", higher_is_better=True)
    assert "significantly worse in val PSNR" in verdict(0.2, -3.0, psnr)
    assert "not significantly worse" in verdict(0.2, 3.0, psnr)


@pytest.mark.parametrize("arms", [3, 10, 13, 20])
def test_every_arm_has_its_own_colour(arms: int) -> None:
    """The report's plots tell arms apart: past ten arms the colour cycle would repeat."""
    colours = [str(colour) for colour in arm_colours(arms)]
    assert len(set(colours)) == arms


@pytest.mark.slow
def test_the_run_count_leaves_out_the_tasks_reference_whatever_its_name(
    template_task: Path,  # noqa: F811
    procedural_dir: Path,
    tmp_path: Path,
):
    """dem_denoise's reference row is ``noisy input``, not ``bicubic``: the console and the
    report count the arms' runs only."""
    out = tmp_path / "experiment"
    result = run_cli(sys.executable, "-m", "core.experiment", "--arms", "baseline", "--seeds",
                     "0,1", "--epochs", "1", "--data", str(procedural_dir), "--out", str(out),
                     "--set", "run.task='dem_denoise'", "--set", "model.channels=4",
                     "--set", "train.progress='never'", "--jobs", "2", "--threads", "1",
                     path=[template_task])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {out / 'results.md'} (2 of 2 runs)" in result.stdout
    assert "2 of 2 runs complete" in (out / "results.md").read_text()
    assert "noisy input (reference)" in (out / "results.md").read_text()


@pytest.mark.slow
def test_sigint_stops_an_experiment_started_with_sigint_ignored(
    procedural_dir: Path, tmp_path: Path
):
    """A script's background job (``cmd &``) starts with SIGINT ignored, which Python would
    keep: the driver handles SIGINT all the same, and its running run stops with exit 130
    and interrupted.json, never finishing."""
    out = tmp_path / "exp"
    args = tiny_run_args(procedural_dir, out, "--arms", "baseline", "--seeds", "0")
    args[args.index("--epochs") + 1] = "200"  # far longer than the test waits
    driver = subprocess.Popen(
        [sys.executable, "-m", "core.experiment", *args],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    run = out / "baseline" / "seed0"
    try:
        deadline = time.monotonic() + 600  # a loaded 2-core machine starts a run slowly
        while not (run / CHECKPOINT).is_file():
            assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output
    assert json.loads((run / INTERRUPTED).read_text())["signal"] == "SIGINT"
    assert not (run / SUMMARY).exists()
