"""A trained sar2opt run leaves the run: peft adapters, a merged export, and the predict CLI.

One short ``teacher_forcing`` run (TerraMind tiny, random weights) is shared by the module.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from accelerate import Accelerator
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from core.config import load_config
from core.context import RunContext
from core.errors import UsageError
from core.plugins import PluginManager
from core.tasks import PredictOptions
from core.tasks.sar2opt.adapters import ADAPTERS, load_merged, load_run_terramind
from core.tasks.sar2opt.data import OPTICAL_BANDS, TERRAMIND_V1
from core.tasks.sar2opt.predict import SarToOpticalPredictor, SceneNoise
from core.tasks.sar2opt.task import SarToOptical
from core.tasks.sar2opt.terramind import build_terramind
from core.tasks.sar2opt.terratorch_import import import_terratorch
from terraplug.testing import reset_accelerate_state
from tests.conftest import read_metrics
from tests.test_safety import Payload, digest, limit_file_size

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.run import main

    out = tmp_path_factory.mktemp("sar2opt") / "run"
    settings = ["model.diffusion_steps=1", "train.progress='never'", "data.val_fraction=0.1",
                "train.max_steps_per_epoch=3", "optim.lr=1e-2"]  # fmt: skip
    args = ["--task", "sar2opt", "--plugins", "teacher_forcing", "--out", str(out)]
    assert main([*args, "--epochs", "1", *(f"--set={s}" for s in settings)]) == 0
    reset_accelerate_state()
    return out


EPILOGUE = """
import json
from core.tasks.sar2opt import metrics
from core.tasks.sar2opt.bigearthnet import TILE_SIZE, ensure_bigearthnet_pairs
from core.tasks.sar2opt.data import TERRAMIND_V1, PairDataset
from core.data.geotiff import open_geotiff

folder = ensure_bigearthnet_pairs(quiet=True).folder
val = PairDataset.from_folder(folder, TERRAMIND_V1, size=TILE_SIZE, strict=True)
errors = []
for i, path in enumerate(sorted((folder / "S1GRD").glob("*.tif"))):  # the validation order
    with open_geotiff(path) as src:
        sar_db = torch.from_numpy(src.read()).float()[None]
    tile = val[i]
    target = (val.destandardise_optical(tile["optical"][None]) / 10_000).clamp(0, 1)
    generated = (translate(sar_db, SPLIT_SEED + i) / 10_000).clamp(0, 1)
    errors.append(float(metrics.masked_mean((generated - target).abs(), tile["mask"][None])))
