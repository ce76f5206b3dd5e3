"""What an experiment runs: arms, seeds, budget, controls and the statistics' settings.

An experiment file is read with the project's strict cattrs converter (``core.config``), so
an unknown key or a value of the wrong type is refused with the key's path, as in run configs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs

from core import validators as check
from core.config import load_config, read_toml, structure
from core.errors import UsageError
from core.plugins import PluginManager
from core.tasks import task_class

BASELINE = "baseline"
DEFAULT_SEEDS = (0, 1, 2)
CONTROLS = ("sham", "harmful", "frozen", "unstable")
CORRECTIONS = ("holm", "bh", "none")
TESTS = ("signflip", "t", "wilcoxon")


def _non_empty(_: object, attribute: attrs.Attribute, value: str) -> None:
    if not value.strip():
        raise ValueError(f"'{attribute.name}' must be a non-empty string")


def folder_name(name: str) -> str:
    """An arm's folder name: ``a,b`` -> ``a+b``; characters unsafe in paths -> ``-``."""
    text = name.replace(",", "+").replace("|", "__").replace(" ", "")
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", text)


def _inside_out(_: object, attribute: attrs.Attribute, value: str) -> None:
    """``/`` never survives :func:`folder_name`, but ``.`` and ``..`` would put the arm's runs
    in ``--out`` itself or above it."""
    if folder_name(value) in (".", ".."):
        raise ValueError(
            f"'{attribute.name}' must give a folder inside --out: {value!r} is the folder "
            f"{folder_name(value)!r}"
        )


def _seed_list(_: object, attribute: attrs.Attribute, value: tuple[int, ...] | None) -> None:
    """An empty list is a mistake, not a request for the default seeds."""
    if value is not None and (not value or len(set(value)) != len(value)):
        raise ValueError(f"'{attribute.name}' must list at least one seed, each once: {value}")


def _whole_above_one(_: object, attribute: attrs.Attribute, value: float) -> None:
    """A share of one GPU packs runs onto it; several GPUs are whole ones, one process each."""
    if value > 1 and value != int(value):
        raise ValueError(f"'{attribute.name}' above 1 must be a whole number, got {value}")


@attrs.frozen
class Resources:
    """What each run asks of a Ray cluster (``--backend ray``); the local backend runs one
    process per run on this machine and reads none of it."""

    num_cpus: float = attrs.field(default=1.0, validator=check.positive)
    """Cores reserved per run; its ``OMP_NUM_THREADS`` unless ``--threads`` says otherwise."""
    num_gpus: float = attrs.field(default=0.0, validator=[check.non_negative, _whole_above_one])
    """GPUs per run, which it sees alone (``CUDA_VISIBLE_DEVICES``); 2 or more: one process
    per GPU through ``accelerate launch``."""
    retries: int = attrs.field(default=3, validator=check.non_negative_int)
    """How often a run whose node died starts again elsewhere, resuming its checkpoint."""


@attrs.frozen
class Param:
    """One searched setting: a range ``low`` to ``high`` (log-uniform with ``log``, whole
    numbers with ``integer``), or ``choices``, each written as ``--set`` takes a value."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        ranged = self.low is not None and self.high is not None
        if bool(self.choices) == ranged or (self.low is None) != (self.high is None):
            raise ValueError("a parameter takes either low and high, or choices")
        if ranged and not self.low < self.high:
            raise ValueError(f"low must be below high, got {self.low} and {self.high}")
        if ranged and self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")


@attrs.frozen
class Search:
    """A tuned arm's search (``core.experiment.tune``): Optuna's TPE sampler, seeded, over
    ``params``; each trial trains on the experiment's data and validates on ``regions``, a
    tuning split apart from the reported validation regions, which the trials never read."""

    params: dict[str, Param] = attrs.field(validator=attrs.validators.min_len(1))
    """Config key (``section.key``) -> its range or choices."""
    regions: tuple[str, ...] = attrs.field(validator=attrs.validators.min_len(1))
    """The tuning split: the trial runs' ``data.val_regions``."""
    trials: int = attrs.field(default=8, validator=check.positive_int)
    """The budget: how many settings are trained."""
    seeds: tuple[int, ...] = attrs.field(default=(1000,), validator=_seed_list)
    """Each trial's runs; its value is their mean."""
    epochs: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(check.positive_int)
    )
    """Epochs of a trial run; None: the experiment's."""
    batch: int = attrs.field(default=1, validator=check.positive_int)
    """Trials asked of the sampler at a time, which run side by side; part of the search's
    definition, since the sampler sees the results batch by batch."""
    sampler_seed: int = attrs.field(default=0, validator=check.seed)
    metric: str | None = None
    """The metrics.jsonl key minimised (maximised where the task says higher is better) at a
    trial's last epoch; None: the task's first report metric."""


