"""Region entropy (regproxy_cli.engine.analyze, `regproxy analyze regions`) against a naive loop and constructed
cases."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from regproxy_cli import RegproxyError, build_model
from regproxy_cli.cli.app import main
from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.open import open_dataset
from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.engine.analyze import (
    cell_class_fractions,
    cell_histograms,
    entropies,
    region_entropy,
    region_histograms,
)
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.model.ops import affinity_from_logits


def _naive_histograms(affinity: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Sub-pixel by sub-pixel, neighbour by neighbour: the definition."""
    _, sub_h, sub_w, grid_h, grid_w = affinity.shape
    out = np.zeros((fractions.shape[0], grid_h, grid_w))
    for y in range(grid_h):
        for x in range(grid_w):
            for i in range(sub_h):
                for j in range(sub_w):
                    for n in range(9):
                        ty, tx = y + n // 3 - 1, x + n % 3 - 1
                        if 0 <= ty < grid_h and 0 <= tx < grid_w:
                            out[:, ty, tx] += affinity[n, i, j, y, x] * fractions[:, y * sub_h + i, x * sub_w + j]
    return out


def test_region_histograms_match_the_definition():
    torch.manual_seed(0)
    affinity = affinity_from_logits(torch.randn(1, 9 * 2 * 3, 4, 5) * 3, (2, 3))[0]
    fractions = torch.rand(6, 8, 15)
    fast = region_histograms(affinity, fractions)
    assert np.allclose(fast.numpy(), _naive_histograms(affinity.numpy(), fractions.numpy()), atol=1e-5)
    # affinities sum to 1 per sub-pixel, so the total mass is kept
    assert torch.isclose(fast.sum(), fractions.sum(), rtol=1e-5)


def test_centre_only_affinity_gives_the_regular_cells():
    affinity = torch.zeros(9, 4, 4, 3, 3)
    affinity[4] = 1  # every sub-pixel belongs to its own token
    fractions = torch.rand(5, 12, 12)
    assert torch.allclose(region_histograms(affinity, fractions), cell_histograms(fractions, (4, 4)))


def test_entropies_of_constructed_regions():
    histograms = torch.zeros(3, 1, 4)
    histograms[0, 0, 0] = 5  # pure
    histograms[:2, 0, 1] = 2  # two classes, equal
    histograms[:, 0, 2] = 1  # three classes, equal
    # region 3: no labelled mass, left out
    assert np.allclose(entropies(histograms), [0, math.log(2), math.log(3)], atol=1e-6)


def test_cell_fractions_count_ignored_pixels_for_nothing():
    labels = np.array([[0, 0, 1, IGNORE_INDEX],
                       [0, 1, 1, IGNORE_INDEX]])
    fractions = cell_class_fractions(labels, (4, 4), (2, 2), 2)  # padded to 4x4; 2x2 pixels per cell
    assert torch.allclose(fractions[:, 0, 0], torch.tensor([0.75, 0.25]))
    assert torch.allclose(fractions[:, 0, 1], torch.tensor([0.0, 0.5]))  # two of four pixels ignored
    assert torch.allclose(fractions[:, 1], torch.zeros(2, 2))  # padding


@pytest.fixture(scope="module")
def dataset_and_model(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("scenes"), num_train=1, num_val=3, size=(64, 80),
                                   num_classes=3)
    torch.manual_seed(0)
    model = build_model("tiny-vit", 3)
    return root, model.eval()


def test_region_entropy_over_a_dataset(dataset_and_model):
    root, model = dataset_and_model
    result = region_entropy(model, open_dataset("folder", root, "val"), progress=False)
    summary = result.summary()
    assert summary["images"] == 3 and summary["max_entropy"] == pytest.approx(math.log(3))
    for source in ("learned", "soft", "cells"):
        values = result.values[source]
        assert values.size == summary[source]["regions"] > 0
        assert np.all(values >= 0) and np.all(values <= math.log(3) + 1e-5)
    # 64x80 at stride 16: a 4x5 token grid per image, every cell labelled
    assert summary["cells"]["regions"] == 3 * 4 * 5


def test_region_entropy_in_bf16_finds_the_same_regions(dataset_and_model):
    root, model = dataset_and_model
    dataset = open_dataset("folder", root, "val")
    fp32 = region_entropy(model, dataset, progress=False)
    bf16 = region_entropy(model, dataset, progress=False, precision="bf16")
    for source in ("learned", "soft", "cells"):
        assert bf16.values[source].shape == fp32.values[source].shape
    np.testing.assert_array_equal(bf16.values["cells"], fp32.values["cells"])  # labels only: no network
    np.testing.assert_allclose(bf16.values["soft"], fp32.values["soft"], atol=0.05)


def test_cli_checks_the_precision_before_reading_anything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "regions", "--model", "nowhere", "--data", "nowhere", "--precision", "fp16",
              "--device", "cpu"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: fp16 needs a CUDA device; use bf16 on CPU"


def test_region_entropy_refuses_the_baseline_and_a_class_mismatch(dataset_and_model):
    root, _ = dataset_and_model
    dataset = open_dataset("folder", root, "val")
    with pytest.raises(RegproxyError, match="needs a RegProxy model"):
        region_entropy(build_model("tiny-vit", 3, baseline=True), dataset)
    with pytest.raises(RegproxyError, match="4 classes, the dataset 3"):
        region_entropy(build_model("tiny-vit", 4), dataset)


def test_cli_writes_the_summary_and_the_plot(cli, tmp_path, dataset_and_model):
    root, model = dataset_and_model
    save_pretrained(model, tmp_path / "model")
    result = cli("analyze", "regions", "--model", str(tmp_path / "model"), "--data", str(root), "--out",
                 str(tmp_path / "out"), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "out" / "region_entropy.json").read_text())
    picture = Image.open(tmp_path / "out" / "region_entropy.png")
    assert picture.size[0] > 300 and picture.size[1] > 200
    save_pretrained(build_model("tiny-vit", 3, baseline=True), tmp_path / "baseline")
    refused = cli("analyze", "regions", "--model", str(tmp_path / "baseline"), "--data", str(root))
    assert refused.returncode == 1 and "needs a RegProxy model" in refused.stderr
    assert "Traceback" not in refused.stderr
