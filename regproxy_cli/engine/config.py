"""Training configs: one flat YAML per run, validated into dataclasses; ``--set section.key=value`` overrides.

No inheritance: a recipe file states every value that differs from the defaults below, and the resolved
config is written into the run directory, so ``config.yaml`` + checkpoint rebuild the run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from regproxy_cli.data.datasets import SegmentationDataset
from regproxy_cli.data.open import SyntheticSpec, open_dataset
from regproxy_cli.engine.losses import MEAN_OVER, get_loss, list_losses
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.classifiers import list_classifiers


@dataclass
class ModelSection:
    backbone: str = "s16"
    m: int | None = None  # token-head depth; None = the backbone's default
    region_res: int = 4
    baseline: bool = False
    pretrained: bool = True  # start from the backbone's ImageNet weights (Hub)
    drop_path_rate: float = 0.1
    # start from another model (anything --model accepts): matching tensors loaded, position embeddings resized,
    # classifier rows kept by class name (regproxy_cli.engine.finetune); model.pretrained is then not used
    init_from: str | None = None
    freeze: str = "none"  # none | backbone | blocks:N (patch embedding, prefix tokens, position embedding, N blocks)
    # the token classifier: linear (the paper's), hssn, protoseg, or an installed plugin (regproxy classifiers)
    classifier: str = "linear"
    classifier_options: dict = field(default_factory=dict)  # e.g. hssn: {hierarchy: FILE}, protoseg: {prototypes: M}


@dataclass
class DataSection:
    kind: str = "ade20k"  # ade20k | cityscapes | pascal-context | pascal-context-59 | folder | synthetic
    root: str = "data/ade"
    train_split: str = "train"
    val_split: str = "val"
    crop: int = 512
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # mmseg (long, short) resize scale
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    workers: int = 4
    # synthetic only: scenes generated into `root` when missing
    synthetic_train: int = 400
    synthetic_val: int = 50
    synthetic_size: int = 128
    synthetic_classes: int = 5
    synthetic_generator: str = "scenes"  # scenes | streets (regproxy_cli.data.streets: street-like, 7 classes)

    def open(self, split: str) -> SegmentationDataset:
        """One split of this dataset (synthetic scenes are generated into ``root`` first, once)."""
        synthetic = SyntheticSpec(self.synthetic_train, self.synthetic_val, self.synthetic_size, self.synthetic_classes,
                                  self.synthetic_generator)
        return open_dataset(self.kind, self.root, split, synthetic=synthetic)


@dataclass
class TestSection:
    mode: str = "slide"  # slide | whole
    stride: int | None = None  # sliding-window stride; None = the crop
    scale: list[int] | None = field(default_factory=lambda: [2048, 512])  # keep-ratio test scale; None = as is


@dataclass
class OptimSection:
    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 16  # total over all processes and accumulation steps
    accum_steps: int = 1
    iters: int = 160000
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    schedule: str = "poly"  # poly | cosine_restart
    poly_power: float = 1.0
    min_lr: float = 0.0
    restart_periods: list[int] = field(default_factory=lambda: [20000, 40000, 100000])
    restart_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])


@dataclass
class LossSection:
    # what the summed cross-entropy is divided by: "all" = every pixel of the batch, ignored ones included
    # (mmseg 0.17's CrossEntropyLoss, so the paper's); "labelled" = only the pixels that carry a label
    mean_over: str = "all"
    kind: str = "ce"  # ce | focal | dice | ce+dice | lovasz | hssn | protoseg, or an installed plugin
    # none | auto (median-frequency balancing from the training masks' pixel counts) | [w0, w1, ...]
    class_weight: str | list[float] | None = "none"
    focal_gamma: float = 2.0
    options: dict = field(default_factory=dict)  # the kind's own settings, e.g. hssn: {triplet_weight: 0.5}


@dataclass
class RunSection:
    out_dir: str = "runs/run"
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only)
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 4000
    save_every: int = 4000
    log_every: int = 50
    threads: int | None = None  # CPU threads per process; None = torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume on GPUs, somewhat slower
    tf32: bool = False  # TF32 in matmuls and cuDNN convolutions on Ampere+ GPUs: faster fp32, ~1e-3 relative error
    backend: str = "auto"  # torchrun's process group: auto (nccl on GPUs, gloo on CPUs) | nccl | gloo (GPUs shared)


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


_CHOICES = {
    "data.kind": ("ade20k", "cityscapes", "pascal-context", "pascal-context-59", "camvid", "folder", "synthetic"),
    "test.mode": ("slide", "whole"),
    "optim.schedule": ("poly", "cosine_restart"),
    "loss.mean_over": MEAN_OVER,
    "run.precision": ("fp32", "bf16", "fp16"),
    "run.backend": ("auto", "nccl", "gloo"),
}


def _check_value(key: str, value: object, annotation: object) -> object:
    """Return ``value`` converted to the annotated type, or raise an error naming ``key``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"list": list})  # postponed annotations of this module
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first type the value fits (str | list[float]: "auto" or [1, 2])
            try:
                return _check_value(key, value, option)
            except RegproxyError:
                pass
        return _check_value(key, value, options[-1])
    if annotation is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise RegproxyError(f"config key {key}: expected a mapping of names to values, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RegproxyError(f"config key {key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 6e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise RegproxyError(f"config key {key}: expected {annotation.__name__}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise RegproxyError(f"config key {key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
    return value


def _build(cls: type, data: dict, prefix: str) -> object:
    if not isinstance(data, dict):
        raise RegproxyError(f"config section {prefix or 'top level'}: expected a mapping, got {data!r}")
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RegproxyError(f"unknown config key {where}{unknown[0]}; known: {', '.join(sorted(hints))}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = {"model": ModelSection, "data": DataSection, "test": TestSection, "optim": OptimSection,
               "loss": LossSection, "run": RunSection}.get(name) if cls is TrainConfig else None
        values[name] = _build(sub, value, key) if sub else _check_value(key, value, hints[name])
    return cls(**values)


def _set(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise RegproxyError(f"--set {assignment!r}: expected section.key=value")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
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
    for assignment in overrides:
        _set(data, assignment)
    config = _build(TrainConfig, data, "")
    _validate(config)
    return config


def _validate(config: TrainConfig) -> None:
    o, r = config.optim, config.run
    if o.iters < 1 or o.batch_size < 1 or o.accum_steps < 1:
        raise RegproxyError("config: optim.iters, optim.batch_size and optim.accum_steps must be positive")
    if o.schedule == "cosine_restart" and (len(o.restart_periods) != len(o.restart_weights) or not o.restart_periods):
        raise RegproxyError("config: optim.restart_periods and optim.restart_weights must have the same length")
    if min(r.eval_every, r.save_every, r.log_every) < 1:
        raise RegproxyError("config: run.eval_every, run.save_every and run.log_every must be positive")
    if not 1 <= config.model.region_res <= 16:
        raise RegproxyError("config key model.region_res: must be 1..16")
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
    if loss.focal_gamma < 0:
        raise RegproxyError("config key loss.focal_gamma: must be >= 0")


_FREEZE = re.compile(r"none|backbone|blocks:[1-9][0-9]*")


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
