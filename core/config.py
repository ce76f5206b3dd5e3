"""The run configuration: attrs classes with a default for every key, read from TOML.

A run's config is resolved from the defaults, then ``--config FILE.toml``, then each
``--set section.key=value``; the result is written to the run folder as ``config.toml``,
and passing that file back with ``--config`` repeats the run. Plugins declare their own
attrs config class, read from ``[plugins.<name>]`` with the same strict converter, and the
task declares its sections (``Task.sections``): ``[model]``, ``[loss]`` and any of its own,
top-level tables like the framework's, read by the same converter.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import attrs
import cattrs
import tomli_w
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_mutable_sequence,
    list_structure_factory,
)
from cattrs.gen import make_dict_unstructure_fn
from cattrs.v import format_exception

from core import validators as check
from core.errors import ConfigError

T = TypeVar("T")


@attrs.define
class RunSection:
    """What to run: task, strategies, length and seed."""

    task: str = "dem_sr"
    plugins: list[str] = attrs.Factory(list)
    epochs: int = attrs.field(default=8, validator=check.positive_int)
    seed: int = attrs.field(default=0, validator=check.seed)
    out: str = ""
    """Run folder; empty: ``runs/<task>-<timestamp>``."""


@attrs.define
class DataSection:
    """Where tiles come from and how they are batched."""

    dir: str = ""
    """A GeoTIFF of any size or a folder of them, read as windows; empty: the built-in
    ``source``."""
    source: str = "srtm90"
    """dem_sr's built-in DEM without ``dir``: ``srtm90``, ``globe``, ``colorado10m``,
    ``tianshan`` or ``world`` (eight landscapes, validated on held-out ones)."""
    scale: int = attrs.field(default=3, validator=check.positive_int)
    tile_size: int = attrs.field(default=0, validator=check.non_negative_int)
    """Window size in pixels: rasters are read as windows of this size (a tile of that size
    is one window); 0: the task's (dem_sr 48, sar2opt 64)."""
    val_fraction: float = attrs.field(default=0.2, validator=check.open_fraction)
    val_block: int = attrs.field(default=8, validator=check.positive_int)
    """Without ``train/`` and ``val/`` folders, validation takes whole blocks of this many
    windows a side (docs/data-format.md, "Spatial split")."""
    val_regions: list[str] = attrs.field(factory=list)
    """Validate on these regions (a raster's ``landscape`` or ``region`` tag, a named box,
    or its file name) instead of seeded blocks: landscapes training never sees."""
    exclude_regions: list[str] = attrs.field(factory=list)
    """Regions (named as in ``val_regions``) the run neither trains nor validates on: a
    tuned arm's search leaves the experiment's reported validation regions unread."""
    split_seed: int = attrs.field(default=0, validator=check.seed)
    """Seed of the train/validation split, apart from ``run.seed``: runs with other seeds
    validate on the same tiles and differ in initial weights and batch order only."""
    batch_size: int = attrs.field(default=10, validator=check.positive_int)
    num_workers: int = attrs.field(default=0, validator=check.non_negative_int)
    strict: bool = False
    """Stop at the first bad tile instead of skipping it with a warning."""
    normalisation: str = attrs.field(
        default="per_tile", validator=attrs.validators.in_(("per_tile", "global"))
    )
    """dem_sr: a window's elevations minus its LR mean, divided by its LR std (``per_tile``:
    every window weighs alike, so flat ones dominate the loss) or by ``global_scale_m``
    (``global``: a window weighs by its relief, as RMSE in metres does)."""
    global_scale_m: float = attrs.field(default=100.0, validator=check.positive)
    """The one scale of ``normalisation = "global"``, in metres."""

    @property
    def global_scale(self) -> float | None:
        """The one scale every window is divided by, or None for per-window scales: what
        sets the units of a run's losses."""
        return self.global_scale_m if self.normalisation == "global" else None


