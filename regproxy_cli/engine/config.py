"""Training configs: one flat YAML per run, validated into dataclasses; ``--set section.key=value`` overrides.

No inheritance: a recipe file states every value that differs from the defaults below, and the resolved
config is written into the run directory, so ``config.yaml`` + checkpoint rebuild the run.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from regproxy_cli.constants import INFERENCE_MODES, PRECISIONS
from regproxy_cli.data.datasets import SegmentationDataset
from regproxy_cli.data.open import SyntheticSpec, open_dataset
from regproxy_cli.engine.distributed import BACKENDS
from regproxy_cli.engine.losses import MEAN_OVER, get_loss, list_losses
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.classifiers import list_classifiers
from regproxy_cli.schema import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Rule, build, rule

DATA_KINDS = ("ade20k", "cityscapes", "pascal-context", "pascal-context-59", "camvid", "folder", "synthetic")
SCALE = rule(length=2, each=Rule(low=1, high=1 << 16))  # (long, short) sides in pixels


@dataclass
class ModelSection:
    backbone: str = "s16"
    m: int | None = field(default=None, metadata=NON_NEGATIVE)  # token-head depth; None = the backbone's default
    region_res: int = field(default=4, metadata=rule(low=1, high=16))
    baseline: bool = False
    pretrained: bool = True  # start from the backbone's ImageNet weights (Hub)
    drop_path_rate: float = field(default=0.1, metadata=rule(low=0, below=1))
    # start from another model (anything --model accepts): matching tensors loaded, position embeddings resized,
    # classifier rows kept by class name (regproxy_cli.engine.finetune); model.pretrained is then not used
    init_from: str | None = None
    freeze: str = "none"  # none | backbone | blocks:N (patch embedding, prefix tokens, position embedding, N blocks)
    # the token classifier: linear (the paper's), hssn, protoseg, or an installed plugin (regproxy classifiers)
    classifier: str = "linear"
    classifier_options: dict = field(default_factory=dict)  # e.g. hssn: {hierarchy: FILE}, protoseg: {prototypes: M}


@dataclass
class DataSection:
    kind: str = field(default="ade20k", metadata=rule(choices=DATA_KINDS))
    root: str = "data/ade"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = field(default=512, metadata=AT_LEAST_1)  # ModelConfig.crop_size: training crop = test window
    scale: list[int] = field(default_factory=lambda: [2048, 512], metadata=SCALE)  # mmseg (long, short) resize scale
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0], metadata=rule(length=2, each=Rule(above=0)))
    cat_max_ratio: float = field(default=0.75, metadata=rule(above=0, high=1))
    photometric: bool = True
    workers: int = field(default=4, metadata=NON_NEGATIVE)
    # synthetic only: scenes generated into `root` when missing
    synthetic_train: int = field(default=400, metadata=AT_LEAST_1)
    synthetic_val: int = field(default=50, metadata=AT_LEAST_1)
    synthetic_size: int = field(default=128, metadata=rule(low=8, high=8192))
    synthetic_classes: int = field(default=5, metadata=rule(low=1, high=255))
    synthetic_generator: str = "scenes"  # scenes | streets (regproxy_cli.data.streets: street-like, 7 classes)

    def open(self, split: str) -> SegmentationDataset:
        """One split of this dataset (synthetic scenes are generated into ``root`` first, once)."""
        synthetic = SyntheticSpec(self.synthetic_train, self.synthetic_val, self.synthetic_size, self.synthetic_classes,
                                  self.synthetic_generator)
        return open_dataset(self.kind, self.root, split, synthetic=synthetic)


@dataclass
class TestSection:
    """The test protocol the model is saved with: ModelConfig's names, copied 1:1 into config.json."""

    __test__ = False  # a config section, not a pytest test class

    inference_mode: str = field(default="slide", metadata=rule(choices=INFERENCE_MODES))
    window_stride: int | None = field(default=None, metadata=AT_LEAST_1)  # sliding-window stride; None = the crop
    test_scale: list[int] | None = field(default_factory=lambda: [2048, 512], metadata=SCALE)  # keep-ratio; None = as is


@dataclass
class OptimSection:
    lr: float = field(default=6e-5, metadata=POSITIVE)
    weight_decay: float = field(default=0.01, metadata=NON_NEGATIVE)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=rule(length=2, each=Rule(low=0, below=1)))
    batch_size: int = field(default=16, metadata=AT_LEAST_1)  # total over all processes and accumulation steps
    accum_steps: int = field(default=1, metadata=AT_LEAST_1)
    iters: int = field(default=160000, metadata=AT_LEAST_1)
    warmup_iters: int = field(default=1500, metadata=NON_NEGATIVE)
    warmup_ratio: float = field(default=1e-6, metadata=rule(low=0, high=1))
    schedule: str = field(default="poly", metadata=rule(choices=("poly", "cosine_restart")))
    poly_power: float = field(default=1.0, metadata=NON_NEGATIVE)
    min_lr: float = field(default=0.0, metadata=NON_NEGATIVE)
    restart_periods: list[int] = field(default_factory=lambda: [20000, 40000, 100000], metadata=rule(each=Rule(low=1)))
    restart_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25], metadata=rule(each=Rule(low=0)))


@dataclass
class LossSection:
    # what the summed cross-entropy is divided by: "all" = every pixel of the batch, ignored ones included
    # (mmseg 0.17's CrossEntropyLoss, so the paper's); "labelled" = only the pixels that carry a label
    mean_over: str = field(default="all", metadata=rule(choices=MEAN_OVER))
    kind: str = "ce"  # ce | focal | dice | ce+dice | lovasz | hssn | protoseg, or an installed plugin
    # none | auto (median-frequency balancing from the training masks' pixel counts) | [w0, w1, ...]
    class_weight: str | list[float] | None = "none"
    focal_gamma: float = field(default=2.0, metadata=NON_NEGATIVE)
    options: dict = field(default_factory=dict)  # the kind's own settings, e.g. hssn: {triplet_weight: 0.5}


