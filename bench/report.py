"""Turn docs/benchmarks.json (written by bench/run.py) and docs/quality.json into docs/benchmarks.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

NAMES = {
    "regproxy-t16": "RegProxy-Ti/16", "regproxy-s16": "RegProxy-S/16", "regproxy-b16": "RegProxy-B/16",
    "linear-t16": "linear Ti/16", "linear-s16": "linear S/16", "linear-b16": "linear B/16",
    "segformer-b0": "SegFormer-B0", "segformer-b1": "SegFormer-B1", "upernet-swin-t": "UperNet Swin-T",
    "mask2former-swin-t": "Mask2Former Swin-T", "regproxy-l16": "RegProxy-L/16", "eomt-s": "EoMT-S",
    "eomt-l": "EoMT-L",
}


def _name(key: str) -> str:
    base, _, rest = key.partition(" ")
    return f"{NAMES.get(base, base)} {rest}".strip()


def _table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _latency_lookup(sections: dict) -> dict:
    rows = sections.get("latency", {}).get("rows", [])
    return {(r["model"], r["size"], r["batch"]): r for r in rows}


def _best_throughput(lookup: dict, name: str, size: int) -> tuple[float, int] | None:
    """(images/s, batch) of a model's fastest batch size at ``size``."""
    rows = [r for (model, s, _), r in lookup.items() if model == name and s == size]
    best = max(rows, key=lambda r: r["images_per_s"], default=None)
    return (best["images_per_s"], best["batch"]) if best else None


def headline(sections: dict) -> str:
    out = []
    lookup = _latency_lookup(sections)
    if lookup:
        rate = sections["latency"]["matmul_gflops"]
        rows = []
        for name in ("regproxy-s16", "linear-s16", "segformer-b1", "segformer-b0", "mask2former-swin-t",
                     "upernet-swin-t"):
            r = lookup.get((name, 512, 1))
            if r:
                rows.append([_name(name), f"{r['ms']:.0f}", f"{r['images_per_s']:.2f}", f"{r['gmacs']:.1f}",
                             f"{r['gflops_per_s']:.0f}", f"{100 * r['of_matmul']:.0f}%"])
        where = (sections["latency"].get("machine") or {}).get("cpu", "this machine")
        out.append(f"512², batch 1, fp32 CPU, image → label map ({where}, dense fp32 matmul: {rate:.0f} "
                   "GFLOP/s):\n")
        out.append(_table(["model", "ms", "images/s", "true GMACs", "GFLOP/s", "of matmul"], rows))
        rp, sf, m2f = (lookup.get((n, 512, 1)) for n in ("regproxy-s16", "segformer-b1", "mask2former-swin-t"))
        if rp and sf and m2f:
            out.append(f"\nRegProxy-S/16 runs at **{rp['images_per_s'] / sf['images_per_s']:.2f}×** SegFormer-B1's "
                       f"throughput and **{rp['images_per_s'] / m2f['images_per_s']:.2f}×** Mask2Former-Swin-T's.")
        rp8, sf8, m2f8 = (lookup.get((n, 512, 8)) for n in ("regproxy-s16", "segformer-b1", "mask2former-swin-t"))
        if rp8 and sf8 and m2f8:
            out.append(f"At batch 8: {rp8['images_per_s'] / sf8['images_per_s']:.2f}× SegFormer-B1 "
                       f"({rp8['images_per_s']:.2f} against {sf8['images_per_s']:.2f} images/s) and "
                       f"{rp8['images_per_s'] / m2f8['images_per_s']:.2f}× Mask2Former; "
                       f"{100 * rp8['of_matmul']:.0f}% of the matmul rate.")
        best = {n: _best_throughput(lookup, n, 512) for n in ("regproxy-s16", "segformer-b1")}
        if all(best.values()):
            (rp_rate, rp_batch), (sf_rate, sf_batch) = best["regproxy-s16"], best["segformer-b1"]
            out.append(f"Each at its best batch (1 or 8): RegProxy-S/16 {rp_rate:.2f} images/s (batch {rp_batch}) "
                       f"against SegFormer-B1 {sf_rate:.2f} (batch {sf_batch}), **{rp_rate / sf_rate:.2f}×**.")
    overhead = sections.get("overhead")
    if overhead:
        out.append(f"\nProxy head overhead over the linear baseline (S/16, {overhead['size']}², batch 1, median of "
                   f"{overhead['rounds']} paired rounds): **{100 * overhead['overhead_labels']:+.1f}%** image → "
                   f"label map, {100 * overhead['overhead_forward']:+.1f}% image → full-size logits → argmax.")
    fast = sections.get("fastpath")
    if fast:
        best = max((n for n in fast["speedup"] if n in fast["agreement"]), key=lambda n: fast["speedup"][n])
        latency_machine = (sections.get("latency") or {}).get("machine")
        on = (f" on the {fast['machine']['cpu']} ({', '.join(fast['machine']['isa'])})"
              if fast.get("machine") and fast["machine"] != latency_machine else "")
        out.append(f"\nFastest CPU path{on}: **{best}**, {fast['speedup'][best]:.2f}× fp32 eager (S/16, 512², batch 1), "
                   f"label agreement {100 * fast['agreement'].get(best, float('nan')):.2f}% with fp32 on random "
                   "weights (a worst case: their top two logits are a few hundredths apart)")
        trained = sections.get("agreement")
        if trained:
            s16 = [r["agreement"] for r in trained["rows"] if "S/16" in r.get("model", "")]
            worst = min(s16 or [r["agreement"] for r in trained["rows"]])
            which = "an S/16 trained on the generated scenes" if s16 else "a trained model (the demo RegProxy)"
            out[-1] += f"; {100 * worst:.2f}% or more on {which}."
        else:
            out[-1] += "."
    return "\n".join(out)


