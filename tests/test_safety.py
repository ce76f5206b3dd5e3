"""What terraplug trusts and what it does not (docs/safety.md): checkpoints never run code,
only GeoTIFFs are read, temporary files never follow planted links, predict never
destroys its input or leaves a partial file, a diverged model is never saved or used, and
a stopped run, a full disk or a killed process each say what happened."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio._env import get_gdal_config
from rasterio.env import getenv
from rasterio.windows import Window

import plugins
from core.data.geotiff import geotiff_profile, open_geotiff, read_dem, write_dem, write_geotiff
from core.errors import DataError, StorageError
from core.hookspecs import hookimpl
from core.plugins import Plugin
from core.predict import main as predict_main
from core.run import main as run_main
from core.run_folder import CHECKPOINT
from core.safe_io import (
    atomic_write,
    load_checkpoint,
    nonfinite_tensors,
    save_tensors,
    storage_error,
)
from core.tasks import get_task
from core.tasks.dem_sr.predict import Predictor
from core.tasks.sar2opt.data import TERRAMIND_V1, PairDataset
from tests.conftest import FAST, read_metrics
from tests.test_sar2opt_data import write_good_pairs, write_sar

REPO = Path(__file__).resolve().parent.parent
UTM = "EPSG:32613"
UTM_TRANSFORM = Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 4_400_000.0)
KILL_ENV = "TERRAPLUG_TEST_SIGKILL_AT_EPOCH"


def fast_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["--data", str(data), "--out", str(out), "--epochs", "1", *extra]
    for assignment in FAST:
        args += ["--set", assignment]
    return args


@pytest.fixture(scope="module")
def run_dir(procedural_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder: one fast epoch on procedural tiles."""
    out = tmp_path_factory.mktemp("safety") / "run"
    assert run_main(fast_args(procedural_dir, out)) == 0
    return out


def copy_run(run: Path, to: Path, checkpoint: Path | None = None) -> Path:
    """A run folder with ``run``'s config and ``checkpoint`` (default: ``run``'s own)."""
    to.mkdir()
    (to / "config.toml").write_text((run / "config.toml").read_text())
    (to / CHECKPOINT).write_bytes((checkpoint or run / CHECKPOINT).read_bytes())
    return to


def hills(shape: tuple[int, int]) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return 1500 + 300 * np.sin(x / 9) * np.cos(y / 13) + 50 * np.sin(x / 3.1 + y / 2.3)


def dem(path: Path, shape: tuple[int, int] = (40, 40)) -> Path:
    return write_dem(path, hills(shape), UTM_TRANSFORM, UTM)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def python(*args: str, **kwargs) -> subprocess.Popen:
    """A real interpreter running this checkout, as a user would start it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


# --- 1. checkpoints never run code -------------------------------------------------------------


class Payload:
    """Unpickled, it creates ``marker``: any code would run the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def crafted_zip(path: Path, marker: Path) -> None:
    torch.save({"model": Payload(marker), "epoch": 1}, path)


def crafted_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model": Payload(marker), "epoch": 1}, protocol=2))


@pytest.mark.parametrize("craft", [crafted_zip, crafted_pickle])
@pytest.mark.parametrize("command", ["predict", "resume"])
def test_a_crafted_checkpoint_is_refused_and_never_runs(run_dir, tmp_path, capsys, craft, command):
    crafted = copy_run(run_dir, tmp_path / "crafted")
    marker = tmp_path / "payload-ran"
    craft(crafted / CHECKPOINT, marker)
    if command == "predict":
        src = dem(tmp_path / "in.tif")
        status = predict_main(["--checkpoint", str(crafted), str(src), str(tmp_path / "o.tif")])
    else:
        status = run_main(["--resume", str(crafted)])
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's payload ran"
    assert status == 2
    assert f"{crafted / CHECKPOINT}: refused" in err and "GLOBAL io.open" in err


