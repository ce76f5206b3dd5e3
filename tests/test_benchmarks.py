"""Every benchmark runs end to end in its ``--quick`` setting and prints its ratio lines.

Timings are not asserted: on a shared machine they say nothing in a test, and the measured
numbers, with whether each target is met, live in docs/benchmarks.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"\d+\.\d+(?:e[+-]\d+)?"
RATIO = re.compile(
    rf"^ratio (\S+) = {NUMBER} \[{NUMBER}-{NUMBER}, n=\d+\](?:; 95 % interval {NUMBER}-{NUMBER})?; "
    r"target .+: (met|NOT met|no target)$",
    re.MULTILINE,
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "options", "ratios"),
    [
        (
            "overhead.py",
            [],
            {
                "overhead_per_epoch_from_parts_cpu",
                "overhead_per_epoch_cpu",
                "overhead_per_epoch_wall",
            },
        ),
        (
            "balanced_grad.py",
            [],
            {
                "balanced_grad_time",
                "balanced_grad_memory",
                "recipe_time",
                "recipe_memory_after_2_batches",
                "recipe_memory_per_sample_seen",
                "naive_time",
                "naive_time_T5_vs_T1",
            },
        ),
        ("stratified_plan.py", [], {"stratified_vs_python_loop", "stratified_share_of_epoch"}),
        ("data_loading.py", [], {"loader_vs_small_model", "geotiff_vs_small_model"}),
        ("gpu_throughput.py", ["--device", "cpu", "--no-others"], {"bf16_vs_fp32_small"}),
        (
            "gpu_terramind.py",
            ["--device", "cpu"],
            {"step_peak_vs_6gb", "validation_peak_vs_6gb", "predict_peak_vs_6gb"},
        ),
        (
            "predict_memory.py",
            [],
            {
                "predict_rss_rise_largest_vs_cache_capped",
                "predict_rss_rise_largest_vs_output_gdal_default",
                "predict_vs_forward_windows_per_s_small",
            },
        ),
        (
            "window_loading.py",
            [],
            {
                "peak_rss_768_vs_240",
                "loader_workers0_vs_small_model",
                "loader_workers2_vs_small_model",
            },
        ),
        pytest.param(
            "experiment_backends.py",
            [],
            {"ray_wall_vs_local", "ray_start_latency_vs_local"},
            marks=pytest.mark.ray_cluster,
        ),
        (
            "terramind_memory.py",
            [],
            {
                "checkpointing_step_memory_vs_plain_tiny",
                "checkpointing_step_tensors_vs_plain_tiny",
                "bf16_weight_bytes_vs_fp32_tiny",
                "bf16_peak_vs_fp32_tiny",
            },
        ),
        (
            "terramind_predict.py",
            [],
            {
                "overlap_read_difference",
                "overlap_own_step_difference",
                "variance_by_stride_position",
                "edges_vs_elsewhere",
                "predict_vs_generate_windows_per_s",
                "predict_rss_rise_1024_vs_256_rows",
                "predict_traced_peak_1024_vs_256_rows",
            },
        ),
        (
            "straight_through_estimators.py",
            [],
            {f"gumbel_squared_error_vs_exact_gradient_tau{tau}" for tau in ("1", "0.5", "0.2")},
        ),
        (
            "generators.py",
            [],
            {
                f"{name}_step_vs_teacher_forcing"
                for name in ("straight_through", "reinforce", "refiner", "encoder_only")
            },
        ),
    ],
)
def test_benchmark_runs_and_prints_its_ratios(
    script: str, options: list[str], ratios: set[str], tmp_path: Path
):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *options],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    printed = {match.group(1) for match in RATIO.finditer(result.stdout)}
    assert printed == ratios, result.stdout
    assert "load average" in result.stdout, "the header records the machine's load"
    assert not list(tmp_path.iterdir()), "a benchmark left files in the working directory"
