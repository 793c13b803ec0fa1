"""`regproxy eval --report`: the folder's numbers against independent computations from the saved predictions,
its links, the worst images, replacing a report and refusing anything else, and the plots module."""

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from browser import Browser, chromium
from PIL import Image

from regproxy_cli import RegproxyError, build_model
from regproxy_cli import plots as plots_module
from regproxy_cli.data.datasets import build_dataset
from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.engine.metrics import BoundaryFScore, ConfusionMatrix
from regproxy_cli.engine.report import (
    REPORT_MARKER,
    ReportCollector,
    check_report_dir,
    error_map,
    image_scores,
    read_confusion_csv,
    write_report,
)
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.plots import class_bars, confused_classes, confusion_matrix, histogram, require_matplotlib

K = 5


def _noisy_model():
    """A tiny model with perturbed weights: several classes per image, so every score is non-trivial."""
    torch.manual_seed(0)
    model = build_model("tiny-vit", K)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=6, size=(64, 64))


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    """One evaluation with --report's collector, its saved predictions, and the report folder."""
    root = tmp_path_factory.mktemp("evaluated")
    dataset = build_dataset("folder", data, "val")
    model = _noisy_model()
    collector = ReportCollector(K, worst=3)
    result = evaluate(model, dataset, progress=False, save_dir=root / "pred", report=collector)
    report = write_report(root / "report", result, collector, dataset, model.config, {"data": str(data)})
    labels = [np.asarray(dataset[i][1]) for i in range(len(dataset))]
    names = [dataset[i][2] for i in range(len(dataset))]
    predictions = [np.asarray(Image.open(root / "pred" / f"{Path(n).stem}.png")).astype(np.int64) for n in names]
    return {"root": root, "report": report, "result": result, "labels": labels, "predictions": predictions,
            "names": names, "model": model, "dataset": dataset,
            "metrics": json.loads((report / "metrics.json").read_text())}


def test_the_csv_holds_the_confusion_counts(evaluated):
    matrix = ConfusionMatrix(K)
    for prediction, label in zip(evaluated["predictions"], evaluated["labels"]):
        matrix.update(torch.from_numpy(prediction), torch.from_numpy(label.astype(np.int64)))
    classes, counts = read_confusion_csv(evaluated["report"] / "confusion_matrix.csv")
    assert classes == list(evaluated["model"].config.classes)
    rows = [line.split(",")[0] for line in (evaluated["report"] / "confusion_matrix.csv").read_text().splitlines()[1:]]
    assert rows == classes  # class names index the rows too
    np.testing.assert_array_equal(counts, matrix.matrix.numpy())
    assert (counts - np.diag(np.diag(counts))).sum() > 0  # the model makes mistakes: the check is not trivial


def test_per_class_f1_iou_and_boundary_f_against_the_pixels(evaluated):
    gt = np.concatenate([label.ravel() for label in evaluated["labels"]]).astype(np.int64)
    pred = np.concatenate([p.ravel() for p in evaluated["predictions"]])
    valid = gt != 255
    gt, pred = gt[valid], pred[valid]
    per_class = evaluated["metrics"]["per_class"]
    checked = 0
    for c, name in enumerate(evaluated["model"].config.classes):
        true_positive = np.sum((pred == c) & (gt == c))
        predicted, actual = np.sum(pred == c), np.sum(gt == c)
        if predicted == 0 and actual == 0:
            assert per_class[name]["F1"] is None
            continue
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert per_class[name]["F1"] == pytest.approx(100 * f1)
        assert per_class[name]["IoU"] == pytest.approx(100 * true_positive / (predicted + actual - true_positive))
        assert per_class[name]["gt_pixels"] == actual and per_class[name]["predicted_pixels"] == predicted
        checked += 0 < f1 < 1
    assert checked >= 2
    boundary = BoundaryFScore(K, 2)
    for prediction, label in zip(evaluated["predictions"], evaluated["labels"]):
        boundary.update(prediction, label.astype(np.int64))
    expected = boundary.compute()
    metrics = evaluated["metrics"]
    assert metrics["BF"] == pytest.approx(100 * expected["BF"]) and metrics["mBF"] == pytest.approx(100 * expected["mBF"])
    assert metrics["boundary_tolerance_px"] == 2
    for key in ("mIoU", "mAcc", "aAcc", "images"):
        assert metrics[key] == evaluated["result"][key]


