"""The command that starts two real training processes in the tests."""

from __future__ import annotations

from core.experiment.ray_backend import accelerate_launch


def launch() -> list[str]:
    """``accelerate launch`` for two processes, followed by the script or ``-m module``, as a
    Ray task launches a run of two GPUs.

    ``--cpu --num_processes 2`` starts ONE process unless MPI is set up (accelerate 1.15);
    ``--multi_gpu`` starts two through torchrun, and the trainer keeps them on the CPU over
    gloo.
    """
    return accelerate_launch(2)
