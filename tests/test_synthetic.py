"""Synthetic scenes: determinism, class coverage, thin structures, and the FolderDataset writer."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regproxy_cli.data.datasets import FolderDataset
from regproxy_cli.data.synthetic import SyntheticScenes, synthetic_classes, write_synthetic_dataset
from regproxy_cli.errors import RegproxyError

SIZE = (48, 64)


def test_deterministic_by_seed_split_and_index() -> None:
    first, again = SyntheticScenes(3, SIZE, seed=1), SyntheticScenes(3, SIZE, seed=1)
    for index in range(3):
        np.testing.assert_array_equal(first[index][0], again[index][0])
        np.testing.assert_array_equal(first[index][1], again[index][1])
    assert not np.array_equal(first[0][0], SyntheticScenes(3, SIZE, seed=2)[0][0])
    assert not np.array_equal(first[0][0], SyntheticScenes(3, SIZE, seed=1, split="val")[0][0])
    assert not np.array_equal(first[0][0], first[1][0])


def test_shapes_label_range_and_class_coverage() -> None:
    scenes = SyntheticScenes(6, SIZE, num_classes=5, seed=0)
    seen: set[int] = set()
    for image, label, name in scenes:
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        assert label.shape == SIZE and label.dtype == np.uint8 and label.max() < 5
        seen |= set(np.unique(label).tolist())
    assert seen == set(range(5))
    assert scenes.classes == ("background", "ellipse", "blob", "line", "ring") and len(set(scenes.palette)) == 5
    with pytest.raises(IndexError):
        scenes[6]


def test_colour_is_informative_but_noisy() -> None:
    image, label, _ = SyntheticScenes(1, (96, 96), seed=3)[0]
    for c in np.unique(label):
        pixels = image[label == c].astype(float)
        assert pixels.std(axis=0).mean() > 4  # texture and noise, not flat colour


def test_thin_structures_exist() -> None:
    scenes = SyntheticScenes(4, (96, 96), seed=0)
    line = scenes.classes.index("line")
    masks = torch.stack([torch.from_numpy(scenes[i][1] == line) for i in range(4)]).float()[:, None]
    assert masks.sum() > 0
    # A pixel survives a 5x5 erosion only where the structure is at least 5 px wide (e.g. where lines cross).
    eroded = -F.max_pool2d(-masks, kernel_size=5, stride=1, padding=2)
    assert eroded.sum() / masks.sum() < 0.1


def test_line_width_sets_the_difficulty() -> None:
    line = 3

    def line_pixels(widths: tuple[int, int]) -> int:
        scenes = SyntheticScenes(4, (64, 64), seed=0, line_width=widths)
        return sum(int((scenes[i][1] == line).sum()) for i in range(4))

    assert 0 < line_pixels((2, 2)) < line_pixels((4, 4))
    with pytest.raises(RegproxyError, match="line widths"):
        SyntheticScenes(1, (64, 64), line_width=(3, 2))


def test_many_classes_have_unique_names() -> None:
    names, kinds, colours = synthetic_classes(12)
    assert len(set(names)) == 12 and names[6] == "ellipse-2" and kinds[6] == "ellipse"
    assert len(set(colours)) == 12
    with pytest.raises(RegproxyError):
        synthetic_classes(1)


def test_writer_output_loads_through_folder_dataset(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", num_train=3, num_val=2, size=SIZE, num_classes=4, seed=7)
    train, val = FolderDataset(root, "train"), FolderDataset(root, "val")
    assert len(train) == 3 and len(val) == 2
    scenes = SyntheticScenes(3, SIZE, num_classes=4, seed=7)
    assert train.classes == scenes.classes and train.palette == scenes.palette
    for index in range(3):
        image, label, name = train[index]
        expected_image, expected_label, expected_name = scenes[index]
        assert name == expected_name
        np.testing.assert_array_equal(image, expected_image)  # PNG is lossless
        np.testing.assert_array_equal(label, expected_label)
    # The same settings reuse what is there; anything else in the directory is refused.
    assert write_synthetic_dataset(root, num_train=3, num_val=2, size=SIZE, num_classes=4, seed=7) == root
    with pytest.raises(RegproxyError, match="not empty"):
        write_synthetic_dataset(root, num_train=4, num_val=2, size=SIZE, num_classes=4, seed=7)
