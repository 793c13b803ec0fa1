"""The model schema: everything needed to rebuild a model and to use it (``config.json`` of a model directory)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from regproxy_cli.classes import default_palette
from regproxy_cli.constants import IMAGENET_MEAN, IMAGENET_STD, INFERENCE_MODES
from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import read_json
from regproxy_cli.schema import AT_LEAST_1, Rule, build, rule

# A model directory (also a Hub repo): this schema as config.json, the weights, a generated model card
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
MAX_CLASSES = 65535  # a label PNG holds 16 bits; more would only build huge name and colour lists
SIDE = Rule(low=1, high=1 << 16)  # a size in pixels


@dataclass
class ModelConfig:
    """How to rebuild a model and how to run it (preprocessing and inference protocol)."""

    backbone: str
    num_classes: int = field(metadata=rule(low=1, high=MAX_CLASSES))
    m: int = field(metadata=rule(low=0, high=64))
    region_res: tuple[int, int] = field(default=(4, 4), metadata=rule(each=Rule(low=1, high=16)))
    baseline: bool = False
    # the token classifier plugin (regproxy_cli.model.classifiers) and its resolved options (e.g. a hierarchy)
    classifier: str = "linear"
    classifier_options: dict = field(default_factory=dict)
    crop_size: int = field(default=512, metadata=rule(low=1, high=1 << 16))
    classes: list[str] = field(default_factory=list, metadata=rule(max_length=MAX_CLASSES))
    palette: list[list[int]] = field(default_factory=list, metadata=rule(
        max_length=MAX_CLASSES, each=Rule(length=3, each=Rule(low=0, high=255))))
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN, metadata=rule(each=Rule(low=-1e6, high=1e6)))
    # std divides: 0 would make every pixel infinite and the whole image one class
    std: tuple[float, float, float] = field(default=IMAGENET_STD, metadata=rule(each=Rule(above=0, high=1e6)))
    inference_mode: str = field(default="slide", metadata=rule(choices=INFERENCE_MODES))
    # sliding-window stride; None = crop_size
    window_stride: int | None = field(default=None, metadata=rule(low=1, high=1 << 16))
    # mmseg keep-ratio (long, short) bound; None = as given
    test_scale: tuple[int, int] | None = field(default=(2048, 512), metadata=rule(each=SIDE))
    dataset: str | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)
    source: str | None = None  # where the weights came from
    format_version: int = field(default=FORMAT_VERSION, metadata=AT_LEAST_1)

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
        if self.inference_mode not in INFERENCE_MODES:
            raise RegproxyError(f"inference mode must be 'slide' or 'whole', not {self.inference_mode!r}")

    @property
    def stride(self) -> int:
        return self.window_stride or self.crop_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "config") -> ModelConfig:
        """A config read from a file, validated once here: every key's type and range (one line naming the key)."""
        if not isinstance(data, dict):
            raise RegproxyError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise RegproxyError(f"{where}: unknown key(s) {', '.join(unknown)}")
        missing = [name for name in ("backbone", "num_classes", "m") if name not in data]
        if missing:
            raise RegproxyError(f"{where}: missing key(s) {', '.join(missing)}")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise RegproxyError(f"{where}: format version {version} is newer than this regproxy ({FORMAT_VERSION})")
        try:
            return build(cls, data, where=f"{where}: ", what="key")
        except RegproxyError as exc:  # __post_init__'s cross-key checks do not know the file
            message = str(exc)
            raise RegproxyError(message if message.startswith(f"{where}: ") else f"{where}: {message}") from None


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The config of a model directory whose weights are there too, read without building the model (no torch),
    or one error line."""
    directory = Path(directory)
    for needed in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / needed).is_file():
            raise RegproxyError(f"{directory} is not a regproxy model directory: {needed} is missing")
    return ModelConfig.from_dict(read_json(directory / CONFIG_NAME), where=str(directory / CONFIG_NAME))