@attrs.define
class OptimSection:
    """AdamW with a per-step schedule."""

    lr: float = attrs.field(default=1e-3, validator=check.non_negative)
    """0 freezes the weights: the frozen-model null of the spike measure (docs/experiments.md)."""
    weight_decay: float = attrs.field(default=0.0, validator=check.non_negative)
    schedule: str = attrs.field(
        default="cosine", validator=attrs.validators.in_(("cosine", "constant"))
    )
    """``cosine`` (to 1% of ``lr`` at the last step) or ``constant``."""
    warmup_steps: int = attrs.field(default=0, validator=check.non_negative_int)
    grad_clip: float = attrs.field(default=0.0, validator=check.non_negative)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    accumulation_steps: int = attrs.field(default=1, validator=check.positive_int)
    lr_spike_steps: tuple[int, ...] = attrs.field(default=(), validator=check.step_numbers)
    """Optimizer steps (1 = the first) taken at ``lr_spike_factor`` times the learning rate:
    an injected instability, the control the model-spike measure must find."""
    lr_spike_factor: float = attrs.field(default=100.0, validator=check.positive)


@attrs.define
class TrainSection:
    """How the loop runs: precision, checkpoints, progress and logging."""

    mixed_precision: str = attrs.field(
        default="no", validator=attrs.validators.in_(("no", "bf16", "fp16"))
    )
    """``no``, ``bf16`` or ``fp16`` (Accelerate's names)."""
    cpu: bool = False
    """Force the CPU even when an accelerator is present."""
    max_steps_per_epoch: int = attrs.field(default=0, validator=check.non_negative_int)
    """Stop each epoch after this many optimizer steps; 0 runs the whole epoch."""
    checkpoint_every: int = attrs.field(default=1, validator=check.positive_int)
    """Write the checkpoint every this many epochs (and always after the last)."""
    progress: str = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "always", "never"))
    )
    """``auto`` (a bar when stderr is a terminal), ``always`` or ``never``."""
    plot_every: int = attrs.field(default=0, validator=check.non_negative_int)
    """Redraw the run's PNGs every this many epochs; 0 draws them after the last epoch."""
    tensorboard: bool = False
    max_nonfinite_steps: int = attrs.field(default=5, validator=check.positive_int)
    """Stop after this many consecutive steps with a non-finite loss (each one is skipped)."""
    validate_every_steps: int = attrs.field(default=0, validator=check.non_negative_int)
    """Also validate after every this many optimizer steps (``val_curve`` in metrics.jsonl);
    0: only at the end of each epoch."""
    probe_every: int = attrs.field(default=10, validator=check.non_negative_int)
    """Evaluate the probe set every this many optimizer steps (``probe_loss``, model spikes);
    0: never."""
    probe_tiles: int = attrs.field(default=16, validator=check.positive_int)
    """Training windows in the probe set, as many of each domain as it holds, chosen by
    ``data.split_seed``: the same windows for every arm and seed."""
    model_spike_jump: float = attrs.field(default=0.1, validator=check.positive)
    """A model spike: the probe loss rose by more than this fraction since the probe before."""


@attrs.define
class ResumeNote:
    """One ``--resume`` of the run: when, after which epoch, and each key it changed as
    ``[before, after]`` (see ``core.resume`` for what may change)."""

    at: str = ""
    """UTC time of the resume, ISO 8601."""
    after_epoch: int = attrs.field(default=0, validator=check.non_negative_int)
    changed: dict[str, list[Any]] = attrs.Factory(dict)


@attrs.define
class Config:
    """The whole run. Every key has a default; ``plugins`` holds raw per-plugin sections,
    ``model`` and ``loss`` the classes the task declares."""

    run: RunSection = attrs.Factory(RunSection)
    data: DataSection = attrs.Factory(DataSection)
    model: Any = attrs.Factory(lambda self: task_section(self.run.task, "model"), takes_self=True)
    """The task's ``[model]`` section (``Task.sections``), e.g. RCAN's size for dem_sr."""
    loss: Any = attrs.Factory(lambda self: task_section(self.run.task, "loss"), takes_self=True)
    """The task's ``[loss]`` section, e.g. the five component weights for dem_sr."""
    task_sections: dict[str, Any] = attrs.Factory(
        lambda self: own_section_defaults(self.run.task), takes_self=True
    )
    """The task's own sections besides ``[model]`` and ``[loss]``, by name: a task declaring
    ``denoise`` reads its ``[denoise]`` table as ``config.task_sections["denoise"]``."""
    optim: OptimSection = attrs.Factory(OptimSection)
    train: TrainSection = attrs.Factory(TrainSection)
    plugins: dict[str, dict[str, Any]] = attrs.Factory(dict)
    resumed: list[ResumeNote] = attrs.Factory(list)
    """The run's history of resumes, written by ``--resume``; a new run starts without."""


