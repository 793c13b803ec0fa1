"""A seeded fuzzer over the importers and the config loaders: valid inputs, mutated at random (values of the wrong
type, out of range, names that climb or are absolute, keys dropped, bytes flipped). Every outcome must be success or
one RegproxyError line, never another exception, and nothing may be written outside DST. Seeded, so a failure
reproduces; bounded, so it runs in the default suite (a few seconds per loader)."""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from regproxy_cli.data.formats import import_annotations
from regproxy_cli.data.formats.cvat import cvat_labelmap, cvat_labelmap_text
from regproxy_cli.engine.config import load_config
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.config import ModelConfig

pytest.importorskip("pycocotools")

H, W = 8, 10
# per loader: about 2-5 s each on a laptop core, and never longer than BUDGET_S whatever the machine;
# REGPROXY_FUZZ_CASES=5000 REGPROXY_FUZZ_SECONDS=600 digs deeper by hand
CASES = int(os.environ.get("REGPROXY_FUZZ_CASES", "120"))
BUDGET_S = float(os.environ.get("REGPROXY_FUZZ_SECONDS", "8"))

ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 10**9, -(10**12), 2**63, 0.0, -0.5, 1e308, float("nan"), float("inf"), "", "x",
    "../../../../escaped", "/etc/hostname", "..", ".", "a/b", "a\\b", "C:\\x.png", "\x00", "é" * 3, "255",
    [], [0], [0, 0], [[1, 2], [3]], [-1, -1, -1], [255, 255, 256], {}, {"a": 1}, {"counts": "zz", "size": [1, 1]},
    {"counts": [1, 2, 3], "size": [H, W]}, [[0, 0, 1, 1, 0]], [1.5, "a", None],
]


