"""`regproxy predict --engine ray`: a local Ray cluster started in this process (2 CPUs, loopback only) gives
exactly plain predict's files; a killed job resumes to exactly the missing outputs; a corrupt image is one row of
failures.jsonl (the kill test is `slow`: CI runs it with the slow tests). Skipped only when the `ray` extra is not
installed; every Ray test has a hard time limit, so a hang fails the test instead of the run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regproxy_cli import RegproxyError
from regproxy_cli.engine import scale
from regproxy_cli.engine.outputs import expand_inputs, output_names
from regproxy_cli.engine.runner import predict_files

LIMIT_S = 240  # per Ray test: a few actors' start-up on 2 shared cores, with room


@pytest.fixture
def time_limit():
    """Fail the test (not the run) when it takes more than LIMIT_S: SIGALRM raises in the main thread."""

    def expired(signum, frame):
        raise TimeoutError(f"a Ray test ran over {LIMIT_S} s (a hang: e.g. actors holding every CPU)")

    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray in this process: 2 CPUs, no dashboard; shut down after the module."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


def _images(folder: Path, count: int = 12, sizes=((48, 64), (64, 48), (40, 56)), bad: bool = True) -> Path:
    """``count`` generated photos of mixed sizes, two sharing a stem in a subfolder, and a corrupt JPEG."""
    rng = np.random.default_rng(0)
    (folder / "more").mkdir(parents=True)
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 256], -1)
        picture = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
        target = folder / "more" / "img0.png" if index == count - 1 else folder / f"img{index}.png"
        Image.fromarray(picture).save(target)
    if bad:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _files(folder: Path, skip=(scale.FAILURES_FILE,)) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}


def test_resources_leave_reading_a_cpu():
    """2 actors on 2 CPUs ask half a CPU each (1 each hangs map_batches: the read tasks never get one)."""
    assert scale.plan_resources(2, 0, 2, 0) == (2, 0.75, 0.5)
    assert scale.plan_resources(2, 0, 1, 0) == (1, 1.0, 0.5)
    assert scale.plan_resources(2, 0, None, 0) == (1, 1.0, 0.5)
    assert scale.plan_resources(16, 0, None, 0) == (15, 1.0, 0.5)
    assert scale.plan_resources(1, 0, 1, 0) == (1, 0.5, 0.5)
    assert scale.plan_resources(16, 4, None, 1) == (4, 1.0, 0.5)
    assert scale.plan_resources(16, 2, None, 0.5) == (4, 1.0, 0.5)
    with pytest.raises(RegproxyError, match="too few"):
        scale.plan_resources(2, 0, 100, 0)
    with pytest.raises(RegproxyError, match="GPUs"):
        scale.plan_resources(8, 1, 2, 1)


def test_read_tasks_decode_without_importing_torch():
    """Ray's read tasks import this module for decode_row: torch there cost each read process seconds of CPU, on
    the cores where the actors import it. A fresh interpreter imports the module and decodes an image, torch-free."""
    code = ("import io, sys; import numpy as np; from PIL import Image; from regproxy_cli.engine import scale\n"
            "buffer = io.BytesIO(); Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buffer, 'PNG')\n"
            "row = scale.decode_row({'path': 'a.png', 'bytes': buffer.getvalue()})\n"
            "assert row['image'].shape == (4, 6, 3) and not row['error'], row\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_driver_plans_a_linear_model_without_torch(model_dir):
    """The driver reads classes and label levels off config.json (a linear classifier has none), so it starts Ray
    without importing torch while the actors import it; a fresh interpreter checks."""
    code = ("import sys; from regproxy_cli.engine import scale\n"
            "print(scale.describe_model(sys.argv[1]))\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True)
    classes = json.loads((model_dir / "config.json").read_text())["classes"]
    assert done.stdout.splitlines() == [repr((classes, ())), "[]"]


def test_the_driver_asks_another_classifier_for_its_levels(tmp_path):
    """An HSSN model's category level names its files: only its classifier module knows the level, so the driver
    loads that model (and the names match plain predict's)."""
    from regproxy_cli import build_model, save_pretrained
    from regproxy_cli.plugins.hssn import resolve_options

    classes = ["sky", "road", "car"]
    options = resolve_options({"hierarchy": {"stuff": ["sky", "road"], "thing": ["car"]}}, classes)
    model = build_model("tiny-vit", 3, classifier="hssn", classifier_options=options)
    model.config.classes = classes
    save_pretrained(model, tmp_path / "hssn")
    assert scale.describe_model(str(tmp_path / "hssn")) == (classes, ("category",))


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RegproxyError, match=r"pip install 'regproxy\[ray\]'"):
        scale.import_ray()


def test_ray_equals_predict_and_the_corrupt_file_is_a_row(tmp_path, model, model_dir, ray_cluster, time_limit):
    folder = _images(tmp_path / "in")
    paths, _ = expand_inputs([str(folder)])
    plain = predict_files(model, paths, tmp_path / "plain")
    assert len(plain.failed) == 1
    report = scale.predict_ray([str(folder)], str(model_dir), tmp_path / "ray", workers=2)
    assert (report.written, report.skipped, report.workers) == (12, 0, 2)
    expected = _files(tmp_path / "plain")
    assert "in_img0.png" in expected and "more_img0.png" in expected  # names from the whole list
    assert _files(tmp_path / "ray") == expected  # pixel for pixel, and byte for byte
    rows = [json.loads(line) for line in (tmp_path / "ray" / scale.FAILURES_FILE).read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(folder / "broken.jpg")]
    assert report.pixels == plain.pixels and report.images == plain.images


