"""Third-party tasks: the template task distribution installs with pip and trains by name,
and the task registry refuses unknown names, taken names and another task's config keys."""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from accelerate import Accelerator
from affine import Affine

from core.config import Config, load_config
from core.context import RunContext
from core.errors import ConfigError
from core.run import main
from core.safe_io import load_checkpoint
from core.tasks import BUILTIN_TASKS, harness_settings, missing_members
from core.tasks.dem_sr.task import DemSuperResolution
from terraplug import HarnessSettings
from terraplug.testing import (
    FAST,
    FAST_ANY_TASK,
    fast_overrides,
    reset_accelerate_state,
    run_training,
)
from tests.conftest import install_distribution, read_metrics
from tests.test_config_schema import task_schema, unguarded
from tests.test_run import REPO, fast_args, run_cli


@pytest.fixture(scope="module")
def template_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template task distribution, pip-installed for real into a folder of its own."""
    target = tmp_path_factory.mktemp("template-task") / "site"
    return install_distribution(REPO / "entrypoints" / "terraplug-example-task", target)


def write_distribution(
    source: Path, name: str, module: str, entry_points: dict[str, dict[str, str]]
) -> Path:
    """A distribution ``name`` in ``source``, ready for ``install_distribution``: one module,
    ``name`` with ``_`` for ``-``, holding ``module``, and ``entry_points`` ({group: {entry
    point name: ``module:attribute``}})."""
    package = name.replace("-", "_")
    (source / "src" / package).mkdir(parents=True)
    (source / "src" / package / "__init__.py").write_text(module)
    groups = "".join(
        f'[project.entry-points."{group}"]\n'
        + "".join(f'{key} = "{value}"\n' for key, value in entries.items())
        for group, entries in entry_points.items()
    )
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "0.0.1"\ndependencies = []\n{groups}'
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n'
    )
    return source


@pytest.fixture
def template_task_installed(template_task: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The template task visible to in-process runs (its folder on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(template_task))
    return template_task


@pytest.mark.slow
def test_template_task_installs_and_trains_by_name(
    template_task: Path, procedural_dir: Path, tmp_path: Path
):
    out = tmp_path / "run"
    result = run_cli(
        sys.executable, "-m", "core.run", "--task", "dem_denoise", "--data", str(procedural_dir),
        "--epochs", "4", "--out", str(out), "--set", "train.progress='never'",
        "--set", "data.batch_size=4", "--set", "optim.lr=0.003", path=[template_task],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terraplug: dem_denoise" in result.stdout

    config = tomllib.loads((out / "config.toml").read_text())
    assert config["run"]["task"] == "dem_denoise"
    assert set(config["model"]) == {"channels", "depth"}  # the task's own sections,
    assert set(config["loss"]) == {"l1", "gradient"}  # not dem_sr's
    assert config["denoise"] == {"noise_m": 5.0}  # and one no other task has

    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert all({"val_rmse_m", "val_rmse_m_noisy", "train_loss_l1"} <= set(row) for row in rows)
    # The validation noise is drawn once per tile: the noisy input scores the same each epoch.
    assert len({row["val_rmse_m_noisy"] for row in rows}) == 1
    noisy = rows[0]["val_rmse_m_noisy"]
    assert noisy == pytest.approx(5.0, rel=0.05)  # denoise.noise_m's default, in metres
    # What makes it a denoiser: its output is closer to the clean tiles than its input.
    assert rows[-1]["val_rmse_m"] < noisy - 0.1, [row["val_rmse_m"] for row in rows]
    for name in ("denoised.png", "loss_curves.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name


def test_unknown_task_exits_2_listing_every_task(template_task_installed, tmp_path, capsys):
    assert main(["--task", "nosuch", "--out", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err
    assert "unknown task 'nosuch'" in message
    for name in ("dem_sr", "sar2opt", "dem_denoise"):
        assert name in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # dem_sr's [model] and [loss] keys: each task's sections hold only its own keys
        (["--set", "model.preset='small'"], "extra fields found (preset) @ config.model"),
        (["--set", "loss.elevation=1.0"], "extra fields found (elevation) @ config.loss"),
        # the template's attrs validators, reported at the key, in its own section too
        (["--set", "model.depth=1"], "'depth' must be >= 2: 1 @ config.model.depth"),
        (["--set", "denoise.noise_m=-1"], "'noise_m' must be > 0.0: -1.0 @ config.denoise.noise_m"),
        # a section the task does not declare names the task and the ones it takes
        (
            ["--set", "void.radius=3"],
            "config: unknown section [void]; task 'dem_denoise' takes [model], [loss], "
            "[denoise] and the framework's [run], [data], [optim], [train], [plugins.<name>]",
        ),
    ],
)
def test_template_task_refuses_bad_config(template_task_installed, args, message, tmp_path, capsys):
    assert main(["--task", "dem_denoise", *args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_distribution_taking_a_task_name_is_refused(tmp_path: Path):
    source = write_distribution(
        tmp_path / "dup",
        "terraplug-dup-task",
        "class Dup:\n    pass\n",
        {"terraplug.tasks": {"dem_sr": "terraplug_dup_task:Dup"}},
    )
    site = install_distribution(source, tmp_path / "site")
    result = run_cli(sys.executable, "-m", "core.run", "--task", "dem_sr",
                     "--out", str(tmp_path / "run"), path=[site])  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "terraplug-dup-task 0.0.1" in result.stderr
    assert "'dem_sr'" in result.stderr and "already taken" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_harness_trains_a_third_party_task_with_a_plugin(
    template_task_installed, procedural_dir: Path, tmp_path: Path
):
    """terraplug.testing serves task authors too: any task by name, with plugins mixed in."""
    rows = run_training(
        tmp_path, ["balanced_grad"], epochs=1, data_dir=procedural_dir, task="dem_denoise"
    )
    assert rows[0]["val_rmse_m_noisy"] > 0 and "train_loss_gradient" in rows[0]
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["run"]["plugins"] == ["balanced_grad"] and "noise_m" in config["denoise"]


def test_the_harness_leaves_another_task_its_own_default_data(
    template_task_installed, tmp_path, capsys
):
    """Procedural DEM tiles are dem_sr's default in the harness; another task gets no
    ``data.dir``: dem_denoise then trains on the built-in DEM tiles of ``data.source``,
    reached through ``terraplug.data`` (no cache path), with their validation block."""
    overrides = ["data.source='colorado10m'", "train.max_steps_per_epoch=1", "model.depth=2"]
    rows = run_training(tmp_path, (), overrides, epochs=1, task="dem_denoise")
    assert rows[0]["val_rmse_m_noisy"] == pytest.approx(5.0, rel=0.05)
    assert "/ 60 validation tiles" in capsys.readouterr().out  # the 3 southern lattice rows
    assert not (tmp_path / "tiles").exists()
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["data"]["dir"] == ""


def test_terraplug_data_reaches_the_built_in_sources_and_the_classifier(tmp_path: Path):
    """What a third-party task needs of the built-in data, from ``terraplug.data`` alone."""
    from terraplug.data import (
        DEM_SOURCES,
        TERRAINS,
        ensure_source_tiles,
        label_tile,
        read_dem,
        terrain_stats,
        write_dem,
    )

    assert DEM_SOURCES == ("srtm90", "globe", "colorado10m", "tianshan")
    folder = ensure_source_tiles("colorado10m", quiet=True)
    tile = sorted((folder / "val").glob("*.tif"))[0]
    dem = read_dem(tile)
    assert label_tile(tile.stem, dem.elevation, dem.cell_size_m()) == ("alpine", "region")
    plane = 100.0 + np.tile(np.arange(48) * 30 * np.tan(np.radians(40)), (48, 1))
    origin = Affine.translation(500_000, 4_400_000) @ Affine.scale(30.0, -30.0)
    unnamed = write_dem(tmp_path / "t.tif", plane, origin, "EPSG:32613")
    steep = read_dem(unnamed)
    assert label_tile("t", steep.elevation, steep.cell_size_m()) == ("extreme", "dem")
    assert terrain_stats(steep.elevation, steep.cell_size_m()).mean_slope_deg > 39
    assert "extreme" in TERRAINS


HALF_TASK = '''\
import attrs


@attrs.frozen
class NoKeys:
    """A config section without keys."""


class HalfTask:
    """Written against a contract it only half implements."""

    name = "half"
    sections = {"model": NoKeys, "loss": NoKeys}
    components = ("l1",)
    report_metrics = ()
    reference_name = "none"
    forward_losses = "not a method"

    def __init__(self):
        self.skipped = []

    def epoch_summary(self, row):
        return ""

    def plot_examples(self, val):
        return []
'''
HALF_TASK_LACKS = (
    "build_datasets", "build_model", "forward_losses", "validate", "checkpoint_meta",
    "export_model", "write_plots", "predict", "terrains",
)  # fmt: skip


def test_a_task_class_missing_protocol_members_exits_2_naming_each(
    procedural_dir: Path, tmp_path: Path
):
    entry_points = {"half": "terraplug_half_task:HalfTask", "module": "terraplug_half_task"}
    source = write_distribution(
        tmp_path / "half", "terraplug-half-task", HALF_TASK, {"terraplug.tasks": entry_points}
    )
    site = install_distribution(source, tmp_path / "site")
    out = tmp_path / "run"
    result = run_cli(sys.executable, "-m", "core.run", "--task", "half", "--data",
                     str(procedural_dir), "--out", str(out), path=[site])  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "terraplug-half-task 0.0.1" in result.stderr
    assert "terraplug_half_task.HalfTask does not implement the Task protocol" in result.stderr
    missing = result.stderr.rpartition("lacks ")[2]
    assert sorted(re.findall(r"\w+", missing.split("(")[0])) == sorted(HALF_TASK_LACKS)
    assert not out.exists()  # refused before anything was written

    result = run_cli(sys.executable, "-m", "core.run", "--task", "module", "--data",
                     str(procedural_dir), "--out", str(out), path=[site])  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "(terraplug_half_task) is a module, not a task class" in result.stderr
    assert not out.exists()


def test_a_task_that_exits_at_import_exits_2_naming_it(tmp_path: Path):
    """``sys.exit()`` in a task's module is a failure to load, like an ImportError."""
    source = write_distribution(
        tmp_path / "exiting",
        "terraplug-exiting-task",
        "import sys\n\nsys.exit(3)\n",
        {"terraplug.tasks": {"exiting": "terraplug_exiting_task:Task"}},
    )
    site = install_distribution(source, tmp_path / "site")
    result = run_cli(sys.executable, "-m", "core.run", "--task", "exiting",
                     "--out", str(tmp_path / "run"), path=[site])  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "task 'exiting' from terraplug-exiting-task 0.0.1" in result.stderr
    assert "failed to load: SystemExit: sys.exit(3) called on import" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distribution whose task and plugin entry points both fail to import."""
    source = write_distribution(
        tmp_path_factory.mktemp("broken") / "source",
        "terraplug-broken",
        "import no_such_module_xyz\n",
        {
            "terraplug.tasks": {"broken_task": "terraplug_broken:Task"},
            "terraplug.plugins": {"broken_plugin": "terraplug_broken:Plugin"},
        },
    )
    return install_distribution(source, source.parent / "site")


BROKEN_TASK = "task 'broken_task' from terraplug-broken 0.0.1"
NO_MODULE = "ModuleNotFoundError: No module named 'no_such_module_xyz'"


def test_strict_plugins_stops_on_a_broken_task_entry_point(procedural_dir: Path, tmp_path: Path):
    """``--strict-plugins`` covers every third-party entry point: a task the run does not use
    stops the run before anything is written, and fails ``--list-tasks`` after the listing."""
    source = write_distribution(
        tmp_path / "source",
        "terraplug-broken",
        "import no_such_module_xyz\n",
        {"terraplug.tasks": {"broken_task": "terraplug_broken:Task"}},
    )
    site = install_distribution(source, tmp_path / "site")
    out = tmp_path / "run"
    run = run_cli(sys.executable, "-m", "core.run", "--strict-plugins",
                  *fast_args(procedural_dir, out, "--epochs", "1"), path=[site])  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert BROKEN_TASK in run.stderr and NO_MODULE in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()

    listing = run_cli(sys.executable, "-m", "core.run", "--list-tasks", "--strict-plugins",
                      path=[site])  # fmt: skip
    assert listing.returncode == 2, listing.stderr[-3000:]
    assert "broken_task" in listing.stdout
    assert BROKEN_TASK in listing.stderr and NO_MODULE in listing.stderr


def test_list_tasks_shows_origin_domains_summary_and_broken(
    template_task_installed: Path, broken_site: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.syspath_prepend(str(broken_site))
    assert main(["--list-tasks"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "origin", "domains", "summary"]
    rows = {line.split()[0]: line for line in lines}
    assert set(rows) == {"dem_sr", "sar2opt", "dem_denoise", "broken_task"}
    assert "built-in" in rows["dem_sr"]
    assert "flat, moderate, alpine, desert, extreme" in rows["dem_sr"]
    assert "RCAN-DEM trained with the seed's five loss components" in rows["dem_sr"]
    assert "terraplug-example-task 0.1.0" in rows["dem_denoise"]
    assert " tile " in rows["dem_denoise"]
    assert "Learn to remove Gaussian noise of " in rows["dem_denoise"]  # its docstring's line
    assert "terraplug-broken 0.0.1" in rows["broken_task"]
    assert rows["broken_task"].endswith(f"BROKEN: {NO_MODULE}")


def test_unknown_names_suggest_the_closest_and_mark_broken_entry_points(
    template_task_installed: Path, broken_site: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """An unknown ``--task`` gets a "did you mean" like an unknown plugin; both "Available:"
    lists mark the entry points that fail to load."""
    monkeypatch.syspath_prepend(str(broken_site))
    assert main(["--task", "dem_denoize"]) == 2
    message = capsys.readouterr().err
    assert "unknown task 'dem_denoize'. Did you mean 'dem_denoise'?" in message
    assert "broken_task (broken)" in message
    assert "dem_sr," in message and "dem_sr (broken)" not in message

    assert main(["--plugins", "stratifed"]) == 2
    message = capsys.readouterr().err
    assert "unknown plugin 'stratifed'. Did you mean 'stratified'?" in message
    assert "broken_plugin (broken)" in message and "stratified (broken)" not in message


HARNESSED_TASK = '''\
import numpy as np
from affine import Affine

from terraplug import HarnessSettings
from terraplug.data import write_dem
from terraplug_example_task.task import DemDenoising


def write_tiles(folder):
    """Six 32 x 32 slopes with seeded bumps, at 30 m."""
    rows, cols = np.mgrid[0:32, 0:32]
    for i in range(6):
        bumps = np.random.default_rng(i).normal(0.0, 4.0, (32, 32))
        elevation = 100.0 + 2.0 * rows + (i + 1) * cols + bumps
        origin = Affine.translation(500_000 + 960 * i, 4_400_000) @ Affine.scale(30.0, -30.0)
        write_dem(folder / f"tile_{i}.tif", elevation, origin, "EPSG:32633")


class Harnessed(DemDenoising):
    """The template task with the settings a task declares for ``terraplug.testing``."""

    name = "harnessed"
    harness = HarnessSettings(overrides=("model.channels=4", "model.depth=2"), data=write_tiles)
'''


def test_the_harness_takes_a_tasks_own_overrides_and_data(
    template_task_installed: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """A task says how it trains in seconds (``harness``): the harness applies its overrides
    after its own, and writes its data once, with nothing of dem_sr's."""
    source = write_distribution(
        tmp_path / "harnessed",
        "terraplug-harnessed",
        HARNESSED_TASK,
        {"terraplug.tasks": {"harnessed": "terraplug_harnessed:Harnessed"}},
    )
    monkeypatch.syspath_prepend(str(install_distribution(source, tmp_path / "site")))
    assert fast_overrides("harnessed") == (*FAST_ANY_TASK, "model.channels=4", "model.depth=2")

    rows = run_training(tmp_path, ["balanced_grad"], ["model.channels=6"], epochs=1,
                        task="harnessed")  # fmt: skip
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert (config["model"]["channels"], config["model"]["depth"]) == (6, 2)  # the test's last
    assert config["data"]["batch_size"] == 8 and config["train"]["progress"] == "never"
    tiles = sorted(path.name for path in (tmp_path / "tiles").iterdir())
    assert tiles == [f"tile_{i}.tif" for i in range(6)]
    assert Path(config["data"]["dir"]) == tmp_path / "tiles"
    assert rows[0]["val_rmse_m_noisy"] > 0

    (tmp_path / "tiles" / "tile_5.tif").unlink()  # written once: a folder with files is kept
    run_training(tmp_path, epochs=1, task="harnessed", out="again")
    assert len(list((tmp_path / "tiles").iterdir())) == 5


