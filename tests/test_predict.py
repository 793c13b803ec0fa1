"""`regproxy predict` and `model.predict` end to end on generated images of every mode and size."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import SteepPointwise
from regproxy_cli import RegproxyError
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.inference import protocol
from regproxy_cli.inference.predictor import predict_labels


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width, 1), yy * 255 // max(height, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _write_every_mode(folder):
    """One file per image mode the predictor must accept; returns {file name: expected (H, W)}."""
    folder.mkdir()
    rgb = Image.fromarray(_photo(70, 90))
    expected = {}

    def save(name, image, **kwargs):
        image.save(folder / name, **kwargs)
        expected[name] = (image.height, image.width)

    save("rgb.jpg", rgb, quality=95)
    save("gray.png", rgb.convert("L"))
    save("gray_alpha.png", rgb.convert("LA"))
    save("palette.png", rgb.convert("P", palette=Image.ADAPTIVE, colors=16))
    save("rgba.png", rgb.convert("RGBA"))
    save("bilevel.png", rgb.convert("1"))
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("deep16.png", Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).convert("I;16"))
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is 90 wide, 70 tall once upright
    rgb.save(folder / "rotated.jpg", exif=exif)
    expected["rotated.jpg"] = (90, 70)
    save("tiny.png", Image.fromarray(_photo(5, 7)))  # smaller than one 16-pixel patch
    save("large.png", Image.fromarray(_photo(300, 410)))  # many sliding windows
    return expected


def test_predict_cli_writes_every_output_for_every_image_mode(tmp_path, model_dir, cli):
    expected = _write_every_mode(tmp_path / "in")
    out = tmp_path / "out"
    result = cli("predict", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(out), "--regions",
                 env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for name, (height, width) in expected.items():
        stem = name.rsplit(".", 1)[0]
        labels = Image.open(out / f"{stem}.png")
        assert labels.mode == "P" and labels.size == (width, height), name
        assert np.asarray(labels).max() < 5
        assert Image.open(out / f"{stem}_overlay.png").size == (width, height)
        assert Image.open(out / f"{stem}_regions.png").size == (width, height)
    assert "Classes present" in result.stdout and f"wrote {len(expected)} label maps" in result.stdout
    assert any(name in result.stdout for name in ("sky", "tree", "road", "car", "person"))


def test_bad_inputs_are_reported_and_the_rest_still_run(tmp_path, model_dir, cli):
    good = tmp_path / "good.png"
    Image.fromarray(_photo(40, 50)).save(good)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "empty").mkdir()
    result = cli("predict", str(tmp_path / "missing.jpg"), str(tmp_path / "corrupt.png"), str(good),
                 str(tmp_path / "empty"), str(tmp_path / "nothing-*.jpg"), "--model", str(model_dir),
                 "--out", str(tmp_path / "out"), env={"COLUMNS": "200"})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # the rest: progress bar
    assert len(errors) == 4, result.stderr
    assert "missing.jpg" in result.stderr and "corrupt.png" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "good.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "error: unknown model 'no-such-model'"),
    (["--device", "warp-drive"], "error: --device warp-drive"),
    (["--window-batch", "0"], "error: --window-batch must be at least 1"),
    (["--precision", "fp16"], "error: fp16 needs a CUDA device; use bf16 on CPU"),
])
def test_bad_options_are_one_line(tmp_path, model_dir, cli, args, message):
    Image.fromarray(_photo(20, 20)).save(tmp_path / "a.png")
    full = ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]
    if "--model" not in args:
        full += ["--model", str(model_dir)]
    result = cli(*full, *args)
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_python_api_matches_the_forward_pass(model_dir):
    model = load_model(model_dir)
    image = _photo(64, 96)
    labels = predict_labels(model, image, mode="whole")
    # normalised by hand: RGB 0-255, ImageNet mean/std (the authors'), channels first
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    x = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1)[None]).float()
    with torch.no_grad():
        reference = model(x).argmax(1)[0].numpy()
    assert labels.shape == (64, 96) and labels.dtype.kind == "i"
    assert (labels == reference).mean() > 0.999
    # slide with windows of the crop size gives the same map where one window covers the image
    square = _photo(64, 64)
    assert (predict_labels(model, square, mode="slide") == predict_labels(model, square, mode="whole")).all()


def test_bf16_autocast_runs_the_network_in_bf16_and_agrees_with_fp32(model_dir, monkeypatch):
    model = load_model(model_dir)
    image = _photo(64, 96)
    dtypes = []
    handle = model.head.classifier.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    reference = predict_labels(model, image)
    fp32_dtypes, dtypes[:] = dtypes[:], []
    labels = predict_labels(model, image, precision="bf16")
    handle.remove()
    assert set(fp32_dtypes) == {torch.float32} and set(dtypes) == {torch.bfloat16}
    assert labels.shape == (64, 96) and labels.dtype == reference.dtype
    assert (labels == reference).mean() > 0.9  # a random tiny model has small margins; the bench measures S/16
    assert predict_labels(model, image, mode="slide", precision="bf16").shape == (64, 96)


def test_predict_cli_bf16(tmp_path, model_dir, cli):
    Image.fromarray(_photo(40, 30)).save(tmp_path / "a.png")
    result = cli("predict", str(tmp_path / "a.png"), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                 "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    assert np.asarray(Image.open(tmp_path / "o" / "a.png")).shape == (40, 30)


def test_predict_cli_compile_gives_the_eager_labels(tmp_path, model_dir, cli):
    Image.fromarray(_photo(70, 50)).save(tmp_path / "a.png")
    common = ("predict", str(tmp_path / "a.png"), "--model", str(model_dir))
    eager = cli(*common, "--out", str(tmp_path / "eager"))
    compiled = cli(*common, "--out", str(tmp_path / "compiled"), "--compile",
                   env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    labels = [np.asarray(Image.open(tmp_path / run / "a.png")) for run in ("eager", "compiled")]
    assert labels[0].shape == (70, 50) and np.array_equal(labels[0], labels[1])


def test_predict_cli_compile_without_a_compiler_is_one_error_line(tmp_path, model_dir, cli):
    Image.fromarray(_photo(40, 30)).save(tmp_path / "a.png")
    result = cli("predict", str(tmp_path / "a.png"), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                 "--compile", env={"CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "torch.compile failed" in result.stderr and "run without --compile" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o" / "a.png").exists()


def test_modes_scale_and_tta_keep_the_original_size(model_dir, tmp_path):
    model = load_model(model_dir)
    image = _photo(150, 110)
    Image.fromarray(image).save(tmp_path / "p.png")
    for options in ({"mode": "whole"}, {"mode": "slide", "batch_size": 3}, {"scale": 0.5}, {"tta": True}):
        assert predict_labels(model, tmp_path / "p.png", **options).shape == (150, 110), options
    with pytest.raises(RegproxyError, match="mode must be"):
        predict_labels(model, image, mode="tiles")


def test_test_scale_sets_the_working_size_and_labels_come_back_full_size(model_dir):
    model = load_model(model_dir)
    model.config.test_scale = (128, 64)  # a 1200x1600 photo is segmented at 64x85, then resized per row chunk
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    labels = predict_labels(model, _photo(1200, 1600), mode="whole")
    handle.remove()
    assert labels.shape == (1200, 1600) and seen == [(64, 85)]


# the test sizes of a 96x128 image for test scale (16, 12) x (0.5 ... 1.75): scale factors 1/16, 3/32, ... 7/32
_TTA_SIZES = [(6, 8), (9, 12), (12, 16), (15, 20), (18, 24), (21, 28)]


def _tta_reference(net: nn.Module, image: np.ndarray, probs_at: tuple[int, int] | None) -> np.ndarray:
    """mmseg 0.17's aug_test written out: every scale and flip, logits resized to the original size, softmax,
    mean, argmax. With ``probs_at``, the old order instead: softmax at that size, mean, resize the mean."""
    height, width = image.shape[:2]
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    x = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1)[None]).float()
    total = 0
    with torch.no_grad():
        for size in _TTA_SIZES:
            scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for view in ("plain", "flipped"):
                logits = net(scaled) if view == "plain" else net(scaled.flip(-1)).flip(-1)
                to = probs_at or (height, width)
                total = total + F.interpolate(logits, size=to, mode="bilinear", align_corners=False).softmax(1)
        probs = total / (2 * len(_TTA_SIZES))
        if probs_at is not None:
            probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    return probs[0].argmax(0).numpy()


def test_tta_resizes_each_augmentations_logits_to_the_original_size_before_the_softmax():
    net, image = SteepPointwise(), _photo(96, 128, seed=4)
    labels = predict_labels(net, image, tta=True)
    expected = _tta_reference(net, image, probs_at=None)
    old_order = _tta_reference(net, image, probs_at=(12, 16))
    assert labels.shape == (96, 128)
    assert (expected != old_order).sum() > 20  # the example tells the two orders apart
    assert np.array_equal(labels, expected)


def test_tta_in_row_bands_gives_the_same_labels(monkeypatch):
    net, image = SteepPointwise(), _photo(96, 128, seed=4)
    whole = predict_labels(net, image, tta=True)
    bands = []
    resize_rows = protocol.resize_rows

    def spy(logits, out_size, rows):
        bands.append(rows)
        return resize_rows(logits, out_size, rows)

    monkeypatch.setattr(protocol, "TTA_FULL_SIZE_LIMIT", 4 * 128 * 7)  # 7 rows of 4 classes at a time
    monkeypatch.setattr(protocol, "resize_rows", spy)
    banded = predict_labels(net, image, tta=True)
    assert {(r.start, r.stop) for r in bands} == {(y, min(y + 7, 96)) for y in range(0, 96, 7)}
    assert len(bands) == 12 * len(range(0, 96, 7))  # every band of every augmentation
    assert np.array_equal(banded, whole)


def test_tta_without_a_test_scale_applies_scale_to_the_image():
    net = SteepPointwise()
    net.config.test_scale = None
    seen = []
    handle = net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    labels = predict_labels(net, _photo(40, 60), tta=True, scale=0.5)
    handle.remove()
    # ratios 0.5 ... 1.75 times 0.5 of 40x60, halves rounded up; each size plain and mirrored
    expected = [(10, 15), (15, 23), (20, 30), (25, 38), (30, 45), (35, 53)]
    assert labels.shape == (40, 60) and seen == [size for size in expected for _ in range(2)]


# ---------------------------------------------------------------------------------------------------- issue 27


def test_colliding_input_names_give_distinct_outputs_and_a_true_count(tmp_path, model_dir, cli):
    sizes = {"a/x.png": (20, 21), "a/x.jpg": (22, 23), "b/x.png": (24, 25), "a_x.png": (26, 27),
             "x_overlay.png": (28, 29), "c/X.png": (30, 31)}
    for name, (height, width) in sizes.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(height, width)).save(tmp_path / "in" / name, quality=95)
    out = tmp_path / "out"
    result = cli("predict", str(tmp_path / "in"), "--model", str(model_dir), "--out", str(out),
                 "--format", "png", "--format", "labelme", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert f"wrote {len(sizes)} label maps" in result.stdout
    # a label map and an overlay per input, each at its input's own size: none overwrote another
    pictures = sorted(out.glob("*.png"))
    assert sorted(Image.open(p).size[::-1] for p in pictures) == sorted([*sizes.values()] * 2)
    label_maps = [p for p in pictures if Image.open(p).mode == "P"]
    assert len(label_maps) == len(sizes) and len(list(out.glob("*.json"))) == len(sizes)


def test_output_names_are_distinct_even_against_each_others_files():
    from regproxy_cli.engine.outputs import OUTPUT_FILES, output_names

    paths = [Path(p) for p in ("r/a/x.png", "r/a/x.jpg", "r/b/x.png", "r/a_x.png", "r/a/a_x.png", "r/x_overlay.png",
                               "r/X.PNG", "r/c/x_regions.tif", "r/a/x.bmp", "r/a_x_png.png", "r/predictions.png")]
    names = output_names(paths, ("category",))
    assert len(names) == len(paths)
    files = [template.format(name).casefold() for name in names.values()
             for template in (*OUTPUT_FILES, "{}_category.png")]
    assert len(files) == len(set(files))  # no two inputs share one output file, ignoring case
    assert "predictions.json" not in files  # COCO's file of the whole run
    assert output_names([Path("d/one.png"), Path("e/two.png")]) == {Path("d/one.png"): "one", Path("e/two.png"): "two"}


def test_a_sliver_image_and_a_failing_image_are_one_line_each_and_the_rest_run(tmp_path, model_dir, cli,
                                                                               monkeypatch):
    Image.fromarray(np.full((1, 100000, 3), 128, np.uint8)).save(tmp_path / "a_sliver.png")
    Image.fromarray(_photo(30, 40)).save(tmp_path / "b_good.png")
    scaled = tmp_path / "scaled"  # a keep-ratio test scale: the sliver's short side would round to 0 pixels
    shutil.copytree(model_dir, scaled)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "test_scale": [64, 32]}))
    result = cli("predict", str(tmp_path / "a_sliver.png"), str(tmp_path / "b_good.png"), "--model", str(scaled),
                 "--out", str(tmp_path / "out"), "--mode", "whole")
    assert result.returncode == 0, result.stderr
    assert np.asarray(Image.open(tmp_path / "out" / "a_sliver.png")).shape == (1, 100000)

    from regproxy_cli.engine import runner as predict_module

    real = predict_module.predict_label_batch

    def fails_on_width_13(model, images, **options):  # a fault inside the network step, for one image only
        if any(image.shape[1] == 13 for image in images):
            raise RuntimeError("planted failure")
        return real(model, images, **options)

    monkeypatch.setattr(predict_module, "predict_label_batch", fails_on_width_13)
    paths = []
    for index, width in enumerate((20, 13, 21)):
        paths.append(tmp_path / "in" / f"{index}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(_photo(10, width)).save(paths[-1])
    report = predict_module.predict_files(load_model(str(model_dir)), paths, tmp_path / "out2", workers=0)
    assert [p.name for p in report.written] == ["0.png", "2.png"]
    assert report.failed == [f"{paths[1]}: failed (RuntimeError: planted failure)"]


@pytest.mark.parametrize("out", ["file", "file/sub", "/proc/regproxy-no-such/out"])
def test_an_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, model_dir, cli, out):
    (tmp_path / "file").write_text("keep me")
    Image.fromarray(_photo(20, 20)).save(tmp_path / "a.png")
    target = out if out.startswith("/") else str(tmp_path / out)
    result = cli("predict", str(tmp_path / "a.png"), "--model", str(model_dir), "--out", target)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"error: --out {target}: ")
    assert (tmp_path / "file").read_text() == "keep me"


def test_ctrl_c_during_predict_says_how_many_were_written(tmp_path, model_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    for index in range(60):
        (tmp_path / "in").mkdir(exist_ok=True)
        Image.fromarray(_photo(200, 260, seed=index)).save(tmp_path / "in" / f"{index:02d}.png")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "regproxy_cli", "predict", str(tmp_path / "in"), "--model",
                                str(model_dir), "--out", str(out), "--regions"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200"},
                               # a test run before this one may have left SIGINT ignored, which a child inherits
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while len(list(out.glob("*_regions.png"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    line = next(line for line in stderr.splitlines() if line.startswith("interrupted:"))
    written = int(line.split()[1])
    assert line == (f"interrupted: {written} of 60 images written to {out} (each file complete); run the same "
                    "command again to segment them all")
    assert 1 <= written < 60 and "Traceback" not in stderr
