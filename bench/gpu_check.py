"""What the CPU test suite cannot check, in one command that a one-GPU machine finishes in under 8 minutes.

    python -m bench.gpu_check [--json gpu_check.json] [--work DIR] [--only a,b] [--quick] [--list]

Each check runs in its own subprocess under a hard time limit, inside an overall budget of 7.5 minutes (4x both
when the checks run on a CPU): a check that crashes, hangs or runs out of time is a failed row, never the end of
the run, and the table (and --json) are always written. On a machine without CUDA the checks that need it are rows saying "skipped: no CUDA" and the
rest runs on the CPU (CI runs that). Exits 1 when a check failed. ``--list`` names the checks without running
them; ``--quick`` shrinks every check (tiny models and sizes) to test this script; ``--device cpu`` runs the GPU
checks on the CPU, also only to test this script. Numbers are recorded with TF32 off (run.tf32's default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
MODULE = "bench.gpu_check"  # the children run this module again: python -m bench.gpu_check --run-check NAME
BUDGET_S = 450  # the whole run, under 8 minutes with the interpreter starts
CPU_SLOWER = 4  # limits and budget when the checks run on a CPU (CI): no 8-minute promise there
PAPER_FPS = {"t16": 38.9, "s16": 32.1, "b16": 20.1, "l16": 6.6}  # Table 4, one V100, 512x512, image -> label


@dataclass
class Context:
    work: Path
    device: torch.device  # torch is imported where checks run: --list and the parent need none
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Check:
    name: str
    limit_s: int  # hard limit: the subprocess is killed after this
    cuda: bool  # needs a GPU: a row "skipped: no CUDA" without one
    what: str
    run: Callable[[Context], dict]


# --- helpers (imported lazily: --list and the parent process need no torch) ------------------------------------


def _seconds_per_call(fn: Callable[[], object], device, repeats: int, warmup: int = 2) -> float:
    from regproxy_cli.inference.runtime import synchronize

    for _ in range(warmup):
        fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def _peak_mib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _data(ctx: Context) -> Path:
    """Generated scenes (the demo's kind), once per work folder."""
    from regproxy_cli.data.synthetic import write_synthetic_dataset

    root = ctx.work / "data"
    if not (root / "classes.yaml").is_file():
        write_synthetic_dataset(root, num_train=16, num_val=5, size=(128, 128))
    return root


def _demo_model(ctx: Context) -> Path:
    """The resume check's trained ViT-Demo/8, or (when that check did not run) a random one saved once."""
    trained = ctx.work / "straight" / "final"
    if trained.is_dir():
        return trained
    path = ctx.work / "random-demo"
    if not path.is_dir():
        import torch

        from regproxy_cli import build_model
        from regproxy_cli.hub.checkpoint import save_pretrained

        torch.manual_seed(0)
        model = build_model("demo8", 5)
        with torch.no_grad():  # several classes per image
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
        model.config.crop_size, model.config.inference_mode, model.config.test_scale = 128, "whole", None
        save_pretrained(model, path)
    return path


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "regproxy_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _agreement(a, b) -> float:
    import numpy as np

    return round(float(np.mean(np.asarray(a) == np.asarray(b))), 6)


# --- the checks ------------------------------------------------------------------------------------------------


def check_parity(ctx: Context) -> dict:
    import torch

    from regproxy_cli import build_model
    from regproxy_cli.inference.runtime import autocast, set_tf32, tf32_state

    set_tf32(False)  # the bound is for fp32; TF32 in the convolutions alone moves S/16 logits by ~2.5e-4
    torch.manual_seed(0)
    name, size = ("demo8", (96, 136)) if ctx.quick else ("s16", (512, 683))
    model = build_model(name, 150).eval()
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        cpu = model(x)
        reference = cpu.argmax(1)
        model = model.to(ctx.device)
        gpu = model(x.to(ctx.device)).float().cpu()
        agreement = {}
        for precision in ("bf16", "fp16") if ctx.cuda else ("bf16",):
            with autocast(ctx.device, precision):
                agreement[precision] = _agreement(model.labels(x.to(ctx.device)).cpu(), reference)
    difference = float((cpu - gpu).abs().max())
    return {"status": "pass" if difference <= 1e-4 else "fail", "model": name, "fp32_max_abs_diff": difference,
            "logit_scale": round(float(cpu.abs().max()), 3), "label_agreement_with_fp32": agreement,
            "tf32": tf32_state()}


def check_train_precisions(ctx: Context) -> dict:
    import torch

    from regproxy_cli import build_model
    from regproxy_cli.engine.config import load_config
    from regproxy_cli.engine.distributed import Runtime
    from regproxy_cli.engine.train import build_trainer

    result, ok = {}, True
    generator = torch.Generator().manual_seed(0)
    side = 64 if ctx.quick else 128
    batch = (torch.randn(4, 3, side, side, generator=generator), torch.randint(0, 5, (4, side, side),
                                                                                generator=generator))
    for precision in ("fp32", "bf16", "fp16"):
        if precision == "fp16" and not ctx.cuda:
            result[precision] = "skipped: fp16 needs CUDA"
            continue
        config = load_config(ROOT / "configs" / "demo.yaml", [f"run.precision={precision}", "optim.warmup_iters=0"])
        torch.manual_seed(0)
        trainer = build_trainer(config, build_model("demo8", 5), Runtime(0, 1, ctx.device))
        trainer.train_mode()
        losses = [trainer.step(iter([batch]), i)[0] for i in range(3 if ctx.quick else 6)]
        entry = {"losses": [round(loss, 4) for loss in losses], "finite": all(math.isfinite(v) for v in losses)}
        ok &= entry["finite"]
        if precision == "fp16":  # an overflowing gradient: GradScaler skips the step and halves the scale
            scale = trainer.scaler.get_scale()
            before = [p.detach().clone() for p in trainer.model.parameters()]
            first = next(p for p in trainer.model.parameters() if p.requires_grad)
            handle = first.register_hook(lambda grad: torch.full_like(grad, math.inf))
            trainer.step(iter([batch]), 99)
            handle.remove()
            unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
            entry["inf_step_skipped"] = unchanged and trainer.scaler.get_scale() == scale / 2
            ok &= entry["inf_step_skipped"]
        result[precision] = entry
    return {"status": "pass" if ok else "fail", **result}


def _train_config(ctx: Context, name: str) -> Path:
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    _data(ctx)
    config["data"].update(root=str(ctx.work / "data"), synthetic_train=16, synthetic_val=5, workers=0)
    config["model"].update(drop_path_rate=0.1)  # the resume must restore the generator drop path draws from
    config["optim"].update(iters=6 if ctx.quick else 12, warmup_iters=2)
    config["run"].update(out_dir=str(ctx.work / name), eval_every=6 if ctx.quick else 12, save_every=2 if ctx.quick
                         else 4, log_every=1, precision="bf16" if ctx.cuda else "fp32", deterministic=True,
                         device=str(ctx.device.type))
    if ctx.quick:
        config["data"].update(crop=64, scale=[128, 64])
    path = ctx.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in lines if "loss" in r}


