"""Opening a dataset as ``train`` and ``eval`` both do: by kind or by looking at the folder, with synthetic scenes
generated on first use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from regproxy_cli.data.datasets import SegmentationDataset, build_dataset
from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.errors import RegproxyError


@dataclass(frozen=True)
class SyntheticSpec:
    """What ``synthetic`` scenes to generate into a dataset root (see :func:`write_synthetic_dataset`)."""

    train: int = 400
    val: int = 50
    size: int = 128
    classes: int = 5


def detect_kind(root: str | Path) -> str:
    """The dataset format of a folder: ``folder`` (a classes.yaml), ``ade20k``, ``cityscapes`` or ``pascal-context``."""
    root = Path(root)
    if (root / "classes.yaml").is_file():
        return "folder"
    if (root / "ADEChallengeData2016").is_dir() or root.name == "ADEChallengeData2016":
        return "ade20k"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "VOCdevkit").is_dir() or (root / "VOC2010").is_dir():
        return "pascal-context"
    raise RegproxyError(
        f"{root}: cannot tell the dataset format: expected classes.yaml (folder format), ADEChallengeData2016/, "
        f"leftImg8bit/ (Cityscapes) or VOCdevkit/ (Pascal Context)"
    )


def open_dataset(kind: str, root: str | Path, split: str, *, synthetic: SyntheticSpec | None = None
                 ) -> SegmentationDataset:
    """One split of a dataset.

    Args:
        kind: a :func:`~regproxy_cli.data.datasets.build_dataset` kind, ``auto`` (:func:`detect_kind`) or
            ``synthetic``: scenes generated into ``root`` (once; a later call finds them) and read as a folder dataset.
        root: the dataset's root directory.
        split: e.g. ``train`` or ``val``.
        synthetic: what to generate for ``synthetic`` (default: :class:`SyntheticSpec`'s).
    """
    if kind == "synthetic":
        spec = synthetic or SyntheticSpec()
        write_synthetic_dataset(root, spec.train, spec.val, (spec.size, spec.size), spec.classes)
        kind = "folder"
    elif kind == "auto":
        kind = detect_kind(root)
    return build_dataset(kind, root, split)
