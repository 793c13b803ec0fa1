"""Regenerate docs/benchmarks.md: RegProxy against its linear baseline and its peers, side by side in one process.

    pip install ".[bench]" ./backbones      # adds transformers, onnx, onnxruntime
    python -m bench.run                     # every section, about 40 minutes on 2 CPU cores
    python -m bench.run --sections overhead fastpath --quick

Sections (each writes its rows into docs/benchmarks.json; the markdown is rebuilt from all stored sections):

* ``overhead``  the proxy head's latency over the linear baseline, S/16, 512^2, batch 1 (paired rounds)
* ``latency``   image batch -> label maps at 512^2 and 768^2, batch 1 and 8: RegProxy Ti/S/B, the linear
                baselines, SegFormer-B0/B1, UperNet and Mask2Former (Swin-T); true GMACs, achieved GFLOP/s and
                its fraction of this machine's dense fp32 matmul rate
* ``slide``     sliding-window inference of a 2048x1024 image (512 windows, stride 341, as ADE20K's protocol)
* ``memory``    peak RSS (CPU) or max allocated (GPU) of one forward, each contender in a fresh process
* ``fastpath``  S/16 fp32 eager against bf16 autocast, ONNX Runtime and (``--compile``) torch.compile, with the
                label agreement against fp32
* ``agreement`` bf16 against fp32 labels on trained models: the demo RegProxy (``python -m bench.quality`` first)
                and an S/16 trained here from scratch on the generated scenes (once, about 6 minutes)
* ``postprocess`` logits -> label map and painting, formulations side by side
* ``precision`` fp32 against bf16 for RegProxy-S/16 and SegFormer-B1: 512^2 at batch 1 and 8, and sliding windows
* ``train``     training step throughput (images/s) at the paper's 512^2 crop
* ``quality``   read from docs/quality.json (``python -m bench.quality`` trains the runs)

Random weights are used for speed (the cost of a forward does not depend on the values).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from regproxy_cli.inference.protocol import slide_logits
from regproxy_cli.inference.runtime import autocast
from regproxy_cli.model.flops import count_model
from regproxy_cli.model.ops import NEIGHBOURS
from regproxy_cli.model.regproxy import build_model

from .common import REPO, current_rss_mb, interleaved, machine, matmul_gflops, median, peak_rss_mb, run_json

RESULTS = REPO / "docs" / "benchmarks.json"
REPORT = REPO / "docs" / "benchmarks.md"
OURS = ("t16", "s16", "b16")
LARGE = ("l16",)  # timed against EoMT-L only (section eomt): seconds a call on 2 cores
PEERS = ("segformer-b0", "segformer-b1", "upernet-swin-t", "mask2former-swin-t")
EOMT = ("eomt-s", "eomt-l")
CLASSES = 150  # ADE20K


# ----------------------------------------------------------------------------------------------- contenders


def build(name: str, device: torch.device, num_classes: int = CLASSES) -> torch.nn.Module:
    """``regproxy-s16``, ``linear-s16`` or a peer name -> an eval-mode model on ``device`` (random weights)."""
    torch.manual_seed(0)
    kind, _, backbone = name.partition("-")
    if kind in ("regproxy", "linear") and backbone in OURS + LARGE:
        model = build_model(backbone, num_classes, baseline=kind == "linear")
    else:
        from .peers import build_peer

        model = build_peer(name, num_classes)
    return model.eval().to(device)


@functools.cache  # one count per (model, size): batch 1 and 8 share it, and a peer's count is a real forward
def true_gmacs(name: str, size: int, num_classes: int = CLASSES) -> float:
    """True multiply-adds of one image (attention and painting included), in G."""
    kind, _, backbone = name.partition("-")
    if kind in ("regproxy", "linear") and backbone in OURS + LARGE:
        with torch.device("meta"):
            model = build_model(backbone, num_classes, baseline=kind == "linear")
        return count_model(model, size, size).true_macs / 1e9
    from .peers import peer_flops

    return peer_flops(name, (size, size), num_classes)


def labels_call(model: torch.nn.Module, x: torch.Tensor, precision: str = "fp32"):
    """The timed job: a normalised batch -> (B, H, W) label maps, as ``regproxy predict`` makes them.

    ``model.labels`` goes from the model's low-resolution scores to labels in one step (boundary-first resize +
    argmax); RegProxy, the linear baseline and every peer (bench/peers.py) share that same function.
    """

    def call():
        with torch.inference_mode(), autocast(x.device, precision):
            return model.labels(x)

    return call


def logits_argmax_call(model: torch.nn.Module, x: torch.Tensor):
    """Image -> logits at the input size (the forward), then their argmax: the textbook path."""

    def call():
        with torch.inference_mode():
            return model(x).argmax(1)

    return call


# ------------------------------------------------------------------------------------------------- sections


def section_overhead(args, device) -> dict:
    """RegProxy-S/16 vs its linear baseline: same backbone weights, same input, paired rounds."""
    size, rounds = (256, 6) if args.quick else (512, 40)
    regproxy, linear = build("regproxy-s16", device), build("linear-s16", device)
    linear.backbone.load_state_dict(regproxy.backbone.state_dict())
    x = scenes(1, size, device)
    calls = {
        "regproxy-s16 labels": labels_call(regproxy, x), "linear-s16 labels": labels_call(linear, x),
        "regproxy-s16 logits+argmax": logits_argmax_call(regproxy, x),
        "linear-s16 logits+argmax": logits_argmax_call(linear, x),
    }
    times = interleaved(calls, rounds=rounds, warmup=2, device=device)

    def overhead(path: str) -> float:  # median of the per-round ratios: drifts of the machine cancel
        return median([a / b for a, b in zip(times[f"regproxy-s16 {path}"], times[f"linear-s16 {path}"])]) - 1

    return {
        "size": size, "rounds": rounds, "ms": {name: 1e3 * median(t) for name, t in times.items()},
        "overhead_labels": overhead("labels"), "overhead_forward": overhead("logits+argmax"),
        "head_ms": _head_profile(regproxy, x),
    }


def _head_profile(model, x) -> dict:
    """Milliseconds of the proxy head's parts on the real tap/final grids (median of 20)."""
    from regproxy_cli.model.ops import affinity_from_logits, paint

    with torch.inference_mode():
        tap, final = model.backbone(x)
        head = model.head
        affinity = affinity_from_logits(head.affinity(tap), head.region_res)
        token_logits = head.classifier(final.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        parts = {
            "affinity head + softmax": lambda: affinity_from_logits(head.affinity(tap), head.region_res),
            "classifier": lambda: head.classifier(final.permute(0, 2, 3, 1)),
            "painting": lambda: paint(token_logits, affinity),
        }
        times = interleaved(parts, rounds=20, device=x.device)
    return {name: 1e3 * median(t) for name, t in times.items()}


def section_latency(args, device) -> dict:
    """Label maps per second for every contender, interleaved, per (size, batch)."""
    names = [f"{kind}-{b}" for b in OURS for kind in ("regproxy", "linear")] + list(PEERS)
    configs = [(128, 1), (128, 2)] if args.quick else [(512, 1), (512, 8), (768, 1), (768, 8)]
    if args.quick:
        names = ["regproxy-t16", "linear-t16", "segformer-b0"]
    rate = matmul_gflops(device=device)
    models = {name: build(name, device) for name in names}
    rows = []
    for size, batch in configs:
        x = scenes(batch, size, device)
        calls = {name: labels_call(model, x) for name, model in models.items()}
        rounds = 3 if args.quick else (7 if batch == 1 else 3 if size == 512 else 2)  # 768^2 x 8 takes minutes
        times = interleaved(calls, rounds=rounds, warmup=1, device=device)
        for name in names:
            gmacs = true_gmacs(name, size)
            seconds = median(times[name])
            achieved = 2 * gmacs * batch / seconds
            rows.append({"model": name, "size": size, "batch": batch, "ms": 1e3 * seconds,
                         "images_per_s": batch / seconds, "gmacs": gmacs, "gflops_per_s": achieved,
                         "of_matmul": achieved / rate, "rounds": len(times[name])})
        args.save_partial("latency", {"matmul_gflops": rate, "rows": rows})
        _progress(f"latency {size}^2 batch {batch} done")
    return {"matmul_gflops": rate, "rows": rows}


def section_slide(args, device) -> dict:
    """A 2048x1024 image through 512^2 windows at stride 341, windows batched 8 (and 1, for S/16)."""
    height, width, window, stride = (256, 512, 128, 85) if args.quick else (1024, 2048, 512, 341)
    names = ["regproxy-t16", "linear-t16"] if args.quick else [f"{k}-{b}" for b in OURS for k in ("regproxy", "linear")]
    image = scenes(1, (height, width), device)
    models = {name: build(name, device) for name in names}

    def sliding(model, batch_size):
        def call():
            with torch.inference_mode():
                return slide_logits(model, image, num_classes=CLASSES, window=(window, window),
                                    stride=(stride, stride), batch_size=batch_size).argmax(1)
        return call

    calls = {f"{name} (8 windows/pass)": sliding(model, 8) for name, model in models.items()}
    s16 = "regproxy-s16" if not args.quick else "regproxy-t16"
    calls[f"{s16} (1 window/pass)"] = sliding(models[s16], 1)
    times = interleaved(calls, rounds=2, warmup=1, device=device)
    from regproxy_cli.inference.protocol import window_starts

    windows = len(window_starts(height, window, stride)) * len(window_starts(width, window, stride))
    return {"image": [height, width], "window": window, "stride": stride, "windows": windows,
            "ms": {name: 1e3 * median(t) for name, t in times.items()}}


def fast_precisions(device: torch.device) -> list[str]:
    """fp32, and bf16 where it can be fast: a GPU, or a CPU with AVX512-BF16 or AMX. Without those instructions
    oneDNN emulates bf16 (7.5x slower than fp32 on an AVX2 EPYC: minutes per table for nothing; section int8 still
    times it once)."""
    from regproxy_cli.inference.runtime import cpu_has_bf16

    return ["fp32", "bf16"] if device.type != "cpu" or cpu_has_bf16() else ["fp32"]


def section_precision(args, device) -> dict:
    """fp32 against bf16 autocast (and, on CPU, RegProxy's --precision int8), RegProxy-S/16 against SegFormer-B1, in
    one process: 512^2 at batch 1 and 8, and a 2048x1024 image through 512^2 sliding windows (stride 341, 8 windows
    a pass)."""
    size = 128 if args.quick else 512
    height, width, window, stride = (256, 512, 128, 85) if args.quick else (1024, 2048, 512, 341)
    names = ["regproxy-s16", "segformer-b1"]
    built = {name: build(name, device) for name in names}
    models = {(name, p): built[name] for name in names for p in fast_precisions(device)}  # bf16: autocast
    if device.type == "cpu":  # --precision int8: RegProxy's backbone linear layers (SegFormer has no int8 path here)
        from regproxy_cli.inference.quantize import quantize_int8

        models[("regproxy-s16", "int8")] = build("regproxy-s16", device)
        quantize_int8(models[("regproxy-s16", "int8")])
    rows = []
    for batch in (1, 8):
        x = scenes(batch, size, device)
        calls = {(n, p): labels_call(model, x, p) for (n, p), model in models.items()}
        times = interleaved(calls, rounds=3 if args.quick or batch == 8 else 7, warmup=1, device=device)
        rows += [{"model": n, "precision": p, "size": size, "batch": batch, "ms": 1e3 * median(times[(n, p)]),
                  "images_per_s": batch / median(times[(n, p)])} for n, p in calls]
        _progress(f"precision: batch {batch} done")
    image = scenes(1, (height, width), device)

    def sliding(model, precision):
        def call():
            with torch.inference_mode(), autocast(device, precision):
                logits = slide_logits(model, image, num_classes=CLASSES, window=(window, window),
                                      stride=(stride, stride), batch_size=8)
            return logits.argmax(1)
        return call

    calls = {(n, p): sliding(model, p) for (n, p), model in models.items()}
    times = interleaved(calls, rounds=2, warmup=1, device=device)
    slide = [{"model": n, "precision": p, "image": [height, width], "ms": 1e3 * median(times[(n, p)])}
             for n, p in calls]
    return {"rows": rows, "slide": slide, "window": window, "stride": stride}


def section_memory(args, device) -> dict:
    """Peak memory of one labelled forward per contender, each in a fresh process."""
    names = ["regproxy-t16", "linear-t16"] if args.quick else (
        [f"{k}-{b}" for b in OURS for k in ("regproxy", "linear")] + list(PEERS))
    configs = [(128, 1)] if args.quick else [(512, 1), (512, 8)]
    rows = []
    for size, batch in configs:
        for name in names:
            row = run_json(["-m", "bench.run", "--memory-one", name, str(size), str(batch), "--device", str(device)])
            rows.append({"model": name, "size": size, "batch": batch, **row})
        _progress(f"memory {size}^2 batch {batch} done")
    return {"rows": rows}


def memory_one(name: str, size: int, batch: int, device: torch.device) -> dict:
    """Run in a fresh process: peak RSS (CPU) or max allocated (GPU) of building + one labelled forward."""
    model = build(name, device)
    x = scenes(batch, size, device)
    before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        labels_call(model, x)()
        torch.cuda.synchronize()
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                "inference_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    labels_call(model, x)()
    return {"peak_mb": peak_rss_mb(), "inference_mb": peak_rss_mb() - before}


def section_fastpath(args, device) -> dict:
    """S/16 at 512^2, batch 1: fp32 eager against the fast paths, with label agreement against fp32.

    Also, on this machine: the dense fp32 and bf16 matmul rates, each attention kernel forced in bf16 (the default
    runs the one measured faster here, regproxy_cli.model.attention), and the label step's share of the call on
    a generated scene and on noise (noise: the worst case, most output pixels on a label boundary).
    """
    from regproxy_cli.model.resize import resize_argmax

    size = 256 if args.quick else 512
    model = build("regproxy-s16", device)
    image = scenes(1, size, device, seed=7)  # agreement on another scene than the timed one
    x = scenes(1, size, device)
    noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    # path name -> (normalised batch -> label maps); each is timed on x and compared with fp32 eager on image
    paths = {"fp32 eager": lambda inputs: labels_call(model, inputs)()}
    for precision in ["bf16"] + (["fp16"] if device.type == "cuda" else []):
        paths[f"{precision} autocast"] = lambda inputs, precision=precision: labels_call(model, inputs, precision)()
    if device.type == "cpu":
        for kernel in ("sdpa", "explicit"):
            paths[f"bf16 autocast, {kernel} attention"] = functools.partial(_forced_attention, model, kernel)
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cpu":
            from regproxy_cli.onnx.export import export_onnx
            from regproxy_cli.onnx.runtime import onnx_session

            path = export_onnx(model, Path(tmp) / "s16.onnx", size=(size, size), dynamic=False)  # `--static`
            session = onnx_session(path)
            paths["onnxruntime fp32 (static shape)"] = lambda inputs: torch.from_numpy(
                session.run(None, {"image": inputs.numpy()})[0]).argmax(1)
        if args.compile:  # as `--compile` does it: the backbone, frozen weights, warmed up at this size
            from regproxy_cli.inference.runtime import compile_backbone

            compiled = build("regproxy-s16", device)  # the same seed, so the same weights
            compile_backbone(compiled, size=(size, size))
            paths["torch.compile fp32 (backbone)"] = lambda inputs: labels_call(compiled, inputs)()
        calls = {name: functools.partial(run, x) for name, run in paths.items()}
        calls["fp32 eager, logits + argmax"] = logits_argmax_call(model, x)
        # the label step alone, and the whole bf16 call, on a scene and on noise
        grids = {}
        for name, inputs in (("scene", x), ("noise", noise)):
            with torch.inference_mode(), autocast(device, "bf16"):
                grids[name] = model.grid_logits(inputs)[0].float()
            calls[f"label step, {name}"] = functools.partial(resize_argmax, grids[name], (size, size))
            calls[f"label step, {name}, resize then argmax"] = functools.partial(_resize_then_argmax, grids[name],
                                                                                 size)
        calls["fp32 eager, noise"] = labels_call(model, noise)
        calls["bf16 autocast, noise"] = labels_call(model, noise, "bf16")
        times = interleaved(calls, rounds=5 if args.quick else 15, warmup=2, device=device)
        reference = paths["fp32 eager"](image)
        agreement = {name: _agree(run(image), reference) for name, run in paths.items() if name != "fp32 eager"}
    ms = {n: 1e3 * median(t) for n, t in times.items()}
    fp32 = ms["fp32 eager"]
    with torch.inference_mode(), autocast(device, "bf16"):
        kernel = model.backbone.attention_kernel(size, size)
    return {"size": size, "ms": ms, "speedup": {n: fp32 / v for n, v in ms.items() if not n.startswith("label step")
                                                 and "noise" not in n},
            "speedup_noise": ms["fp32 eager, noise"] / ms["bf16 autocast, noise"],
            "label_step_share": {"scene": ms["label step, scene"] / ms["bf16 autocast"],
                                 "noise": ms["label step, noise"] / ms["bf16 autocast, noise"]},
            "agreement": agreement, "attention_kernel": kernel, "gmacs": true_gmacs("regproxy-s16", size),
            "matmul_gflops": {"fp32": matmul_gflops(device=device),
                              "bf16": matmul_gflops(dtype=torch.bfloat16, device=device)}}


def _forced_attention(model: torch.nn.Module, kernel: str, inputs: torch.Tensor) -> torch.Tensor:
    from regproxy_cli.model.attention import ATTENTION_ENV

    with mock.patch.dict(os.environ, {ATTENTION_ENV: kernel}):
        return labels_call(model, inputs, "bf16")()


def _resize_then_argmax(grid: torch.Tensor, size: int) -> torch.Tensor:
    """The textbook label step: all K scores resized to the image, then argmax (the layout the model gives)."""
    from regproxy_cli.model.resize import batch_of_one

    with torch.inference_mode():
        return F.interpolate(batch_of_one(grid), size=(size, size), mode="bilinear", align_corners=False)[0].argmax(0)


def scenes(batch: int, size: int | tuple[int, int], device: torch.device, seed: int = 3) -> torch.Tensor:
    """A normalised batch of generated scenes (objects, thin lines, textures): the timed inputs.

    Not noise: the network's cost does not depend on the pixels, but the label step's does (it blends all K
    scores only at label boundaries), so the timings use pictures with structure.
    """
    from regproxy_cli.constants import IMAGENET_MEAN, IMAGENET_STD
    from regproxy_cli.data.synthetic import SyntheticScenes

    height, width = (size, size) if isinstance(size, int) else size
    scenes = SyntheticScenes(batch, size=(height, width), num_classes=5, seed=seed)
    rgb = torch.stack([torch.from_numpy(scenes.render(i)[0]).permute(2, 0, 1) for i in range(batch)]).float()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((rgb - mean) / std).to(device)


def _agree(labels: torch.Tensor, reference: torch.Tensor) -> float:
    return (labels == reference).float().mean().item()


def section_postprocess(args, device) -> dict:
    """Stride-4 150-class logits -> a 512^2 label map, and the painting step, formulated several ways."""
    from regproxy_cli.model.ops import paint
    from regproxy_cli.model.resize import resize_argmax

    size, grid, region = (256, 16, 4) if args.quick else (512, 32, 4)
    low = torch.randn(1, grid * region, grid * region, CLASSES, device=device)  # channels-last, as paint gives
    nchw = low.permute(0, 3, 1, 2).contiguous()
    strided = low.permute(0, 3, 1, 2)  # a channels-last tensor seen as NCHW

    def to_labels(logits):
        return lambda: F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False).argmax(1)

    with torch.inference_mode():
        post = interleaved({
            "NCHW contiguous": to_labels(nchw),
            "NCHW from a permuted tensor (.contiguous() first)": lambda: to_labels(strided.contiguous())(),
            "channels-last (RegProxy's layout)": to_labels(strided),
            "resize_argmax: boundary cells, top-3 candidates (model.labels)": lambda: resize_argmax(strided[0],
                                                                                                   (size, size)),
        }, rounds=5 if args.quick else 15, device=device)
        token_logits = torch.randn(1, grid, grid, CLASSES, device=device).permute(0, 3, 1, 2)
        affinity = torch.randn(1, NEIGHBOURS, region, region, grid, grid, device=device).softmax(1)
        painting = interleaved({
            "unfold + einsum (straightforward)": lambda: _paint_einsum(token_logits, affinity),
            "token-major matmul, channels-last (ours)": lambda: paint(token_logits, affinity),
        }, rounds=5 if args.quick else 25, device=device)
        error = (_paint_einsum(token_logits, affinity) - paint(token_logits, affinity)).abs().max().item()
    return {"size": size, "grid": grid, "postprocess_ms": {n: 1e3 * median(t) for n, t in post.items()},
            "paint_ms": {n: 1e3 * median(t) for n, t in painting.items()}, "paint_max_abs_diff": error}


