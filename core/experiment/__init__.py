"""``python -m core.experiment``: compare plugin combinations ("arms") over several seeds.

Every (arm, seed) is an ordinary ``python -m core.run`` in its own process and run folder,
``<out>/<arm-slug>/seed<k>/``, with the same data, model, budget and common overrides; so each
run resumes on its own, and a fresh process gives every run clean Accelerate state and RNG.
A restarted experiment skips the runs whose ``summary.json`` exists and resumes the ones that
left a checkpoint. The report (``results.md``, ``results.csv``, ``loss_curves_by_arm.png``,
``step_losses_by_arm.png``, ``terrain_rmse_by_arm.png``) is written from whatever runs are
complete, so an interrupted or partly failed experiment still yields a partial table.

Modules by concern: ``spec`` (arms, seeds, controls; the experiment file), ``schedule`` (the
run processes, restarts), ``ray_backend`` (the same runs as tasks on a Ray cluster, ``--backend
ray``), ``tune`` (tuned arms' search), ``summary`` (numbers per run and arm), ``stats`` (paired
tests, intervals, corrections), ``report`` (tables, verdict, CSV, plots), ``cli``.

Exit status: 0 every run finished, 1 a run failed (the report covers the others), 2 a usage
error (the message names the arm, key or plugin), 130 interrupted.
"""

from core.experiment.cli import build_experiment, build_parser, main
from core.experiment.report import control_verdict, markdown, write_report
from core.experiment.spec import Arm, Experiment, check_arms, parse_arms
from core.experiment.summary import summarise

__all__ = [
    "Arm", "Experiment", "build_experiment", "build_parser", "check_arms", "control_verdict",
    "main", "markdown", "parse_arms", "summarise", "write_report",
]  # fmt: skip