@attrs.frozen
class Arm:
    """One plugin combination, with the overrides that only this arm gets."""

    name: str = attrs.field(validator=[_non_empty, _inside_out])
    plugins: tuple[str, ...] = ()
    set: tuple[str, ...] = ()
    """``section.key=value`` overrides of this arm alone."""
    control: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(CONTROLS))
    )
    """``sham``: must differ from the baseline by chance only; ``harmful``: must be worse;
    ``frozen`` (``optim.lr=0``): the model-spike measure must stay at 0; ``unstable``
    (``optim.lr_spike_steps``): it must find the injected steps."""
    seed_offset: int = attrs.field(default=0, validator=check.non_negative_int)
    """Added to every seed of this arm. A sham arm with an offset draws other initial weights
    and batch orders than the baseline, so it measures the spread between seeds; with 0 it
    repeats the baseline's runs exactly (the trainer is deterministic)."""
    primary: str | None = None
    """The column this arm's question is decided on (its primary endpoint); None: the
    experiment's ``primary``. Every other column of the arm is exploratory."""
    tune: Search | None = None
    """A search that chooses some of this arm's settings before its runs start."""

    @property
    def overrides(self) -> tuple[str, ...]:
        return self.set

    @property
    def slug(self) -> str:
        """The arm's folder name (:func:`folder_name`)."""
        return folder_name(self.name)


@attrs.frozen
class SpecFile:
    """The keys of an experiment TOML file; command-line options take precedence."""

    arms: tuple[Arm, ...] = ()
    seeds: tuple[int, ...] | None = attrs.field(default=None, validator=_seed_list)
    epochs: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(check.positive_int)
    )
    set: tuple[str, ...] = ()
    data: str | None = None
    baseline: str | None = None
    primary: str | None = None
    """Every question's primary endpoint unless its arm names its own; None: the task's
    first report metric (dem_sr: val RMSE)."""
    correction: str = attrs.field(default="holm", validator=attrs.validators.in_(CORRECTIONS))
    """The correction of the primary endpoints' tests, and of each table's exploratory ones."""
    test: str = attrs.field(default="signflip", validator=attrs.validators.in_(TESTS))
    alpha: float = attrs.field(default=0.05, validator=check.open_fraction)
    resources: Resources = Resources()


@attrs.frozen
class Experiment:
    """What to run: arms x seeds, sharing data, epochs and the common overrides."""

    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    epochs: int
    common: tuple[str, ...] = ()
    data: str | None = None
    baseline: str = BASELINE
    primary: str | None = None
    """The default primary endpoint (``SpecFile.primary``)."""
    correction: str = "holm"
    test: str = "signflip"
    alpha: float = 0.05
    task: str = attrs.field(kw_only=True)
    """``run.task`` of every arm, as the common settings resolve it (core.config's default
    without one): it supplies the report's columns and its reference row."""
    resources: Resources = attrs.field(factory=Resources, kw_only=True)

    def control(self, kind: str) -> Arm | None:
        return next((arm for arm in self.arms if arm.control == kind), None)

    def questions(self) -> list[Arm]:
        """The arms whose comparison with the baseline is a question: all but the baseline
        and the controls."""
        return [arm for arm in self.arms if arm.name != self.baseline and arm.control is None]