def _independent_image_miou(prediction, label):
    ious = []
    for c in range(K):
        inside, predicted = (label == c), (prediction == c) & (label != 255)
        union = np.sum(inside | predicted)
        if union:
            ious.append(np.sum(inside & predicted) / union)
    return 100 * np.mean(ious)


def test_the_worst_images_are_the_lowest_scoring(evaluated):
    scores = {name: _independent_image_miou(p, label)
              for name, p, label in zip(evaluated["names"], evaluated["predictions"], evaluated["labels"])}
    metrics = evaluated["metrics"]
    assert metrics["worst_by"].startswith("per-image mIoU")
    assert [entry["name"] for entry in metrics["per_image"]] == evaluated["names"]
    for entry in metrics["per_image"]:
        assert entry["mIoU"] == pytest.approx(scores[entry["name"]])
    lowest = sorted(scores, key=scores.get)[:3]
    assert [w["name"] for w in metrics["worst"]] == lowest
    assert len(set(scores.values())) == len(scores)  # distinct scores: the order is the test, not a tie-break
    for rank, entry in enumerate(metrics["worst"], start=1):
        assert entry["rank"] == rank and entry["mIoU"] == pytest.approx(scores[entry["name"]])
        strip = Image.open(evaluated["report"] / entry["strip"])
        assert strip.format == "PNG" and strip.width > 3 * strip.height  # four panels side by side


def test_image_scores_and_error_map():
    label = np.array([[0, 0, 1, 255], [1, 1, 2, 2]])
    prediction = np.array([[0, 1, 1, 0], [1, 1, 2, 0]])
    miou, acc = image_scores(prediction, label, 3)
    # by hand, (0, 3) ignored: gt 0 at (0,0),(0,1); pred 0 at (0,0),(1,3) -> I 1, U 3
    # gt 1 at (0,2),(1,0),(1,1); pred 1 at (0,1),(0,2),(1,0),(1,1) -> I 3, U 4
    # gt 2 at (1,2),(1,3); pred 2 at (1,2) -> I 1, U 2
    assert miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3) and acc == pytest.approx(5 / 7)
    assert all(np.isnan(image_scores(prediction, np.full_like(label, 255), 3)))
    colours = error_map(prediction, label)
    assert tuple(colours[0, 0]) == (0, 170, 0) and tuple(colours[0, 1]) == (220, 0, 0)
    assert tuple(colours[0, 3]) == (128, 128, 128)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [value for name, value in attrs if name in ("src", "href")]


def test_the_html_links_resolve_inside_the_folder(evaluated):
    report = evaluated["report"]
    parser = _Links()
    parser.feed((report / "report.html").read_text())
    assert "script" not in parser.tags and "link" not in parser.tags  # no JS, no external stylesheet
    assert not any(re.match(r"[a-z]+:|/|\\\\", link) for link in parser.links)  # relative only
    targets = {(report / unquote(link)).resolve() for link in parser.links}
    assert all(t.is_file() and report.resolve() in t.parents for t in targets)
    expected = {report / name for name in ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png",
                                           "per_class_iou.png", "per_image_miou.png")}
    expected |= {report / w["strip"] for w in evaluated["metrics"]["worst"]}
    assert {p.resolve() for p in expected} <= targets
    assert (report / REPORT_MARKER).is_file()


ALL_IMAGES_LOADED = ("(() => { const images = [...document.images];"
                     " return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); })()")


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed here (.ci/run installs it)")
def test_the_html_renders_in_chromium_with_every_image(evaluated, tmp_path):
    report = evaluated["report"]
    with Browser() as browser:
        browser.open((report / "report.html").resolve().as_uri())
        assert browser.wait_for(ALL_IMAGES_LOADED, timeout=60), "an image of report.html did not load"
        shown = browser.evaluate("document.images.length")
        text = browser.evaluate("document.body.innerText")
        shot = browser.screenshot(tmp_path / "report.png")
    assert shown == 3 + len(evaluated["metrics"]["worst"])  # confusion matrix, IoU bars, per-image mIoU, strips
    assert f"{evaluated['metrics']['mIoU']:.2f}" in text
    assert Image.open(shot).size == (1400, 1000)


