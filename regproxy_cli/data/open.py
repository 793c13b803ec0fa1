"""Opening a dataset as ``train`` and ``eval`` both do: by kind or by looking at the folder, with synthetic scenes
generated on first use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from regproxy_cli.data.datasets import DATASETS, CamVid, SegmentationDataset, build_dataset, camvid_base
from regproxy_cli.data.streets import write_streets_dataset
from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.errors import RegproxyError


@dataclass(frozen=True)
class SyntheticSpec:
    """What ``synthetic`` scenes to generate into a dataset root (see :func:`write_synthetic_dataset`)."""

    train: int = 400
    val: int = 50
    size: int = 128
    classes: int = 5
    generator: str = "scenes"  # scenes (data/synthetic.py) | streets (data/streets.py: 7 fixed classes)


def detect_kind(root: str | Path) -> str:
    """The dataset format of a folder: ``folder`` (a classes.yaml), ``ade20k``, ``cityscapes``, ``pascal-context``
    or ``camvid`` (the SegNet tutorial's ``train``/``trainannot`` folders, in ``root`` or ``root/CamVid``)."""
    root = Path(root)
    if (root / "classes.yaml").is_file():
        return "folder"
    if (root / "ADEChallengeData2016").is_dir() or root.name == "ADEChallengeData2016":
        return "ade20k"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "VOCdevkit").is_dir() or (root / "VOC2010").is_dir():
        return "pascal-context"
    if (camvid_base(root) / "trainannot").is_dir():
        return "camvid"
    raise RegproxyError(
        f"{root}: cannot tell the dataset format: expected classes.yaml (folder format), ADEChallengeData2016/, "
        f"leftImg8bit/ (Cityscapes), VOCdevkit/ (Pascal Context) or trainannot/ (CamVid, the SegNet tutorial's)"
    )


def available_splits(kind: str, root: str | Path) -> list[str]:
    """The splits of a dataset that have annotations on disk, train and val (and test) first.

    ``kind`` is a :func:`~regproxy_cli.data.datasets.build_dataset` kind or ``auto``. Cityscapes' test split is
    left out: its public annotations are blank.
    """
    root = Path(root)
    key = detect_kind(root) if kind == "auto" else kind.strip().lower().replace("_", "-")
    if key == "folder":
        images, masks = root / "images", root / "masks"
        found = {p.name for p in images.iterdir() if p.is_dir() and (masks / p.name).is_dir()} if images.is_dir() \
            else set()
    elif key == "camvid":
        base = camvid_base(root)
        found = {s for s in CamVid.SPLITS if (base / s).is_dir() and (base / f"{s}annot").is_dir()}
    elif key == "ade20k":
        base = root if (root / "images").is_dir() or root.name == "ADEChallengeData2016" else (
            root / "ADEChallengeData2016")
        found = {s for s, folder in (("train", "training"), ("val", "validation"))
                 if (base / "annotations" / folder).is_dir()}
    elif key == "cityscapes":
        found = {s for s in ("train", "val") if (root / "gtFine" / s).is_dir()}
    elif key in ("pascal-context", "pascal-context-59"):
        lists = [root / "ImageSets", root / "VOC2010" / "ImageSets", root / "VOCdevkit" / "VOC2010" / "ImageSets"]
        found = {p.stem for folder in lists for p in (folder / "SegmentationContext").glob("*.txt")}
    else:
        raise RegproxyError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASETS)}")
    first = [s for s in ("train", "val", "test") if s in found]
    splits = first + sorted(found - set(first))
    if not splits:
        raise RegproxyError(f"{root}: no annotated split found for a {key} dataset")
    return splits


def open_dataset(kind: str, root: str | Path, split: str, *, synthetic: SyntheticSpec | None = None
                 ) -> SegmentationDataset:
    """One split of a dataset.

    Args:
        kind: a :func:`~regproxy_cli.data.datasets.build_dataset` kind, ``auto`` (:func:`detect_kind`) or
            ``synthetic``: scenes generated into ``root`` (once; a later call finds them) and read as a folder dataset.
        root: the dataset's root directory.
        split: e.g. ``train``, ``val`` or (CamVid) ``test``.
        synthetic: what to generate for ``synthetic`` (default: :class:`SyntheticSpec`'s).
    """
    if kind == "synthetic":
        spec = synthetic or SyntheticSpec()
        if spec.generator == "streets":  # its seven classes are fixed: spec.classes applies to scenes only
            write_streets_dataset(root, spec.train, spec.val, (spec.size, spec.size))
        elif spec.generator == "scenes":
            write_synthetic_dataset(root, spec.train, spec.val, (spec.size, spec.size), spec.classes)
        else:
            raise RegproxyError(f"synthetic generator {spec.generator!r} is not one of scenes, streets")
        kind = "folder"
    elif kind == "auto":
        kind = detect_kind(root)
    return build_dataset(kind, root, split)