def check_resume(ctx: Context) -> dict:
    import torch
    from safetensors.torch import load_file

    straight = _cli("train", str(_train_config(ctx, "straight")))
    _, err = straight.communicate()
    if straight.returncode:
        return {"status": "fail", "why": f"uninterrupted run: {_last_line(err)}"}
    killed_config = _train_config(ctx, "killed")
    process = _cli("train", str(killed_config))
    checkpoint = ctx.work / "killed" / "last.pt"
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if not checkpoint.exists():
        return {"status": "fail", "why": "the run ended before writing last.pt"}
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"]
    resumed = _cli("train", str(killed_config), "--resume")
    _, err = resumed.communicate()
    if resumed.returncode:
        return {"status": "fail", "why": f"resumed run: {_last_line(err)}"}
    a, b = _losses(ctx.work / "straight"), _losses(ctx.work / "killed")
    after = [i for i in a if i > stopped_at]
    loss_diff = max(abs(a[i] - b[i]) for i in after) if after else 0.0
    weights_a = load_file(str(ctx.work / "straight" / "final" / "model.safetensors"))
    weights_b = load_file(str(ctx.work / "killed" / "final" / "model.safetensors"))
    weight_diff = max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a)
    exact = loss_diff == 0 and weight_diff == 0 and bool(after)
    return {"status": "pass" if exact else "fail", "device": ctx.device.type, "precision": "bf16" if ctx.cuda
            else "fp32", "deterministic": True, "drop_path_rate": 0.1, "killed_after_iteration": stopped_at,
            "iterations_compared": len(after), "max_loss_diff": loss_diff, "max_weight_diff": weight_diff}


