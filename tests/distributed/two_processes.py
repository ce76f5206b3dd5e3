"""The command that starts two real training processes in the tests."""

from __future__ import annotations

import socket
import sys


def launch() -> list[str]:
    """``accelerate launch`` for two processes, followed by the script or ``-m module``.

    Each launch gets a free port of its own for the processes' rendezvous, so launches that
    run side by side (``pytest -n 2``) never meet on torchrun's default port.

    ``--cpu --num_processes 2`` starts ONE process unless MPI is set up (accelerate 1.15);
    ``--multi_gpu`` starts two through torchrun, and the trainer keeps them on the CPU over
    gloo. Through ``python -m accelerate.commands.launch``, not the ``accelerate`` script: the
    script's CLI imports timm, hence torchvision, whose PyPI wheel cannot load beside a CPU
    build of torch (the sar2opt extra installs both).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port),
    ]  # fmt: skip