def _strict(kind: type, accepts: tuple[type, ...]) -> Any:
    """A structure hook that refuses silent coercion ("3" -> 3, 3.7 -> 3, 1 -> "1")."""

    def structure(value: Any, _: type) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got a boolean")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return kind(value)

    return structure


def is_homogeneous_tuple(kind: Any) -> bool:
    """``tuple[X, ...]``."""
    return get_origin(kind) is tuple and get_args(kind)[-1:] == (Ellipsis,)


def _refuse_text(factory: Any) -> Any:
    """cattrs reads a string given for a list as its characters ("ab" -> ["a", "b"]); a
    list or tuple key refuses one instead."""

    def make(kind: type, converter: cattrs.Converter) -> Any:
        hook = factory(kind, converter)

        def structure(value: Any, _: type) -> Any:
            if isinstance(value, str):
                raise TypeError(f"expected a list, got str {value!r}")
            return hook(value, kind)

        return structure

    return make


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook_factory(
        is_mutable_sequence, _refuse_text(list_structure_factory)
    )
    converter.register_structure_hook_factory(
        is_homogeneous_tuple, _refuse_text(homogenous_tuple_structure_factory)
    )
    converter.register_structure_hook(int, _strict(int, (int,)))
    converter.register_structure_hook(float, _strict(float, (int, float)))
    converter.register_structure_hook(bool, _strict(bool, (bool,)))
    converter.register_structure_hook(str, _strict(str, (str,)))
    return converter


converter = _make_converter()
_unstructure_fields = make_dict_unstructure_fn(Config, converter)


def _unstructure_config(config: Config) -> dict[str, Any]:
    """The task's own sections as top-level tables after ``loss``, as config.toml and the
    checkpoint hold them (and ``_resolve`` reads them back)."""
    tree = _unstructure_fields(config)
    own = tree.pop("task_sections")
    items = list(tree.items())
    at = list(tree).index("loss") + 1
    return dict([*items[:at], *own.items(), *items[at:]])


converter.register_unstructure_hook(Config, _unstructure_config)
TASK_OWN = ("model", "loss", "task_sections")
FRAMEWORK_SECTIONS = tuple(f.name for f in attrs.fields(Config) if f.name not in TASK_OWN)
"""The top-level tables every task shares: ``[run]``, ``[data]``, ..., ``[[resumed]]``."""


def _describe(error: BaseException, kind: type | None) -> str:
    """Our hooks' and attrs validators' own messages say more than cattrs' generic ones."""
    if isinstance(error, TypeError | ValueError) and error.args:
        return str(error.args[0])
    return format_exception(error, kind)


_VALIDATOR_PROBLEM = re.compile(r"^'(?P<name>\w+)' must .* @ (?P<path>\S+)$", re.DOTALL)


def _at_key(problem: str) -> str:
    """A validator's error is reported at its class (``@ config.optim``); name the key."""
    match = _VALIDATOR_PROBLEM.match(problem)
    if match is None or match["path"].endswith(f".{match['name']}"):
        return problem
    return f"{problem}.{match['name']}"


def structure(raw: dict[str, Any], cls: type[T], where: str) -> T:
    """Build ``cls`` from ``raw``; errors name the key (``where.key``) and the expected type
    or allowed range."""
    try:
        return converter.structure(raw, cls)
    except Exception as error:  # cattrs raises exception groups; flatten them into one message
        problems = cattrs.transform_error(error, path=where, format_exception=_describe)
        raise ConfigError("; ".join(_at_key(problem) for problem in problems)) from None


def unstructure(value: Any) -> Any:
    return converter.unstructure(value)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is read as TOML (``_parse_value``)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set key {key!r} must name a section and a key, e.g. data.batch_size")
    return path, _parse_value(".".join(path), text)


def _parse_value(key: str, text: str) -> Any:
    """``--set``'s value: TOML; else JSON, since ``json.dumps`` writes a character beyond the
    BMP as a surrogate pair escape (``"\\ud83c\\udf0b"``) that TOML refuses; else a bare word
    is a string. Text that opens a string, list or table but is neither is a mistake, not a
    string with its quotes."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as error:
        problem = re.sub(r" \(at [^()]*\)$", "", str(error))  # its place in "v = ..."
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text.lstrip().startswith(('"', "'", "[", "{")):
        raise ConfigError(f"--set {key}={text}: not a TOML value ({problem})")
    return text


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a TOML file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def load_config(path: Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then ``--set`` overrides, checked key by key; an error
    names the key, and the file unless the file alone is valid (then an override is bad)."""
    if path is None:
        return _resolve({}, overrides)
    try:
        return _resolve(read_toml(path), overrides)
    except ConfigError as error:
        if str(path) in str(error) or (overrides and _valid(path)):
            raise
        raise ConfigError(f"{error} (in {path})") from None


