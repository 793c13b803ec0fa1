"""The studies in bench/ score through :func:`regproxy_cli.engine.evaluate.evaluate` (one mIoU in the house): on
generated scenes of both generators, :func:`bench.common.score` gives to the last digit the numbers of the per-image
loop over :mod:`regproxy_cli.engine.metrics` that bench ran before (``common.score_dataset``, ``quality.score``)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import OBJECT_KINDS, TOLERANCE_PX, score
from bench.quality import BASE_CONFIG, data_overrides
from regproxy_cli import build_model
from regproxy_cli.data.streets import object_recall, read_sidecar, recall_by_width
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.engine.metrics import BoundaryFScore, ConfusionMatrix
from regproxy_cli.inference.predictor import predict_labels


def _percent(values) -> list[float | None]:
    return [None if np.isnan(v) else round(100 * float(v), 2) for v in values]


def _loop_before(model, dataset, sidecars: Path | None) -> dict:
    """bench's own scorer before issue 28, kept here as the reference."""
    matrix, boundary = ConfusionMatrix(model.config.num_classes), BoundaryFScore(model.config.num_classes, TOLERANCE_PX)
    objects = []
    for index in range(len(dataset)):
        image, label, name = dataset[index]
        prediction = predict_labels(model, image)
        target = torch.from_numpy(np.asarray(label, dtype=np.int64))
        matrix.update(torch.from_numpy(prediction), target)
        boundary.update(torch.from_numpy(prediction), target)
        if sidecars is not None:
            objects += object_recall(prediction, read_sidecar(sidecars / f"{name}.json"))
    iou, bf = matrix.compute(), boundary.compute()
    result = {"mIoU": round(100 * iou["mIoU"], 2), "aAcc": round(100 * iou["aAcc"], 2), "IoU": _percent(iou["IoU"]),
              "BF": round(100 * bf["BF"], 2), "mBF": round(100 * bf["mBF"], 2),
              "boundary_precision": round(100 * bf["precision"], 2), "boundary_recall": round(100 * bf["recall"], 2),
              "BF_per_class": _percent(bf["F"])}
    if sidecars is not None:
        result["object_recall"] = {kind: recall_by_width([o for o in objects if o["kind"] == kind])
                                   for kind in OBJECT_KINDS}
        result["object_recall"]["pole+sign"] = recall_by_width([o for o in objects if o["kind"] in OBJECT_KINDS])
    return result


@pytest.mark.parametrize("generator", ["scenes", "streets"])
def test_the_study_scores_equal_the_loop_bench_ran_before_and_regproxy_eval(generator, tmp_path):
    config = load_config(BASE_CONFIG, data_overrides(generator, 2, 4, 64, tmp_path))
    dataset = config.data.open(config.data.val_split)
    torch.manual_seed(0)
    model = build_model("tiny-vit", dataset.num_classes).eval()
    model.config.classes = list(dataset.classes)
    sidecars = Path(config.data.root) / "instances" / config.data.val_split if generator == "streets" else None

    scores = score(model, dataset, sidecars=sidecars)
    assert scores == _loop_before(model, dataset, sidecars)
    assert scores["mIoU"] == round(evaluate(model, dataset, progress=False)["mIoU"], 2)
    assert ("object_recall" in scores) == (generator == "streets")
    assert 0 < scores["mIoU"] < 100 and 0 < scores["BF"] < 100  # a real comparison, not two empty results


def test_the_benchmark_report_renders_from_the_committed_results(tmp_path):
    """python -m bench.report turns docs/benchmarks.json and docs/quality.json into the page; both stay readable."""
    import json

    from bench import report

    out = tmp_path / "benchmarks.md"
    report.write_report(json.loads((report.REPO / "docs" / "benchmarks.json").read_text()), out)
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "## Quality per cost (generated data)" in text
    assert "| RegProxy h=w=4 | 2 |" in text  # the quality table, from bench.quality's own renderer


def test_a_section_measured_on_another_kind_of_machine_is_kept_and_shown_beside_the_new_one(tmp_path):
    """bench.run keeps each machine kind's table (section@kind); the report shows both, the newest first."""
    import json

    from bench import report
    from bench.run import machine_kind

    results = json.loads((report.REPO / "docs" / "benchmarks.json").read_text())
    int8 = results["sections"]["int8"]
    other = {**int8["machine"], "cpu": "Some CPU", "isa": ["avx2"]}
    kind = machine_kind(other)
    assert kind == "Some CPU (avx2)" and machine_kind(int8["machine"]) != kind
    results["sections"][f"int8@{kind}"] = {**int8, "machine": other, "date": "2000-01-01"}
    out = tmp_path / "benchmarks.md"
    report.write_report(results, out)
    text = out.read_text()
    title = "## int8 on CPU, with and without AMX"
    assert text.index(f"{title}\n") < text.index(f"{title}: Some CPU (avx2)\n") < text.index("2000-01-01")
