"""A tuned arm: Optuna's seeded TPE search over ``terrain_loss``'s per-terrain weights on a
tuning split of named regions, whose trials never train or validate on the regions the
report scores; the chosen setting then trains the arm, reported like every other arm."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import statistics
from pathlib import Path

import pytest

from core.config import DataSection, load_config
from core.errors import DataError
from core.experiment import main
from core.tasks.dem_sr.data.dataset import load_split
from core.tasks.dem_sr.terrain import TERRAINS
from tests.conftest import read_metrics
from tests.test_experiment import tiny_run_args

REPORTED = [f"{terrain}_tile_0" for terrain in TERRAINS]
"""The experiment's validation regions (a procedural tile is a region of its own)."""
TUNING = [f"{terrain}_tile_1" for terrain in TERRAINS]
KEY = "plugins.terrain_loss.profiles.extreme.elevation"
TRIALS = 3
QUIET = ("--set", "train.progress='never'")


def spec(folder: Path) -> Path:
    path = folder / "spec.toml"
    path.write_text(
        f"seeds = [0]\nepochs = 1\nset = ['data.val_regions={json.dumps(REPORTED)}']\n"
        '[[arms]]\nname = "baseline"\n'
        '[[arms]]\nname = "tuned"\nplugins = ["terrain_loss"]\n'
        f"[arms.tune]\ntrials = {TRIALS}\nbatch = 2\nseeds = [1000]\n"
        f"regions = {json.dumps(TUNING)}\n"
        f'[arms.tune.params]\n"{KEY}" = {{low = 0.5, high = 4.0, log = true}}\n'
    )
    return path


def command(data: Path, out: Path) -> list[str]:
    spec_file = spec(out.parent)
    return tiny_run_args(data, out, "--config", str(spec_file), "--jobs", "2", *QUIET)


