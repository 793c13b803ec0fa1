"""What the CPU test suite cannot check, in one command a CUDA machine runs in a few minutes.

    python bench/gpu_check.py [--json gpu_check.json] [--work DIR]

1. parity: RegProxy-S/16 (random weights, 512x683) logits on CUDA against the CPU in fp32 (max |diff| <= 1e-4), and
   the bf16 / fp16 autocast label maps against fp32 (agreement; random weights are the worst case).
2. resume: a short training run (ViT-Demo/8 on generated scenes; bf16 and deterministic algorithms on CUDA) killed
   with SIGKILL after its first checkpoint and resumed with --resume: the loss curve after the kill and the final
   weights must equal an uninterrupted run's exactly.
3. torchrun: `regproxy eval` under torchrun (NCCL over every GPU; 2 gloo processes on a CPU machine) gives the same
   JSON as one process.
4. speed: predict and eval throughput, and on CUDA ``torch.cuda.max_memory_allocated``.

On a machine without CUDA the CUDA-only parts are reported as skipped, with the reason, and the rest runs on the CPU
(CI runs that). Exits 1 when a check fails. Prints a table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from regproxy_cli import build_model, load_model, predict_labels
from regproxy_cli.data.open import open_dataset
from regproxy_cli.engine.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent
console = Console(highlight=False)


def _machine() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def check_parity() -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "why": "no CUDA device"}
    torch.manual_seed(0)
    model = build_model("s16", 150).eval()
    x = torch.randn(1, 3, 512, 683)
    with torch.inference_mode():
        cpu = model(x)
        gpu_model = model.cuda()
        gpu = gpu_model(x.cuda()).float().cpu()
        reference = cpu.argmax(1)
        agreement = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.autocast("cuda", dtype=dtype):
                labels = gpu_model.labels(x.cuda()).cpu()
            agreement[name] = float((labels == reference).float().mean())
    difference = float((cpu - gpu).abs().max())
    return {"status": "pass" if difference <= 1e-4 else "fail", "fp32_max_abs_diff": difference,
            "logit_scale": float(cpu.abs().max()), "label_agreement": agreement}


def _train_config(work: Path, name: str, cuda: bool) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["data"].update(root=str(work / "data"), synthetic_train=16, synthetic_val=5, workers=0)
    config["optim"].update(iters=12, warmup_iters=2)
    config["run"].update(out_dir=str(work / name), eval_every=12, save_every=4, log_every=1,
                         precision="bf16" if cuda else "fp32", deterministic=True,
                         device="cuda" if cuda else "cpu")
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.Popen([sys.executable, "-m", "regproxy_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in lines if "loss" in r}


def check_resume(work: Path) -> dict:
    cuda = torch.cuda.is_available()
    straight = _cli("train", str(_train_config(work, "straight", cuda)))
    _, err = straight.communicate(timeout=600)
    if straight.returncode:
        return {"status": "fail", "why": err.strip().splitlines()[-1]}
    killed_config = _train_config(work, "killed", cuda)
    process = _cli("train", str(killed_config))
    checkpoint = work / "killed" / "last.pt"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"]
    resumed = _cli("train", str(killed_config), "--resume")
    _, err = resumed.communicate(timeout=600)
    if resumed.returncode:
        return {"status": "fail", "why": err.strip().splitlines()[-1]}
    a, b = _losses(work / "straight"), _losses(work / "killed")
    after = [i for i in a if i > stopped_at]
    loss_diff = max(abs(a[i] - b[i]) for i in after)
    weights_a = load_file(str(work / "straight" / "final" / "model.safetensors"))
    weights_b = load_file(str(work / "killed" / "final" / "model.safetensors"))
    weight_diff = max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a)
    exact = loss_diff == 0 and weight_diff == 0
    return {"status": "pass" if exact else "fail", "device": "cuda" if cuda else "cpu",
            "precision": "bf16" if cuda else "fp32", "killed_after_iteration": stopped_at,
            "iterations_compared": len(after), "max_loss_diff": loss_diff, "max_weight_diff": weight_diff}


def check_torchrun(work: Path) -> dict:
    cuda = torch.cuda.is_available()
    processes = torch.cuda.device_count() if cuda else 2
    model, data = work / "straight" / "final", work / "data"
    if not model.is_dir():
        return {"status": "skipped", "why": "the resume check's model is missing"}
    command = ["-m", "regproxy_cli", "eval", "--model", str(model), "--data", str(data), "--json",
               "--device", "cuda" if cuda else "cpu"]
    single = subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, timeout=600)
    several = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(processes), *command], check=False, capture_output=True, text=True, timeout=600)
    if single.returncode or several.returncode:
        failed = single if single.returncode else several
        return {"status": "fail", "why": failed.stderr.strip().splitlines()[-1]}
    equal = json.loads(single.stdout) == json.loads(several.stdout)
    return {"status": "pass" if equal else "fail", "backend": "nccl" if cuda else "gloo", "processes": processes,
            "mIoU": json.loads(single.stdout)["mIoU"]}


def check_speed(work: Path) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    result = {"device": device.type}
    dataset = open_dataset("folder", work / "data", "val")
    images = [dataset[i][0] for i in range(len(dataset))]
    runs = [("demo8 (trained)", load_model(work / "straight" / "final"))]
    if cuda:
        torch.manual_seed(0)
        s16 = build_model("s16", 150).eval()
        s16.config.inference_mode, s16.config.test_scale = "whole", None
        runs.append(("s16 512x512", s16))
        images_512 = [torch.randint(0, 256, (512, 512, 3), dtype=torch.uint8).numpy() for _ in range(20)]
    for name, model in runs:
        model = model.to(device)
        batch = images_512 if name.startswith("s16") else images
        for precision in ("fp32", "bf16"):
            predict_labels(model, batch[0], precision=precision)  # warm-up
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for image in batch:
                predict_labels(model, image, precision=precision)
            if cuda:
                torch.cuda.synchronize()
            entry = {"images_per_s": round(len(batch) / (time.perf_counter() - started), 2)}
            if cuda:
                entry["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            result[f"predict {name} {precision}"] = entry
    started = time.perf_counter()
    evaluate(runs[0][1], dataset, progress=False)
    result["eval demo8 images_per_s"] = round(len(dataset) / (time.perf_counter() - started), 2)
    result["status"] = "pass"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="regproxy-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": _machine()}
    for name, check in (("parity", check_parity), ("resume", lambda: check_resume(work)),
                        ("torchrun", lambda: check_torchrun(work)), ("speed", lambda: check_speed(work))):
        console.print(f"[bold]{name}[/] ...")
        started = time.perf_counter()
        report[name] = {**check(), "seconds": round(time.perf_counter() - started, 1)}
    table = Table(title=f"gpu_check on {report['machine'].get('gpus', ['CPU only'])[0]}, torch {torch.__version__}")
    table.add_column("check")
    table.add_column("status")
    table.add_column("details")
    for name in ("parity", "resume", "torchrun", "speed"):
        details = {k: v for k, v in report[name].items() if k != "status"}
        table.add_row(name, report[name]["status"], json.dumps(details))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(report[name]["status"] == "fail" for name in ("parity", "resume", "torchrun", "speed")) else 0


if __name__ == "__main__":
    sys.exit(main())