def ddp_worker(out: Path, device: str, steps: int) -> None:
    """One process of check_ddp_one_gpu (also run alone for the 1-process reference): a few DDP steps with a global
    batch of 4 split over the processes; rank 0 saves every process's final weights."""
    import torch

    from regproxy_cli import build_model
    from regproxy_cli.engine.config import load_config
    from regproxy_cli.engine.distributed import all_gather_objects, setup_runtime, shutdown
    from regproxy_cli.engine.train import build_trainer

    runtime = setup_runtime(device, backend="gloo")
    config = load_config(ROOT / "configs" / "demo.yaml", ["optim.warmup_iters=0"])
    torch.manual_seed(0)
    trainer = build_trainer(config, build_model("demo8", 5), runtime)  # several processes on CUDA: DDP + SyncBN
    share = 4 // runtime.world
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        images, labels = torch.randn(4, 3, 64, 64, generator=generator), torch.randint(0, 5, (4, 64, 64),
                                                                                       generator=generator)
        mine = slice(runtime.rank * share, (runtime.rank + 1) * share)
        trainer.train_mode()
        trainer.step(iter([(images[mine], labels[mine])]), step)
    # the parameters: BN running statistics are per process without SyncBN (on the CPU), and DDP only broadcasts
    # them at the next forward
    weights = {k: v.detach().float().cpu() for k, v in trainer.model.named_parameters()}
    gathered = all_gather_objects(weights)
    synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
    if runtime.main:
        torch.save({"ranks": gathered, "sync_bn": synced, "world": runtime.world}, out)
    shutdown()


def check_ddp_one_gpu(ctx: Context) -> dict:
    import torch

    steps = 2 if ctx.quick else 4
    env = _child_env(OMP_NUM_THREADS="1")
    worker = ["-m", MODULE, "--ddp-worker", "--device", ctx.device.type, "--steps", str(steps)]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *worker, "--work", str(ctx.work / "ddp2.pt")], capture_output=True, text=True, env=env)
    one = subprocess.run([sys.executable, *worker, "--work", str(ctx.work / "ddp1.pt")], capture_output=True,
                         text=True, env=env)
    for name, done in (("2 processes", two), ("1 process", one)):
        if done.returncode:
            return {"status": "fail", "why": f"{name}: {_last_line(done.stderr)}"}
    ranks = torch.load(ctx.work / "ddp2.pt", weights_only=True)
    single = torch.load(ctx.work / "ddp1.pt", weights_only=True)["ranks"][0]
    across = max(float((ranks["ranks"][0][k] - ranks["ranks"][1][k]).abs().max()) for k in single)
    to_single = max(float((ranks["ranks"][0][k] - single[k]).abs().max()) for k in single)
    # SyncBN makes 2 x 2 images the same batch as 1 x 4 (on the CPU there is no SyncBN: only ranks are compared)
    ok = across == 0 and (to_single <= 1e-4 or not ctx.cuda)
    return {"status": "pass" if ok else "fail", "backend": "gloo", "device": ctx.device.type, "steps": steps,
            "sync_bn": ranks["sync_bn"], "max_diff_across_ranks": across, "max_diff_to_one_process": to_single}


