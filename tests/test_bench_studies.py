"""The quality studies in bench/ run end to end at toy size and write the JSON the README's claims are read from.

They are scripts, not package code, so nothing else imports them: without this a refactor of the package can break
them silently (it did once: thin_objects.py reached for a private helper that had been renamed).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TOY = ["--threads", "1", "--no-progress"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], check=False, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_quality_study_covers_both_generators_with_paired_differences(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    _run("quality.py", "--iters", "4", "--train-images", "12", "--val-images", "3", "--size", "64", "--seeds", "2", "--variants", "linear baseline,RegProxy h=w=4", *TOY,
         "--out", str(out), "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"))
    result = json.loads(out.read_text())
    assert sorted({(r["generator"], r["seed"], r["model"]) for r in result["runs"]}) == sorted(
        (g, s, m) for g in ("scenes", "streets") for s in (0, 1) for m in ("linear baseline", "RegProxy h=w=4"))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["quality-scenes-12-3-64",
                                                                     "quality-streets-12-3-64"]
    for generator, entries in result["summary"].items():
        baseline, regproxy = entries
        assert baseline["model"] == "linear baseline" and "delta_vs_baseline" not in baseline
        delta = regproxy["delta_vs_baseline"]["mIoU"]
        runs = {(r["model"], r["seed"]): r["mIoU"] for r in result["runs"] if r["generator"] == generator}
        expected = [round(runs[("RegProxy h=w=4", s)] - runs[("linear baseline", s)], 2) for s in (0, 1)]
        assert delta["values"] == expected and delta["n"] == 2
        assert regproxy["mIoU"]["values"] == [runs[("RegProxy h=w=4", s)] for s in (0, 1)]
        assert ("object_recall" in regproxy) == (generator == "streets")
    assert result["setup"]["machine"]["cores"] >= 1


@pytest.mark.slow
def test_thin_object_sweep_trains_the_baseline_at_each_length_and_backbone(tmp_path: Path) -> None:
    out = tmp_path / "thin.json"
    _run("thin_objects.py", "sweep", "--iters", "4", "--train-images", "12", "--val-images", "3", "--size", "64",
         "--axis", "optim.iters=4,6", "--axis", "model.backbone=demo8,demo16", *TOY, "--out", str(out),
         "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"))
    result = json.loads(out.read_text())
    by_name = {r["variant"]: r for r in result["runs"]}
    assert list(by_name) == ["base", "optim.iters=6", "model.backbone=demo16", "linear baseline",
                             "linear baseline, optim.iters=6", "linear baseline, model.backbone=demo16"]
    assert by_name["optim.iters=6"]["iters"] == 6 and by_name["linear baseline, optim.iters=6"]["iters"] == 6
    assert by_name["linear baseline, model.backbone=demo16"]["backbone"] == "demo16"
    for name, run in by_name.items():
        entropy = run["affinity_entropy"]
        if name.startswith("linear baseline"):
            assert entropy is None and run["region_res"] is None
        else:  # entropy over 9 neighbours: between 0 and ln 9
            assert all(0 <= entropy[k]["of_ln9"] <= 1 for k in ("thin", "boundary", "interior"))