def _mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """One random change somewhere inside ``value`` (a JSON-like tree)."""
    if isinstance(value, dict) and value and depth < 6:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.15:
            value.pop(key)
        elif roll < 0.25:
            value[rng.choice(["extra", "x", key + "_"])] = rng.choice(ODD_VALUES)
        elif roll < 0.55:
            value[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            value[key] = _mutate(value[key], rng, depth + 1)
        return value
    if isinstance(value, list) and value and depth < 6:
        index = rng.randrange(len(value))
        roll = rng.random()
        if roll < 0.15:
            value.pop(index)
        elif roll < 0.25:
            value.append(copy.deepcopy(rng.choice(ODD_VALUES)))
        elif roll < 0.5:
            value[index] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            value[index] = _mutate(value[index], rng, depth + 1)
        return value
    return copy.deepcopy(rng.choice(ODD_VALUES))


def _mutated(document: Any, rng: random.Random) -> Any:
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        document = _mutate(document, rng)
    return document


def _png(size=(H, W), value=90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_cases(tmp_path: Path, build, run) -> dict[str, int]:
    """``build(case_dir, rng)`` writes one mutated source under case_dir/src; ``run(src, dst)`` imports it."""
    outcomes = {"ok": 0, "refused": 0}
    started = time.monotonic()
    for case in range(CASES):
        if time.monotonic() - started > BUDGET_S:
            break
        rng = random.Random(case)
        root = tmp_path / f"case{case}"
        src, dst = root / "a" / "b" / "src", root / "a" / "b" / "ds"
        src.mkdir(parents=True)
        build(src, rng)
        before = _files(root)
        try:
            run(src, dst)
            outcomes["ok"] += 1
        except RegproxyError as error:
            assert "\n" not in str(error), (case, str(error))
            outcomes["refused"] += 1
        except Exception as error:
            raise AssertionError(f"case {case}: {type(error).__name__}: {error}") from error
        after = {k: v for k, v in _files(root).items() if not k.startswith("a/b/ds/") and k != "a/b/ds"}
        assert after == before, f"case {case} wrote or changed {sorted(set(after) ^ set(before))} outside DST"
        shutil.rmtree(root)
    assert outcomes["refused"] > 0  # the mutations do reach the checks
    print(outcomes)
    return outcomes


LABELME = {"version": "5.5.0", "flags": {}, "imagePath": "p.png", "imageData": None, "imageHeight": H,
           "imageWidth": W, "shapes": [
               {"label": "a", "points": [[1, 1], [6, 1], [6, 6]], "shape_type": "polygon"},
               {"label": "b", "points": [[2, 2], [4, 4]], "shape_type": "rectangle"},
               {"label": "a", "points": [[5, 5], [6, 6]], "shape_type": "circle"},
               {"label": "b", "points": [[1, 1], [3, 3]], "shape_type": "line"}]}

COCO = {"images": [{"id": 1, "file_name": "p.png", "height": H, "width": W}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [10, 20, H * W - 30]}}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}

CVAT_XML = f"""<?xml version="1.0" encoding="utf-8"?>
<annotations><version>1.1</version><meta><task><labels>
<label><name>a</name><color>#ff0000</color></label><label><name>b</name><color>#00ff00</color></label>
</labels></task></meta>
<image id="0" name="p.png" width="{W}" height="{H}">
<polygon label="a" points="1,1;6,1;6,6" z_order="0"/>
<box label="b" xtl="2" ytl="2" xbr="4" ybr="4" z_order="1"/>
<mask label="a" rle="1,2,1" left="0" top="0" width="2" height="2" z_order="0"/>
</image></annotations>"""


def test_fuzz_labelme(tmp_path):
    def build(src: Path, rng: random.Random) -> None:
        (src / "p.png").write_bytes(_png())
        (src / "p.json").write_text(json.dumps(_mutated(LABELME, rng)))

    _run_cases(tmp_path, build, lambda src, dst: import_annotations("labelme", src, dst))


def test_fuzz_coco(tmp_path):
    def build(src: Path, rng: random.Random) -> None:
        (src / "p.png").write_bytes(_png())
        (src / "coco.json").write_text(json.dumps(_mutated(COCO, rng)))

    _run_cases(tmp_path, build, lambda src, dst: import_annotations("coco", src / "coco.json", dst))


def _flip_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def test_fuzz_cvat_xml(tmp_path):
    def build(src: Path, rng: random.Random) -> None:
        (src / "p.png").write_bytes(_png())
        text = CVAT_XML
        for _ in range(rng.randint(1, 3)):  # replace one attribute value with an odd one
            attributes = [m for m in ("points", "xtl", "ybr", "width", "height", "rle", "left", "z_order", "label",
                                      "name") if f'{m}="' in text]
            name = rng.choice(attributes)
            start = text.index(f'{name}="') + len(name) + 2
            end = text.index('"', start)
            odd = str(rng.choice(ODD_VALUES)).replace('"', "'").replace("<", "").replace("&", "")
            text = text[:start] + odd.replace("\x00", "") + text[end:]
        data = text.encode()
        (src / "annotations.xml").write_bytes(_flip_bytes(data, rng) if rng.random() < 0.2 else data)

    _run_cases(tmp_path, build, lambda src, dst: import_annotations("cvat", src, dst))


def test_fuzz_cvat_mask_zip(tmp_path):
    def build(src: Path, rng: random.Random) -> None:
        names = ["SegmentationClass/p.png", "JPEGImages/p.png", "labelmap.txt"]
        labelmap = cvat_labelmap_text(cvat_labelmap(["a"], [(200, 0, 0)]))
        mask = np.zeros((H, W, 3), np.uint8)
        mask[2:5, 2:5] = (200, 0, 0)
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG")
        contents = {names[0]: buffer.getvalue(), names[1]: _png(), names[2]: labelmap.encode()}
        roll = rng.random()
        if roll < 0.4:  # a member name that climbs, is absolute or nests
            odd = rng.choice(["SegmentationClass/../../../X.png", "SegmentationClass//etc/x.png",
                              "SegmentationClass/a/b.png", "SegmentationClass/..\\..\\x.png",
                              "SegmentationClass/.png", "SegmentationClass/../labelmap.txt.png"])
            contents[odd] = contents.pop(names[0])
        elif roll < 0.7:
            key = rng.choice(names)
            contents[key] = _flip_bytes(contents[key], rng)
        else:
            contents[names[2]] = rng.choice([b"", b"a:1,2\n", b"\xff\xfe", b"a:300,0,0::\n", b"::\n", b"a:1,2,3"])
        with zipfile.ZipFile(src / "export.zip", "w") as archive:
            for name, data in contents.items():
                archive.writestr(zipfile.ZipInfo(name), data)

    _run_cases(tmp_path, build, lambda src, dst: import_annotations("cvat", src / "export.zip", dst, images=src))


def test_fuzz_voc(tmp_path):
    from regproxy_cli.data.formats.voc import voc_colormap

    def build(src: Path, rng: random.Random) -> None:
        base = src / "VOC2012"
        (base / "JPEGImages").mkdir(parents=True)
        (base / "JPEGImages" / "p.jpg").write_bytes(_png())
        mask = Image.fromarray(np.full((H, W), rng.choice([0, 1, 20, 21, 255]), dtype=np.uint8), mode="L")
        mask.putpalette(voc_colormap(256).tobytes())
        (base / "SegmentationClass").mkdir()
        mask.save(base / "SegmentationClass" / "p.png")
        (base / "ImageSets" / "Segmentation").mkdir(parents=True)
        line = rng.choice(["p", "p", "../../../../X", "/etc/hostname", "p/../p", "*", "p\x00", "ü", "..", " "])
        (base / "ImageSets" / "Segmentation" / "train.txt").write_bytes(
            rng.choice([f"{line}\n".encode(), b"\xff\xfe\n", b"p\n"]))
        (base / "ImageSets" / "Segmentation" / "val.txt").write_text(rng.choice(["", "p\n", "missing\n"]))

    _run_cases(tmp_path, build, lambda src, dst: import_annotations("voc", src, dst))


TRAIN_YAML = {"model": {"backbone": "s16", "region_res": 4, "m": 2, "classifier_options": {}},
              "data": {"kind": "synthetic", "crop_size": 64, "scale": [128, 64], "ratio_range": [0.5, 2.0],
                       "cat_max_ratio": 0.75, "workers": 0},
              "test": {"inference_mode": "whole", "window_stride": 32, "test_scale": [128, 64]},
              "optim": {"lr": 1e-4, "iters": 10, "warmup_iters": 2, "betas": [0.9, 0.999], "min_lr": 0.0,
                        "restart_periods": [5, 5], "restart_weights": [1.0, 0.5], "schedule": "poly"},
              "loss": {"kind": "ce", "class_weight": "none", "focal_gamma": 2.0},
              "run": {"seed": 0, "eval_every": 5, "log_every": 1, "precision": "fp32"}}


def test_fuzz_training_config(tmp_path):
    started = time.monotonic()
    refused = 0
    for case in range(CASES * 3):
        if time.monotonic() - started > BUDGET_S:
            break
        rng = random.Random(case)
        path = tmp_path / "c.yaml"
        document = _mutated(TRAIN_YAML, rng)
        try:
            path.write_text(yaml.safe_dump(document) if rng.random() < 0.9 else
                            _flip_bytes(yaml.safe_dump(document).encode(), rng).decode("latin-1"))
        except yaml.YAMLError:
            continue
        overrides = [f"{section}.{key}={rng.choice(['0', '-1', 'nan', '[1]', 'x', '{a: 1}', '1e9'])}"
                     for section, key in [rng.choice([(s, k) for s, v in TRAIN_YAML.items() for k in v])]]
        try:
            load_config(path, overrides if rng.random() < 0.3 else [])
        except RegproxyError as error:
            assert "\n" not in str(error), (case, str(error))
            refused += 1
        except Exception as error:
            raise AssertionError(f"case {case}: {type(error).__name__}: {error}") from error
    assert refused > 0


def test_fuzz_model_config(tmp_path):
    valid = ModelConfig(backbone="s16", num_classes=3, m=2, classes=["a", "b", "c"],
                        metrics={"mIoU": 40.5, "iteration": 100}).to_dict()
    started = time.monotonic()
    refused = 0
    for case in range(CASES * 5):
        if time.monotonic() - started > BUDGET_S:
            break
        rng = random.Random(case)
        document = json.loads(json.dumps(_mutated(valid, rng), default=str))
        try:
            config = ModelConfig.from_dict(document, where="config.json")
        except RegproxyError as error:
            assert "\n" not in str(error), (case, str(error))
            refused += 1
            continue
        except Exception as error:
            raise AssertionError(f"case {case}: {type(error).__name__}: {error}") from error
        # what was accepted is usable: the sizes and the normalisation are sane
        assert 1 <= config.num_classes <= 65535 and len(config.classes) == len(config.palette) == config.num_classes
        assert all(s > 0 for s in config.std) and config.crop_size >= 1 and config.stride >= 1
    assert refused > 0
