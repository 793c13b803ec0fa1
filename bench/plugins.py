"""Do the HSSN and ProtoSeg plugins do on generated data what their papers say? Equal budget, several seeds.

Every run trains ViT-Demo/8 RegProxy (h = w = 4) from ``configs/demo.yaml`` with :func:`regproxy_cli.engine.train.train`
for the same iterations and batch; the seed sets the weights and the data order. Two studies:

* ``hssn`` on the streets generator (:mod:`regproxy_cli.data.streets`, 7 classes) under
  ``configs/hierarchies/streets.yaml`` (5 superclasses): the HSSN classifier trained with its full loss (tree-min
  BCE x 5 + CE per level) against the same classifier trained with CE at each level only (``tree_min_weight: 0``,
  "flat CE"). Scored: class mIoU and category mIoU with path inference, and how often the two levels disagree
  when each is read by its own arg-max (the leaf's parent is not the arg-max superclass): HSSN's claim is that the
  tree-min loss makes the scores themselves respect the tree.
* ``protoseg`` on bimodal scenes: the demo's scenes (5 classes) where, in each image, each class's pixels are shown
  with inverted colours with probability 1/2, so every class has two visual modes. The linear classifier against
  ProtoSeg with M = 1 and M = 2 prototypes per class (its loss: CE + 0.01 PPC + 0.001 PPD, momentum prototypes).
  ProtoSeg's claim is that several prototypes per class capture a class's modes.

    python -m bench.plugins [--studies hssn,protoseg] [--seeds 3] [--iters 600] [--threads 1]

Runs go to ``runs/plugins/`` and data to ``data/plugins-*`` (git-ignored); the result is ``docs/plugins.json``,
rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from regproxy_cli.data.synthetic import write_synthetic_dataset
from regproxy_cli.engine.metrics import ConfusionMatrix
from regproxy_cli.files import write_text_atomic
from regproxy_cli.inference.predictor import normalise

from .common import machine, score
from .quality import ROOT, data_overrides, run_config, train_fresh

STREETS_HIERARCHY = ROOT / "configs" / "hierarchies" / "streets.yaml"
STUDIES = {
    "hssn": [("flat CE", ["model.classifier=hssn", f"model.classifier_options={{hierarchy: {STREETS_HIERARCHY}}}",
                          "loss.kind=hssn", "loss.options={tree_min_weight: 0}"]),
             ("tree-min", ["model.classifier=hssn", f"model.classifier_options={{hierarchy: {STREETS_HIERARCHY}}}",
                           "loss.kind=hssn"])],
    "protoseg": [("linear", []),
                 ("protoseg M=1", ["model.classifier=protoseg", "model.classifier_options={prototypes: 1}",
                                   "loss.kind=protoseg"]),
                 ("protoseg M=2", ["model.classifier=protoseg", "model.classifier_options={prototypes: 2}",
                                   "loss.kind=protoseg"])],
}


def bimodal_scenes(train_images: int, val_images: int, size: int) -> Path:
    """The demo's scenes with each class inverted in colour, per image, with probability 1/2 (a folder dataset)."""
    root = ROOT / "data" / f"plugins-bimodal-{train_images}-{val_images}-{size}"
    if (root / "classes.yaml").is_file():
        return root
    source = write_synthetic_dataset(ROOT / "data" / f"plugins-scenes-{train_images}-{val_images}-{size}",
                                     train_images, val_images, (size, size))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for mask_path in sorted((source / "masks" / split).glob("*.png")):
            mask = np.array(Image.open(mask_path))
            image = np.array(Image.open(source / "images" / split / mask_path.name).convert("RGB"))
            for label in np.unique(mask[mask != 255]):
                if rng.random() < 0.5:
                    image[mask == label] = 255 - image[mask == label]
            Image.fromarray(image).save(root / "images" / split / mask_path.name)
            Image.fromarray(mask).save(root / "masks" / split / mask_path.name)
    (root / "classes.yaml").write_text((source / "classes.yaml").read_text())  # last: marks the folder complete
    return root