def overhead_md(s: dict) -> str:
    rows = [[_name(n), f"{ms:.1f}"] for n, ms in s["ms"].items()]
    parts = [
        (f"RegProxy-S/16 and the linear baseline share the backbone weights and the input ({s['size']}², batch 1, "
        f"fp32). Each round times all four calls in a rotating order; the overhead is the median of the "
        f"{s['rounds']} per-round ratios.\n"),
        _table(["call", "median ms"], rows),
        f"\n- image → label map (`model.labels`, as `regproxy predict`): **{100 * s['overhead_labels']:+.2f}%**",
        f"- image → logits at the input size (the forward) → argmax: **{100 * s['overhead_forward']:+.2f}%**",
        "\nThe head's parts, timed alone on the real grids:\n",
        _table(["part", "ms"], [[n, f"{v:.2f}"] for n, v in s["head_ms"].items()]),
    ]
    return "\n".join(parts)


def latency_md(s: dict) -> str:
    parts = [(f"Dense fp32 matmul on this machine: **{s['matmul_gflops']:.0f} GFLOP/s** (2048² products). "
             "true GMACs count every matrix product, attention and painting included, for RegProxy "
             "(`regproxy flops`) and peers (`torch.utils.flop_counter`) alike; GFLOP/s = 2 × GMACs × batch / "
             "time.\n")]
    configs = sorted({(r["size"], r["batch"]) for r in s["rows"]})
    for size, batch in configs:
        rows = [r for r in s["rows"] if (r["size"], r["batch"]) == (size, batch)]
        parts.append(f"\n**{size}², batch {batch}** ({rows[0]['rounds']} interleaved rounds)\n")
        parts.append(_table(
            ["model", "ms / batch", "images/s", "true GMACs / image", "GFLOP/s", "of matmul"],
            [[_name(r["model"]), f"{r['ms']:.0f}", f"{r['images_per_s']:.2f}", f"{r['gmacs']:.1f}",
              f"{r['gflops_per_s']:.0f}", f"{100 * r['of_matmul']:.0f}%"] for r in rows]))
    return "\n".join(parts)


