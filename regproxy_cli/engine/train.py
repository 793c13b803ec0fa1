"""``regproxy train``: the paper's training protocol in one loop you can read top to bottom.

AdamW (no weight decay on position embeddings, prefix tokens and norms), linear warm-up then poly or
cosine restarts by iteration, cross-entropy with ignore 255, optional bf16/fp16 autocast and gradient
accumulation, torch DDP under ``torchrun`` (NCCL on GPU with SyncBN in the affinity head, gloo on CPU),
evaluation every N iterations keeping the best model, atomic checkpoints, and an exact ``--resume``:
the data stream and its augmentations are a pure function of (seed, sample position), and the model,
optimiser, scheduler, scaler, RNG states and iteration are restored.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.transforms import train_pipeline
from regproxy_cli.engine.config import OptimSection, TrainConfig, dump_config
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import write_atomic
from regproxy_cli.io.checkpoint import save_pretrained
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.plugins import get_backbone
from regproxy_cli.model.regproxy import build_from_config

NO_DECAY_KEYS = ("pos_embed", "cls_token", "dist_token", "norm")  # the authors' paramwise_cfg, in our names


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str) -> Runtime:
    """One process, or one of ``torchrun``'s (RANK/WORLD_SIZE/LOCAL_RANK set): NCCL on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RegproxyError("run.device is cuda but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank, world, torch_device)


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
            crop=(d.crop, d.crop), scale=tuple(d.scale), ratio_range=tuple(d.ratio_range),
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    model_config = ModelConfig(
        backbone=m.backbone, num_classes=len(classes), m=spec.m if m.m is None else m.m,
        region_res=(m.region_res, m.region_res), baseline=m.baseline, crop_size=d.crop,
        classes=list(classes), palette=[list(c) for c in palette], inference_mode=t.mode, window_stride=t.stride,
        test_scale=None if t.scale is None else tuple(t.scale), dataset=d.kind,
    )
    return build_from_config(model_config, pretrained_backbone=m.pretrained, drop_path_rate=m.drop_path_rate)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the directory of the best model (or the last one without evaluation)."""
    runtime = setup_runtime(config.run.device)
    o, r = config.optim, config.run
    per_process, rest = divmod(o.batch_size, runtime.world * o.accum_steps)
    if rest or per_process < 1:
        raise RegproxyError(f"optim.batch_size {o.batch_size} must be a multiple of processes ({runtime.world}) x "
                            f"optim.accum_steps ({o.accum_steps})")
    if r.precision == "fp16" and runtime.device.type != "cuda":
        raise RegproxyError("run.precision fp16 needs CUDA; use bf16 on CPU")
    if r.threads:
        torch.set_num_threads(r.threads)
    out_dir = Path(r.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path = out_dir / "last.pt"
    if not resume and last_path.exists():
        raise RegproxyError(f"{out_dir} already holds a run: pass --resume to continue it, or choose run.out_dir")

    torch.manual_seed(r.seed)
    if runtime.main:
        config.data.open(config.data.train_split)  # generates synthetic scenes once, before the others read them
    if runtime.world > 1:
        dist.barrier()
    train_set = config.data.open(config.data.train_split)
    val_set = config.data.open(config.data.val_split)
    if len(train_set) == 0:
        raise RegproxyError(f"{config.data.root}: the {config.data.train_split} split is empty")

    model = build_training_model(config, train_set.classes, train_set.palette).to(runtime.device)
    raw_model = model
    if runtime.world > 1:
        if runtime.device.type == "cuda":  # the affinity head's BN over all GPUs (SyncBN has no CPU kernel)
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(raw_model, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, o))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=r.precision == "fp16")
    start, best = 0, {"mIoU": -1.0, "iter": 0}

    if resume and last_path.exists():
        state = torch.load(last_path, map_location=runtime.device, weights_only=False)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start, best = state["iteration"], state["best"]
    if runtime.main:
        (out_dir / "config.yaml").write_text(dump_config(config))

    stream = TrainStream(train_set, _SeededPipeline(config, raw_model.config.mean, raw_model.config.std), r.seed)
    loader = DataLoader(
        stream, batch_size=per_process, sampler=_Positions(start, o.iters, per_process * o.accum_steps,
                                                           runtime.rank, runtime.world),
        num_workers=config.data.workers, pin_memory=runtime.device.type == "cuda", drop_last=False,
        generator=torch.Generator(),  # keeps the global RNG (drop path) untouched by the loader
        persistent_workers=False,
    )
    batches = iter(loader)
    log = _Log(out_dir, runtime.main)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.precision)
    bar = tqdm(total=o.iters, initial=start, desc="training", unit="it", disable=not (progress and runtime.main),
               dynamic_ncols=True)
    model.train()
    images_seen, started = 0, time.perf_counter()
    for iteration in range(start, o.iters):
        optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for micro in range(o.accum_steps):
            images, labels = next(batches)
            images, labels = images.to(runtime.device, non_blocking=True), labels.to(runtime.device, non_blocking=True)
            sync = micro == o.accum_steps - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with (nullcontext() if sync else model.no_sync()), torch.autocast(
                    runtime.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX) / o.accum_steps
                scaler.scale(loss).backward()
            total_loss += loss.item()
            images_seen += images.shape[0] * runtime.world
        if not math.isfinite(total_loss):
            raise RegproxyError(
                f"the loss became {total_loss} at iteration {iteration} (lr {scheduler.get_last_lr()[0]:.3g}): lower "
                f"optim.lr or use run.precision fp32; --resume restarts from the last checkpoint in {out_dir}"
            )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = iteration + 1
        bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        bar.update(1)
        if done % r.log_every == 0 or done == o.iters:
            elapsed = time.perf_counter() - started
            log.write(done, loss=total_loss, lr=scheduler.get_last_lr()[0], images_per_s=images_seen / elapsed)
        if done % r.eval_every == 0 or done == o.iters:
            metrics = evaluate(raw_model, val_set, progress=progress and runtime.main)
            raw_model.config.metrics = {"mIoU": round(metrics["mIoU"], 2), "mAcc": round(metrics["mAcc"], 2),
                                        "aAcc": round(metrics["aAcc"], 2), "iteration": done}
            log.write(done, **{k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")})
            if runtime.main:
                bar.write(f"iteration {done}: mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
                          f"aAcc {metrics['aAcc']:.2f}")
                if metrics["mIoU"] > best["mIoU"]:
                    best = {"mIoU": metrics["mIoU"], "iter": done}
                    save_pretrained(raw_model, out_dir / "best")
            model.train()
        if runtime.main and (done % r.save_every == 0 or done == o.iters):
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                     "iteration": done, "best": best, "config": config.to_dict()}
            write_atomic(last_path, lambda tmp, state=state: torch.save(state, tmp))
    bar.close()
    if runtime.main:
        save_pretrained(raw_model, out_dir / "final")
        log.write(o.iters, best_mIoU=best["mIoU"], best_iter=best["iter"],
                  images_per_s=images_seen / max(time.perf_counter() - started, 1e-9))
    if runtime.world > 1:
        dist.barrier()
    return out_dir / ("best" if best["mIoU"] >= 0 else "final")