def test_a_task_without_harness_settings_is_a_task(template_task_installed: Path):
    """``harness`` is optional: the template task, which has none, conforms."""
    from terraplug_example_task.task import DemDenoising

    assert missing_members(DemDenoising) == []
    assert harness_settings(DemDenoising) == HarnessSettings()


def test_reset_accelerate_state_lets_another_run_choose_other_settings():
    """Accelerate keeps its state in process-wide singletons and has no public call that
    clears them: a second Accelerator in the process cannot pick another precision until
    ``reset_accelerate_state`` has run. This fails when Accelerate renames or changes what
    the reset relies on, or stops needing it."""
    Accelerator(cpu=True, mixed_precision="no")
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="bf16")
    reset_accelerate_state()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    reset_accelerate_state()
    assert Accelerator(cpu=True).mixed_precision == "no"


# --- the Task contract: data passed in, attributes on the class, arguments checked ---------


class StatelessDemSr(DemSuperResolution):
    """dem_sr keeping nothing of its datasets: the trainer hands them to ``checkpoint_meta``
    and ``plot_examples``."""

    name = "stateless"

    def build_datasets(self, config: Config, ctx: RunContext) -> tuple[Any, Any]:
        return DemSuperResolution().build_datasets(config, ctx)


CLASS_ONLY = frozenset({"sections", "__dict__", "__weakref__"})