def test_an_existing_report_is_replaced_and_anything_else_refused(evaluated, tmp_path, monkeypatch):
    e = evaluated
    collector = ReportCollector(K, worst=1)
    result = evaluate(e["model"], e["dataset"], progress=False, report=collector)
    target = tmp_path / "report"
    write_report(target, result, collector, e["dataset"], e["model"].config, {})
    (target / "worst" / "stale.png").write_bytes(b"old")
    write_report(target, result, collector, e["dataset"], e["model"].config, {})
    assert not (target / "worst" / "stale.png").exists() and len(list((target / "worst").iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left behind
    # a failure while writing leaves the old report whole
    before = sorted(p.relative_to(target) for p in target.rglob("*"))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots_module, "histogram", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(target, result, collector, e["dataset"], e["model"].config, {})
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    # a folder of the user's, or a file, is never written to
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RegproxyError, match="holds other files"):
        write_report(mine, result, collector, e["dataset"], e["model"].config, {})
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegproxyError, match="is a file"):
        check_report_dir(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert check_report_dir(tmp_path / "empty") == tmp_path / "empty"


def test_missing_matplotlib_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(RegproxyError, match=re.escape("pip install 'regproxy[report]'")):
        require_matplotlib("eval --report")


def test_eval_cli_report_and_its_errors(tmp_path, data, cli):
    save_pretrained(_noisy_model(), tmp_path / "m")
    base = ("eval", "--model", str(tmp_path / "m"), "--data", str(data))
    result = cli(*base, "--json", "--report", str(tmp_path / "out" / "rep"), "--worst", "2")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)  # stdout stays one JSON document
    metrics = json.loads((tmp_path / "out" / "rep" / "metrics.json").read_text())
    assert metrics["mIoU"] == printed["mIoU"] and len(metrics["worst"]) == 2
    assert metrics["model"]["backbone"] == "tiny-vit" and "report.html" in result.stderr
    table = cli(*base, "--report", str(tmp_path / "out" / "rep"), "--worst", "0", env={"COLUMNS": "120"})
    assert table.returncode == 0, table.stderr
    assert "mIoU" in table.stdout and "report.html" in table.stdout
    assert json.loads((tmp_path / "out" / "rep" / "metrics.json").read_text())["worst"] == []
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "a.txt").write_text("mine")
    for args, message in [(("--report", str(tmp_path / "busy")), "holds other files"),
                          (("--worst", "3"), "--worst needs --report"),
                          (("--report", str(tmp_path / "r2"), "--worst", "-1"), "--worst must be 0 or more")]:
        bad = cli(*base, *args)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert (tmp_path / "busy" / "a.txt").read_text() == "mine" and not (tmp_path / "r2").exists()
    # without matplotlib: one line naming the extra, before any evaluation
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    missing = cli(*base, "--report", str(tmp_path / "r3"),
                  env={"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ["PYTHONPATH"]])})
    assert missing.returncode == 1 and "pip install 'regproxy[report]'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "r3").exists()


def test_torchrun_report_equals_one_process(tmp_path, data):
    """2 gloo processes, each a share of the 6 images: the per-image scores and worst images are gathered, only
    rank 0 writes, and the report equals a single process's."""
    save_pretrained(_noisy_model(), tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reports = {}
    for processes in (1, 2):
        command = ["-m", "regproxy_cli", "eval", "--model", str(tmp_path / "model"), "--data", str(data),
                   "--device", "cpu", "--json", "--report", str(tmp_path / f"r{processes}"), "--worst", "4"]
        if processes == 2:
            command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command]
        done = subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, timeout=300,
                              env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        reports[processes] = tmp_path / f"r{processes}"
    one, two = (json.loads((reports[n] / "metrics.json").read_text()) for n in (1, 2))
    assert one == two and len(one["worst"]) == 4 and len(one["per_image"]) == 6
    assert (reports[1] / "confusion_matrix.csv").read_text() == (reports[2] / "confusion_matrix.csv").read_text()
    assert sorted(p.name for p in (reports[2] / "worst").iterdir()) == sorted(
        p.name for p in (reports[1] / "worst").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------


def test_a_150_class_confusion_matrix_shows_the_most_confused(tmp_path):
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(1000, 5000, 150)) + rng.integers(0, 3, (150, 150))
    busy = [7, 42, 99, 120]
    for a, b in zip(busy, busy[1:] + busy[:1]):
        matrix[a, b] += 2000
    errors = matrix.sum(0) + matrix.sum(1) - 2 * np.diag(matrix)
    expected = np.sort(np.argsort(-errors, kind="stable")[:30])
    shown = confusion_matrix(matrix, [f"class {i}" for i in range(150)], tmp_path / "cm.png")
    assert shown == expected.tolist() == confused_classes(matrix).tolist() and set(busy) <= set(shown)
    small = confusion_matrix(matrix[:5, :5], list("abcde"), tmp_path / "small.png")
    assert small == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(matrix, ["a"], tmp_path / "bad.png")
    big = Image.open(tmp_path / "cm.png")
    assert big.format == "PNG" and big.width > 900  # the figure grows with the classes shown


def test_class_bars_sort_and_skip_absent_classes(tmp_path):
    drawn = class_bars([10.0, None, 80.0, 45.0, float("nan")], list("abcde"), tmp_path / "bars.png", mean=45.0)
    assert drawn == [2, 3, 0]
    assert Image.open(tmp_path / "bars.png").format == "PNG"


def test_histogram_counts_as_numpy(tmp_path):
    values = np.random.default_rng(1).normal(50, 10, 500)
    counts, edges = histogram(np.append(values, np.nan), tmp_path / "h.png", bins=12, value_range=(0, 100),
                              title="t", xlabel="x", log_y=True)
    expected, expected_edges = np.histogram(values, bins=12, range=(0, 100))
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(edges, expected_edges)
    weighted, _ = histogram([1, 1, 3], tmp_path / "w.png", bins=[0, 2, 4], weights=[2, 3, 5])
    assert weighted.tolist() == [5, 5]
    assert Image.open(tmp_path / "h.png").format == "PNG"


def test_flops_plot_draws_the_zoo_and_evaluated_runs(tmp_path, evaluated, cli):
    from regproxy_cli.hub.zoo import ZOO

    run = tmp_path / "mine"
    save_pretrained(evaluated["model"], run / "best")
    (run / "eval.json").write_text(json.dumps({"mIoU": 42.5}))
    picture = tmp_path / "fig2.png"
    result = cli("flops", "--plot", str(picture), "--run", str(run), "--run", str(evaluated["report"]), "--json")
    assert result.returncode == 0, result.stderr
    points = {p["label"]: p for p in json.loads(result.stdout)}
    ade = {name: entry for name, entry in ZOO.items() if entry.dataset == "ade20k"}
    assert set(ade) <= set(points) and all(points[name]["miou"] == entry.miou for name, entry in ade.items())
    # the counted GFLOPs grow with the backbone, as the paper's Fig. 2 x axis does
    vits = sorted((n for n in ade if not ade[n].backbone.startswith("r")), key=lambda n: points[n]["gflops"])
    assert [ade[n].miou for n in vits] == sorted(ade[n].miou for n in vits)
    assert points["mine"]["miou"] == 42.5 and points["mine"]["gflops"] > 0
    assert points["report"]["miou"] == pytest.approx(evaluated["metrics"]["mIoU"])
    assert Image.open(picture).size[0] > 400
    for args, message in [(("--run", str(run)), "--run needs --plot FILE"),
                          (("--plot", str(tmp_path / "x.png"), "--size", "512"), "drop --size"),
                          (("--plot", str(tmp_path / "x.png"), "--run", str(tmp_path / "none")), "no such folder")]:
        bad = cli("flops", *args)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