def test_a_checkpoint_holds_only_tensors_and_plain_values(run_dir: Path) -> None:
    state = load_checkpoint(run_dir / CHECKPOINT)  # the weights-only unpickler accepts it
    assert state["epoch"] == 1 and not nonfinite_tensors(state["model"])
    assert load_checkpoint(str(run_dir / CHECKPOINT))["epoch"] == 1  # a path as text too


# --- 2. only GeoTIFFs are read -------------------------------------------------------------------


def vrt(path: Path, source: str) -> Path:
    """A GDAL VRT (XML) named ``path``, reading its pixels from ``source``."""
    path.write_text(
        '<VRTDataset rasterXSize="40" rasterYSize="40"><SRS>EPSG:32613</SRS>'
        "<GeoTransform>500000, 30, 0, 4400000, 0, -30</GeoTransform>"
        '<VRTRasterBand dataType="Float32" band="1"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{source}</SourceFilename>'
        "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>"
    )
    return path


def other_format(driver: str) -> Callable[[Path], Path]:
    """A georeferenced single-band raster of ``driver``'s format, named ``path``."""

    def write(path: Path) -> Path:
        profile = {"width": 40, "height": 40, "count": 1, "dtype": "uint8"}
        with rasterio.open(
            path, "w", driver=driver, crs=UTM, transform=UTM_TRANSFORM, **profile
        ) as ds:
            ds.write(np.full((1, 40, 40), 100, dtype=np.uint8))
        return path

    return write


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A GeoTIFF outside every folder the commands are given."""
    return dem(tmp_path / "elsewhere" / "secret.tif")


DISGUISES: dict[str, Callable[[Path, Path], Path]] = {
    "VRT reading a file outside the folder": lambda path, secret: vrt(path, str(secret)),
    "JPEG": lambda path, _: other_format("JPEG")(path),
    "PNG": lambda path, _: other_format("PNG")(path),
}
REFUSED = "not a readable GeoTIFF"


@pytest.mark.parametrize("kind", DISGUISES)
def test_another_format_named_tif_is_refused_naming_it(
    kind, run_dir, tmp_path, outside, capsys
) -> None:
    with rasterio.open(DISGUISES[kind](tmp_path / "probe.tif", outside)) as ds:
        assert ds.read(1).size, "GDAL itself reads the disguised file, or this proves nothing"

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    bad_tile = DISGUISES[kind](tiles / "alps_0.tif", outside)
    assert run_main(fast_args(tiles, tmp_path / "run", "--strict-data")) == 2
    assert f"{bad_tile}: {REFUSED}" in capsys.readouterr().err

    bad_input = DISGUISES[kind](tmp_path / "in.tif", outside)
    args = ["--checkpoint", str(run_dir), str(bad_input), str(tmp_path / "o.tif")]
    assert predict_main(args) == 2
    assert f"{bad_input}: {REFUSED}" in capsys.readouterr().err

    pairs = tmp_path / "pairs"
    write_good_pairs(pairs)
    write_sar(pairs, "bad")
    bad_optical = DISGUISES[kind](pairs / "S2L2A" / "bad.tif", outside)
    with pytest.raises(DataError, match=re.escape(f"{bad_optical}: {REFUSED}")):
        PairDataset.from_folder(pairs, TERRAMIND_V1, size=32, strict=True)


class CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_error(404)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 and the list of paths it was asked for."""
    CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", CountingHandler.requests
    server.shutdown()
    server.server_close()


def test_a_vrt_pointing_at_a_url_makes_no_request(tmp_path, local_server, capsys) -> None:
    url, requests = local_server
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    remote = vrt(tiles / "alps_0.tif", f"/vsicurl/{url}/dem.tif")
    with pytest.raises(DataError, match=REFUSED):
        read_dem(remote)
    assert run_main(fast_args(tiles, tmp_path / "run", "--strict-data")) == 2
    assert str(remote) in capsys.readouterr().err
    assert requests == []