def test_relative_paths_reach_actors_in_another_working_directory(tmp_path, model, model_dir, ray_cluster,
                                                                 time_limit, monkeypatch):
    """--model, --out and the inputs as relative paths, from a folder that is not the cluster's working directory:
    the actors must load that model and write into that --out (they once wrote into their own directory)."""
    _images(tmp_path / "in", count=3, bad=False)
    shutil.copytree(model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    report = scale.predict_ray(["in"], "model", Path("ray"), workers=1)
    assert report.written == 3 and not report.failed
    paths, _ = expand_inputs(["in"])
    predict_files(model, paths, tmp_path / "plain")
    assert _files(tmp_path / "ray") == _files(tmp_path / "plain")


def test_a_model_that_fails_in_the_actors_is_one_plain_line(tmp_path, model_dir, ray_cluster, time_limit):
    """The driver reads only config.json; corrupt weights fail in the actors, and the error is theirs, one line,
    not Ray's remote traceback."""
    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    folder = _images(tmp_path / "in", count=2, bad=False)
    with pytest.raises(RegproxyError) as info:
        scale.predict_ray([str(folder)], str(tmp_path / "model"), tmp_path / "out", workers=1)
    message = str(info.value)
    assert message.startswith(f"the Ray job failed: {tmp_path / 'model' / 'model.safetensors'}: cannot read weights")
    assert "\n" not in message and "File " not in message and "Traceback" not in message


def test_ray_parquet_from_file_uris(tmp_path, model, model_dir, ray_cluster, time_limit):
    """file:// URIs (the fsspec path s3:// and gs:// take) into one Parquet dataset: path, label PNG bytes equal to
    predict's files, the class histogram; a rerun finds every row there and skips them all."""
    import pyarrow.parquet as pq

    folder = _images(tmp_path / "in", count=6, bad=False)
    paths, _ = expand_inputs([str(folder)])
    predict_files(model, paths, tmp_path / "plain")
    names = {str(path): name for path, name in output_names(paths).items()}
    out = tmp_path / "ray"
    report = scale.predict_ray([f"file://{folder}/*.png", f"file://{folder}/more"], str(model_dir), out,
                               workers=1, formats=["parquet"])
    assert report.written == 6 and not report.failed
    table = pq.read_table(out / scale.PARQUET_DIR).to_pylist()
    assert len(table) == 6
    for row in table:
        name = names[row["path"]]
        labels_png = (tmp_path / "plain" / f"{name}.png").read_bytes()
        assert row["labels"] == labels_png
        labels = np.asarray(Image.open(tmp_path / "plain" / f"{name}.png"))
        assert row["histogram"] == np.bincount(labels.ravel(), minlength=5).tolist()
    again = scale.predict_ray([f"file://{folder}"], str(model_dir), out, workers=1, formats=["parquet"])
    assert (again.written, again.skipped) == (0, 6)


@pytest.mark.slow  # about 100 s on 2 shared cores: two CLI runs and their actors' start-up
def test_killed_job_resumes_to_exactly_the_rest(tmp_path, model, model_dir, ray_cluster, time_limit):
    """The CLI on this cluster (--address), killed once outputs exist; the rerun writes exactly the missing ones
    and leaves the complete ones untouched; the end result is plain predict's."""
    folder = _images(tmp_path / "in", count=30, sizes=((240, 320), (200, 300)), bad=True)
    out = tmp_path / "ray"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "regproxy_cli", "predict", str(folder), "--model", str(model_dir), "--out",
               str(out), "--engine", "ray", "--address", address, "--workers", "1"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list(out.glob("*_overlay.png")) and job.poll() is None:
            time.sleep(0.02)
    finally:
        job.kill()
        job.wait(timeout=60)
    stable, before = 0, None  # the actor outlives its driver for a moment: wait until the folder stops changing
    while stable < 3:
        time.sleep(1)
        now = sorted(p.name for p in out.iterdir())
        stable, before = (stable + 1, now) if now == before else (0, now)
    complete = {p.stem[: -len("_overlay")] for p in out.glob("*_overlay.png")}
    assert 0 < len(complete) < 30, "the job was not killed half-way"
    stamps = {name: (out / f"{name}_overlay.png").stat().st_mtime_ns for name in complete}
    # -X importtime: the driver (this model's classifier is linear) reaches Ray and finishes without importing torch
    result = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], check=False, capture_output=True,
                            text=True, timeout=LIMIT_S)
    assert result.returncode == 1, result.stderr  # the corrupt file: a failure row, exit status 1
    assert not re.search(r"\|\s+torch$", result.stderr, re.MULTILINE), "the driver imported torch"
    assert f"wrote {30 - len(complete)} images" in result.stdout and f"{len(complete)} already complete" in result.stdout
    assert f"error: {folder / 'broken.jpg'}: cannot read the image" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[result.stderr.find("Traceback") - 1500:][:5000]
    assert stamps == {name: (out / f"{name}_overlay.png").stat().st_mtime_ns for name in complete}
    paths, _ = expand_inputs([str(folder)])
    predict_files(model, paths, tmp_path / "plain")
    assert _files(out) == _files(tmp_path / "plain")
    rows = (out / scale.FAILURES_FILE).read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["path"] == str(folder / "broken.jpg")


def test_ray_options_are_refused_in_one_line(tmp_path, model_dir, cli):
    image = _images(tmp_path / "in", count=1, bad=False) / "more" / "img0.png"
    for argv, message in ((["--workers", "2"], "--workers go with --engine ray"),
                          (["--format", "parquet"], "--format parquet goes with --engine ray"),
                          (["--engine", "ray", "--format", "coco"], "with --engine ray use png, labelme or parquet")):
        result = cli("predict", str(image), "--model", str(model_dir), "--out", str(tmp_path / "o"), *argv)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "o")