@pytest.fixture(scope="module")
def tuned(procedural_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "exp"
    assert main(command(procedural_dir, out)) == 0
    return out


def regions_read(run: Path) -> tuple[set[str], set[str]]:
    """(training, validation) regions of a run: the split its config.toml makes, and the
    windows its validation wrote to val_tiles.csv.gz."""
    config = load_config(run / "config.toml")
    train, _ = load_split(Path(config.data.dir), config.data, config.data.split_seed)
    with gzip.open(run / "val_tiles.csv.gz", "rt", newline="") as handle:
        validated = {row["region"] for row in csv.DictReader(handle)}
    return set(train.regions), validated


@pytest.mark.slow
def test_the_search_never_reads_the_reported_regions(tuned: Path):
    trials = sorted((tuned / "tuned" / "tuning").glob("trial*/seed1000"))
    assert len(trials) == TRIALS
    for run in trials:
        trained, validated = regions_read(run)
        assert validated == set(TUNING), run
        assert not trained & (set(REPORTED) | set(TUNING)), run
    # the arm itself trains on the tuning regions too and is scored on the reported ones
    trained, validated = regions_read(tuned / "tuned" / "seed0")
    assert validated == set(REPORTED) and set(TUNING) <= trained


@pytest.mark.slow
def test_the_chosen_setting_trains_the_arm_and_the_report_shows_the_search(tuned: Path):
    search = json.loads((tuned / "tuned" / "tuning" / "search.json").read_text())
    values = {}
    for trial in search["trials"]:
        run = tuned / "tuned" / "tuning" / f"trial{trial['trial']}" / "seed1000"
        values[trial["trial"]] = read_metrics(run)[-1]["val_rmse_m"]
        assert trial["value"] == values[trial["trial"]]
        assert load_config(run / "config.toml").plugins["terrain_loss"]["profiles"]["extreme"][
            "elevation"
        ] == pytest.approx(trial["params"][KEY])
    assert len(values) == TRIALS and len({t["params"][KEY] for t in search["trials"]}) == TRIALS
    best = min(values, key=values.__getitem__)  # val RMSE: lower is better
    assert search["chosen"]["trial"] == best
    chosen = search["chosen"]["params"][KEY]
    config = load_config(tuned / "tuned" / "seed0" / "config.toml")
    assert config.plugins["terrain_loss"]["profiles"]["extreme"]["elevation"] == chosen
    assert config.data.val_regions == REPORTED and not config.data.exclude_regions

    report = (tuned / "results.md").read_text()
    section = report.split("## Tuned arms")[1]
    assert f"`{KEY}={json.dumps(chosen)}`" in section
    assert f"Budget spent: {TRIALS} of {TRIALS} trials, {TRIALS} runs" in section
    steps = sum(row["steps"] for t in values for row in trial_rows(tuned, t))
    assert f"{steps} optimizer steps" in section
    for trial in search["trials"]:  # training seconds: the runs' own, summed
        seconds = sum(row["seconds"] for row in trial_rows(tuned, trial["trial"]))
        assert trial["seconds"] == pytest.approx(seconds)
    with open(tuned / "results.csv", newline="") as handle:
        rows = {(row["arm"], row["seed"]): row for row in csv.DictReader(handle)}
    final = read_metrics(tuned / "tuned" / "seed0")[-1]["val_rmse_m"]
    assert float(rows[("tuned", "0")]["val_rmse_m"]) == pytest.approx(final)
    assert statistics.fmean([final]) == pytest.approx(float(rows[("tuned", "mean")]["val_rmse_m"]))


def trial_rows(out: Path, trial: int) -> list[dict]:
    return read_metrics(out / "tuned" / "tuning" / f"trial{trial}" / "seed1000")


@pytest.mark.slow
def test_a_rerun_replays_the_search_and_runs_nothing(tuned: Path, procedural_dir: Path, capsys):
    before = (tuned / "tuned" / "tuning" / "search.json").read_text()
    assert main(command(procedural_dir, tuned)) == 0
    assert "2 of 2 runs already finished, 0 to run" in capsys.readouterr().out
    assert (tuned / "tuned" / "tuning" / "search.json").read_text() == before


@pytest.mark.slow
def test_a_search_stopped_before_its_last_batch_replays_the_rest(
    tuned: Path, procedural_dir: Path, tmp_path: Path, capsys
):
    """The sampler, given the finished trials back, asks for the same last trial's settings,
    and only that trial runs; it ends as it did before."""
    out = tmp_path / "exp"
    shutil.copytree(tuned, out)
    last = TRIALS - 1  # batches of 2: the last batch holds this trial alone
    shutil.rmtree(out / "tuned" / "tuning" / f"trial{last}")
    search = out / "tuned" / "tuning" / "search.json"
    before = json.loads(search.read_text())
    # as the first batch left it: its trials, the best of them chosen
    first = before["trials"][:last]
    best = min(first, key=lambda trial: trial["value"])
    search.write_text(json.dumps({**before, "trials": first, "chosen": best}))
    capsys.readouterr()
    assert main(command(procedural_dir, out)) == 0
    started = [line for line in capsys.readouterr().out.splitlines() if " starting " in line]
    assert len(started) == 1 and f"starting tuned trial {last} seed 1000" in started[0]
    after = json.loads(search.read_text())
    assert [t["params"] for t in after["trials"]] == [t["params"] for t in before["trials"]]
    assert [t["value"] for t in after["trials"]] == [t["value"] for t in before["trials"]]
    assert after["chosen"]["params"] == before["chosen"]["params"]


@pytest.mark.slow
def test_a_search_that_left_other_regions_out_is_refused(
    tuned: Path, procedural_dir: Path, tmp_path: Path, capsys
):
    """Its trials trained on a region that the experiment now reports on."""
    out = tmp_path / "exp"
    (out / "tuned" / "tuning").mkdir(parents=True)
    search = tuned / "tuned" / "tuning" / "search.json"
    (out / "tuned" / "tuning" / "search.json").write_bytes(search.read_bytes())
    assert main([*command(procedural_dir, out), "--check"]) == 0  # the same regions: reused
    assert "2 to run, 2 at a time\n" in capsys.readouterr().out  # no search first
    regions = f"data.val_regions={json.dumps([*REPORTED[:-1], 'extreme_tile_2'])}"
    assert main([*command(procedural_dir, out), "--set", regions, "--check"]) == 2
    err = capsys.readouterr().err
    assert "search.json was searched leaving" in err and "extreme_tile_2" in err


@pytest.mark.parametrize(
    ("tune", "common", "message"),
    [
        ('regions = ["flat_tile_1"]', "", "needs the experiment to validate on named regions"),
        ('regions = ["flat_tile_0"]', REPORTED, "are reported validation regions too"),
        ('regions = ["flat_tile_1"]\nmetric = "nope"', REPORTED, "tune.metric 'nope' is not"),
    ],
)
def test_a_search_that_would_read_the_reported_set_exits_2(
    tune: str, common: list[str], message: str, procedural_dir: Path, tmp_path: Path, capsys
):
    path = tmp_path / "spec.toml"
    sets = f"set = ['data.val_regions={json.dumps(common)}']\n" if common else ""
    path.write_text(
        f'{sets}[[arms]]\nname = "baseline"\n[[arms]]\nname = "t"\nplugins = ["terrain_loss"]\n'
        f'[arms.tune]\n{tune}\n[arms.tune.params]\n"{KEY}" = {{low = 0.5, high = 4.0}}\n'
    )
    out = tmp_path / "exp"
    assert main(["--config", str(path), "--data", str(procedural_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "arm 't': " in err and message in err
    assert not out.exists()


def test_a_search_over_a_key_that_does_not_exist_exits_2(
    procedural_dir: Path, tmp_path: Path, capsys
):
    path = spec(tmp_path)
    path.write_text(path.read_text().replace(KEY, "plugins.terrain_loss.nope"))
    out = tmp_path / "exp"
    assert main(["--config", str(path), "--data", str(procedural_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "arm 'tuned': " in err and "(nope) @ plugins.terrain_loss" in err
    assert not out.exists()


def test_excluded_regions_neither_train_nor_validate(procedural_dir: Path):
    data = DataSection(val_regions=TUNING, exclude_regions=REPORTED)
    train, val = load_split(procedural_dir, data, 0)
    assert set(val.regions) == set(TUNING) and not set(train.regions) & set(REPORTED)
    with pytest.raises(DataError, match=r"data\.exclude_regions: no window lies in atlantis"):
        load_split(procedural_dir, DataSection(exclude_regions=["atlantis"]), 0)


def test_a_folder_split_into_train_and_val_refuses_regions(tmp_path: Path, capsys):
    """Such a folder would validate every trial on val/, the set the report scores."""
    presplit = tmp_path / "tiles"
    for part in ("train", "val"):
        (presplit / part).mkdir(parents=True)
    for data in (DataSection(val_regions=TUNING), DataSection(exclude_regions=REPORTED)):
        with pytest.raises(DataError, match=r"split into train/ and val/ already"):
            load_split(presplit, data, 0)
    out = tmp_path / "exp"
    assert main(["--config", str(spec(tmp_path)), "--data", str(presplit), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "arm 'tuned': " in err and "data.val_regions and data.exclude_regions" in err
    assert not out.exists()


@pytest.mark.slow
def test_an_archive_keeps_the_search_and_gives_the_same_report(
    tuned: Path, procedural_dir: Path, tmp_path: Path
):
    archive = tmp_path / "archive"
    first = [*command(procedural_dir, tuned), "--report-only", "--report-dir", str(tmp_path / "a")]
    assert main([*first, "--archive", str(archive)]) == 0
    search = Path("tuned", "tuning", "search.json")
    assert (archive / search).read_bytes() == (tuned / search).read_bytes()
    again = [*command(procedural_dir, archive), "--report-only", "--report-dir"]
    assert main([*again, str(tmp_path / "b")]) == 0
    for name in ("results.md", "results.csv"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text(), name
