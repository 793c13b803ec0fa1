"""``regproxy train``: the paper's training protocol in one loop you can read top to bottom.

AdamW (no weight decay on position embeddings, prefix tokens and norms), linear warm-up then poly or
cosine restarts by iteration, cross-entropy with ignore 255 averaged as mmseg 0.17 does (over all pixels, see
:mod:`~regproxy_cli.engine.losses`; focal, Dice and Lovasz and class weights on request), a start from another
model and frozen layers (:mod:`~regproxy_cli.engine.finetune`), optional bf16/fp16 autocast and gradient
accumulation, torch DDP under ``torchrun`` (NCCL on GPU with SyncBN in the affinity head, gloo on CPU),
evaluation every N iterations keeping the best model, atomic checkpoints, and an exact ``--resume``:
the data stream and its augmentations are a pure function of (seed, sample position), and the model,
optimiser, scheduler, scaler, RNG states and iteration are restored.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.class_weights import CLASS_WEIGHT_FORMULA, pixel_counts, suggested_class_weights
from regproxy_cli.data.datasets import SegmentationDataset
from regproxy_cli.data.transforms import train_pipeline
from regproxy_cli.engine.config import OptimSection, TrainConfig, dump_config, rename_old_keys
from regproxy_cli.engine.distributed import (
    Runtime,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    rank_world,
    setup_runtime,
    shutdown,
)
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.engine.finetune import apply_freeze, frozen_modules, init_from, load_init_source, train_mode
from regproxy_cli.engine.losses import Loss, LossContext, build_loss
from regproxy_cli.errors import RegproxyError, listed, one_line, unpickling_reason
from regproxy_cli.files import write_atomic, write_text_atomic
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.inference.runtime import autocast_dtype
from regproxy_cli.model.classifiers import get_classifier
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.plugins import get_backbone
from regproxy_cli.model.regproxy import build_from_config

# the authors' paramwise_cfg, in our names; DINOv2/v3's register tokens and layer-scale gammas (ls1.gamma, gamma_1)
# are prefix tokens and per-channel scales like those, so they are not decayed either (as timm and DINOv2 do)
NO_DECAY_KEYS = ("pos_embed", "cls_token", "dist_token", "norm", "reg_token", "gamma")


class TrainStream(Dataset):
    """Sample position p -> the augmented sample of the run's deterministic stream.

    Epoch e visits the dataset in the order of a permutation seeded by (seed, e); the sample's
    augmentation RNG is seeded by (seed, p). Nothing depends on worker count or on when the run started.
    """

    def __init__(self, dataset: Dataset, transform, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self._orders: dict[int, torch.Tensor] = {}

    def index_of(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        return int(self._orders[epoch][offset])

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, position: int):
        image, label, _ = self.dataset[self.index_of(position)]
        generator = torch.Generator().manual_seed(self.seed * 2_000_003 + position)
        return self.transform(image, label, generator)


class _SeededPipeline:
    """The training pipeline with a per-sample generator (the pipeline object is rebuilt per call: cheap)."""

    def __init__(self, config: TrainConfig, mean, std) -> None:
        self.config, self.mean, self.std = config, mean, std

    def __call__(self, image, label, generator: torch.Generator):
        d = self.config.data
        pipeline = train_pipeline(
            crop=(d.crop_size, d.crop_size), scale=tuple(d.scale), ratio_range=tuple(d.ratio_range),
            cat_max_ratio=d.cat_max_ratio, photometric=d.photometric, ignore_index=IGNORE_INDEX,
            mean=self.mean, std=self.std, generator=generator,
        )
        return pipeline(image, label)


class _Positions(torch.utils.data.Sampler):
    """Positions of this process's samples from iteration ``start`` on (rank-major inside each batch)."""

    def __init__(self, start: int, iters: int, per_process: int, rank: int, world: int) -> None:
        self.start, self.iters, self.per_process, self.rank, self.world = start, iters, per_process, rank, world

    def __iter__(self):
        step = self.per_process * self.world
        for position in range(self.start * step, self.iters * step):
            if (position % step) // self.per_process == self.rank:
                yield position

    def __len__(self) -> int:
        return (self.iters - self.start) * self.per_process


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY_KEYS) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(iteration: int, optim: OptimSection) -> float:
    """mmseg's iteration-based schedule as a multiple of the base lr: poly or cosine restarts, linear warm-up."""
    min_ratio = optim.min_lr / optim.lr
    if optim.schedule == "poly":
        regular = (1 - min_ratio) * (1 - iteration / optim.iters) ** optim.poly_power + min_ratio
    else:
        regular, start = min_ratio, 0
        for period, weight in zip(optim.restart_periods, optim.restart_weights):
            if iteration < start + period:
                alpha = (iteration - start) / period
                regular = min_ratio + 0.5 * weight * (1 - min_ratio) * (math.cos(math.pi * alpha) + 1)
                break
            start += period
    if iteration < optim.warmup_iters:
        k = (1 - iteration / optim.warmup_iters) * (1 - optim.warmup_ratio)
        return regular * (1 - k)
    return regular