print(json.dumps(sum(errors) / len(errors)))
"""


def fake_hub_cache(cache: Path) -> None:
    """TerraMind tiny's and the S2 L2A tokenizer's files where ``pretrained=True`` reads them
    (the Hugging Face cache layout), holding random weights: the real ones are not here.
    Stored in bfloat16 to halve the 1.2 GB; both sides load the same rounded values."""
    import_terratorch()  # torchvision's ops first, as the task imports terratorch
    from terratorch.models.backbones.terramind.model.terramind_register import (
        pretrained_weights as model_weights,
    )
    from terratorch.models.backbones.terramind.tokenizer.tokenizer_register import (
        pretrained_weights as tokenizer_weights,
    )

    torch.manual_seed(0)
    model = build_terramind("tiny", pretrained=False, lora_rank=0, lora_alpha=1.0,
                            lora_targets="")  # fmt: skip
    for entry, module in (
        (model_weights["terramind_v1_tiny"], model.terramind),
        (tokenizer_weights["terramind_v1_tokenizer_s2l2a"], model.tokenizer),
    ):
        repo = cache / f"models--{entry['hf_hub_id'].replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        state = {key: value.bfloat16() if value.is_floating_point() else value
                 for key, value in module.state_dict().items()}  # fmt: skip
        torch.save(state, snapshot / entry["hf_hub_filename"])


def test_the_documented_adapter_snippet_reproduces_the_runs_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snippet of docs/terramind.md, "Using a trained model", as printed, in a fresh
    process: TerraTorch's model with pretrained weights from the local Hugging Face cache,
    the run's adapters through peft, the generation settings it prints and the validation
    seed it names give the run's own val_l1 on the six validation tiles."""
    import huggingface_hub.constants

    from core.run import main

    cache = tmp_path / "hub"
    fake_hub_cache(cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    run = tmp_path / "RUN_DIR"  # the snippet's own name for the run folder
    settings = ["model.pretrained=true", "train.progress='never'", "data.val_fraction=0.1",
                "train.max_steps_per_epoch=2", "optim.lr=1e-2"]  # fmt: skip
    args = ["--task", "sar2opt", "--plugins", "teacher_forcing", "--out", str(run)]
    assert main([*args, "--epochs", "1", *(f"--set={s}" for s in settings)]) == 0
    reset_accelerate_state()
    recorded = read_metrics(run)[-1]
    config = load_config(run / "config.toml")
    assert config.model.diffusion_steps == 2 and not config.model.final_diffusion_steps

    text = (Path(__file__).resolve().parents[1] / "docs" / "terramind.md").read_text()
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL)
                  if "PeftModel.from_pretrained" in block]  # fmt: skip
    script = tmp_path / "snippet.py"
    script.write_text(snippet + f"SPLIT_SEED = {config.data.split_seed}\n" + EPILOGUE)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # TerraTorch standardises the dB itself, terraplug's reader did it in its own float
    # steps: inputs a float32 ulp apart, which move an L1 of ~0.1 by far less than 1e-5
    assert json.loads(done.stdout.splitlines()[-1]) == pytest.approx(recorded["val_l1"], abs=1e-5)


def test_adapters_are_peft_files_that_reproduce_the_validation_metrics(run_dir: Path) -> None:
    """A fresh TerraMind with the exported adapters (loaded by peft's own
    ``PeftModel.from_pretrained``), built without the training set, scores the validation
    tiles exactly as the run did."""
    folder = run_dir / ADAPTERS
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    weights = load_file(folder / "adapter_model.safetensors")
    assert all(key.startswith("base_model.model.") for key in weights)
    assert any("lora_B" in key and weights[key].abs().sum() > 0 for key in weights)  # trained

    terramind, run_config, _ = load_run_terramind(run_dir)
    task = SarToOptical()
    plugins = PluginManager.from_names(run_config.run.plugins, run_config.plugins)
    ctx = RunContext(run_config, Accelerator(cpu=True), task, plugins, run_dir, 1)
    ctx.epoch = 1
    _, val = task.build_datasets(run_config, ctx)
    metrics = task.validate(terramind, DataLoader(val, batch_size=2), ctx)
    recorded = read_metrics(run_dir)[-1]
    for key in ("val_l1", "val_psnr", "val_ssim", "val_token_ce", "val_ceiling_l1"):
        assert metrics[key] == recorded[key], key


