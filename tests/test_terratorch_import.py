"""``core.tasks.sar2opt.terratorch_import``: terratorch imports beside a CUDA build of torchvision.

The shim defines operators process-wide and only before torchvision's first import, so every
check runs in a fresh interpreter. One of them imports terratorch (10-15 s) and reports
everything that needs it as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_python(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter at the repository root; its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def after_import() -> dict[str, Any]:
    """What a fresh process sees before and after ``import_terratorch()``."""
    return run_python(
        """
        import json
        import torch
        from core.tasks.sar2opt.terratorch_import import compiled_ops_loadable, import_terratorch

        def error(call):
            try:
                call()
            except RuntimeError as err:
                return str(err)
            return None

        loadable = compiled_ops_loadable()
        torch.set_float32_matmul_precision("high")  # not the default, so a reset shows too
        registry = import_terratorch()
        build = registry.build("terramind_v1_tiny_generate", pretrained=False,
                               modalities=["S1GRD"], output_modalities=["S2L2A"])
        again = import_terratorch()
        import torchvision

        boxes, scores = torch.rand(3, 4), torch.rand(3)
        print(json.dumps({
            "loadable": loadable,
            "has_tiny_generate": "terramind_v1_tiny_generate" in registry,
            "same_registry": again is registry,
            "built": type(build).__name__,
            "matmul_precision": torch.get_float32_matmul_precision(),
            "ops_nms": error(lambda: torchvision.ops.nms(boxes, scores, 0.5)),
            "torch_ops_nms": error(lambda: torch.ops.torchvision.nms(boxes, scores, 0.5)),
            "torch_ops_qnms": error(lambda: torch.ops.torchvision.qnms(boxes, scores, 0.5)),
        }))
        """
    )


def test_compiled_ops_do_not_load_here(after_import: dict[str, Any]) -> None:
    assert after_import["loadable"] is False, (
        "torchvision's compiled ops load in this environment, so the shim is never applied and "
        "the tests below no longer exercise it; revise them for a matching torchvision"
    )


def test_terramind_is_registered(after_import: dict[str, Any]) -> None:
    assert after_import["has_tiny_generate"]


def test_importing_terratorch_keeps_the_float32_matmul_precision(
    after_import: dict[str, Any],
) -> None:
    # terratorch's Clay v1.5 backbone sets "medium" at import, which lets oneDNN compute
    # float32 matmuls in bfloat16 on CPUs with AVX512-BF16 or AMX: every model of the
    # process, RCAN-DEM included, would train and validate at bfloat16 precision
    assert after_import["built"] and after_import["matmul_precision"] == "high"


def test_second_call_is_cached(after_import: dict[str, Any]) -> None:
    assert after_import["same_registry"]


def test_torchvision_ops_fail_with_a_clear_message(after_import: dict[str, Any]) -> None:
    # torchvision.ops.nms checks for its compiled ops first and raises its own error.
    assert after_import["ops_nms"] is not None
    assert "Couldn't load custom C++ ops" in after_import["ops_nms"]
    for op in ("nms", "qnms"):
        message = after_import[f"torch_ops_{op}"]
        assert message is not None
        assert f"torchvision::{op} is unavailable" in message
        assert "CUDA build of torchvision beside a CPU build of torch" in message


def test_torchvision_fails_to_import_without_the_shim() -> None:
    outcome = run_python(
        """
        import json
        try:
            import torchvision
        except RuntimeError as err:
            print(json.dumps({"error": str(err)}))
        else:
            print(json.dumps({"error": None}))
        """
    )
    assert outcome["error"] is not None, (
        "torchvision now imports without the shim; core.tasks.sar2opt.terratorch_import can go"
    )
    assert "torchvision::nms" in outcome["error"]


def test_missing_terratorch_is_a_usage_error(tmp_path: Path) -> None:
    package = tmp_path / "terratorch"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("terratorch is broken")\n')
    outcome = run_python(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from core.errors import UsageError
        from core.tasks.sar2opt.terratorch_import import import_terratorch

        try:
            import_terratorch()
        except UsageError as err:
            print(json.dumps({{"type": type(err).__name__, "message": str(err)}}))
        else:
            print(json.dumps({{"type": None, "message": None}}))
        """
    )
    assert outcome["type"] == "UsageError"
    assert outcome["message"].startswith(
        'the sar2opt task needs the sar2opt extra: pip install -e ".[sar2opt]"'
    )
    assert "terratorch is broken" in outcome["message"]