def test_sidecar_files_are_not_followed(tmp_path: Path, outside: Path) -> None:
    """GDAL takes overviews from ``NAME.ovr`` even with the GeoTIFF driver; a VRT planted
    there would feed a decimated read (predict's terrain guess) from any file."""
    real = dem(tmp_path / "dem.tif", (64, 64))
    vrt(tmp_path / "dem.tif.ovr", str(outside)).write_text(
        (tmp_path / "dem.tif.ovr").read_text().replace('"40"', '"32"')
    )
    with rasterio.open(real, driver="GTiff") as ds:
        assert ds.overviews(1) == [2], "GDAL itself follows the sidecar, or this proves nothing"
    alone = tmp_path / "alone" / "dem.tif"  # the same file without the sidecar
    alone.parent.mkdir()
    alone.write_bytes(real.read_bytes())
    decimated = []
    for path in (real, alone):
        with open_geotiff(path) as ds:
            assert ds.overviews(1) == []
            decimated.append(ds.read(1, out_shape=(32, 32)))
    assert np.array_equal(*decimated)


# --- 3. temporary files never follow planted links ---------------------------------------------


def plant(link: Path, target: Path) -> None:
    link.symlink_to(target)


def test_atomic_writes_never_write_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "state.pt"
    plant(tmp_path / "state.pt.tmp", victim)  # the names earlier versions used
    plant(tmp_path / "state.pt.partial", victim)
    plant(path, victim)  # the target itself: replaced, not written through
    save_tensors(path, {"w": torch.ones(3)})
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    (tmp_path / "plain").write_text("")  # permissions as a plain open() gives them
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["victim", "state.pt", "state.pt.tmp", "state.pt.partial"]
    )