def check_torchrun_eval(ctx: Context) -> dict:
    import torch

    model, data = _demo_model(ctx), _data(ctx)
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    processes = max(2, gpus)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ctx.cuda and gpus < processes:
        env["REGPROXY_BACKEND"] = "gloo"  # two processes share the one GPU
    command = ["-m", "regproxy_cli", "eval", "--model", str(model), "--data", str(data), "--json", "--device",
               ctx.device.type]
    single = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    several = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(processes), *command], capture_output=True, text=True, env=env)
    for name, done in (("1 process", single), (f"{processes} processes", several)):
        if done.returncode:
            return {"status": "fail", "why": f"{name}: {_last_line(done.stderr)}"}
    equal = json.loads(single.stdout) == json.loads(several.stdout)
    return {"status": "pass" if equal else "fail", "backend": env.get("REGPROXY_BACKEND", "nccl" if ctx.cuda else
                                                                      "gloo"),
            "processes": processes, "mIoU": json.loads(single.stdout)["mIoU"]}


def check_eval_modes(ctx: Context) -> dict:
    import numpy as np

    from regproxy_cli.data.open import open_dataset
    from regproxy_cli.hub.zoo import load_model
    from regproxy_cli.inference.predictor import predict_labels

    model = load_model(_demo_model(ctx))
    model.config.crop_size, model.config.window_stride = 96, 64  # slide: 4 overlapping windows per 128^2 image
    dataset = open_dataset("folder", _data(ctx), "val")
    images = [dataset[i][0] for i in range(2 if ctx.quick else len(dataset))]
    result, ok = {}, True
    for name, options in (("whole", {"mode": "whole"}), ("slide", {"mode": "slide"}),
                          ("tta", {"mode": "whole", "tta": True})):
        cpu = [predict_labels(model.cpu(), image, **options) for image in images]
        gpu = [predict_labels(model.to(ctx.device), image, **options) for image in images]
        agreement = float(np.mean([_agreement(a, b) for a, b in zip(cpu, gpu)]))
        result[name] = {"label_agreement": round(agreement, 6)}
        ok &= agreement >= 0.999
    return {"status": "pass" if ok else "fail", "images": len(images), **result}


def check_predict_batch(ctx: Context) -> dict:
    import numpy as np
    from PIL import Image

    model, folder = _demo_model(ctx), _data(ctx) / "images" / "val"
    outputs = {}
    for batch in (1, 4):
        out = ctx.work / f"predict-batch{batch}"
        done = _cli("predict", str(folder), "--model", str(model), "--out", str(out), "--batch", str(batch),
                    "--device", ctx.device.type)
        _, err = done.communicate()
        if done.returncode:
            return {"status": "fail", "why": f"--batch {batch}: {_last_line(err)}"}
        outputs[batch] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))
                          if not p.stem.endswith("_overlay")}
    if not outputs[1] or outputs[1].keys() != outputs[4].keys():
        return {"status": "fail", "why": f"outputs differ: {sorted(outputs[1])} against {sorted(outputs[4])}"}
    agreement = min(_agreement(outputs[1][k], outputs[4][k]) for k in outputs[1])
    return {"status": "pass" if agreement >= 0.999 else "fail", "images": len(outputs[1]),
            "min_label_agreement_batch4_vs_1": agreement}


def check_memory_l16(ctx: Context) -> dict:
    import numpy as np
    import torch

    from regproxy_cli import build_model
    from regproxy_cli.inference.predictor import predict_labels
    from regproxy_cli.inference.runtime import synchronize

    torch.manual_seed(0)
    name, (height, width), crop, stride = ("demo8", (256, 512), 128, 96) if ctx.quick else (
        "l16", (1024, 2048), 768, 512)
    model = build_model(name, 19).eval().to(ctx.device)
    model.config.crop_size, model.config.window_stride, model.config.test_scale = crop, stride, None
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    result = {"model": name, "image": f"{width}x{height}", "window": crop, "stride": stride}
    for precision in ("fp32", "bf16"):
        _reset_peak(ctx.device)
        started = time.perf_counter()
        predict_labels(model, image, mode="slide", precision=precision)
        synchronize(ctx.device)
        result[precision] = {"seconds": round(time.perf_counter() - started, 3), "peak_mib": _peak_mib(ctx.device)}
    return {"status": "pass", **result}