def slide_md(s: dict) -> str:
    height, width = s["image"]
    rows = [[_name(n), f"{ms / 1e3:.2f}"] for n, ms in s["ms"].items()]
    text = (f"A {width}×{height} image, {s['window']}² windows at stride {s['stride']} ({s['windows']} windows), "
            "image → label map:\n\n" + _table(["model", "seconds"], rows))
    single = next((n for n in s["ms"] if n.endswith("(1 window/pass)")), None)
    one = s["ms"].get(single)
    eight = s["ms"].get(single.replace("(1 window/pass)", "(8 windows/pass)")) if single else None
    if one and eight:
        text += (f"\n\n8 windows per forward: {one / eight:.2f}× the speed of one window per forward. On a CPU our "
                 "models run a batch image by image anyway (batched calls are slower per image there), so the two "
                 "differ only in how windows are cut and stacked; batching is for GPUs.")
    return text


def memory_md(s: dict) -> str:
    rows = [[_name(r["model"]), f"{r['size']}²", r["batch"], f"{r['peak_mb']:.0f}", f"{r['inference_mb']:.0f}"]
            for r in s["rows"]]
    return ("Each contender in a fresh process: build the model, then one image batch → label maps. peak: the "
            "process's peak RSS (Python, torch and the weights included); inference: the peak above the RSS "
            "just before the forward.\n\n" + _table(["model", "size", "batch", "peak MiB", "inference MiB"], rows))


def fastpath_md(s: dict) -> str:
    names = [n for n in s["ms"] if n in s["speedup"]]
    rows = [[n, f"{s['ms'][n]:.0f}", f"{s['speedup'][n]:.2f}×",
             f"{100 * s['agreement'][n]:.2f}%" if n in s["agreement"] else "—"] for n in names]
    out = (f"RegProxy-S/16, {s['size']}², batch 1, image → label map, on a generated scene. Agreement: the fraction "
           "of pixels whose label equals fp32 eager's on another generated scene (random weights: a worst case).\n\n"
           + _table(["path", "ms", "speed-up", "label agreement"], rows))
    if "label_step_share" in s:
        ms, share, rate = s["ms"], s["label_step_share"], s["matmul_gflops"]
        achieved = 2 * s["gmacs"] / (ms["fp32 eager"] / 1e3)
        out += (
            f"\n\n- bf16 runs the **{s['attention_kernel']}** attention kernel here (measured the faster on this "
            "machine; `REGPROXY_ATTENTION` forces one).\n"
            f"- On noise (most output pixels on a label boundary): fp32 {ms['fp32 eager, noise']:.0f} ms, bf16 "
            f"{ms['bf16 autocast, noise']:.0f} ms, **{s['speedup_noise']:.2f}×**.\n"
            f"- The label step (150-class stride-4 scores → {s['size']}² labels): {ms['label step, scene']:.1f} ms on "
            f"the scene ({100 * share['scene']:.0f}% of the bf16 call; resize then argmax: "
            f"{ms['label step, scene, resize then argmax']:.1f} ms), {ms['label step, noise']:.1f} ms on noise "
            f"({100 * share['noise']:.0f}%; resize then argmax: {ms['label step, noise, resize then argmax']:.1f} ms)."
            f"\n- Dense 2048² matmul: fp32 {rate['fp32']:.0f} GFLOP/s, bf16 {rate['bf16']:.0f} GFLOP/s "
            f"({rate['bf16'] / rate['fp32']:.1f}×). fp32 eager runs {s['gmacs']:.1f} true GMACs at {achieved:.0f} "
            f"GFLOP/s, {100 * achieved / rate['fp32']:.0f}% of the fp32 matmul rate.")
    return out


