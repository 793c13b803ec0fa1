"""Frozen-backbone training against full fine-tuning: step time and memory, random weights, one command.

A training step here is what ``regproxy train`` does per batch: forward, cross-entropy on the logits, backward, an
AdamW step over the trainable parameters, with the frozen modules in eval mode (``engine.finetune.train_mode``).
Three ways of training one backbone (default DINOv3 ViT-S/16, RegProxy 4x4, 150 classes):

* ``full``: everything trains (the paper's recipe);
* ``freeze=blocks:M``: the blocks before the affinity tap frozen, the token head (blocks after it) trains;
* ``freeze=backbone``: the whole ViT frozen, RegProxy's affinity head and classifier train (the frozen-features
  recipe, ``configs/dinov3-s16-ade.yaml``).

Reported: the median step time (interleaved rounds in this process, so all three share the machine's state), the
bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``: the activations a step keeps
alive, exact and independent of the allocator), and each mode's peak RSS over one step in a fresh process (weights,
gradients and AdamW state included), with the ratios to ``full``.

    flock /tmp/regproxy-bench.lock python -m bench.frozen [--backbone dinov3-s16] [--size 512] [--batch 2] [--rounds 5]

Results go to ``docs/frozen.json`` (``--out``); docs/backbones.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from regproxy_cli.engine.finetune import apply_freeze, frozen_modules, train_mode
from regproxy_cli.files import write_text_atomic
from regproxy_cli.model.plugins import get_backbone
from regproxy_cli.model.regproxy import build_model

from .common import REPO, current_rss_mb, interleaved, machine, median, peak_rss_mb, run_json

CLASSES = 150


def modes(backbone: str) -> dict[str, str]:
    """Label -> model.freeze value."""
    m = get_backbone(backbone).m
    return {"full": "none", f"freeze=blocks:{m}": f"blocks:{m}", "freeze=backbone": "backbone"}


def make_step(backbone: str, freeze: str, size: int, batch: int):
    """A model (seed 0, random weights), its optimiser and a closure running one training step."""
    torch.manual_seed(0)
    model = build_model(backbone, CLASSES)
    apply_freeze(model, freeze)
    frozen = frozen_modules(model)
    train_mode(model, frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    target = torch.randint(0, CLASSES, (batch, size, size), generator=generator)

    def step() -> float:
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, step, trainable


def saved_for_backward(model: torch.nn.Module, step) -> int:
    """Bytes of the activations autograd saves for the backward during one step (each storage counted once; the
    weights a layer saves are the parameters themselves, held anyway, and are left out)."""
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def memory_one(backbone: str, freeze: str, size: int, batch: int) -> dict:
    """Run in a fresh process: peak RSS of a training step after one warm-up step (AdamW state allocated)."""
    _, step, _ = make_step(backbone, freeze, size, batch)
    step()
    before = current_rss_mb()
    step()
    return {"peak_mb": peak_rss_mb(), "step_mb": peak_rss_mb() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="dinov3-s16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "frozen.json")
    parser.add_argument("--memory-one", nargs=2, metavar=("BACKBONE", "FREEZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_one:
        print(json.dumps(memory_one(*args.memory_one, args.size, args.batch)))
        return

    started = time.perf_counter()
    labels = modes(args.backbone)
    steps, rows = {}, {}
    for label, freeze in labels.items():
        model, step, trainable = make_step(args.backbone, freeze, args.size, args.batch)
        rows[label] = {"freeze": freeze, "trainable_params": trainable, "saved_for_backward_mb":
                       saved_for_backward(model, step) / 2**20}
        steps[label] = step
    times = interleaved(steps, rounds=args.rounds, warmup=1)
    for label, freeze in labels.items():
        rows[label]["step_s"] = median(times[label])
        rows[label].update(run_json(["-m", "bench.frozen", "--memory-one", args.backbone, freeze, "--size",
                                     str(args.size), "--batch", str(args.batch)]
                                    + (["--threads", str(args.threads)] if args.threads else [])))
    full = rows["full"]
    for row in rows.values():
        row["time_ratio"] = row["step_s"] / full["step_s"]
        row["saved_ratio"] = row["saved_for_backward_mb"] / full["saved_for_backward_mb"]
        row["step_mb_ratio"] = row["step_mb"] / full["step_mb"]
    result = {"backbone": args.backbone, "size": args.size, "batch": args.batch, "rounds": args.rounds,
              "machine": machine(), "seconds": round(time.perf_counter() - started), "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"{args.backbone} RegProxy 4x4, {args.size}^2, batch {args.batch}, fp32, {result['machine']['cpu']}")
    print("| training | trainable params | step s | vs full | saved for backward MiB | vs full | "
          "step peak RSS MiB | vs full | process peak MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, row in rows.items():
        print(f"| {label} | {row['trainable_params'] / 1e6:.2f} M | {row['step_s']:.2f} | {row['time_ratio']:.2f} | "
              f"{row['saved_for_backward_mb']:.0f} | {row['saved_ratio']:.3f} | {row['step_mb']:.0f} | "
              f"{row['step_mb_ratio']:.2f} | {row['peak_mb']:.0f} |")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