def check_compile(ctx: Context) -> dict:
    import numpy as np
    import torch

    from regproxy_cli import build_model
    from regproxy_cli.inference.predictor import predict_labels
    from regproxy_cli.inference.runtime import compile_backbone

    torch.manual_seed(0)
    name, side = ("demo8", 128) if ctx.quick else ("s16", 512)
    model = build_model(name, 150).eval().to(ctx.device)
    model.config.inference_mode, model.config.test_scale, model.config.crop_size = "whole", None, side
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    eager = predict_labels(model, image)
    eager_s = _seconds_per_call(lambda: predict_labels(model, image), ctx.device, 3 if ctx.quick else 20)
    started = time.perf_counter()
    compile_backbone(model, "fp32", size=(side, side))
    compile_s = time.perf_counter() - started
    compiled = predict_labels(model, image)
    compiled_s = _seconds_per_call(lambda: predict_labels(model, image), ctx.device, 3 if ctx.quick else 20)
    agreement = _agreement(eager, compiled)
    return {"status": "pass" if agreement >= 0.99 else "fail", "model": name, "size": side,
            "compile_seconds": round(compile_s, 1), "eager_fps": round(1 / eager_s, 2),
            "compiled_fps": round(1 / compiled_s, 2), "label_agreement": agreement}