def _paint_einsum(token_logits: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """The straightforward painting: unfold the 3x3 neighbours at full size, then one einsum (the baseline)."""
    batch, classes, height, width = token_logits.shape
    sub_h, sub_w = affinity.shape[2:4]
    neighbours = F.unfold(token_logits, 3, padding=1).reshape(batch, classes, NEIGHBOURS, height, width)
    out = torch.einsum("bnijyx,bknyx->bkyixj", affinity, neighbours)
    return out.reshape(batch, classes, height * sub_h, width * sub_w)


def section_train(args, device) -> dict:
    """Training steps per second (forward, cross-entropy, backward, AdamW) at the paper's crop."""
    size, batch = (128, 2) if args.quick else (512, 4)
    names = ["regproxy-t16", "linear-t16"] if args.quick else [f"{k}-{b}" for b in ("t16", "s16") for k in
                                                                  ("regproxy", "linear")]
    steps = {}
    for name in names:
        model = build(name, device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, CLASSES, (batch, size, size), device=device)

        def step(model=model, optimizer=optimizer, x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[name] = step
    times = interleaved(steps, rounds=2 if args.quick else 4, warmup=1, device=device)
    return {"size": size, "batch": batch,
            "images_per_s": {name: batch / median(t) for name, t in times.items()}}


def section_agreement(args, device) -> dict:
    """bf16 against fp32 labels for *trained* models: the demo RegProxy that bench/quality.py trains, and an S/16.

    Random weights have tiny logit margins (the top two of 150 classes a few hundredths apart), so their
    agreement is a worst case; a trained model's is what users see. The authors' S/16 weights cannot be
    downloaded here, so an S/16 is trained from scratch on the generated scenes (once; `runs/agreement/s16`).
    """
    from regproxy_cli.data.synthetic import SyntheticScenes
    from regproxy_cli.hub.zoo import load_model
    from regproxy_cli.inference.predictor import predict_labels

    demo = REPO / "runs" / "quality" / "RegProxy_hw4" / "best"
    s16_name, s16_path = _scene_trained_s16(iters=10 if args.quick else args.agreement_iters)
    models = {s16_name: s16_path}
    if demo.exists():
        models["ViT-Demo/8 RegProxy h=w=4 (bench/quality.py)"] = demo
    else:
        _progress(f"agreement: {demo} is missing (`python -m bench.quality` trains it); S/16 only")
    from regproxy_cli.engine.metrics import ConfusionMatrix
    from regproxy_cli.inference.quantize import quantize_int8

    count = 8 if args.quick else args.agreement_images
    # bf16 only where it can be fast: emulated bf16 takes minutes here for a path nobody should take
    precisions = [p for p in fast_precisions(device) if p != "fp32"] + (["int8"] if device.type == "cpu" else [])
    rows = []
    for name, path in models.items():
        model = load_model(str(path)).to(device)
        int8 = load_model(str(path)).to(device)
        if "int8" in precisions:
            quantize_int8(int8)
        for size in (128, 512):  # the training size, and scenes 4x larger
            scenes = SyntheticScenes(count, size=(size, size), num_classes=model.config.num_classes, seed=0,
                                     split="val")
            same = dict.fromkeys(precisions, 0)
            total = 0
            scores = {p: ConfusionMatrix(model.config.num_classes) for p in ["fp32", *precisions]}
            for index in range(count):
                image, truth = scenes.render(index)
                labels = {"fp32": predict_labels(model, image)}
                for precision in precisions:
                    labels[precision] = predict_labels(int8 if precision == "int8" else model, image,
                                                       precision=precision)
                    same[precision] += int((labels["fp32"] == labels[precision]).sum())
                for precision, predicted in labels.items():
                    scores[precision].update(torch.from_numpy(predicted), torch.from_numpy(truth.astype("int64")))
                total += labels["fp32"].size
            miou = {p: 100 * float(c.compute()["mIoU"]) for p, c in scores.items()}
            rows += [{"model": name, "size": size, "images": count, "precision": p, "agreement": same[p] / total,
                      "mIoU": {"fp32": miou["fp32"], p: miou[p]},
                      "val_mIoU": model.config.metrics.get("mIoU") if model.config.metrics else None}
                     for p in precisions]
    return {"rows": rows}


def _scene_trained_s16(iters: int) -> tuple[str, Path]:
    """RegProxy-S/16 trained from scratch on the demo's generated scenes (128^2 crops, batch 8), once."""
    from regproxy_cli.engine.train import train

    from .quality import run_config

    run_dir = REPO / "runs" / "agreement" / f"s16_{iters}"
    if not (run_dir / "best").exists():
        train(run_config(run_dir, iters, ["model.backbone=s16"]), progress=False)
    return f"RegProxy-S/16 trained from scratch on the scenes ({iters} iterations)", run_dir / "best"


def section_eomt(args, device) -> dict:
    """RegProxy-S/16 and L/16 against EoMT-S and EoMT-L (bench/peers.py), 512^2, batch 1, image -> labels,
    interleaved in one process, fp32 and bf16; true GMACs counted alike (FlopCounterMode for EoMT)."""
    size = 128 if args.quick else 512
    names = ["regproxy-t16", "eomt-s"] if args.quick else ["regproxy-s16", "eomt-s", "regproxy-l16", "eomt-l"]
    models = {name: build(name, device) for name in names}
    x = scenes(1, size, device)
    precisions = ["fp32"] if args.quick else fast_precisions(device)
    calls = {(n, p): labels_call(models[n], x, p) for n in names for p in precisions}
    times = interleaved(calls, rounds=3 if args.quick else 5, warmup=1, device=device)
    rows = [{"model": n, "precision": p, "size": size, "ms": 1e3 * min(times[(n, p)]),
             "ms_median": 1e3 * median(times[(n, p)]), "gmacs": true_gmacs(n, size),
             "rounds": len(times[(n, p)])} for n, p in calls]
    return {"rows": rows}


def int8_one(isa: str | None, size: int, rounds: int) -> dict:
    """Run in a fresh process (oneDNN reads ONEDNN_MAX_CPU_ISA once, at load): S/16 fp32 eager against bf16
    autocast and --precision int8 (dynamic, and static scales calibrated on 4 other scenes), interleaved; label
    agreement with fp32 on a further scene (random weights: a worst case, see section agreement)."""
    from regproxy_cli.inference.quantize import calibrate_int8, quantize_int8

    device = torch.device("cpu")
    fp32 = build("regproxy-s16", device)
    dynamic = build("regproxy-s16", device)
    quantize_int8(dynamic)
    static = build("regproxy-s16", device)
    quantize_int8(static, calibrate_int8(static, [scenes(1, size, device, seed=s) for s in range(10, 14)]))
    x, image = scenes(1, size, device), scenes(1, size, device, seed=7)
    contenders = {"fp32 eager": (fp32, "fp32"), "bf16 autocast": (fp32, "bf16"),
                  "int8 (dynamic scales)": (dynamic, "int8"), "int8 (static scales)": (static, "int8"),
                  "int8 + bf16 attention": (dynamic, "bf16")}
    calls = {name: labels_call(model, x, precision) for name, (model, precision) in contenders.items()}
    times = interleaved(calls, rounds=rounds, warmup=2, device=device)
    reference = labels_call(fp32, image)()
    agreement = {name: _agree(labels_call(model, image, precision)(), reference)
                 for name, (model, precision) in contenders.items()}
    return {"isa": isa or "default", "ms": {n: 1e3 * min(t) for n, t in times.items()},
            "ms_median": {n: 1e3 * median(t) for n, t in times.items()}, "agreement": agreement,
            "rounds": rounds}


def section_int8(args, device) -> dict:
    """--precision int8 against fp32 and bf16 (int8_one), on this CPU as it is and with oneDNN held to AVX512-VNNI
    and to AVX512-BF16 (``ONEDNN_MAX_CPU_ISA``): an emulation of an AVX-512 CPU without AMX, for oneDNN's kernels
    only (it is not such a machine: caches, clocks and memory stay this one's)."""
    if device.type != "cpu":
        return {"skipped": "int8 runs on CPU only"}
    size, rounds = (128, 3) if args.quick else (512, 9)
    from regproxy_cli.model.attention import cpu_info

    runs = []
    # the caps emulate CPUs below this one; on a CPU without AVX-512 they would change nothing
    caps = ("AVX512_CORE_BF16", "AVX512_CORE_VNNI") if "avx512f" in cpu_info()[1] else ()
    for isa in (None, *caps):
        env = {"ONEDNN_MAX_CPU_ISA": isa} if isa else {}
        runs.append(run_json(["-m", "bench.run", "--int8-one", isa or "default", str(size), str(rounds)], env=env))
        _progress(f"int8 {isa or 'default'} done")
    return {"size": size, "runs": runs}


SECTIONS = {
    "overhead": section_overhead, "latency": section_latency, "slide": section_slide, "memory": section_memory,
    "fastpath": section_fastpath, "agreement": section_agreement, "postprocess": section_postprocess,
    "train": section_train, "precision": section_precision, "eomt": section_eomt, "int8": section_int8,
}


# ------------------------------------------------------------------------------------------------- report


def machine_kind(info: dict) -> str:
    """A machine kind as the kernels see it: the CPU's name and matrix extensions (or the GPU)."""
    return info["gpu"] or f"{info['cpu']} ({', '.join(info['isa'])})"


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the scripts, not a benchmark")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in the fastpath section")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default docs/benchmarks.json; "
                        "--quick writes to a temporary file unless given)")
    parser.add_argument("--memory-one", nargs=3, metavar=("MODEL", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--agreement-iters", type=int, default=500,
                        help="training iterations of the agreement section's scene-trained S/16")
    parser.add_argument("--agreement-images", type=int, default=50, help="validation scenes per size (agreement)")
    parser.add_argument("--int8-one", nargs=3, metavar=("ISA", "SIZE", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.int8_one:
        isa, size, rounds = args.int8_one
        print(json.dumps(int8_one(None if isa == "default" else isa, int(size), int(rounds))))
        return
    if args.memory_one:
        name, size, batch = args.memory_one
        print(json.dumps(memory_one(name, int(size), int(batch), device)))
        return

    out = args.out or (Path(tempfile.gettempdir()) / "regproxy-bench-quick.json" if args.quick else RESULTS)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("sections", {})
    for kept in results["sections"].values():  # sections from an earlier run keep the machine they ran on
        kept.setdefault("machine", results.get("machine"))
    results["machine"] = machine()
    def store(section: str, data: dict, seconds: float, partial: bool = False) -> None:
        earlier = results["sections"].get(section)
        if earlier and machine_kind(earlier["machine"]) != machine_kind(results["machine"]):
            # another kind of machine measured it: kept beside this one (the report shows each kind's table)
            results["sections"][f"{section}@{machine_kind(earlier['machine'])}"] = earlier
        results["sections"][section] = {**data, "device": str(device), "date": time.strftime("%Y-%m-%d"),
                                        "seconds": seconds, "machine": results["machine"],
                                        **({"partial": True} if partial else {})}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    # long sections keep what they have if interrupted
    args.save_partial = lambda section, data: store(section, data, float("nan"), partial=True)
    for name in args.sections:
        _progress(f"{name} ...")
        begin = time.perf_counter()
        store(name, SECTIONS[name](args, device), time.perf_counter() - begin)
        _progress(f"{name} done in {time.perf_counter() - begin:.0f} s")
    if not args.quick or args.out:
        from .report import write_report

        write_report(results, REPORT if out == RESULTS else out.with_suffix(".md"))


if __name__ == "__main__":
    main()