def precision_md(s: dict) -> str:
    rows = {(r["model"], r["precision"], r["batch"]): r for r in s["rows"]}
    table = []
    for batch in (1, 8):
        for precision in [p for p in ("fp32", "bf16") if ("regproxy-s16", p, batch) in rows]:
            ours, peer = rows[("regproxy-s16", precision, batch)], rows[("segformer-b1", precision, batch)]
            table.append([f"{ours['size']}², batch {batch}", precision, f"{ours['images_per_s']:.2f}",
                          f"{peer['images_per_s']:.2f}", f"{ours['images_per_s'] / peer['images_per_s']:.2f}×"])
        if ("regproxy-s16", "int8", batch) in rows:  # against SegFormer-B1's faster precision
            ours = rows[("regproxy-s16", "int8", batch)]
            peer = max((rows[k] for k in (("segformer-b1", p, batch) for p in ("fp32", "bf16")) if k in rows),
                       key=lambda r: r["images_per_s"])
            table.append([f"{ours['size']}², batch {batch}", f"int8 (SegFormer {peer['precision']})",
                          f"{ours['images_per_s']:.2f}", f"{peer['images_per_s']:.2f}",
                          f"{ours['images_per_s'] / peer['images_per_s']:.2f}×"])
    slide = {(r["model"], r["precision"]): r["ms"] for r in s["slide"]}
    h, w = s["slide"][0]["image"]
    for precision in ("fp32", "bf16", "int8"):
        if ("regproxy-s16", precision) not in slide:
            continue
        ours = slide[("regproxy-s16", precision)]
        peer_precision = precision if precision != "int8" else min(
            [p for p in ("fp32", "bf16") if ("segformer-b1", p) in slide], key=lambda p: slide[("segformer-b1", p)])
        peer = slide[("segformer-b1", peer_precision)]
        label = precision if precision != "int8" else f"int8 (SegFormer {peer_precision})"
        table.append([f"{w}×{h} sliding windows", label, f"{1e3 / ours:.3f}", f"{1e3 / peer:.3f}",
                      f"{peer / ours:.2f}×"])
    bf16 = ("regproxy-s16", "bf16", 1) in rows
    no_bf16 = "" if bf16 else "; no bf16: this CPU has no bf16 instructions"
    text = ("Image → label map, images/s, in one process (random weights, 150 classes; windows "
            f"{s['window']}² at stride {s['stride']}, 8 a pass{no_bf16}):\n\n"
            + _table(["input", "precision", "RegProxy-S/16", "SegFormer-B1", "RegProxy / SegFormer"], table))
    if not bf16:
        return text
    speedups = [f"batch {b}: RegProxy {rows[('regproxy-s16', 'fp32', b)]['ms'] / rows[('regproxy-s16', 'bf16', b)]['ms']:.2f}×, "
                f"SegFormer {rows[('segformer-b1', 'fp32', b)]['ms'] / rows[('segformer-b1', 'bf16', b)]['ms']:.2f}×"
                for b in (1, 8)]
    speedups.append(f"sliding windows: RegProxy {slide[('regproxy-s16', 'fp32')] / slide[('regproxy-s16', 'bf16')]:.2f}×, "
                    f"SegFormer {slide[('segformer-b1', 'fp32')] / slide[('segformer-b1', 'bf16')]:.2f}×")
    return text + "\n\nbf16 over fp32: " + "; ".join(speedups) + "."


def eomt_md(s: dict) -> str:
    table = [[_name(r["model"]), r["precision"], f"{r['ms']:.0f}", f"{r['ms_median']:.0f}", f"{r['gmacs']:.1f}"]
             for r in s["rows"]]
    ms = {(r["model"], r["precision"]): r["ms"] for r in s["rows"]}
    ratios = [f"EoMT-{size.upper()} / RegProxy-{size.upper()}/16, {p}: "
              f"{ms[(f'eomt-{size}', p)] / ms[(f'regproxy-{size}16', p)]:.2f}× the time"
              for size in ("s", "l") for p in ("fp32", "bf16")
              if (f"eomt-{size}", p) in ms and (f"regproxy-{size}16", p) in ms]
    gmacs = {r["model"]: r["gmacs"] for r in s["rows"]}
    accuracy = [[_name(model), crop, miou, f"{gmacs[model]:.1f}" if model in gmacs else "—", source]
                for model, crop, miou, source in ADE20K_PAPERS]
    return ("Image → label map, 512², batch 1, interleaved in one process (random weights, 150 classes; ms: the "
            "fastest of the rounds, and their median; EoMT's post-processing as its `transformers` image processor "
            "does it, bench/peers.py):\n\n"
            + _table(["model", "precision", "ms (min)", "ms (median)", "true GMACs"], table)
            + ("\n\n" + "; ".join(ratios) + "." if ratios else "")
            + "\n\nAccuracy per FLOP: ADE20K val mIoU (single scale) as the papers and their authors' releases "
            "give it, against the true GMACs counted here at 512² (RegProxy by `regproxy flops`, EoMT by "
            "`torch.utils.flop_counter`, as for every peer). The backbones' pre-training differs: RegProxy's ViTs "
            "are ImageNet-21k (AugReg), EoMT-L's is DINOv2 (LVD-142M):\n\n"
            + _table(["model", "training crop", "ADE20K mIoU", "true GMACs at 512²", "source"], accuracy))


