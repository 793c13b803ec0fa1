"""The quality studies (``python -m bench.quality``, ``bench.thin_objects``) run end to end at toy size and write the
JSON that docs/studies.md quotes.

They are entry points, not library code, so nothing else imports them: without this a refactor of the package can
break them silently (it did once: thin_objects.py reached for a private helper that had been renamed).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOY = ["--threads", "1", "--no-progress"]
TOY_SCENES = ["--train-images", "12", "--val-images", "3", "--size", "64"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], check=False, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def quality(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quality")
    out = root / "quality.json"
    _run("quality", "--iters", "4", *TOY_SCENES, "--seeds", "2", "--variants", "linear baseline,RegProxy h=w=4",
         *TOY, "--out", str(out), "--runs", str(root / "runs"), "--data-dir", str(root / "data"))
    return out


@pytest.mark.slow
def test_quality_study_covers_both_generators_with_paired_differences(quality: Path) -> None:
    result = json.loads(quality.read_text())
    assert sorted({(r["generator"], r["seed"], r["model"]) for r in result["runs"]}) == sorted(
        (g, s, m) for g in ("scenes", "streets") for s in (0, 1) for m in ("linear baseline", "RegProxy h=w=4"))
    assert sorted(p.name for p in (quality.parent / "data").iterdir()) == ["quality-scenes-12-3-64",
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
def test_thin_object_sweep_pairs_the_baseline_grows_by_seed_and_plots(quality: Path, tmp_path: Path) -> None:
    out, common = tmp_path / "thin.json", [*TOY_SCENES, *TOY, "--runs", str(tmp_path / "runs"),
                                           "--data-dir", str(quality.parent / "data")]
    _run("thin_objects", "sweep", "--iters", "4", "--axis", "optim.iters=4,6", "--axis",
         "model.backbone=demo8,demo16", "--out", str(out), *common)
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

    # a second seed of one axis joins the study; seed 0's runs (the backbone axis too) stay
    _run("thin_objects", "sweep", "--iters", "4", "--axis", "optim.iters=4,6", "--first-seed", "1", "--out",
         str(out), *common)
    grown = json.loads(out.read_text())
    assert sorted((r["variant"], r["seed"]) for r in grown["runs"]) == sorted(
        [(name, 0) for name in by_name] + [(name, 1) for name in ("base", "optim.iters=6", "linear baseline",
                                                                  "linear baseline, optim.iters=6")])
    assert [r for r in grown["runs"] if r["seed"] == 0] == result["runs"]
    assert next(e for e in grown["summary"] if e["variant"] == "base")["seeds"] == [0, 1]

    picture = tmp_path / "thin.png"
    _run("thin_objects", "plot", "--quality", str(quality), "--sweep", str(out), "--out", str(picture))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