def _rng_state(device: torch.device) -> dict:
    """This process's generators: the CPU's and, on a GPU, that GPU's only (a resume may see fewer GPUs)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`_rng_state`'s generators; a GPU state goes to this process's GPU."""
    # RNG states are CPU ByteTensors whatever device the run uses: set_rng_state refuses any other
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # an older checkpoint: every visible GPU's state, by index
        if device.index >= len(cuda):
            return
        cuda = cuda[device.index]
    torch.cuda.set_rng_state(cuda.cpu(), device)


class _Log:
    """JSONL log (and TensorBoard when installed), written by the main process only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "log.jsonl"
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.board = None

    def write(self, iteration: int, **values) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as log:
            log.write(json.dumps({"iter": iteration, "time": round(time.time(), 3), **values}) + "\n")
        if self.board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, iteration)


def build_training_model(config: TrainConfig, classes, palette) -> nn.Module:
    m, d, t = config.model, config.data, config.test
    spec = get_backbone(m.backbone)
    try:
        classifier_options = get_classifier(m.classifier).resolve_options(dict(m.classifier_options), list(classes))
    except RegproxyError as exc:
        raise RegproxyError(f"config key model.classifier_options: {exc}") from None
    model_config = ModelConfig(
        backbone=m.backbone, num_classes=len(classes), m=spec.m if m.m is None else m.m,
        region_res=(m.region_res, m.region_res), baseline=m.baseline, classifier=m.classifier,
        classifier_options=classifier_options, crop_size=d.crop_size, classes=list(classes),
        palette=[list(c) for c in palette], inference_mode=t.inference_mode, window_stride=t.window_stride,
        test_scale=None if t.test_scale is None else tuple(t.test_scale), dataset=d.kind,
    )
    # a run started from another model gets its backbone from there: no ImageNet download
    pretrained = m.pretrained and m.init_from is None
    return build_from_config(model_config, pretrained_backbone=pretrained, drop_path_rate=m.drop_path_rate)


CLASS_WEIGHTS_NAME = "class_weights.json"


def class_weights(config: TrainConfig, train_set: SegmentationDataset, out_dir: Path, *, resume: bool,
                  progress: bool) -> tuple[list[float] | None, dict | None]:
    """The class weights ``loss.class_weight`` asks for, and (for ``auto``) the record to save in the run.

    ``auto`` counts the training masks' pixels and applies median-frequency balancing
    (:mod:`~regproxy_cli.data.class_weights`); a resumed run reads the numbers its start saved, so they never drift.
    """
    wanted, k = config.loss.class_weight, train_set.num_classes
    if wanted == "none":
        return None, None
    if isinstance(wanted, list):
        if len(wanted) != k:
            raise RegproxyError(f"config key loss.class_weight: {len(wanted)} weights for the {k} classes of "
                                f"{config.data.root} ({listed(list(train_set.classes), 6)})")
        return list(wanted), None
    saved = out_dir / CLASS_WEIGHTS_NAME
    if resume and saved.is_file():
        record = json.loads(saved.read_text())
        if len(record.get("weights", [])) != k:
            raise RegproxyError(f"{saved}: {len(record.get('weights', []))} weights for {k} classes")
        return record["weights"], None
    rank, world = rank_world()  # each process counts its share of the masks; the sum is every mask's
    counts = pixel_counts(train_set, progress=progress, indices=range(rank, len(train_set), world))
    counts = all_reduce_sum(torch.from_numpy(counts)).cpu().numpy()
    weights = suggested_class_weights(counts)
    record = {"formula": CLASS_WEIGHT_FORMULA, "classes": list(train_set.classes),
              "pixel_counts": counts.tolist(), "weights": weights.tolist()}
    return record["weights"], record


UNCHECKED_ON_RESUME = ("data.workers", "run.threads", "run.backend")  # they change speed, not results


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint (``last.pt``), on the CPU whatever device wrote it, without running pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RegproxyError(f"{path}: not a readable training checkpoint ({unpickling_reason(exc)})") from None


def clean_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the hidden ``.<name>.*.tmp`` files ``write_atomic`` leaves when a run is killed mid-save."""
    stale = [p for p in out_dir.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def truncate_log(path: Path, iteration: int) -> None:
    """Drop the log lines after ``iteration`` (the checkpoint a resume starts from): the iterations between it and
    the kill are run again, and would otherwise be logged twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            logged = json.loads(line).get("iter", 0)
        except (ValueError, AttributeError):
            continue  # a line cut by the kill
        if isinstance(logged, int) and logged <= iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text_atomic(path, "".join(kept))


def changed_keys(saved: dict, current: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts. A key on one side only counts, except a
    setting that the saved config predates (absent there) and that the current one leaves at its default."""
    defaults = {} if defaults is None else defaults
    keys = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        old, new, default = saved.get(key), current.get(key), defaults.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            keys += changed_keys(old, new, default if isinstance(default, dict) else {}, f"{dotted}.")
        elif key not in saved and key in defaults and new == default:
            continue
        elif old != new and dotted not in UNCHECKED_ON_RESUME:
            keys.append(dotted)
    return keys


@dataclass
class Trainer:
    """What one optimisation step needs: the (possibly DDP-wrapped) network and its optimisation state."""

    model: nn.Module  # the model itself: what is saved and evaluated
    net: nn.Module  # what runs the forward pass: the model, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    config: TrainConfig
    device: torch.device
    loss: Loss  # loss.kind, built for this model (class weights on the device)
    frozen: list[nn.Module] = field(default_factory=list)  # kept in eval mode (model.freeze)

    def train_mode(self) -> None:
        """Training mode for the network, except the frozen modules: their BN statistics and drop path stay put."""
        train_mode(self.net, self.frozen)

    def step(self, batches, iteration: int = 0) -> tuple[float, int]:
        """One iteration: accumulate gradients over ``optim.accum_steps`` batches, then update; (loss, images)."""
        o = self.config.optim
        dtype = autocast_dtype(self.config.run.precision)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, images_seen = 0.0, 0
        for micro in range(o.accum_steps):
            images, labels = next(batches)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            # DDP: gradients are exchanged on the last micro-batch only
            last = micro == o.accum_steps - 1 or not isinstance(self.net, nn.parallel.DistributedDataParallel)
            with (nullcontext() if last else self.net.no_sync()), torch.autocast(
                    self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                output = self.net(images, training_output=True)
                loss = self.loss(output, labels, iteration) / o.accum_steps
                self.scaler.scale(loss).backward()
            total_loss += loss.item()
            images_seen += images.shape[0]
        # Every process decides alike: DDP has already averaged a NaN into every process's gradients, so a loss
        # that is not finite on any process skips the step on all of them. One sum gives that and the loss mean
        # over processes (what mmseg logs).
        finite = math.isfinite(total_loss)
        summed = all_reduce_sum(torch.tensor([total_loss if finite else 0.0, 0.0 if finite else 1.0],
                                             dtype=torch.float64)).tolist()
        if summed[1]:
            return (total_loss if not finite else math.nan), images_seen
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return summed[0] / rank_world()[1], images_seen

    def state(self, iteration: int, best: dict, rng: list[dict] | None = None) -> dict:
        """The checkpoint; ``rng``: every process's :func:`_rng_state` in rank order (default: this one's)."""
        rng = rng or [_rng_state(self.device)]
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng[0],
                "rng_ranks": rng, "iteration": iteration, "best": best, "config": self.config.to_dict()}

    def restore(self, state: dict, rank: int = 0) -> tuple[int, dict]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # an fp32/bf16 run saves an empty scaler state: fp16 then starts from a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks") or [state["rng"]]  # each process resumes its own generators
        _set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0], self.device)
        return state["iteration"], state["best"]