@dataclass
class RunSection:
    out_dir: str = "runs/run"
    seed: int = field(default=0, metadata=rule(low=0, below=2**63))
    precision: str = field(default="fp32", metadata=rule(choices=PRECISIONS))  # fp16 on CUDA only
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = field(default=4000, metadata=AT_LEAST_1)
    save_every: int = field(default=4000, metadata=AT_LEAST_1)
    log_every: int = field(default=50, metadata=AT_LEAST_1)
    threads: int | None = field(default=None, metadata=AT_LEAST_1)  # CPU threads per process; None = torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume on GPUs, somewhat slower
    tf32: bool = False  # TF32 in matmuls and cuDNN convolutions on Ampere+ GPUs: faster fp32, ~1e-3 relative error
    # torchrun's process group: auto (nccl on GPUs, gloo on CPUs) | nccl | gloo (several processes may share a GPU)
    backend: str = field(default="auto", metadata=rule(choices=BACKENDS))


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    test: TestSection = field(default_factory=TestSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "test": TestSection, "optim": OptimSection,
             "loss": LossSection, "run": RunSection}


# Keys that took ModelConfig's names (config.json): the old spelling still reads, with a FutureWarning, for one
# release; a saved run's config (last.pt) is read through the same map, so old runs resume.
RENAMED_KEYS = {"data.crop": "data.crop_size", "test.mode": "test.inference_mode", "test.stride": "test.window_stride",
                "test.scale": "test.test_scale"}


def rename_old_keys(data: dict, *, warn: bool = True) -> dict:
    """``data`` (a nested config mapping) with the keys of :data:`RENAMED_KEYS` under their new names, in place."""
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        values = data.get(section)
        if not isinstance(values, dict) or old_key not in values:
            continue
        if new_key in values:
            raise RegproxyError(f"config keys {old} and {new} are one setting: keep {new}")
        values[new_key] = values.pop(old_key)
        if warn:
            _warn_renamed(old)
    return data


def _warn_renamed(old: str) -> None:
    """The one FutureWarning of an old key name (in the YAML or a --set), pointing at the caller's caller."""
    warnings.warn(f"config key {old} is now {RENAMED_KEYS[old]}: rename it (the old name goes in the next release)",
                  FutureWarning, stacklevel=4)


def _build(data: dict) -> TrainConfig:
    """The YAML mapping (after ``--set``) as a TrainConfig: every key's type and range checked by the schema."""
    return build(TrainConfig, data, what="config key", sections=_SECTIONS)


def _set(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise RegproxyError(f"--set {assignment!r}: expected section.key=value")
    path, raw = assignment.split("=", 1)
    path = path.strip()
    if path in RENAMED_KEYS:
        _warn_renamed(path)
        path = RENAMED_KEYS[path]
    parts = path.split(".")
    if len(parts) != 2:
        raise RegproxyError(f"--set {assignment!r}: the key must be section.key, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    data.setdefault(parts[0], {})
    if not isinstance(data[parts[0]], dict):
        raise RegproxyError(f"--set {assignment!r}: {parts[0]} is not a section")
    data[parts[0]][parts[1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply ``section.key=value`` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RegproxyError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RegproxyError(f"{path}: not valid YAML{where}") from None
    if isinstance(data, dict):
        rename_old_keys(data)
    for assignment in overrides:
        _set(data, assignment)
    config = _build(data)
    _validate(config)
    return config


def _validate(config: TrainConfig) -> None:
    """What a single key's type and range cannot say (ranges live in the fields' ``rule`` metadata)."""
    o = config.optim
    if o.schedule == "cosine_restart" and (len(o.restart_periods) != len(o.restart_weights) or not o.restart_periods):
        raise RegproxyError("config key optim.restart_periods: needs as many entries as optim.restart_weights")
    low, high = config.data.ratio_range
    if low > high:
        raise RegproxyError(f"config key data.ratio_range: [low, high] with low <= high, got {[low, high]}")
    if not _FREEZE.fullmatch(config.model.freeze):
        raise RegproxyError(f"config key model.freeze: {config.model.freeze!r} is not none, backbone or blocks:N "
                            "(N >= 1)")
    if config.model.init_from is not None and not config.model.init_from.strip():
        raise RegproxyError("config key model.init_from: empty; give a model (zoo name, Hub id, directory, .pth) or null")
    if config.model.classifier not in list_classifiers():
        raise RegproxyError(f"config key model.classifier: {config.model.classifier!r} is not one of "
                            f"{', '.join(list_classifiers())}")
    loss = config.loss
    if loss.kind not in list_losses():
        raise RegproxyError(f"config key loss.kind: {loss.kind!r} is not one of {', '.join(list_losses())}")
    try:
        get_loss(loss.kind).resolve_options(dict(loss.options))
    except RegproxyError as exc:
        raise RegproxyError(f"config key loss.options: {exc}") from None
    if loss.class_weight is None:
        loss.class_weight = "none"
    if isinstance(loss.class_weight, str) and loss.class_weight not in ("none", "auto"):
        raise RegproxyError(f"config key loss.class_weight: {loss.class_weight!r} is not none, auto or a list of "
                            "numbers [w0, w1, ...]")
    if isinstance(loss.class_weight, list) and (not loss.class_weight or min(loss.class_weight) < 0
                                                or not sum(loss.class_weight) > 0):
        raise RegproxyError("config key loss.class_weight: a list needs one weight >= 0 per class, not all zero")


_FREEZE = re.compile(r"none|backbone|blocks:[1-9][0-9]*")


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
