"""Dataset layouts on tiny fixture trees: loading, label mapping, errors that name paths and files."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from regproxy_cli.data import datasets as D
from regproxy_cli.data.transforms import train_pipeline
from regproxy_cli.errors import RegproxyError

H, W = 32, 48


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (H, W), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)


def _mask(path: Path, values: list[int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A mask whose rows cycle through ``values``; returns the array written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.array([values[i % len(values)] for i in range(size[0])], dtype=np.uint8)[:, None].repeat(size[1], 1)
    Image.fromarray(array).save(path)
    return array


# ADE20K


def _ade(tmp_path: Path) -> Path:
    base = tmp_path / "ADEChallengeData2016"
    for i in (1, 2):
        _image(base / "images" / "training" / f"ADE_train_{i:08d}.jpg", seed=i)
        _mask(base / "annotations" / "training" / f"ADE_train_{i:08d}.png", [0, 1, 5, 150])
    _image(base / "images" / "validation" / "ADE_val_00000001.jpg")
    _mask(base / "annotations" / "validation" / "ADE_val_00000001.png", [3])
    return base


def test_ade20k_loads_and_reduces_zero_label(tmp_path: Path) -> None:
    base = _ade(tmp_path)
    for root in (tmp_path, base):  # the parent or the ADEChallengeData2016 directory itself
        dataset = D.ADE20K(root, "train")
        assert len(dataset) == 2 and dataset.num_classes == 150 and dataset.classes[0] == "wall"
        image, label, name = dataset[0]
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert label.shape == (H, W) and label.dtype == np.uint8
        assert name == "ADE_train_00000001"
        np.testing.assert_array_equal(label[:4, 0], [255, 0, 4, 149])  # 0 -> ignore, others shifted down
    assert len(D.ADE20K(tmp_path, "validation")) == len(D.ADE20K(tmp_path, "val")) == 1


def test_ade20k_errors_name_paths_and_files(tmp_path: Path) -> None:
    with pytest.raises(RegproxyError, match=str(tmp_path / "ADEChallengeData2016" / "images" / "training")):
        D.ADE20K(tmp_path, "train")
    base = _ade(tmp_path)
    _mask(base / "annotations" / "training" / "ADE_train_00000002.png", [151])  # 151 - 1 is not a class id
    with pytest.raises(RegproxyError, match=r"ADE_train_00000002\.png: label 150 is not a class id"):
        D.ADE20K(tmp_path, "train")[1]
    (base / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(RegproxyError, match=r"expected .*annotations/training/ADE_train_00000001\.png"):
        D.ADE20K(tmp_path, "train")
    with pytest.raises(RegproxyError, match="split"):
        D.ADE20K(tmp_path, "test")


# Cityscapes


def _cityscapes(tmp_path: Path, train_ids: bool) -> Path:
    for city, frame in (("aachen", "000000_000019"), ("bochum", "000001_000019")):
        stem = f"{city}_{frame}"
        _image(tmp_path / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
        _mask(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", [7, 26, 0, 33, 9])
        if train_ids:
            _mask(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelTrainIds.png", [1, 2, 255])
    return tmp_path


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    dataset = D.Cityscapes(_cityscapes(tmp_path, train_ids=False), "train")
    assert len(dataset) == 2 and dataset.num_classes == 19 and dataset.classes[13] == "car"
    image, label, name = dataset[1]
    assert name == "bochum_000001_000019" and image.shape == (H, W, 3)
    np.testing.assert_array_equal(label[:5, 0], [0, 13, 255, 18, 255])  # road, car, unlabeled, bicycle, parking


def test_cityscapes_prefers_train_id_files(tmp_path: Path) -> None:
    _, label, _ = D.Cityscapes(_cityscapes(tmp_path, train_ids=True), "train")[0]
    np.testing.assert_array_equal(label[:3, 0], [1, 2, 255])


def test_cityscapes_errors(tmp_path: Path) -> None:
    with pytest.raises(RegproxyError, match=str(tmp_path / "leftImg8bit" / "val")):
        D.Cityscapes(tmp_path, "val")
    _cityscapes(tmp_path, train_ids=False)
    (tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(RegproxyError, match="aachen_000000_000019_gtFine_labelTrainIds.png"):
        D.Cityscapes(tmp_path, "train")


# Pascal Context


def _pascal_context(tmp_path: Path) -> Path:
    base = tmp_path / "VOCdevkit" / "VOC2010"
    for name in ("2008_000001", "2008_000002"):
        _image(base / "JPEGImages" / f"{name}.jpg")
        _mask(base / "SegmentationClassContext" / f"{name}.png", [0, 1, 59])
    split = base / "ImageSets" / "SegmentationContext" / "train.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000001\n2008_000002\n")
    return tmp_path


def test_pascal_context_60_and_59(tmp_path: Path) -> None:
    root = _pascal_context(tmp_path)
    full = D.PascalContext(root, "train")
    assert full.num_classes == 60 and full.classes[0] == "background" and len(full) == 2
    np.testing.assert_array_equal(full[0][1][:3, 0], [0, 1, 59])
    reduced = D.build_dataset("pascal_context_59", root, "train")
    assert reduced.num_classes == 59 and reduced.classes[0] == "aeroplane"
    np.testing.assert_array_equal(reduced[0][1][:3, 0], [255, 0, 58])
    assert len(D.PascalContext(root / "VOCdevkit" / "VOC2010", "train")) == 2


def test_pascal_context_errors(tmp_path: Path) -> None:
    root = _pascal_context(tmp_path)
    with pytest.raises(RegproxyError, match=r"SegmentationContext/val\.txt"):
        D.PascalContext(root, "val")
    (root / "VOCdevkit" / "VOC2010" / "JPEGImages" / "2008_000002.jpg").unlink()
    with pytest.raises(RegproxyError, match=r"JPEGImages/2008_000002\.jpg"):
        D.PascalContext(root, "train")
    with pytest.raises(RegproxyError, match="60 or 59"):
        D.PascalContext(root, "train", num_classes=21)


# FolderDataset


def _folder(tmp_path: Path, classes: object = ("sky", "road", "car")) -> Path:
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump(classes if isinstance(classes, dict) else list(classes)))
    _image(tmp_path / "images" / "train" / "a.jpg", seed=1)
    _image(tmp_path / "images" / "train" / "b.png", seed=2, mode="L")  # greyscale input
    _mask(tmp_path / "masks" / "train" / "a.png", [0, 1, 2, 255])
    _mask(tmp_path / "masks" / "train" / "b.png", [2])
    return tmp_path


def test_folder_dataset_loads(tmp_path: Path) -> None:
    dataset = D.build_dataset("folder", _folder(tmp_path), "train")
    assert dataset.classes == ("sky", "road", "car") and dataset.num_classes == 3 and len(dataset.palette) == 3
    image, label, name = dataset[0]
    assert name == "a" and image.shape == (H, W, 3)
    np.testing.assert_array_equal(label[:4, 0], [0, 1, 2, 255])
    grey, _, _ = dataset[1]
    assert grey.shape == (H, W, 3) and (grey[..., 0] == grey[..., 2]).all()


def test_folder_dataset_with_transform(tmp_path: Path) -> None:
    dataset = D.FolderDataset(_folder(tmp_path), "train", transform=train_pipeline(crop=(24, 24), scale=(48, 32)))
    image, label, _ = dataset[0]
    assert isinstance(image, torch.Tensor) and tuple(image.shape) == (3, 24, 24) and tuple(label.shape) == (24, 24)


def test_folder_dataset_options(tmp_path: Path) -> None:
    palette = [[10, 20, 30], [200, 0, 0], [0, 0, 200]]
    _folder(tmp_path, {"classes": ["a", "b", "c"], "palette": palette, "ignore_index": 9})
    _mask(tmp_path / "masks" / "train" / "b.png", [9, 1])
    colour = np.zeros((H, W, 3), np.uint8)
    colour[:, :] = palette[2]
    colour[:5] = palette[1]
    Image.fromarray(colour).save(tmp_path / "masks" / "train" / "a.png")  # a colour-coded mask
    dataset = D.FolderDataset(tmp_path, "train")
    assert dataset.palette == ((10, 20, 30), (200, 0, 0), (0, 0, 200))
    assert (dataset[0][1][:5] == 1).all() and (dataset[0][1][5:] == 2).all()
    np.testing.assert_array_equal(dataset[1][1][:2, 0], [255, 1])  # the ignore value becomes 255
    colour[0, 0] = (1, 2, 3)
    Image.fromarray(colour).save(tmp_path / "masks" / "train" / "a.png")
    with pytest.raises(RegproxyError, match=r"a\.png: colour \(1, 2, 3\)"):
        dataset[0]


def test_folder_dataset_reduce_zero_label(tmp_path: Path) -> None:
    _folder(tmp_path, {"classes": ["a", "b"], "reduce_zero_label": True})
    _mask(tmp_path / "masks" / "train" / "a.png", [0, 1, 2])
    np.testing.assert_array_equal(D.FolderDataset(tmp_path)[0][1][:3, 0], [255, 0, 1])


def test_reduce_zero_label_keeps_255_ignored() -> None:
    raw = np.array([[0, 1, 2, 150, 254, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(D.reduce_zero_label(raw), [[255, 0, 1, 149, 253, 255]])


def test_folder_dataset_reduce_zero_label_keeps_255_ignored(tmp_path: Path) -> None:
    _folder(tmp_path, {"classes": ["a", "b"], "reduce_zero_label": True})
    _mask(tmp_path / "masks" / "train" / "a.png", [0, 1, 2, 255])
    np.testing.assert_array_equal(D.FolderDataset(tmp_path)[0][1][:4, 0], [255, 0, 1, 255])


def test_folder_dataset_exif_orientation(tmp_path: Path) -> None:
    _folder(tmp_path)
    array = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: displayed rotated by 90 degrees
    Image.fromarray(array).save(tmp_path / "images" / "train" / "a.jpg", exif=exif)
    _mask(tmp_path / "masks" / "train" / "a.png", [0], size=(W, H))  # annotated on the displayed image
    image, label, _ = D.FolderDataset(tmp_path)[0]
    assert image.shape == (W, H, 3) and label.shape == (W, H)


def test_folder_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(RegproxyError, match=str(tmp_path / "classes.yaml")):
        D.FolderDataset(tmp_path)
    _folder(tmp_path)
    with pytest.raises(RegproxyError, match=rf"{tmp_path / 'images' / 'val'}.*splits present: train"):
        D.FolderDataset(tmp_path, "val")
    _mask(tmp_path / "masks" / "train" / "b.png", [1], size=(H, W + 2))
    with pytest.raises(RegproxyError, match=r"masks/train/b\.png is 50x32 but its image .*b\.png is 48x32"):
        D.FolderDataset(tmp_path)[1]
    _mask(tmp_path / "masks" / "train" / "b.png", [3])
    with pytest.raises(RegproxyError, match=r"masks/train/b\.png: label 3 is not a class id 0\.\.2"):
        D.FolderDataset(tmp_path)[1]
    (tmp_path / "masks" / "train" / "b.png").unlink()
    with pytest.raises(RegproxyError, match=rf"expected {tmp_path / 'masks' / 'train' / 'b.png'}"):
        D.FolderDataset(tmp_path)
    (tmp_path / "classes.yaml").write_text("classes: [a, b]\npalette: [[1, 2, 3]]\n")
    with pytest.raises(RegproxyError, match="palette"):
        D.FolderDataset(tmp_path)
    (tmp_path / "classes.yaml").write_text("classes: [a, b]\nignore_index: 1\n")
    with pytest.raises(RegproxyError, match="ignore_index"):
        D.FolderDataset(tmp_path)
    (tmp_path / "classes.yaml").write_text("classes: [a]\ncolours: []\n")
    with pytest.raises(RegproxyError, match="unknown key"):
        D.FolderDataset(tmp_path)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "images" / "train" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(RegproxyError, match=r"a\.jpg"):
        D.FolderDataset(tmp_path)[0]
    (tmp_path / "masks" / "train" / "b.png").write_bytes(b"not a mask")
    with pytest.raises(RegproxyError, match=r"cannot read mask .*b\.png"):
        D.FolderDataset(tmp_path)[1]


def test_build_dataset_unknown_kind(tmp_path: Path) -> None:
    valid = "ade20k, cityscapes, pascal-context, pascal-context-59, camvid, folder"
    with pytest.raises(RegproxyError, match=f"valid kinds: {valid}"):
        D.build_dataset("coco", tmp_path)


# CamVid (the SegNet tutorial's layout)


def _camvid(root: Path, splits: dict[str, int] | None = None) -> Path:
    """CamVid/{split}/*.png and CamVid/{split}annot/*.png; masks cycle through ids 0-11 (11 = void)."""
    base = root / "CamVid"
    for split, count in (splits or {"train": 3, "val": 2, "test": 2}).items():
        for i in range(count):
            _image(base / split / f"0001TP_{split}{i:03d}.png", seed=i)
            _mask(base / f"{split}annot" / f"0001TP_{split}{i:03d}.png", list(range(12)))
    return base


def test_camvid_loads_all_three_splits_and_ignores_void(tmp_path: Path) -> None:
    from regproxy_cli.data.open import available_splits, detect_kind, open_dataset

    base = _camvid(tmp_path)
    for root in (tmp_path, base):  # the parent or the CamVid folder itself
        assert detect_kind(root) == "camvid" and available_splits("auto", root) == ["train", "val", "test"]
        sizes = {split: len(open_dataset("auto", root, split)) for split in ("train", "val", "test")}
        assert sizes == {"train": 3, "val": 2, "test": 2}
    dataset = D.build_dataset("camvid", tmp_path, "test")
    assert dataset.num_classes == 11 and dataset.classes[0] == "Sky" and dataset.classes[-1] == "Bicyclist"
    assert len(set(dataset.palette)) == 11
    image, label, name = dataset[1]
    assert image.shape == (H, W, 3) and name == "0001TP_test001"
    np.testing.assert_array_equal(label[:12, 0], [*range(11), 255])


def test_camvid_errors_name_paths_and_files(tmp_path: Path) -> None:
    with pytest.raises(RegproxyError, match=str(tmp_path / "CamVid" / "train")):
        D.CamVid(tmp_path, "train")
    base = _camvid(tmp_path, {"train": 2})
    with pytest.raises(RegproxyError, match="unknown CamVid split 'training'; use train, val, test"):
        D.CamVid(tmp_path, "training")
    with pytest.raises(RegproxyError, match=str(base / "val")):
        D.CamVid(tmp_path, "val")
    _mask(base / "trainannot" / "0001TP_train001.png", [3, 12])
    with pytest.raises(RegproxyError, match=r"0001TP_train001\.png: label 12 .*CamVid's void, 11, becomes 255"):
        D.CamVid(tmp_path, "train")[1]
    (base / "trainannot" / "0001TP_train000.png").unlink()
    with pytest.raises(RegproxyError, match=r"CamVid: no mask for .*0001TP_train000\.png"):
        D.CamVid(tmp_path, "train")


def test_camvid_configs_and_eval_open_the_test_split(tmp_path: Path) -> None:
    from regproxy_cli.engine.config import load_config
    from regproxy_cli.engine.evaluate import open_eval_dataset

    _camvid(tmp_path)
    for name in ("camvid-cpu.yaml", "camvid-s16.yaml"):
        config = load_config(Path(__file__).parent.parent / "configs" / name, [f"data.root={tmp_path}"])
        assert config.data.kind == "camvid" and config.data.crop_size % 16 == 0 and config.data.root == str(tmp_path)
        assert len(config.data.open("test")) == 2
    cpu = load_config(Path(__file__).parent.parent / "configs" / "camvid-cpu.yaml")
    assert (cpu.model.backbone, cpu.model.pretrained, cpu.data.crop_size, cpu.optim.batch_size, cpu.optim.lr) == (
        "demo8", False, 256, 8, 1e-3)
    assert (cpu.test.inference_mode, cpu.test.test_scale, cpu.data.root, cpu.data.workers) == ("whole", None, "data/CamVid", 1)
    s16 = load_config(Path(__file__).parent.parent / "configs" / "camvid-s16.yaml")
    assert (s16.model.backbone, s16.model.pretrained, s16.test.test_scale) == ("s16", True, [480, 360])
    config = tmp_path / "camvid.yaml"
    config.write_text(yaml.safe_dump({"data": {"kind": "camvid", "root": str(tmp_path)}}))
    assert len(open_eval_dataset(str(config), "test")) == 2 and len(open_eval_dataset(str(config))) == 2
    assert len(open_eval_dataset(str(tmp_path), "test")) == 2 and len(open_eval_dataset(str(tmp_path))) == 2
    assert open_eval_dataset(str(tmp_path), "train").samples[0][2] == "0001TP_train000"