def test_training_and_predict_never_write_through_planted_links(
    procedural_dir, run_dir, tmp_path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    plant(out / f"{CHECKPOINT}.tmp", victim)
    assert run_main(fast_args(procedural_dir, out)) == 0
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1

    src = dem(tmp_path / "in.tif")
    dst = tmp_path / "out.tif"
    plant(tmp_path / "out.tif.partial", victim)
    assert predict_main(["--checkpoint", str(run_dir), str(src), str(dst), "--quiet"]) == 0
    assert victim.read_text() == "precious"
    with rasterio.open(dst) as ds:
        assert ds.shape == (120, 120)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary left"


@pytest.mark.parametrize(
    "link", [plant, lambda path, target: os.link(target, path)], ids=["symlink", "hard link"]
)
def test_a_link_planted_at_the_run_lock_is_refused_never_written_through(
    procedural_dir, tmp_path, capsys, link
) -> None:
    """The lock file stays put for the run's life, so it cannot be renamed into place like a
    checkpoint: it is opened without following a symlink, and one with other names (a hard
    link) is refused too."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    link(out / "run.lock", victim)
    assert run_main(fast_args(procedural_dir, out)) == 2
    assert f"{out / 'run.lock'}: " in capsys.readouterr().err
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


# --- 4. predict's output: checked first, never the input, no partial file ----------------------


def test_predict_refuses_its_input_as_output_by_any_name(run_dir, tmp_path, capsys) -> None:
    src = dem(tmp_path / "in.tif")
    before = digest(src)
    (tmp_path / "link.tif").symlink_to(src)
    os.link(src, tmp_path / "hard.tif")
    for output in (src, tmp_path / "link.tif", tmp_path / "hard.tif"):
        args = ["--checkpoint", str(run_dir), str(src), str(output), "--overwrite"]
        assert predict_main(args) == 2
        assert f"{output}: is the input {src}" in capsys.readouterr().err
    assert digest(src) == before


def test_predict_replaces_an_existing_output_only_with_overwrite(run_dir, tmp_path, capsys):
    src, dst = dem(tmp_path / "in.tif"), tmp_path / "out.tif"
    dst.write_text("an earlier result")
    args = ["--checkpoint", str(run_dir), str(src), str(dst), "--quiet"]
    assert predict_main(args) == 2
    assert f"{dst}: exists; pass --overwrite" in capsys.readouterr().err
    assert dst.read_text() == "an earlier result"
    assert predict_main([*args, "--overwrite"]) == 0
    with rasterio.open(dst) as ds:
        assert ds.shape == (120, 120)


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        ("folder", "is a folder"),
        ("missing/out.tif", "folder {tmp}/missing does not exist"),
        ("/sys/out.tif", "cannot create a file in /sys"),  # sysfs refuses even root
    ],
)
def test_predict_checks_the_output_before_anything_else(tmp_path, capsys, output, problem):
    (tmp_path / "folder").mkdir()
    output = tmp_path / output
    # no such run and no such input: only the output is looked at
    assert predict_main(["--checkpoint", "/no/such/run", "/no/such.tif", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{output}: {problem.format(tmp=tmp_path)}" in err
    assert "/no/such" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_predict_without_a_partial_file(run_dir, tmp_path, sig) -> None:
    src = dem(tmp_path / "in.tif", (1500, 1500))
    dst = tmp_path / "out.tif"
    process = python(
        "-m", "core.predict", "--checkpoint", str(run_dir), str(src), str(dst), "--quiet"
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tif.*.partial")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    time.sleep(0.5)  # well into the windows
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"{sig.name}: stopped; {dst} was not written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_gdal_cache_is_set_for_the_run_and_restored(run_dir, tmp_path, monkeypatch, capsys):
    default = get_gdal_config("GDAL_CACHEMAX")
    seen: list[int] = []
    original = Predictor.predict_windows

    def spy(self: Predictor, windows: list[np.ndarray]) -> list[np.ndarray]:
        seen.append(getenv()["GDAL_CACHEMAX"])
        return original(self, windows)

    monkeypatch.setattr(Predictor, "predict_windows", spy)
    src = dem(tmp_path / "in.tif")
    for option, megabytes in (([], 64), (["--gdal-cache", "16"], 16)):
        args = ["--checkpoint", str(run_dir), str(src), str(tmp_path / f"{megabytes}.tif")]
        assert predict_main([*args, *option]) == 0
        assert set(seen) == {megabytes * 2**20}
        seen.clear()
    assert get_gdal_config("GDAL_CACHEMAX") == default  # GDAL's own again
    assert predict_main([*args[:-1], str(tmp_path / "0.tif"), "--gdal-cache", "0"]) == 2
    assert "--gdal-cache 0" in capsys.readouterr().err


# --- 8. a diverged model is never saved nor used ---------------------------------------------


class Diverge(Plugin):
    """Test probe: the weights turn NaN at the start of epoch 2, as after a blow-up."""

    name = "diverge"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        if epoch == 2:
            with torch.no_grad():
                next(ctx.model.parameters()).fill_(float("nan"))


def test_nonfinite_weights_are_never_checkpointed(procedural_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "diverge", f"{__name__}:Diverge")
    out = tmp_path / "run"
    args = ["--plugins", "diverge", "--epochs", "2", "--set", "train.max_nonfinite_steps=1000"]
    assert run_main(fast_args(procedural_dir, out, *args)) == 1
    err = capsys.readouterr().err
    assert "epoch 2:" in err and "hold NaN or inf" in err and "not saved" in err
    state = load_checkpoint(out / CHECKPOINT)
    assert state["epoch"] == 1 and not nonfinite_tensors(state["model"])
    assert [row["epoch"] for row in read_metrics(out)] == [1]


def test_predict_refuses_a_checkpoint_with_nonfinite_weights(run_dir, tmp_path, capsys) -> None:
    state = load_checkpoint(run_dir / CHECKPOINT)
    name = next(iter(state["model"]))
    state["model"][name].view(-1)[0] = float("inf")
    save_tensors(tmp_path / "diverged.pt", state)
    diverged = copy_run(run_dir, tmp_path / "diverged", tmp_path / "diverged.pt")
    src = dem(tmp_path / "in.tif")
    assert predict_main(["--checkpoint", str(diverged), str(src), str(tmp_path / "o.tif")]) == 2
    err = capsys.readouterr().err
    assert f"{diverged / CHECKPOINT}: 1 of" in err and name in err and "diverged" in err
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("task", ["dem_sr", "sar2opt"])
def test_the_epoch_line_prints_missing_and_nonfinite_metrics(task: str) -> None:
    keys = ("train_loss", "val_loss", "val_rmse_m", "val_l1", "val_psnr", "val_ssim")
    row = {key: None for key in keys} | {"val_loss": float("nan"), "val_rmse_m_by_terrain": {}}
    assert "n/a" in get_task(task).epoch_summary(row)


# --- 12. a run killed before its first checkpoint --------------------------------------------


class KillSelf(Plugin):
    """Test probe: SIGKILL to its own process at the start of the epoch named by an
    environment variable, as the OOM killer would."""

    name = "kill_self"

    @hookimpl
    def on_epoch_start(self, epoch, ctx):
        if os.environ.get(KILL_ENV) == str(epoch):
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("killed_at", [1, 2])
def test_resume_before_the_first_checkpoint_says_what_to_run(
    procedural_dir, tmp_path, monkeypatch, capsys, killed_at
) -> None:
    out = tmp_path / "run"
    target = f"{__name__}:KillSelf"
    script = (
        "import runpy, plugins; "
        f"plugins.BUILTIN_PLUGINS['kill_self'] = {target!r}; "
        "runpy.run_module('core.run', run_name='__main__', alter_sys=True)"
    )
    args = fast_args(procedural_dir, out, "--plugins", "kill_self", "--epochs", "3",
                     "--set", "train.checkpoint_every=3")  # fmt: skip
    process = python("-c", script, *args, env={KILL_ENV: str(killed_at)})
    _, err = process.communicate(timeout=240)
    assert process.returncode == -signal.SIGKILL, err
    assert (out / "config.toml").is_file() and not (out / CHECKPOINT).exists()

    monkeypatch.setitem(plugins.BUILTIN_PLUGINS, "kill_self", target)
    assert run_main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.toml is there but checkpoint.pt is not" in err
    suggested = re.search(r"python -m core\.run (--config \S+ --out \S+)", err)
    assert suggested, err
    assert run_main(suggested.group(1).split()) == 0
    restarted = Path(suggested.group(1).split()[-1])
    assert [row["epoch"] for row in read_metrics(restarted)] == [1, 2, 3]


# --- 13. a full disk -------------------------------------------------------------------------


def limit_file_size(limit: int) -> None:
    """Files this process writes stop at ``limit`` bytes (``ulimit -f``): a write past it fails
    with EFBIG, as one on a full disk fails with ENOSPC (Python ignores SIGXFSZ, which would
    kill the process instead). Only the soft limit, so the hard one can restore it."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(
    procedural_dir: Path, tmp_path: Path
) -> None:
    """A real refused write: the resumed run's file-size limit (``ulimit -f``) is half the
    first checkpoint, so saving the second one fails with EFBIG, as a full disk fails with
    ENOSPC."""
    out = tmp_path / "run"
    assert run_main(fast_args(procedural_dir, out)) == 0
    checkpoint = out / CHECKPOINT
    before, limit = digest(checkpoint), checkpoint.stat().st_size // 2
    process = python("-m", "core.run", "--resume", str(out), "--epochs", "2",
                     preexec_fn=partial(limit_file_size, limit))  # fmt: skip
    _, err = process.communicate(timeout=240)
    assert process.returncode == 1, err
    assert "file size limit (ulimit -f, or the file system's) exceeded on " in err
    assert f"writing {checkpoint} (left as it was)" in err and "Traceback" not in err
    assert digest(checkpoint) == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary left"
    assert [row["epoch"] for row in read_metrics(out)] == [1]