def build_trainer(config: TrainConfig, model: nn.Module, runtime: Runtime,
                  class_weight: list[float] | None = None) -> Trainer:
    """Model on its device (DDP with SyncBN on GPUs under torchrun), AdamW over the trainable parameters (frozen
    ones stay out), the lr schedule, the fp16 scaler."""
    o = config.optim
    model = model.to(runtime.device)
    net = model
    if runtime.world > 1:
        if runtime.device.type == "cuda":  # the affinity head's BN over all GPUs (SyncBN has no CPU kernel)
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, o))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.run.precision == "fp16")
    weight = None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32, device=runtime.device)
    loss = build_loss(config.loss.kind, LossContext(
        model, mean_over=config.loss.mean_over, class_weight=weight, focal_gamma=config.loss.focal_gamma,
        options=config.loss.options, iters=o.iters))
    # after the SyncBN conversion, which replaces modules
    return Trainer(model, net, optimizer, scheduler, scaler, config, runtime.device, loss, frozen_modules(model))


def train(config: TrainConfig, *, resume: bool = False, allow_config_change: bool = False,
          progress: bool = True) -> Path | None:
    """Run (or resume) training; returns the directory of the best model (or the last one without evaluation), on
    the main process; None on the others (under torchrun).

    ``resume`` continues from ``run.out_dir/last.pt``, which must exist and must have been written with the same
    config (``allow_config_change`` accepts a different one, e.g. more iterations).
    """
    o, r = config.optim, config.run
    if r.deterministic:  # cuBLAS needs its workspace fixed before CUDA starts (setup_runtime starts it)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # errors, not warnings: a nondeterministic kernel would break the exact resume this setting promises (the
        # bilinear resize has a deterministic form, model/resize.py; anything else is reported in one line)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    runtime = setup_runtime(r.device, backend=r.backend, tf32=r.tf32)
    per_process, rest = divmod(o.batch_size, runtime.world * o.accum_steps)
    if rest or per_process < 1:
        raise RegproxyError(f"optim.batch_size {o.batch_size} must be a multiple of processes ({runtime.world}) x "
                            f"optim.accum_steps ({o.accum_steps})")
    if r.precision == "fp16" and runtime.device.type != "cuda":
        raise RegproxyError("run.precision fp16 needs CUDA; use bf16 on CPU")
    if r.precision == "int8":  # int8 quantizes a trained model for inference; its rounding has no gradient
        raise RegproxyError("run.precision int8 is for inference (predict, eval, benchmark); train at fp32 or bf16")
    if r.threads:
        torch.set_num_threads(r.threads)
    out_dir = Path(r.out_dir)
    last_path = out_dir / "last.pt"
    if resume and not last_path.is_file():
        raise RegproxyError(f"--resume: {last_path} does not exist, there is nothing to resume; run without --resume")
    if not resume and last_path.exists():
        raise RegproxyError(f"{out_dir} already holds a run: pass --resume to continue it, or choose run.out_dir")
    checkpoint = read_checkpoint(last_path) if resume else None
    if checkpoint is not None and not allow_config_change:
        saved = rename_old_keys(dict(checkpoint.get("config", {})), warn=False)  # a run started before the renames
        changed = changed_keys(saved, config.to_dict(), TrainConfig().to_dict())
        if changed:
            raise RegproxyError(f"--resume: the config differs from the one {last_path} was trained with in "
                                f"{listed(changed)}; pass --allow-config-change to continue with the new one")
    m = config.model
    # a resumed run has its weights in last.pt; a fresh one checks its source before anything is written
    source = None
    if m.init_from is not None and checkpoint is None:
        source = load_init_source(m.init_from, backbone=m.backbone, m=get_backbone(m.backbone).m if m.m is None
                                  else m.m, baseline=m.baseline)

    torch.manual_seed(r.seed)
    created = not out_dir.exists()
    begun: list[bool] = []  # set once the first iteration runs
    try:
        return _train(config, runtime, checkpoint, source, begun, resume=resume, progress=progress)
    except BaseException:
        # a start that fails removes the run folder it made (config.yaml, an empty log): no empty run is left
        if created and not begun and runtime.main and out_dir.is_dir():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _train(config: TrainConfig, runtime: Runtime, checkpoint: dict | None, source, begun: list[bool], *,
           resume: bool, progress: bool) -> Path:
    o, r, m = config.optim, config.run, config.model
    out_dir = Path(r.out_dir)
    last_path = out_dir / "last.pt"
    per_process = o.batch_size // (runtime.world * o.accum_steps)
    if runtime.main:
        config.data.open(config.data.train_split)  # generates synthetic scenes once, before the others read them
    barrier()
    train_set = config.data.open(config.data.train_split)
    val_set = config.data.open(config.data.val_split)
    if len(train_set) == 0:
        raise RegproxyError(f"{config.data.root}: the {config.data.train_split} split is empty")

    model = build_training_model(config, train_set.classes, train_set.palette)
    report = init_from(model, source, m.init_from) if source is not None else None
    del source
    frozen = apply_freeze(model, m.freeze)
    weights, weights_record = class_weights(config, train_set, out_dir, resume=resume, progress=progress and
                                            runtime.main)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, model, runtime, weights)
    model = trainer.model
    start, best = (trainer.restore(checkpoint, runtime.rank) if checkpoint is not None
                   else (0, {"mIoU": -1.0, "iter": 0}))
    if runtime.main and checkpoint is not None:
        clean_stale_temporaries(out_dir)
        truncate_log(out_dir / "log.jsonl", start)
    if runtime.main:
        write_text_atomic(out_dir / "config.yaml", dump_config(config))
        _announce(out_dir, report, frozen, model, weights_record, weights, train_set)

    stream = TrainStream(train_set, _SeededPipeline(config, model.config.mean, model.config.std), r.seed)
    loader = DataLoader(
        stream, batch_size=per_process, sampler=_Positions(start, o.iters, per_process * o.accum_steps,
                                                           runtime.rank, runtime.world),
        num_workers=config.data.workers, pin_memory=runtime.device.type == "cuda", drop_last=False,
        generator=torch.Generator(),  # keeps the global RNG (drop path) untouched by the loader
        persistent_workers=False,
    )
    batches = iter(loader)
    log = _Log(out_dir, runtime.main)
    bar = tqdm(total=o.iters, initial=start, desc="training", unit="it", disable=not (progress and runtime.main),
               dynamic_ncols=True)
    trainer.train_mode()
    begun.append(True)
    images_seen, started = 0, time.perf_counter()
    for iteration in range(start, o.iters):
        loss, images = _step(trainer, batches, iteration, r.deterministic)
        if not math.isfinite(loss):
            raise RegproxyError(
                f"the loss became {loss} at iteration {iteration} (lr {trainer.scheduler.get_last_lr()[0]:.3g}): "
                f"lower optim.lr or use run.precision fp32; --resume restarts from the last checkpoint in {out_dir}"
            )
        images_seen += images * runtime.world
        done = iteration + 1
        lr = trainer.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if done % r.log_every == 0 or done == o.iters:
            log.write(done, loss=loss, lr=lr, images_per_s=images_seen / (time.perf_counter() - started))
        if done % r.eval_every == 0 or done == o.iters:
            metrics = evaluate(model, val_set, progress=progress and runtime.main)
            model.config.metrics = {"mIoU": round(metrics["mIoU"], 2), "mAcc": round(metrics["mAcc"], 2),
                                    "aAcc": round(metrics["aAcc"], 2), "iteration": done}
            log.write(done, **{k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")})
            if runtime.main:
                bar.write(f"iteration {done}: mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
                          f"aAcc {metrics['aAcc']:.2f}")
                if metrics["mIoU"] > best["mIoU"]:
                    best = {"mIoU": metrics["mIoU"], "iter": done}
                    save_pretrained(model, out_dir / "best")
            trainer.train_mode()
        if done % r.save_every == 0 or done == o.iters:
            rng = all_gather_objects(_rng_state(runtime.device))  # every process's generators, for an exact resume
            if runtime.main:
                state = trainer.state(done, best, rng)
                write_atomic(last_path, lambda tmp, state=state: torch.save(state, tmp))
    bar.close()
    if runtime.main:
        save_pretrained(model, out_dir / "final")
        log.write(o.iters, best_mIoU=best["mIoU"], best_iter=best["iter"],
                  images_per_s=images_seen / max(time.perf_counter() - started, 1e-9))
    shutdown()
    if not runtime.main:  # one process reports where the model is
        return None
    return out_dir / ("best" if best["mIoU"] >= 0 else "final")


def _step(trainer: Trainer, batches, iteration: int, deterministic: bool) -> tuple[float, int]:
    """:meth:`Trainer.step`, with ``run.deterministic``'s refusal of a nondeterministic kernel as one error line."""
    try:
        return trainer.step(batches, iteration)
    except RuntimeError as exc:
        if deterministic and "deterministic" in str(exc):
            raise RegproxyError(f"run.deterministic: {one_line(exc)[:300]}; set run.deterministic false to train "
                                "with it (resumes are then not bit-exact)") from None
        raise


def _announce(out_dir: Path, report, frozen: list[str], model: nn.Module, weights_record: dict | None,
              weights: list[float] | None, train_set: SegmentationDataset) -> None:
    """Say (and record in the run) what the run starts from: init_from's summary, frozen parameters, class weights."""
    console = Console(highlight=False)
    if report is not None:
        console.print(report.table())
        write_text_atomic(out_dir / "init_from.json", json.dumps(report.to_dict(), indent=2) + "\n")
    if frozen:
        total = sum(p.numel() for p in model.parameters())
        count = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        console.print(f"frozen: {len(frozen)} tensors, {count:,} of {total:,} parameters")
    if weights_record is not None:
        write_text_atomic(out_dir / CLASS_WEIGHTS_NAME, json.dumps(weights_record, indent=2) + "\n")
    if weights is not None:
        shown = ", ".join(f"{name} {w:.3g}" for name, w in zip(train_set.classes, weights))
        console.print(f"class weights: {shown}")