def check_resize_argmax(ctx: Context) -> dict:
    import torch
    import torch.nn.functional as F

    from regproxy_cli.model.resize import boundary_resize_argmax, fused_resize_argmax, label_method

    torch.manual_seed(0)
    classes, grid, out = (19, 32, 128) if ctx.quick else (150, 128, 512)
    coarse = torch.randn(1, classes, grid // 8, grid // 8) * 4  # spatially coherent scores, like a model's
    scores = F.interpolate(coarse, size=(grid, grid), mode="bilinear", align_corners=False)[0].to(ctx.device)
    repeats = 3 if ctx.quick or not ctx.cuda else 20
    timings, labels = {}, {}
    for name, fn in (("boundary", boundary_resize_argmax), ("fused", fused_resize_argmax)):
        labels[name] = fn(scores, (out, out)).cpu()
        timings[name] = round(1000 * _seconds_per_call(lambda fn=fn: fn(scores, (out, out)), ctx.device, repeats), 3)
    chosen, faster = label_method(ctx.device), min(timings, key=timings.get)
    agreement = _agreement(labels["boundary"], labels["fused"])
    return {"status": "pass" if agreement >= 0.9999 else "fail", "classes": classes, "from": grid, "to": out,
            "ms": timings, "chosen_here": chosen, "faster_here": faster, "label_agreement": agreement}


def check_table4(ctx: Context) -> dict:
    import numpy as np
    import torch

    from regproxy_cli import build_model
    from regproxy_cli.inference.predictor import predict_labels
    from regproxy_cli.inference.runtime import set_tf32, tf32_state

    set_tf32(False)
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    rows = {}
    for name in ("t16",) if ctx.quick else tuple(PAPER_FPS):
        torch.manual_seed(0)
        model = build_model(name, 150).eval().to(ctx.device)
        model.config.inference_mode, model.config.test_scale = "whole", None
        row = {"paper_v100_fps": PAPER_FPS[name]}
        for precision in ("fp32", "bf16"):
            seconds = _seconds_per_call(lambda: predict_labels(model, image, precision=precision), ctx.device,
                                        2 if ctx.quick else 30, warmup=1 if ctx.quick else 5)
            row[f"{precision}_fps"] = round(1 / seconds, 1)
        rows[name] = row
    machine = {"gpu": torch.cuda.get_device_name(ctx.device) if ctx.cuda else "CPU", "tf32": tf32_state(),
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if ctx.cuda else None}
    return {"status": "pass", "size": "512x512", "batch": 1, "rows": rows, "machine": machine}


def check_speed(ctx: Context) -> dict:
    import torch

    from regproxy_cli.data.open import open_dataset
    from regproxy_cli.engine.evaluate import evaluate
    from regproxy_cli.hub.zoo import load_model
    from regproxy_cli.inference.predictor import predict_labels

    dataset = open_dataset("folder", _data(ctx), "val")
    images = [dataset[i][0] for i in range(len(dataset))]
    model = load_model(_demo_model(ctx)).to(ctx.device)
    result = {"device": ctx.device.type}
    for precision in ("fp32", "bf16"):
        _reset_peak(ctx.device)
        seconds = _seconds_per_call(lambda: [predict_labels(model, image, precision=precision) for image in images],
                                    ctx.device, 1 if ctx.quick else 3, warmup=1)
        result[f"predict demo8 {precision}"] = {"images_per_s": round(len(images) / seconds, 2),
                                                "peak_mib": _peak_mib(ctx.device)}
    started = time.perf_counter()
    with torch.inference_mode():
        evaluate(model, dataset, progress=False)
    result["eval demo8 images_per_s"] = round(len(dataset) / (time.perf_counter() - started), 2)
    return {"status": "pass", **result}


CHECKS = [
    Check("parity", 60, True, "S/16 logits CUDA vs CPU in fp32 (TF32 off, |diff| <= 1e-4); bf16/fp16 label "
          "agreement", check_parity),
    Check("train_precisions", 60, True, "train steps in fp32, bf16 and fp16 (GradScaler; an inf step skipped)",
          check_train_precisions),
    Check("resume", 150, False, "SIGKILL after a checkpoint, --resume: bit-exact (deterministic, drop path 0.1)",
          check_resume),
    Check("ddp_one_gpu", 120, True, "2 ranks on one GPU over gloo (DDP + SyncBN): weights equal across ranks and "
          "to 1 process, same global batch", check_ddp_one_gpu),
    Check("torchrun_eval", 90, False, "regproxy eval under torchrun equals one process (2 processes share a GPU "
          "over gloo)", check_torchrun_eval),
    Check("eval_modes", 60, True, "whole, slide and TTA labels on CUDA equal the CPU's (agreement >= 0.999)",
          check_eval_modes),
    Check("predict_batch", 60, False, "regproxy predict --batch 4 equals --batch 1", check_predict_batch),
    Check("memory_l16", 60, True, "peak memory of L/16 sliding windows (768, stride 512) at 2048x1024, fp32 and "
          "bf16", check_memory_l16),
    Check("compile", 150, True, "--compile (torch.compile of the backbone): labels equal eager, FPS both",
          check_compile),
    Check("resize_argmax", 30, False, "label maps: boundary blend vs fused resize+argmax, time of each here",
          check_resize_argmax),
    Check("table4", 120, True, "Table 4: t16/s16/b16/l16 image->label FPS at 512^2, batch 1, fp32 and bf16, next "
          "to the paper's V100", check_table4),
    Check("speed", 60, False, "predict and eval throughput of the demo model (and peak memory on CUDA)",
          check_speed),
]


# --- running: each check in a subprocess with a hard limit ---------------------------------------------------


def _run_one(name: str, work: Path, result: Path, device: str, quick: bool) -> None:
    """The child: run one check and write its result (a failure is a result too)."""
    import torch

    from regproxy_cli.inference.runtime import set_tf32

    set_tf32(False)
    check = next(c for c in CHECKS if c.name == name)
    ctx = Context(work, torch.device(device), quick)
    try:
        outcome = check.run(ctx)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed row with its reason, the other checks go on
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        outcome = {"status": "fail", "why": f"{type(exc).__name__}: {message}"[:300]}
    result.write_text(json.dumps(outcome, indent=2, default=str) + "\n")


def _spawn(check: Check, work: Path, device: str, quick: bool, limit: float) -> dict:
    result = work / f"{check.name}.result.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", MODULE, "--run-check", check.name, "--work", str(work), "--device", device,
               *(["--quick"] if quick else [])]
    # its own process group, so that a timeout also ends what it started (torchrun's workers, trainings)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                               start_new_session=True)
    try:
        _, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"status": "fail", "why": f"timed out after {limit:.0f} s"}
    if result.is_file():
        return json.loads(result.read_text())
    return {"status": "fail", "why": f"exit {process.returncode}: {_last_line(err)}"}


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a child run as ``python -m bench.gpu_check``: the repository first on PYTHONPATH, so it
    finds ``bench`` (and the same ``regproxy_cli`` as this process) from any working folder."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _device(requested: str | None) -> tuple[str, str | None]:
    """(device the GPU checks run on, why they are skipped or None)."""
    import torch

    if requested:
        return requested, None
    if torch.cuda.is_available():
        return "cuda", None
    return "cpu", "skipped: no CUDA"


