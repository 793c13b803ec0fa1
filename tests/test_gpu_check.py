"""python -m bench.gpu_check: --list names every check, a CPU run writes its table and JSON, a check past its limit
is a failed row."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, "-m", "bench.gpu_check"]
CHECKS = ["parity", "train_precisions", "resume", "ddp_one_gpu", "torchrun_eval", "eval_modes", "predict_batch",
          "memory_l16", "compile", "resize_argmax", "table4", "speed"]


def gpu_check():
    return importlib.import_module("bench.gpu_check")


def test_list_names_every_check_without_running_any():
    listed = subprocess.run([*SCRIPT, "--list"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == CHECKS
    assert "Table 4" in listed.stdout and "gloo" in listed.stdout


def test_a_cpu_run_writes_the_table_and_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([*SCRIPT, "--only", "parity,resize_argmax", "--quick", "--work", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["checks"]) == ["parity", "resize_argmax"]
    expected = "pass" if torch.cuda.is_available() else "skipped: no CUDA"
    assert report["checks"]["parity"]["status"] == expected
    assert report["checks"]["resize_argmax"]["status"] == "pass"
    assert report["machine"]["tf32"] == {"matmul": False, "cudnn": False} or torch.cuda.is_available()
    assert "resize_argmax" in done.stdout and "gpu_check on" in done.stdout


def test_a_check_past_its_limit_is_a_failed_row_and_the_report_is_still_written(tmp_path, monkeypatch, capsys):
    module = gpu_check()
    # resume: two trainings cannot finish in a second (limits are 4x on a CPU)
    monkeypatch.setattr(module.CHECKS[2], "limit_s", 1 / module.CPU_SLOWER if not torch.cuda.is_available() else 1)
    out = tmp_path / "report.json"
    code = module.main(["--only", "resume", "--quick", "--work", str(tmp_path), "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["checks"]["resume"]["status"] == "fail"
    assert report["checks"]["resume"]["why"] == "timed out after 1 s"
    assert module.main(["--only", "warp_drive"]) == 2
    assert "unknown check 'warp_drive'" in capsys.readouterr().err