class OldContract(StatelessDemSr):
    """Written against the contract before the datasets were passed in."""

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def plot_examples(self) -> list[int]:
        return []


def _sections_set_by_init(self: Any) -> None:
    DemSuperResolution.__init__(self)
    self.sections = DemSuperResolution.sections


InstanceSections = type(
    "InstanceSections",
    (),
    {
        **{k: v for k, v in vars(DemSuperResolution).items() if k not in CLASS_ONLY},
        "__module__": __name__,
        "__init__": _sections_set_by_init,
    },
)
"""dem_sr with ``sections`` set by ``__init__`` only, as an author may write it (a subclass
would inherit the class attribute)."""


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """Register a class of this module as a task, as an entry point would."""

    def register(name: str, attribute: str) -> None:
        monkeypatch.setitem(BUILTIN_TASKS, name, f"{__name__}:{attribute}")

    return register


def test_checkpoint_meta_and_plot_examples_get_the_datasets(registered, procedural_dir, tmp_path):
    """A task that stores nothing in ``build_datasets`` checkpoints and draws."""
    registered("stateless", "StatelessDemSr")
    run_training(tmp_path, epochs=1, data_dir=procedural_dir, task="stateless", overrides=FAST)
    run = tmp_path / "run"
    assert load_checkpoint(run / "checkpoint.pt")["task"] == {"lr_shape": (16, 16)}
    assert (run / "hillshade.png").stat().st_size > 0


