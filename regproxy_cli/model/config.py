"""The model schema: everything needed to rebuild a model and to use it (``config.json`` of a model directory)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from regproxy_cli.classes import default_palette
from regproxy_cli.constants import IMAGENET_MEAN, IMAGENET_STD
from regproxy_cli.errors import RegproxyError

FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """How to rebuild a model and how to run it (preprocessing and inference protocol)."""

    backbone: str
    num_classes: int
    m: int
    region_res: tuple[int, int] = (4, 4)
    baseline: bool = False
    # the token classifier plugin (regproxy_cli.model.classifiers) and its resolved options (e.g. a hierarchy)
    classifier: str = "linear"
    classifier_options: dict = field(default_factory=dict)
    crop_size: int = 512
    classes: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    inference_mode: str = "slide"  # 'slide' or 'whole'
    window_stride: int | None = None  # sliding-window stride; None = crop_size
    test_scale: tuple[int, int] | None = (2048, 512)  # mmseg keep-ratio (long, short) bound; None = as given
    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    source: str | None = None  # where the weights came from
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.region_res = tuple(self.region_res)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.test_scale is not None:
            self.test_scale = tuple(self.test_scale)
        if not self.classes:
            self.classes = [f"class_{i}" for i in range(self.num_classes)]
        if not self.palette:
            self.palette = [list(c) for c in default_palette(self.num_classes)]
        if len(self.classes) != self.num_classes or len(self.palette) != self.num_classes:
            raise RegproxyError(
                f"config has {self.num_classes} classes but {len(self.classes)} names and {len(self.palette)} colours"
            )
        if self.inference_mode not in ("slide", "whole"):
            raise RegproxyError(f"inference mode must be 'slide' or 'whole', not {self.inference_mode!r}")

    @property
    def stride(self) -> int:
        return self.window_stride or self.crop_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RegproxyError(f"{where}: unknown key(s) {', '.join(unknown)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise RegproxyError(f"{where}: format version {version} is newer than this regproxy ({FORMAT_VERSION})")
        try:
            return cls(**data)
        except TypeError as exc:
            raise RegproxyError(f"{where}: {exc}") from None