def _valid(path: Path) -> bool:
    try:
        _resolve(read_toml(path), [])
    except ConfigError:
        return False
    return True


def absolute_data(config: Config) -> Config:
    """``data.dir`` as the folder it names here, where the run starts (every run keeps it so,
    whatever starts it): a resume from elsewhere reads the same folder."""
    if config.data.dir:
        config.data.dir = str(Path(config.data.dir).absolute())
    return config


def config_from_plain(tree: dict[str, Any], source: Path) -> Config:
    """A config kept as plain values (the one a checkpoint was trained with), checked as a
    file is; an error names ``source``."""
    try:
        return _resolve(dict(tree), [])
    except ConfigError as error:
        raise ConfigError(f"{error} (in {source})") from None


def _resolve(tree: dict[str, Any], overrides: list[str]) -> Config:
    for assignment in overrides:
        key_path, value = parse_override(assignment)
        _set_path(tree, key_path, value)
    plugin_sections = tree.get("plugins", {})
    if not isinstance(plugin_sections, dict) or not all(
        isinstance(section, dict) for section in plugin_sections.values()
    ):
        raise ConfigError("config: [plugins] must hold one table per plugin, [plugins.<name>]")
    run = structure(tree.get("run", {}), RunSection, "config.run")
    sections = task_sections(run.task)  # an unknown task is refused by name
    unknown = sorted(tree.keys() - {*FRAMEWORK_SECTIONS, *sections})
    if unknown:
        raise ConfigError(
            f"config: unknown section [{unknown[0]}]; task {run.task!r} takes "
            f"{', '.join(f'[{name}]' for name in sections)} and the framework's [run], [data], "
            "[optim], [train], [plugins.<name>]"
        )
    for name, cls in sections.items():
        raw = tree.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"config.{name} must be a table, [{name}]")
        tree[name] = structure(raw, cls, f"config.{name}")  # Config keeps it as it is
    tree["task_sections"] = {name: tree.pop(name) for name in sections if name not in TASK_OWN}
    return structure(tree, Config, "config")


def task_section(task: str, name: str) -> Any:
    """The default ``name`` section of task ``task``."""
    return task_sections(task)[name]()


def own_section_defaults(task: str) -> dict[str, Any]:
    """The default sections task ``task`` declares besides ``[model]`` and ``[loss]``."""
    return {name: cls() for name, cls in task_sections(task).items() if name not in TASK_OWN}


def task_sections(task: str) -> Mapping[str, type]:
    """The classes of the sections task ``task`` declares (``Task.sections``), checked when
    the task is looked up: ``model`` and ``loss`` among them, each an attrs class, named by
    a Python identifier no framework section has. Anything else is a ConfigError naming the
    task's class."""
    from core.tasks import task_class

    cls = task_class(task)
    sections = cls.sections
    where = f"task {task!r}: {cls.__module__}.{cls.__qualname__}.sections"
    if not isinstance(sections, Mapping):
        raise ConfigError(
            f"{where} is a {type(sections).__name__}, not a mapping of names to attrs classes"
        )
    problems = [f"lacks {name!r}" for name in ("model", "loss") if name not in sections]
    for name, section in sections.items():
        if not (isinstance(name, str) and name.isidentifier()):
            problems.append(f"{name!r} is not a section name (a Python identifier)")
        elif name in (*FRAMEWORK_SECTIONS, "task_sections"):
            problems.append(f"{name!r} is a framework section")
        elif not (isinstance(section, type) and attrs.has(section)):
            problems.append(f"{name!r} is {section!r}, not an attrs class")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)} (see docs/architecture.md)")
    return sections


def dump_config(config: Config, path: Path) -> None:
    """Write the resolved config as TOML (every key, so the file alone repeats the run;
    the ``[[resumed]]`` history only once there is one)."""
    tree = unstructure(config)
    if not tree["resumed"]:
        del tree["resumed"]
    Path(path).write_text(tomli_w.dumps(tree), encoding="utf-8")