def parse_arm(spec: str) -> Arm:
    """``baseline`` or ``a,b,c``, optionally followed by ``|section.key=value`` overrides."""
    name = spec.strip()
    head, *overrides = (part.strip() for part in name.split("|"))
    plugins = [p.strip() for p in head.split(",") if p.strip()]
    if not plugins:
        raise UsageError(f"--arms: arm {name!r} names no plugins (write 'baseline' for none)")
    if plugins == [BASELINE]:
        plugins = []
    elif BASELINE in plugins:
        raise UsageError(f"--arms: arm {name!r}: 'baseline' means no plugins; it stands alone")
    try:
        return Arm(name, tuple(plugins), tuple(overrides))
    except ValueError as error:
        raise UsageError(f"--arms: arm {name!r}: {error}") from None


def parse_arms(text: str) -> list[Arm]:
    """``--arms "baseline;stratified;stratified,terrain_loss"``: arms separated by ``;``."""
    return [parse_arm(spec) for spec in text.split(";") if spec.strip()]


def read_spec(path: Path) -> SpecFile:
    """The experiment file, checked key by key (errors name ``<path>.arms[2].plugins``...)."""
    return structure(read_toml(path), SpecFile, str(path))


def run_overrides(experiment: Experiment, arm: Arm, seed: int, run_dir: Path) -> list[str]:
    """The ``--set`` assignments that make up one (arm, seed) run's config."""
    shortcuts = {
        "run.plugins": list(arm.plugins),
        "run.seed": seed + arm.seed_offset,
        "run.epochs": experiment.epochs,
        "run.out": str(run_dir),
    }
    if experiment.data is not None:
        shortcuts["data.dir"] = experiment.data
    return [
        *experiment.common,
        *arm.set,
        *(f"{key}={json.dumps(value)}" for key, value in shortcuts.items()),
    ]


def check_arms(experiment: Experiment, out: Path) -> None:
    """Load every arm's config and plugins now, so a typo stops the experiment before any
    run starts (exit 2, naming the arm). An arm's overrides are its own: a plugin that needs
    a setting says so itself when the run starts."""
    reference = task_class(experiment.task).reference_name
    slugs: dict[str, str] = {}
    for arm in experiment.arms:
        if reference and arm.name == reference:
            raise UsageError(
                f"arm name {reference!r} is reserved for the reference row of task "
                f"{experiment.task!r}"
            )
        if arm.slug in slugs:
            raise UsageError(f"arms {slugs[arm.slug]!r} and {arm.name!r} share a folder name")
        slugs[arm.slug] = arm.name
        try:
            config = load_config(None, run_overrides(experiment, arm, 0, out))
            PluginManager.from_names(config.run.plugins, config.plugins)
        except UsageError as error:
            raise UsageError(f"arm {arm.name!r}: {error}") from None
        if config.run.task != experiment.task:
            raise UsageError(
                f"arm {arm.name!r}: run.task {config.run.task!r}; every arm must train "
                f"{experiment.task!r}, the task of the common settings"
            )
    if experiment.baseline not in slugs.values():
        raise UsageError(f"--baseline {experiment.baseline!r} is not one of the arms")
    for kind in CONTROLS:
        arms = [arm.name for arm in experiment.arms if arm.control == kind]
        if len(arms) > 1:
            raise UsageError(f"arms {arms} are all marked control = {kind!r}; mark one")
        if experiment.baseline in arms:
            raise UsageError(f"the baseline {experiment.baseline!r} cannot be a {kind} control")


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UsageError(f"--seeds names no seed, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds needs distinct seeds, got {text!r}")
    return seeds