# ADE20K val mIoU, single scale, cited (not measured here): model, training crop, mIoU, where it is published
ADE20K_PAPERS = [
    ("regproxy-s16", "512²", "47.6", "RegProxy paper / the authors' release (`regproxy models`)"),
    ("regproxy-l16", "640²", "52.9", "RegProxy paper / the authors' release (`regproxy models`)"),
    ("eomt-s", "—", "not published", "EoMT reports ViT-S on COCO panoptic only"),
    ("eomt-l", "512²", "58.4", "EoMT authors' model zoo (DINOv2-L, `ade20k_semantic_eomt_large_512`)"),
]


def int8_md(s: dict) -> str:
    if "skipped" in s:
        return s["skipped"]
    names = list(s["runs"][0]["ms"])
    table = []
    for run in s["runs"]:
        base = run["ms"]["fp32 eager"]
        for name in names:
            table.append([run["isa"], name, f"{run['ms'][name]:.0f}", f"{run['ms_median'][name]:.0f}",
                          f"{base / run['ms'][name]:.2f}×", f"{100 * run['agreement'][name]:.2f}%"])
    return (f"RegProxy-S/16, {s['size']}², batch 1, image → label map, each ISA setting in its own process "
            "(`ONEDNN_MAX_CPU_ISA` caps oneDNN's kernels: an emulation of a CPU without AMX, for oneDNN only); ms: "
            "fastest and median of the interleaved rounds; agreement with fp32 labels on another scene (random "
            "weights: a worst case; trained models in the agreement section):\n\n"
            + _table(["oneDNN ISA", "path", "ms (min)", "ms (median)", "over fp32 (min)", "label agreement"], table))


def agreement_md(s: dict) -> str:
    rows = [[r.get("model", s.get("model")), f"{r['size']}²", r["images"], r.get("precision", "bf16"),
             f"{100 * r['agreement']:.3f}%",
             "—" if r.get("val_mIoU") is None else f"{r['val_mIoU']:.1f}",
             "—" if r.get("mIoU") is None else f"{r['mIoU']['fp32']:.2f} → {r['mIoU'][r.get('precision', 'bf16')]:.2f}"]
            for r in s["rows"]]
    return ("bf16 autocast and int8 against fp32 on trained models, generated validation scenes, label maps from "
            "`predict_labels` (val mIoU: the model's own score at 128², for how well it is trained; mIoU fp32 → "
            "other: on these scenes, against their ground truth):\n\n"
            + _table(["model", "size", "images", "precision", "label agreement", "val mIoU", "mIoU fp32 → other"],
                     rows))


def postprocess_md(s: dict) -> str:
    post = [[n, f"{v:.1f}"] for n, v in s["postprocess_ms"].items()]
    paint = [[n, f"{v:.2f}"] for n, v in s["paint_ms"].items()]
    return (f"150-class logits at stride 4 ({s['grid'] * 4}²; independent noise per pixel, the worst case) → a "
            f"{s['size']}² label map (bilinear resize + argmax):\n\n" + _table(["layout", "ms"], post)
            + f"\n\nPainting {s['grid']}×{s['grid']} tokens, 150 classes, 4×4 sub-pixels (max difference "
            f"{s['paint_max_abs_diff']:.1e}):\n\n" + _table(["formulation", "ms"], paint))


def train_md(s: dict) -> str:
    rows = [[_name(n), f"{v:.2f}"] for n, v in s["images_per_s"].items()]
    return (f"Forward, cross-entropy, backward and an AdamW step at {s['size']}², batch {s['batch']}, fp32:\n\n"
            + _table(["model", "images/s"], rows))


