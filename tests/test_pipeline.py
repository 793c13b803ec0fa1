"""The pipelined `predict` (threads for reading and writing, batched forwards) against a plain loop, and
`regproxy benchmark`."""

import json
import statistics
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from regproxy_cli.cli.app import app, main
from regproxy_cli.engine import runner
from regproxy_cli.errors import RegproxyError
from regproxy_cli.hub import zoo
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.images import load_image, save_label_png, save_png_atomic
from regproxy_cli.inference import pipeline
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.viz import overlay, predict_regions


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 256], -1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def inputs(tmp_path):
    """Eight inputs in the order given: three of one size in a row, a corrupt file, a missing one, a stem twice."""
    folder = tmp_path / "in"
    (folder / "other").mkdir(parents=True)
    Image.fromarray(_photo(40, 56, 1)).save(folder / "a.png")
    Image.fromarray(_photo(40, 56, 2)).save(folder / "b.jpg", quality=90)
    Image.fromarray(_photo(40, 56, 3)).convert("L").save(folder / "c.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(_photo(33, 47, 4)).save(folder / "d.png")
    Image.fromarray(_photo(40, 56, 5)).save(folder / "other" / "a.png")
    Image.fromarray(_photo(40, 56, 6)).convert("RGBA").save(folder / "e.png")
    Image.fromarray(_photo(64, 64, 7)).save(folder / "f.png")
    names = ["a.png", "b.jpg", "c.png", "corrupt.png", "d.png", "missing.png", "other/a.png", "e.png", "f.png"]
    return [folder / name for name in names]


def _plain_loop(model, paths, out_dir, *, regions):
    """The reference: load, predict, save, one image after the other, as predict did before the pipeline."""
    out_dir.mkdir()
    palette = np.array(model.config.palette, dtype=np.uint8)
    stems = Counter(p.stem for p in paths)
    written, failed, pixels, images = [], [], Counter(), Counter()
    for path in paths:
        try:
            image = load_image(path)
        except RegproxyError as exc:
            failed.append(str(exc))
            continue
        labels = predict_labels(model, image)
        stem = path.stem if stems[path.stem] == 1 else f"{path.parent.name}_{path.stem}"
        save_label_png(out_dir / f"{stem}.png", labels, palette)
        save_png_atomic(out_dir / f"{stem}_overlay.png", overlay(image, labels, palette))
        if regions:
            save_png_atomic(out_dir / f"{stem}_regions.png", predict_regions(model, image))
        written.append(out_dir / f"{stem}.png")
        for class_id in range(model.config.num_classes):
            count = int((labels == class_id).sum())
            if count:
                pixels[class_id] += count
                images[class_id] += 1
    return written, failed, pixels, images


@pytest.mark.parametrize("workers, batch", [(0, 1), (2, 1), (2, 3), (1, 2)])
def test_pipelined_outputs_and_report_equal_a_plain_loop(model, inputs, tmp_path, monkeypatch, workers, batch):
    written, failed, pixels, images = _plain_loop(model, inputs, tmp_path / "reference", regions=True)
    groups = []
    batched = pipeline.predict_label_batch

    def recording(model, images, **options):
        groups.append(len(images))
        return batched(model, images, **options)

    # batch on the CPU too (the network still runs image by image there, so the labels must not change)
    monkeypatch.setattr(runner, "forward_batch", lambda model, batch: batch)
    monkeypatch.setattr(runner, "predict_label_batch", recording)
    ticks = []
    out = tmp_path / "out"
    report = runner.predict_files(model, inputs, out, regions=True, progress=lambda: ticks.append(1),
                                       batch=batch, workers=workers)
    assert len(ticks) == len(inputs)
    reference = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert sorted(p.name for p in out.iterdir()) == reference and len(reference) == 7 * 3
    for name in reference:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert [p.name for p in report.written] == [p.name for p in written]
    assert report.failed == failed and len(failed) == 2
    assert "corrupt.png" in failed[0] and "missing.png" in failed[1]
    assert report.pixels == pixels and report.images == images
    # consecutive same-size images share a forward; the failures and size changes break the groups
    expected = {1: [1] * 7, 2: [2, 1, 1, 2, 1], 3: [3, 1, 2, 1]}[batch]
    assert groups == expected


def test_cpu_runs_the_network_image_by_image(model):
    assert pipeline.forward_batch(model, 8) == 1
    with pytest.raises(RegproxyError, match="batch must be at least 1"):
        pipeline.forward_batch(model, 0)


@pytest.mark.parametrize("options", [{}, {"scale": 0.75}, {"mode": "slide"}, {"mode": "slide", "scale": 1.5},
                                     {"tta": True}])
def test_a_batch_gives_the_labels_of_single_images(model, options):
    images = [_photo(48, 80, seed) for seed in range(3)]
    labels = pipeline.predict_label_batch(model, images, **options)
    for image, got in zip(images, labels):
        assert np.array_equal(got, predict_labels(model, image, **options))


def test_bad_input_fails_alone_and_order_is_kept():
    """A failing group is retried item by item; load, infer and write errors each fail only their item."""
    def load(item):
        if item == "unreadable":
            raise RegproxyError("unreadable: cannot read")
        return np.full((3, 3) if item == "big" else (2, 2), float(item == "poison"))

    def infer(group):
        if any(float(x.sum()) for x in group):
            raise RegproxyError("poisoned")
        return [x.shape for x in group]

    def write(item, loaded, result):
        if item == "full-disk":
            raise RegproxyError("full-disk: cannot write")
        return item, result

    items = ["p", "q", "unreadable", "r", "big", "s", "full-disk", "t", "poison"]
    got = list(pipeline.run_pipeline(items, load, infer, write, batch=4, workers=2))
    assert [item for item, _, _ in got] == items
    errors = {item: error for item, _, error in got if error}
    assert errors == {"unreadable": "unreadable: cannot read", "full-disk": "full-disk: cannot write",
                      "poison": "poisoned"}
    assert [done for item, done, _ in got if item == "big"] == [("big", (3, 3))]


@pytest.mark.parametrize("batch", [1, 3])
def test_what_is_in_flight_is_bounded(batch):
    lock = threading.Lock()
    state = {"loaded": 0, "max_loaded": 0, "writing": 0, "max_writing": 0}

    def load(item):
        with lock:
            state["loaded"] += 1
            state["max_loaded"] = max(state["max_loaded"], state["loaded"])
        return np.zeros((4, 4))

    def infer(group):
        with lock:
            state["loaded"] -= len(group)
            state["writing"] += len(group)
            state["max_writing"] = max(state["max_writing"], state["writing"])
        time.sleep(0.002)  # loads race ahead
        return list(range(len(group)))

    def write(item, loaded, result):
        time.sleep(0.005)  # writes fall behind
        return item

    finished = []
    for item, done, error in pipeline.run_pipeline(range(60), load, infer, write, batch=batch, workers=3, ahead=3):
        assert error is None and done == item
        finished.append(item)
        with lock:
            state["writing"] -= 1
    assert finished == list(range(60))
    assert 2 <= state["max_loaded"] <= 3 + batch  # prefetched: ``ahead`` waiting, plus the group being formed
    assert state["max_writing"] <= 3 + batch  # ``ahead`` pending, plus the group just handed over


def test_predict_files_keeps_few_decoded_images(model, inputs, tmp_path, monkeypatch):
    lock = threading.Lock()
    state = {"waiting": 0, "max": 0}
    loader = runner.load_image
    batched = runner.predict_label_batch

    def counting_load(path):
        image = loader(path)
        with lock:
            state["waiting"] += 1
            state["max"] = max(state["max"], state["waiting"])
        return image

    def slow_batch(model, images, **options):
        with lock:
            state["waiting"] -= len(images)
        time.sleep(0.02)
        return batched(model, images, **options)

    monkeypatch.setattr(runner, "load_image", counting_load)
    monkeypatch.setattr(runner, "predict_label_batch", slow_batch)
    report = runner.predict_files(model, inputs * 3, tmp_path / "out")
    assert len(report.written) == 21 and len(report.failed) == 6
    assert 2 <= state["max"] <= pipeline.AHEAD + 1


def _run(argv, capsys):
    """`regproxy ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("size, batch, shape", [("64", 1, (64, 64)), ("32x48", 2, (32, 48))])
def test_benchmark_json_is_consistent(model_dir, monkeypatch, capsys, size, batch, shape):
    calls = []

    def counting_load(spec):
        loaded = load_model(spec)
        labels = loaded.labels
        loaded.labels = lambda x: calls.append(tuple(x.shape)) or labels(x)
        return loaded

    monkeypatch.setattr(zoo, "load_model", counting_load)
    code, out, err = _run(["benchmark", "--model", str(model_dir), "--size", size, "--batch", str(batch),
                           "--iters", "3", "--warmup", "1", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert calls == [(batch, 3, *shape)] * 4  # 1 warm-up + 3 timed calls of the whole batch
    assert r["size"] == list(shape) and r["batch"] == batch and r["iters"] == 3 and r["warmup"] == 1
    assert len(r["times_ms"]) == 3 and r["total_s"] == pytest.approx(sum(r["times_ms"]) / 1000)
    assert r["images_per_s"] == pytest.approx(3 * batch / r["total_s"])
    per_image = [t / batch for t in r["times_ms"]]
    assert r["ms_per_image_median"] == pytest.approx(statistics.median(per_image))
    assert r["ms_per_image_min"] == pytest.approx(min(per_image)) and r["ms_per_image_max"] == pytest.approx(
        max(per_image))
    assert r["device"] == "cpu" and r["device_name"] and r["torch_version"] == torch.__version__
    assert r["max_memory_allocated"] is None and r["precision"] == "fp32" and r["backbone"] == "tiny-vit"
    assert r["attention"] == "sdpa"  # fp32: timm's choice


def test_benchmark_table(model_dir):
    result = CliRunner().invoke(app, ["benchmark", "-m", str(model_dir), "--size", "32", "--iters", "2",
                                      "--warmup", "0"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output and "32x32" in result.output and torch.__version__ in result.output


@pytest.mark.parametrize("args, message", [
    (["benchmark", "--size", "0"], "error: --size '0' must have positive sides"),
    (["benchmark", "--size", "64x"], "error: --size '64x' must be N or HEIGHTxWIDTH"),
    (["benchmark", "--size", "2x3x4"], "error: --size '2x3x4' must be N or HEIGHTxWIDTH"),
    (["benchmark", "--batch", "0"], "error: --batch must be at least 1, got 0"),
    (["benchmark", "--iters", "0"], "error: --iters must be at least 1, got 0"),
    (["benchmark", "--warmup", "-1"], "error: --warmup must be at least 0, got -1"),
    (["predict", "x.png", "--batch", "0"], "error: --batch must be at least 1, got 0"),
])
def test_bad_sizes_and_batches_are_one_line(model_dir, capsys, args, message):
    code, out, err = _run([*args, "--model", str(model_dir)], capsys)
    assert code == 1 and err.startswith(message), err
    assert len(err.strip().splitlines()) == 1 and out == ""