def test_merged_export_equals_the_adapted_model(run_dir: Path, tmp_path: Path) -> None:
    """Every adapted layer's export is W + s·B·A, every other weight is W unchanged, and the
    merged model computes the adapted one's logits."""
    from peft.tuners.lora import LoraLayer

    from core.tasks.sar2opt.adapters import main

    merged_path = tmp_path / "merged.safetensors"
    assert main([str(run_dir), "--merged", str(merged_path)]) == 0
    merged = load_file(merged_path)
    assert not any("lora_" in key for key in merged)
    adapted, config, peft_model = load_run_terramind(run_dir)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert layers
    for name, layer in layers.items():
        w = layer.base_layer.weight.double()
        b, a = (ab["default"].weight.double() for ab in (layer.lora_B, layer.lora_A))
        scale = layer.scaling["default"]
        # float32 merge (B·A of rank r, times s, plus W): each step rounds by at most one
        # float32 epsilon of the magnitudes it sums, so 4 epsilons of |W| + s·|B|·|A| bound
        # it on any CPU, whatever the summation order
        bound = 4 * torch.finfo(torch.float32).eps * (w.abs() + scale * (b.abs() @ a.abs()))
        assert ((merged[f"{name}.weight"].double() - (w + scale * b @ a)).abs() <= bound).all()
    base = {
        key.removeprefix("base_model.model.").replace(".base_layer", ""): value
        for key, value in peft_model.state_dict().items()
        if "lora_" not in key
    }
    for key, value in merged.items():
        if key.removesuffix(".weight") not in layers:
            assert torch.equal(value, base[key]), key
    config.model.lora_rank = 0
    plain = SarToOptical().build_model(config)
    load_merged(plain, merged)
    sar = torch.randn(1, 2, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        # in float64 the two differ only by the export's float32 rounding of W + s·B·A (a
        # relative 6e-8 per weight, checked above); float32 arithmetic would add differences
        # of summation order that the transformer amplifies to 3e-3 on some CPUs
        torch.testing.assert_close(plain.double()(sar), adapted.double()(sar), rtol=1e-5, atol=1e-5)


def write_s1_scene(path: Path, height: int, width: int) -> None:
    """VV/VH backscatter in dB on a UTM grid, with a nodata corner."""
    rng = np.random.default_rng(0)
    data = np.stack([rng.normal(-12, 3, (height, width)), rng.normal(-19, 3, (height, width))])
    data = data.astype(np.float32)
    data[:, :5, :7] = -9999
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 2,
               "dtype": "float32", "crs": CRS.from_epsg(32632), "nodata": -9999,
               "transform": Affine(10, 0, 500_000, 0, -10, 5_200_000)}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def test_predict_turns_a_sentinel1_scene_into_a_georeferenced_sentinel2_geotiff(
    run_dir: Path, tmp_path: Path
) -> None:
    """A scene larger than a window and no multiple of it: 12 bands of L2A DN on the input's
    grid (CRS, transform, size), nodata where the SAR is."""
    from core.predict import main

    source, output = tmp_path / "s1.tif", tmp_path / "s2.tif"
    write_s1_scene(source, 90, 100)
    assert main(["--checkpoint", str(run_dir), str(source), str(output), "--quiet"]) == 0
    with rasterio.open(source) as src, rasterio.open(output) as out:
        assert (out.count, out.dtypes[0], out.nodata) == (12, "uint16", 0)
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        assert out.bounds == src.bounds
        assert out.descriptions == OPTICAL_BANDS
        data = out.read()
    assert (data[:, :5, :7] == 0).all()
    valid = data[:, 5:, :]
    assert (valid > 0).all() and valid.mean() < 10_000  # reflectance DN, not standardised
    assert not list(tmp_path.glob("*.partial"))


def test_the_scenes_noise_is_drawn_per_token_patch() -> None:
    """Each 16-px patch's noise follows from the seed and the patch's place alone: a row of
    blocks is its blocks side by side, whatever the scene's width, and another seed draws
    other noise."""
    noise = SceneNoise(0, 16, 12, 50)
    gumbel, pixels = noise.row(2, 4)
    assert (gumbel.shape, pixels.shape) == ((4, 50), (12, 16, 64))
    block_gumbel, block_pixels = noise.block(2, 3)
    assert np.array_equal(gumbel[3], block_gumbel)
    assert np.array_equal(pixels[:, :, 48:], block_pixels)
    narrow = noise.row(2, 2)
    assert np.array_equal(narrow[0], gumbel[:2]) and np.array_equal(narrow[1], pixels[:, :, :32])
    assert not np.array_equal(noise.row(3, 4)[1], pixels)
    assert not np.array_equal(SceneNoise(1, 16, 12, 50).row(2, 4)[1], pixels)