@torch.inference_mode()
def level_agreement(model, dataset) -> dict:
    """Category mIoU two ways and how often the independently read levels contradict the tree (percent of pixels)."""
    classifier = model.token_classifier
    k, parent = classifier.num_classes, classifier.parent
    path_matrix, independent_matrix = ConfusionMatrix(len(parent.unique())), ConfusionMatrix(len(parent.unique()))
    contradictions = pixels = 0
    lookup = torch.cat([parent, torch.tensor([255])])
    for index in range(len(dataset)):
        image, label, _ = dataset[index]
        x = normalise(np.asarray(image), model.config, torch.device("cpu"))
        outputs = model(x, training_output=True).outputs[0]
        leaf, superclass = outputs[:k].argmax(0), outputs[k:].argmax(0)
        path = classifier.class_scores(outputs[None])[0].argmax(0)
        truth = torch.from_numpy(np.asarray(label, dtype=np.int64))
        truth_category = lookup[torch.where(truth == 255, -1, truth)]
        path_matrix.update(parent[path], truth_category)
        independent_matrix.update(superclass, truth_category)
        contradictions += int((parent[leaf] != superclass).sum())
        pixels += leaf.numel()
    return {"category_mIoU_path": round(100 * path_matrix.compute()["mIoU"], 2),
            "category_mIoU_independent": round(100 * independent_matrix.compute()["mIoU"], 2),
            "contradiction_pct": round(100 * contradictions / pixels, 3)}


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "sd": round(statistics.stdev(values), 2) if len(values) > 1
            else None, "values": values}


def summarise(runs: list[dict]) -> dict:
    summary: dict = {}
    for run in runs:
        summary.setdefault(run["study"], {}).setdefault(run["variant"], []).append(run)
    keys = ("mIoU", "BF", "category_mIoU_path", "category_mIoU_independent", "contradiction_pct")
    return {study: {variant: {key: spread([r[key] for r in rows]) for key in keys if key in rows[0]}
                    | {"IoU": [round(statistics.fmean(v for v in col if v is not None), 2)
                               if any(v is not None for v in col) else None for col in zip(*(r["IoU"] for r in rows))],
                       "seeds": len(rows)}
                    for variant, rows in variants.items()} for study, variants in summary.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", default="hssn,protoseg")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=600, help="training iterations per run (batch 8)")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "plugins")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "plugins.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if not studies or set(studies) - set(STUDIES):
        parser.error(f"--studies: choose from {', '.join(STUDIES)}")
    threads = [f"run.threads={args.threads}"] if args.threads else []
    data = {}
    if "hssn" in studies:
        data["hssn"] = data_overrides("streets", args.train_images, args.val_images, args.size)
    if "protoseg" in studies:
        root = bimodal_scenes(args.train_images, args.val_images, args.size)
        data["protoseg"] = ["data.kind=folder", f"data.root={root}", f"data.crop_size={args.size}",
                            f"data.scale=[{2 * args.size}, {args.size}]"]
    runs = []
    for seed in range(args.seeds):  # seed-major: a study cut short has every variant of its first seeds
        for study in studies:
            for variant, overrides in STUDIES[study]:
                run_dir = args.runs / study / f"seed{seed}" / variant.replace(" ", "_").replace("=", "")
                config = run_config(run_dir, args.iters, [*data[study], *overrides, f"run.seed={seed}", *threads])
                model, seconds = train_fresh(config, not args.no_progress)
                dataset = config.data.open(config.data.val_split)
                row = {"study": study, "variant": variant, "seed": seed, "train_s": round(seconds, 1),
                       **score(model, dataset)}
                if study == "hssn":
                    row |= level_agreement(model, dataset)
                runs.append(row)
                print(f"{study} / {variant} / seed {seed}: mIoU {row['mIoU']:.2f}"
                      + (f", contradictions {row['contradiction_pct']:.2f}%" if study == "hssn" else ""),
                      file=sys.stderr)
                result = {"setup": {"base": "configs/demo.yaml", "iters": args.iters, "seeds": args.seeds,
                                    "train_images": args.train_images, "val_images": args.val_images,
                                    "size": args.size, "hierarchy": yaml.safe_load(STREETS_HIERARCHY.read_text()),
                                    "machine": machine()},
                          "summary": summarise(runs), "runs": runs}
                write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(summarise(runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