def test_a_task_whose_methods_take_other_arguments_is_refused_naming_them(registered):
    """Checked when the task is looked up, not at the end of the first epoch."""
    registered("old", "OldContract")
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["run.task='old'"])
    message = str(refused.value)
    assert f"task 'old' from built-in ({__name__}:OldContract)" in message
    assert "lacks checkpoint_meta(train, val), plot_examples(val)" in message


def test_attributes_set_by_init_only_are_refused_saying_where_they_belong(registered):
    registered("per_instance", "InstanceSections")
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["run.task='per_instance'"])
    assert "lacks sections (set by __init__ only; declare it on the class)" in str(refused.value)


class OwnTokens:
    """Not sar2opt's class, but what the generator plugins need of a task."""

    name = "own_tokens"

    def cache_key(self, what, weights, tiles, config, dataset=None, **settings):
        return {}

    def cached_per_tile(self, name, key, compute, ctx, dataset=None):
        return compute([])

    def prepare_target_tokens(self, terramind, ctx):
        pass

    def target_tokens(self, batch):
        return batch["tokens"]


def test_generator_plugins_check_the_task_by_the_interface_they_declare(
    procedural_dir: Path, tmp_path: Path, capsys
):
    from core.tasks.sar2opt.generation import generation_task

    task = OwnTokens()
    assert generation_task(task, "teacher_forcing") is task
    out = tmp_path / "run"
    fast = [item for assignment in FAST for item in ("--set", assignment)]
    args = ["--plugins", "teacher_forcing", "--data", str(procedural_dir), "--epochs", "1"]
    assert main([*args, *fast, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "plugin 'teacher_forcing' trains TerraMind past its token sampling and needs a task "
        "implementing core.tasks.sar2opt.generation.TokenGeneration (cache_key, "
        "cached_per_tile, prepare_target_tokens, target_tokens); task 'dem_sr' lacks "
        "cache_key, cached_per_tile, prepare_target_tokens, target_tokens"
    ) in err
    assert "raised by plugin 'teacher_forcing' in hook 'setup'" in err


def test_every_numeric_key_of_the_templates_sections_is_guarded(template_task_installed):
    """The schema walk of tests/test_config_schema.py, over the sections a third-party task
    declares: its own ``[denoise]`` included."""
    sections = task_schema("dem_denoise")
    assert [where for where, _ in sections] == ["config.model", "config.loss", "config.denoise"]
    assert [key for where, cls in sections for key in unguarded(where, cls)] == []
