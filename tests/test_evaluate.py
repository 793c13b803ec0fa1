"""`regproxy eval` and the offline demo end to end (train -> eval -> predict), shortened."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from regproxy_cli import RegproxyError, build_model
from regproxy_cli.data.datasets import build_dataset
from regproxy_cli.data.open import detect_kind
from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.regproxy import Segmenter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=4, num_val=3, size=(64, 64))


class ConstantSegmenter(Segmenter):
    """Predicts class 0 everywhere: its scores follow from counting the ground truth's pixels."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = torch.nn.Identity()
        self.backbone.stride = 16
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.config = config

    def batch_grid_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.config.num_classes, x.shape[2] // 16, x.shape[3] // 16)
        logits[:, 0] = 1.0
        return logits


def test_evaluate_scores_known_predictions_by_counting(synthetic):
    dataset = build_dataset("folder", synthetic, "val")
    config = ModelConfig(backbone="tiny-vit", num_classes=5, m=1, crop_size=64, inference_mode="whole",
                         test_scale=None)
    result = evaluate(ConstantSegmenter(config), dataset, progress=False)
    labels = np.stack([dataset[i][1] for i in range(len(dataset))]).astype(np.int64)
    valid = labels != 255
    counts = np.bincount(labels[valid], minlength=5)
    # class 0: intersection = its own pixels, union = every scored pixel; other classes: IoU 0 where present
    expected_iou = [100 * counts[0] / valid.sum()] + [0.0 if counts[c] else None for c in range(1, 5)]
    assert result["IoU"] == pytest.approx(expected_iou)
    assert result["Acc"] == pytest.approx([100.0] + [0.0 if counts[c] else None for c in range(1, 5)])
    present = [v for v in expected_iou if v is not None]
    assert result["mIoU"] == pytest.approx(sum(present) / len(present))
    assert result["aAcc"] == pytest.approx(100 * counts[0] / valid.sum()) and result["images"] == 3
    assert counts.astype(bool).sum() >= 3  # the fixture has several classes, so the check is not trivial


def test_class_count_mismatch_is_refused(synthetic):
    with pytest.raises(RegproxyError, match="the model predicts 7 classes but the dataset has 5"):
        evaluate(build_model("tiny-vit", 7), build_dataset("folder", synthetic, "val"), progress=False)


def test_dataset_format_detection(tmp_path, synthetic):
    assert detect_kind(synthetic) == "folder"
    (tmp_path / "leftImg8bit").mkdir()
    assert detect_kind(tmp_path) == "cityscapes"
    with pytest.raises(RegproxyError, match="cannot tell the dataset format"):
        detect_kind(tmp_path / "leftImg8bit")


def test_eval_cli_json_and_table(tmp_path, synthetic, cli):
    save_pretrained(build_model("tiny-vit", 5), tmp_path / "m")
    result = cli("eval", "--model", str(tmp_path / "m"), "--data", str(synthetic), "--json",
                 "--save-predictions", str(tmp_path / "pred"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"mIoU", "mAcc", "aAcc", "images", "per_class"} and data["images"] == 3
    assert len(list((tmp_path / "pred").glob("*.png"))) == 3
    compiled = cli("eval", "--model", str(tmp_path / "m"), "--data", str(synthetic), "--json", "--compile",
                   env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout) == data  # the same label maps
    table = cli("eval", "--model", str(tmp_path / "m"), "--data", str(synthetic), env={"COLUMNS": "120"})
    assert "Per-class IoU" in table.stdout and "mIoU" in table.stdout
    bad = cli("eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and bad.stderr.startswith("error: --data") and "Traceback" not in bad.stderr


def test_the_offline_demo_end_to_end(tmp_path, cli):
    """configs/demo.yaml, shortened: trains from scratch, beats chance clearly, then eval and predict run."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["data"].update(root=str(tmp_path / "data"), synthetic_train=64, synthetic_val=8, workers=0)
    config["optim"].update(iters=150, warmup_iters=10)
    config["run"].update(out_dir=str(tmp_path / "run"), eval_every=150, save_every=150, threads=2)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    trained = cli("train", str(path))
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = cli("eval", "--model", str(tmp_path / "run" / "best"), "--data", str(path), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["mIoU"] > 40  # chance is about 20 for 5 classes
    predicted = cli("predict", str(tmp_path / "data" / "images" / "val"), "--model", str(tmp_path / "run" / "best"),
                    "--out", str(tmp_path / "pred"), "--regions")
    assert predicted.returncode == 0, predicted.stderr
    assert len(list((tmp_path / "pred").glob("*_regions.png"))) == 8