def quality_md(q: dict) -> str:
    """docs/quality.json as bench.quality writes it: its own tables (mean ± sd over seeds, per generator)."""
    from bench.quality import markdown

    summary, setup = q.get("summary", {}), q.get("setup", {})
    if not summary:
        return "No quality results yet: run `python -m bench.quality`."
    seeds = ", ".join(map(str, setup.get("seeds", [])))
    return (f"`python -m bench.quality`: {setup.get('backbone')} from scratch, every model trained with the same "
            f"data and budget ({setup.get('iters')} iterations of batch {setup.get('batch_size')}, "
            f"{setup.get('train_images')} training scenes, seeds {seeds}), scored on {setup.get('val_images')} "
            f"validation scenes at {setup.get('image_size')}²; boundary F with a {setup.get('boundary_tolerance_px')} "
            "px tolerance.\n" + markdown(summary))


SECTION_TITLES = [
    ("overhead", "Proxy head overhead", overhead_md),
    ("latency", "Latency and throughput against the peers", latency_md),
    ("slide", "Sliding-window inference", slide_md),
    ("memory", "Peak memory", memory_md),
    ("fastpath", "Fast CPU paths", fastpath_md),
    ("precision", "Precisions against SegFormer-B1", precision_md),
    ("int8", "int8 on CPU, with and without AMX", int8_md),
    ("eomt", "Against EoMT (CVPR 2025)", eomt_md),
    ("agreement", "bf16 and int8 on trained models", agreement_md),
    ("postprocess", "Post-processing and painting", postprocess_md),
    ("train", "Training throughput", train_md),
]


def write_report(results: dict, path: Path) -> None:
    m = results["machine"]
    sections = results["sections"]
    ms = [m] + [x for x in {json.dumps(s.get("machine") or m, sort_keys=True): s.get("machine") or m
                            for s in sections.values()}.values() if x != m]  # each machine once, the last run's first
    parts = [
        "# Benchmarks",
        "",
        ("Regenerate: `pip install \".[bench]\" ./backbones && python -m bench.run` (every section, about 40 minutes "
        "on 2 CPU cores; `--sections overhead fastpath` for a part). Quality: `python -m bench.quality`."),
        "",
        *[(f"Machine{' (the last run)' if i == 0 and len(ms) > 1 else ''}: {x['cpu']} ({', '.join(x['isa'])}), "
           f"{x['cores']} cores, {x['torch_threads']} torch threads{', GPU ' + x['gpu'] if x['gpu'] else ', no GPU'}"
           f". {', '.join(f'{k} {v}' for k, v in x['versions'].items())}." + ("" if i == 0 else
           " Sections measured there say so under their tables.")) for i, x in enumerate(ms)],
        "",
        ("Random weights (speed does not depend on the values); every comparison is measured in one process with "
        "interleaved rounds, so ratios are the figures to trust; absolute times move with the machine."),
        "",
        "## Headline",
        "",
        headline(sections),
    ]
    for key, title, render in SECTION_TITLES:
        # the section as last measured, then as measured on other kinds of machine (bench.run keeps them as key@kind)
        for name in [key] * (key in sections) + sorted(k for k in sections if k.startswith(f"{key}@")):
            s = sections[name]
            ran_on = s.get("machine") or m
            where = ", ".join([ran_on["cpu"], f"torch {ran_on['versions']['torch']}"] if ran_on != m else [])
            heading = title if name == key else f"{title}: {name.split('@', 1)[1]}"
            parts += ["", f"## {heading}", "", render(s)]
            if s.get("note"):  # what the run's numbers need read with them (added to the JSON by hand)
                parts += ["", f"**Note.** {s['note']}"]
            parts += ["", (f"<sub>{s['device']}, {where + ', ' if where else ''}"
                      f"{s['date']}, {s['seconds']:.0f} s</sub>")]
    quality = REPO / "docs" / "quality.json"
    if quality.exists():
        parts += ["", "## Quality per cost (generated data)", "", quality_md(json.loads(quality.read_text()))]
    scale = REPO / "docs" / "scale_throughput.json"  # whole commands timed by bench.scale_throughput
    if scale.exists():
        parts += ["", "## Predict at scale (`torchrun`, `--engine ray`)", "", json.loads(scale.read_text())["section"]]
    path.write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "benchmarks.json"
    write_report(json.loads(source.read_text()), REPO / "docs" / "benchmarks.md")
