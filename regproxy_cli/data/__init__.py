"""Datasets (ADE20K, Cityscapes, Pascal Context, user folders, synthetic scenes) and the mmseg training pipeline."""

from regproxy_cli.data.datasets import (
    ADE20K,
    DATASETS,
    Cityscapes,
    FolderDataset,
    PascalContext,
    SegmentationDataset,
    build_dataset,
)
from regproxy_cli.data.synthetic import SyntheticScenes, write_synthetic_dataset
from regproxy_cli.data.transforms import train_pipeline

__all__ = [
    "ADE20K",
    "DATASETS",
    "Cityscapes",
    "FolderDataset",
    "PascalContext",
    "SegmentationDataset",
    "SyntheticScenes",
    "build_dataset",
    "train_pipeline",
    "write_synthetic_dataset",
]