def test_predict_on_a_full_disk_is_named_and_keeps_the_previous_output(run_dir, tmp_path) -> None:
    """Predict under a file-size limit half its output's size. GDAL reports the refused write
    only to its error handler, so predict reads the file back before the rename: exit 1
    naming the output, no file renamed into place, and the output ``--overwrite`` was to
    replace stays byte for byte."""
    src, earlier = dem(tmp_path / "in.tif", (200, 200)), tmp_path / "earlier.tif"
    assert predict_main(["--checkpoint", str(run_dir), str(src), str(earlier), "--quiet"]) == 0
    before, limit = digest(earlier), earlier.stat().st_size // 2
    for dst, extra in ((tmp_path / "out.tif", []), (earlier, ["--overwrite"])):
        args = ["--checkpoint", str(run_dir), str(src), str(dst), "--quiet", *extra]
        process = python("-m", "core.predict", *args, preexec_fn=partial(limit_file_size, limit))
        _, err = process.communicate(timeout=240)
        assert process.returncode == 1, err
        assert "file size limit (ulimit -f, or the file system's) exceeded on " in err
        assert f"writing {dst} (left as it was)" in err and "Traceback" not in err
    assert digest(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.tif", "in.tif"]


def test_the_geotiff_writer_reads_its_file_back_before_replacing_the_output(tmp_path) -> None:
    """The writer of both predict tools, with sar2opt's output (12 bands of uint16): under a
    real file-size limit, and with a block never written, the earlier output stays and no
    temporary file is left."""
    path = tmp_path / "s2.tif"
    data = np.random.default_rng(0).integers(1, 10_000, (12, 300, 300), dtype=np.uint16)
    profile = geotiff_profile(300, 300, 12, "uint16", UTM, UTM_TRANSFORM, 0)
    with write_geotiff(path, profile) as dst:
        dst.write(data)
    before, limits = digest(path), resource.getrlimit(resource.RLIMIT_FSIZE)
    refused = rf"file size limit .* exceeded on .*, writing {path} \(left as it was\)"
    limit_file_size(path.stat().st_size // 2)
    try:
        with pytest.raises(StorageError, match=refused), write_geotiff(path, profile) as dst:
            dst.write(data[::-1])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    sparse = {**profile, "sparse_ok": True}  # GDAL leaves a block it was never given empty
    unfinished = rf"writing {path} failed: .*block"
    with pytest.raises(StorageError, match=unfinished), write_geotiff(path, sparse) as dst:
        dst.write(data[:, :100], window=Window(0, 0, 300, 100))
    assert digest(path) == before and [p.name for p in tmp_path.iterdir()] == ["s2.tif"]


def test_no_space_left_is_named_with_the_device(tmp_path: Path) -> None:
    """ENOSPC for real from /dev/full, through torch's zip writer."""
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(Exception) as info:
        torch.save({"w": torch.ones(100_000)}, full)
    error = storage_error(info.value, tmp_path / CHECKPOINT)
    assert isinstance(error, StorageError)
    assert re.fullmatch(
        rf"no space left on \S+ \(mounted at /\S*\), writing {re.escape(str(tmp_path))}/"
        rf"{CHECKPOINT} \(left as it was\)",
        str(error),
    )
    assert storage_error(RuntimeError("unexpected pos 2083520 vs 2083412"), tmp_path) is None
    assert storage_error(OSError(errno.EACCES, "denied"), tmp_path) is None


def test_a_failed_write_leaves_the_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "kept.bin"
    path.write_bytes(b"previous")

    def fail(handle) -> None:
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match=f"no space left on .*, writing {path}"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["kept.bin"]