class Watching(SarToOpticalPredictor):
    """The predictor, keeping what every window read and made at every diffusion step:
    ``(t, row, col, state, conditioning, stepped)``."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.seen: list[tuple[int, int, int, torch.Tensor, torch.Tensor, np.ndarray]] = []

    def step_windows(
        self, images: torch.Tensor, t: torch.Tensor, quant: torch.Tensor, row: int,
        cols: list[int],
    ) -> np.ndarray:  # fmt: skip
        stepped = super().step_windows(images, t, quant, row, cols)
        for col, image, condition, out in zip(cols, images, quant, stepped, strict=True):
            self.seen.append((int(t), row, col, image, condition, out))
        return stepped


def test_a_lone_window_is_terratorchs_generation_with_the_scenes_noise(
    run_dir: Path, tmp_path: Path
) -> None:
    """A scene of one window: the tokens drawn from its logits with the scene's Gumbel
    noise, decoded by TerraTorch's pipeline from the scene's starting noise (decode_noise,
    which tests/test_sar2opt.py checks against TerraTorch's own), bit for bit; fusing
    leaves it as it is."""
    source, output = tmp_path / "s1.tif", tmp_path / "s2.tif"
    write_s1_scene(source, 64, 64)
    terramind, config, _ = load_run_terramind(run_dir)
    predictor = Watching(terramind, 2, config.run.seed, 64, 16)
    predictor.run(source, output, progress=False)
    drawn = [predictor.noise.row(block, 4) for block in range(4)]
    gumbel = torch.from_numpy(np.concatenate([g for g, _ in drawn]))[None]
    noise = torch.from_numpy(np.concatenate([p for _, p in drawn], axis=1))[None]
    with rasterio.open(source) as src:
        image = predictor.standardised([src.read(masked=True).filled(np.nan)])
    expected = terramind.generate_noise(image, 2, gumbel, noise)[0].numpy()
    assert [seen[:3] for seen in predictor.seen] == [(999, 0, 0), (499, 0, 0)]
    assert np.array_equal(predictor.seen[-1][5], expected)
    optical = (
        expected * TERRAMIND_V1.optical_std[:, None, None]
        + TERRAMIND_V1.optical_mean[:, None, None]
    )
    dn = np.clip(np.rint(optical), 1, 65535).astype(np.uint16)
    dn[:, :5, :7] = 0
    with rasterio.open(output) as out:
        assert np.array_equal(out.read(), dn)


def test_overlapping_windows_read_one_canvas_at_every_step(run_dir: Path, tmp_path: Path) -> None:
    """MultiDiffusion: two windows that overlap are conditioned on the same tokens there and
    read the same state there at every diffusion step (the canvas fused after the step
    before), though their own steps differ there before they are fused."""
    source = tmp_path / "s1.tif"
    write_s1_scene(source, 96, 128)
    terramind, config, _ = load_run_terramind(run_dir)
    predictor = Watching(terramind, 2, config.run.seed, 64, 16, 4)
    predictor.run(source, tmp_path / "s2.tif", progress=False)
    assert len(predictor.seen) == 2 * 2 * 3  # 2 steps x 2 rows x 3 columns of windows
    pairs = 0
    for one, two in itertools.combinations(predictor.seen, 2):
        top, left = max(one[1], two[1]), max(one[2], two[2])
        bottom, right = min(one[1], two[1]) + 64, min(one[2], two[2]) + 64
        if one[0] != two[0] or top >= bottom or left >= right:
            continue
        pairs += 1
        # the shared area in each window's pixels, and in its token patches
        mine, theirs = ([np.s_[..., (top - w[1]) // scale : (bottom - w[1]) // scale,
                               (left - w[2]) // scale : (right - w[2]) // scale]
                         for scale in (1, 16)] for w in (one, two))  # fmt: skip
        assert torch.equal(one[3][mine[0]], two[3][theirs[0]])
        assert torch.equal(one[4][mine[1]], two[4][theirs[1]])
        assert not np.array_equal(one[5][mine[0]], two[5][theirs[0]])
    assert pairs == 2 * 11  # per step: 4 side by side, 3 above each other, 4 diagonal


def test_predict_batches_skips_void_windows_and_records_its_settings(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Windows go through TerraMind in batches, each with its noise from the scene's grid,
    so the output does not depend on the batch size; a window without a valid pixel is
    never generated and stays nodata; the command's diffusion steps, top-p and temperature
    replace the run's and are recorded in the output's tags; without a terminal, progress
    comes as lines on stdout."""
    from core.predict import main

    source = tmp_path / "s1.tif"
    write_s1_scene(source, 96, 160)
    with rasterio.open(source, "r+") as dst:  # the windows at columns 96-159: all nodata
        dst.write(np.full((2, 96, 64), -9999, np.float32), window=Window(96, 0, 64, 96))
    terramind, config, _ = load_run_terramind(run_dir)
    outputs = []
    for batch in (1, 3):
        predictor = SarToOpticalPredictor(terramind, 1, config.run.seed, 64, 16, batch)
        predictor.run(source, tmp_path / f"batch{batch}.tif", progress=False)
        assert predictor.skipped == 2  # two rows of windows, one void window each
        with rasterio.open(tmp_path / f"batch{batch}.tif") as out:
            outputs.append(out.read().astype(int))
    # the same noise and windows; batched float32 sums may differ in the last bits, which
    # moves a DN across a rounding boundary at most
    assert np.abs(outputs[0] - outputs[1]).max() <= 1
    assert (outputs[0][:, :, 96:] == 0).all() and (outputs[0][:, 5:, :96] > 0).all()
    with pytest.raises(UsageError, match="--overlap 12: the windows' stride"):
        SarToOpticalPredictor(terramind, 1, 0, 64, 12)

    output = tmp_path / "s2.tif"
    overrides = ["--diffusion-steps", "2", "--top-p", "0.5", "--temperature", "0"]  # 0: greedy
    command = ["--checkpoint", str(run_dir), str(source), str(output), "--batch-size", "4"]
    assert main([*command, *overrides]) == 0
    # every window takes the token step and both diffusion steps; stderr is no terminal
    assert capsys.readouterr().out.count("s1.tif: 24/24 window steps") == 1
    with rasterio.open(output) as out:
        tags = out.tags()
    assert {key: tags[key] for key in ("diffusion_steps", "top_p", "temperature", "seed")} == {
        "diffusion_steps": "2", "top_p": "0.5", "temperature": "0.0", "seed": "0"
    }  # fmt: skip
    assert (tags["decoder_thresholding"], tags["decoder_clip"]) == ("False", "3.0")
    assert (tags["window"], tags["overlap"]) == ("64", "16")


def test_predict_refuses_sampling_settings_it_cannot_use(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Exit 2 naming the option, before the model loads; a dem_sr run does not sample."""
    from core.predict import main
    from core.tasks.dem_sr.predict import predict as dem_predict

    source, output = tmp_path / "s1.tif", tmp_path / "s2.tif"
    write_s1_scene(source, 32, 32)
    for option, value, message in (
        ("--batch-size", "0", "--batch-size 0 must be at least 1"),
        ("--diffusion-steps", "0", "--diffusion-steps 0 must be at least 1"),
        ("--top-p", "1.5", "--top-p 1.5 must lie in [0, 1]"),
        ("--temperature", "-1", "--temperature -1.0 must be at least 0"),
    ):
        assert main(["--checkpoint", str(run_dir), str(source), str(output), option, value]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(UsageError, match="--top-p: a dem_sr run does not sample"):
        dem_predict(run_dir, source, output, PredictOptions(top_p=0.5))
    assert not output.exists()


def test_predict_on_a_full_disk_exits_1_and_leaves_no_output(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    """sar2opt writes through the GeoTIFF writer that reads its file back (tested under a
    file-size limit in tests/test_safety.py): a limit far below the output's size is exit 1
    naming the output, with no output and no temporary file left."""
    from core.predict import main

    source, output = tmp_path / "s1.tif", tmp_path / "s2.tif"
    write_s1_scene(source, 90, 100)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit_file_size(4096)
    try:
        status = main(["--checkpoint", str(run_dir), str(source), str(output), "--quiet"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert status == 1
    err = capsys.readouterr().err
    assert "file size limit (ulimit -f, or the file system's) exceeded on " in err
    assert f"writing {output} (left as it was)" in err
    assert [p.name for p in tmp_path.iterdir()] == ["s1.tif"]


def test_predict_reads_a_geotiff_only(run_dir: Path, tmp_path: Path, capsys) -> None:
    """A VRT named .tif that reads a 2-band scene from elsewhere is refused by name, as every
    input is (docs/safety.md): GDAL would otherwise follow it to any path or URL."""
    from core.predict import main

    secret = tmp_path / "elsewhere" / "secret.tif"
    secret.parent.mkdir()
    write_s1_scene(secret, 32, 32)
    disguised = tmp_path / "s1.tif"
    bands = "".join(
        f'<VRTRasterBand dataType="Float32" band="{band}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{secret}</SourceFilename>'
        f"<SourceBand>{band}</SourceBand></SimpleSource></VRTRasterBand>"
        for band in (1, 2)
    )
    disguised.write_text(
        f'<VRTDataset rasterXSize="32" rasterYSize="32"><SRS>EPSG:32632</SRS>{bands}</VRTDataset>'
    )
    with rasterio.open(disguised) as ds:
        assert ds.count == 2, "GDAL itself reads the disguised file, or this proves nothing"
    output = tmp_path / "s2.tif"
    assert main(["--checkpoint", str(run_dir), str(disguised), str(output)]) == 2
    assert f"{disguised}: not a readable GeoTIFF" in capsys.readouterr().err
    assert not output.exists()


def test_predict_refuses_a_one_band_raster_naming_it(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from core.predict import main

    source = tmp_path / "one_band.tif"
    with rasterio.open(source, "w", driver="GTiff", height=8, width=8, count=1,
                       dtype="float32", crs=CRS.from_epsg(32632),
                       transform=Affine(10, 0, 0, 0, -10, 0)) as dst:  # fmt: skip
        dst.write(np.zeros((1, 8, 8), dtype=np.float32))
    assert main(["--checkpoint", str(run_dir), str(source), str(tmp_path / "o.tif")]) == 2
    assert "one_band.tif: needs 2 bands" in capsys.readouterr().err


def copied_run(run_dir: Path, to: Path) -> Path:
    """A copy of the module's run folder to tamper with."""
    shutil.copytree(run_dir, to)
    return to


def run_files(run: Path) -> dict[Path, str]:
    return {path: digest(path) for path in run.rglob("*") if path.is_file()}


def test_merged_export_never_replaces_the_runs_own_files(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Not even with --overwrite, and by any name (a link to the run folder): the checkpoint
    and config of a run folder are what resumes it."""
    from core.tasks.sar2opt.adapters import main

    run = copied_run(run_dir, tmp_path / "run")
    (tmp_path / "alias").symlink_to(run)
    before = run_files(run)
    own = [run / "checkpoint.pt", run / "config.toml", run / "metrics.jsonl", run / ADAPTERS,
           run / ADAPTERS / "adapter_model.safetensors", run / "merged.safetensors",
           tmp_path / "alias" / "checkpoint.pt"]  # fmt: skip
    for output in own:
        assert main([str(run), "--merged", str(output), "--overwrite"]) == 2
        assert f"{output}: inside the run folder" in capsys.readouterr().err
    assert run_files(run) == before


def test_merged_export_replaces_an_existing_output_only_with_overwrite(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """As predict's output: refused without --overwrite; with it, a link at the output is
    replaced by the export, never written through to the checkpoint it points to."""
    from core.tasks.sar2opt.adapters import main

    run = copied_run(run_dir, tmp_path / "run")
    before = run_files(run)
    output = tmp_path / "merged.safetensors"
    output.symlink_to(run / "checkpoint.pt")
    assert main([str(run), "--merged", str(output)]) == 2
    assert f"{output}: exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(run), "--merged", str(output), "--overwrite"]) == 0
    assert not output.is_symlink() and not any("lora_" in key for key in load_file(output))
    assert run_files(run) == before


@pytest.mark.parametrize(
    ("key", "before", "after"),
    [("run.seed", "seed = 0", "seed = 1"), ("model.terramind", 'terramind = "tiny"',
                                             'terramind = "small"')],
)  # fmt: skip
def test_predict_refuses_frozen_weights_the_checkpoint_was_not_trained_with(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, key: str, before: str,
    after: str,
) -> None:  # fmt: skip
    """The frozen random weights are rebuilt from config.toml's seed and size: an edit after
    training would change every output silently, so the checkpoint's fingerprint of them
    decides, for predict and the merged export alike."""
    from core.predict import main as predict_main
    from core.tasks.sar2opt.adapters import main as export_main

    run = copied_run(run_dir, tmp_path / "run")
    config = run / "config.toml"
    text = config.read_text()
    assert len(re.findall(rf"(?m)^{before}$", text)) == 1, key
    config.write_text(re.sub(rf"(?m)^{before}$", after, text))
    source, output = tmp_path / "s1.tif", tmp_path / "s2.tif"
    write_s1_scene(source, 32, 32)
    commands = [
        lambda: predict_main(["--checkpoint", str(run), str(source), str(output), "--quiet"]),
        lambda: export_main([str(run), "--merged", str(tmp_path / "merged.safetensors")]),
    ]
    for command in commands:
        assert command() == 2
        err = capsys.readouterr().err
        assert f"{run / 'checkpoint.pt'}: TerraMind's frozen weights" in err, err
        assert "config.toml edited after training?" in err
    assert not output.exists() and not (tmp_path / "merged.safetensors").exists()


def bad_json(folder: Path, marker: Path) -> str:
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    return "adapter_config.json"


def edit_adapter_config(**values: object) -> Callable[[Path, Path], str]:
    def edit(folder: Path, marker: Path) -> str:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
        return "adapter_config.json"

    return edit


def wrong_shapes(folder: Path, marker: Path) -> str:
    path = folder / "adapter_model.safetensors"
    weights = load_file(path)  # rank 4 where adapter_config.json says 8
    save_file({key: (value[:4] if "lora_A" in key else value[:, :4]).contiguous()
               for key, value in weights.items()}, path)  # fmt: skip
    return "adapter_model.safetensors"


def pickle_payload(folder: Path, marker: Path) -> str:
    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    return "adapter_model.safetensors"


def junk(folder: Path, marker: Path) -> str:
    (folder / "adapter_model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return "adapter_model.safetensors"


@pytest.mark.parametrize(
    "tamper",
    [bad_json, edit_adapter_config(r=4), edit_adapter_config(target_modules=r".*\.mlp\.fc1"),
     edit_adapter_config(use_rslora=True), wrong_shapes, pickle_payload, junk],
    ids=["bad_json", "r", "target_modules", "use_rslora", "shapes", "pickle", "junk"],
)  # fmt: skip
def test_tampered_adapters_are_refused_naming_the_file_and_never_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    tamper: Callable[[Path, Path], str],
) -> None:  # fmt: skip
    """The adapters are loaded by real peft from real files: each tampering is exit 2 naming
    the file, nothing in it runs, and no output is written."""
    from core.predict import main

    run = copied_run(run_dir, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    name = tamper(run / ADAPTERS, marker)
    source, output = tmp_path / "s1.tif", tmp_path / "s2.tif"
    write_s1_scene(source, 32, 32)
    assert main(["--checkpoint", str(run), str(source), str(output), "--quiet"]) == 2
    assert f"{run / ADAPTERS / name}: " in capsys.readouterr().err
    assert not marker.exists(), "the adapters' payload ran"
    assert not output.exists()


def test_predict_warns_when_the_backscatter_looks_linear_not_db(
    run_dir: Path, tmp_path: Path
) -> None:
    """Linear sigma0 (the same scene as 10^(dB/10)) standardised as dB gives garbage without
    any error: a warning names the file; the dB scene passes the same rule."""
    from core.predict import main
    from core.tasks.sar2opt.predict import linear_backscatter, open_sar

    decibels, linear = tmp_path / "db.tif", tmp_path / "linear.tif"
    write_s1_scene(decibels, 32, 32)
    with rasterio.open(decibels) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(linear, "w", **profile) as dst:
        dst.write(np.where(data == -9999, data, 10 ** (data / 10)))
    with open_sar(decibels) as src:
        assert not linear_backscatter(src)
    output = tmp_path / "s2.tif"
    with pytest.warns(UserWarning, match=rf"{linear}: .*linear"):
        assert main(["--checkpoint", str(run_dir), str(linear), str(output), "--quiet"]) == 0
    assert output.exists()