def _machine() -> dict:
    import torch

    from regproxy_cli.inference.runtime import tf32_state

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cpu_threads": torch.get_num_threads(), "tf32": tf32_state()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _details(outcome: dict) -> str:
    text = json.dumps({k: v for k, v in outcome.items() if k not in ("status", "seconds", "rows")})
    return text if len(text) <= 400 else text[:397] + "..."


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    machine = report["machine"]
    table = Table(title=f"gpu_check on {machine.get('gpus', ['CPU only'])[0]}, torch {machine['torch']}")
    for column in ("check", "status", "s", "details"):
        table.add_column(column, overflow="fold")
    for name, outcome in report["checks"].items():
        table.add_row(name, outcome["status"], str(outcome.get("seconds", "")), _details(outcome))
    console.print(table)
    rows = report["checks"].get("table4", {}).get("rows")
    if rows:
        side = Table(title="Table 4 side by side: image -> label FPS, 512x512, batch 1")
        for column in ("model", "paper V100", "fp32 here", "bf16 here"):
            side.add_column(column)
        for name, row in rows.items():
            side.add_row(name, str(row["paper_v100_fps"]), str(row["fp32_fps"]), str(row["bf16_fps"]))
        console.print(side)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", help="comma-separated checks to run (see --list)")
    parser.add_argument("--list", action="store_true", help="name the checks and exit")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: tests this script, no numbers")
    parser.add_argument("--device", help="run the GPU checks on this device (cpu: to test this script)")
    parser.add_argument("--run-check", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for check in CHECKS:
            print(f"{check.name:<17} {'CUDA' if check.cuda else 'any ':<5} {check.limit_s:>4} s  {check.what}")
        return 0
    if args.ddp_worker:
        ddp_worker(args.work, args.device or "cuda", args.steps)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="regproxy-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.run_check:
        _run_one(args.run_check, work, work / f"{args.run_check}.result.json", args.device or "cuda", args.quick)
        return 0
    names = [c.name for c in CHECKS]
    wanted = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"gpu_check: unknown check {unknown[0]!r}; the checks: {', '.join(names)}", file=sys.stderr)
        return 2
    from regproxy_cli.inference.runtime import set_tf32

    set_tf32(False)  # the checks' policy (each sets it again in its process), recorded with the machine
    device, no_gpu = _device(args.device)
    report = {"machine": _machine(), "device": device, "quick": args.quick, "checks": {}}
    slower = 1 if device.startswith("cuda") else CPU_SLOWER
    deadline = time.monotonic() + BUDGET_S * slower
    for check in (c for c in CHECKS if c.name in wanted):
        left = deadline - time.monotonic()
        if check.cuda and no_gpu:
            outcome = {"status": no_gpu}
        elif left < 10:
            outcome = {"status": "skipped: over the time budget"}
        else:
            print(f"{check.name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            outcome = {**_spawn(check, work, device, args.quick, min(check.limit_s * slower, left)),
                       "seconds": round(time.monotonic() - started, 1)}
        report["checks"][check.name] = outcome
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if any(o["status"] == "fail" for o in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
