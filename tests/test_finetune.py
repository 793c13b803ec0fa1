"""Fine-tuning: model.init_from (tensors, position embeddings, classifier rows by class name), model.freeze, and
loss.class_weight auto recorded in the run; checked on a tiny run moved onto a 3-class folder dataset."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file

from regproxy_cli import RegproxyError
from regproxy_cli.data.class_weights import pixel_counts, suggested_class_weights
from regproxy_cli.data.datasets import FolderDataset
from regproxy_cli.engine import train as train_module
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.finetune import (
    apply_freeze,
    class_key,
    frozen_modules,
    init_from,
    load_init_source,
    train_mode,
)
from regproxy_cli.engine.train import build_training_model, train
from regproxy_cli.model.regproxy import build_model

TARGET_CLASSES = ["sky", "Ring", "BLOB"]  # the source's synthetic classes: background, ellipse, blob, line, ring
SOURCE_ROWS = {1: 4, 2: 2}  # new index -> source index of the classes whose names match
POS = "backbone.vit.pos_embed"


def _config(tmp_path, name: str, data: dict, **sections) -> dict:
    config = {
        "model": {"backbone": "tiny-vit", "pretrained": False, "drop_path_rate": 0.1},
        "data": {"crop_size": 64, "scale": [128, 64], "workers": 0, **data},
        "test": {"inference_mode": "whole", "test_scale": None},
        "optim": {"lr": 1e-2, "batch_size": 2, "iters": 3, "warmup_iters": 1},
        "run": {"out_dir": str(tmp_path / name), "eval_every": 3, "save_every": 3, "log_every": 1, "threads": 1},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def _load(config: dict, *overrides: str):
    return load_config(None, [f"{section}.{key}={json.dumps(value)}" for section, values in config.items()
                              for key, value in values.items()] + list(overrides))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny model trained for 2 iterations on 64x64 synthetic scenes (5 classes): runs/source/best."""
    tmp_path = tmp_path_factory.mktemp("source")
    data = {"kind": "synthetic", "root": str(tmp_path / "scenes"), "synthetic_train": 4, "synthetic_val": 1,
            "synthetic_size": 64}
    torch.manual_seed(0)
    best = train(_load(_config(tmp_path, "source", data, optim={"iters": 2}, run={"eval_every": 2})), progress=False)
    return best


@pytest.fixture
def folder(tmp_path):
    """A 3-class folder dataset of 96x96 images (a larger crop than the source's 64: position embeddings resize)."""
    root = tmp_path / "three"
    root.mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": TARGET_CLASSES}))
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((96, 96), np.uint8)
            mask[20:60, 10:50] = 1
            mask[70:, 70:] = 2
            mask[:8] = 255
            image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    return root


def _target(tmp_path, folder, **sections) -> dict:
    return _config(tmp_path, "target", {"kind": "folder", "root": str(folder), "crop_size": 96, "scale": [192, 96]},
                   **sections)


def test_class_names_match_whatever_the_case_and_separators():
    assert class_key("Traffic_Sign") == class_key("traffic sign") == class_key("traffic-sign") == "traffic sign"
    assert class_key("  Traffic__-Sign ") == "traffic sign" and class_key("trafficsign") != "traffic sign"


def test_init_from_loads_the_backbone_bit_for_bit_and_keeps_matching_classifier_rows(source_run, tmp_path, folder):
    config = _load(_target(tmp_path, folder, model={"init_from": str(source_run)}))
    source = load_init_source(str(source_run), backbone="tiny-vit", m=1, baseline=False)
    torch.manual_seed(3)
    fresh = build_training_model(config, TARGET_CLASSES, [(0, 0, 0)] * 3)
    torch.manual_seed(3)
    model = build_training_model(config, TARGET_CLASSES, [(0, 0, 0)] * 3)
    report = init_from(model, source, str(source_run))
    ours, theirs, untouched = model.state_dict(), load_file(str(source_run / "model.safetensors")), fresh.state_dict()

    for name, tensor in ours.items():
        if name == POS or name.startswith("head.classifier."):
            continue
        assert torch.equal(tensor, theirs[name]), name  # bit for bit, BN statistics included
    # the position embedding: 4x4 grid -> 6x6, bicubic, the cls token as it was
    old = theirs[POS]
    grid = old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(
        1, 36, -1)
    torch.testing.assert_close(ours[POS], torch.cat([old[:, :1], resized], 1))
    assert torch.equal(ours[POS][:, 0], old[:, 0])
    # classifier: Ring (source 4) -> 1 and BLOB (source 2) -> 2 copied; sky keeps the fresh initialisation
    for new, old_index in SOURCE_ROWS.items():
        assert torch.equal(ours["head.classifier.weight"][new], theirs["head.classifier.weight"][old_index])
        assert torch.equal(ours["head.classifier.bias"][new], theirs["head.classifier.bias"][old_index])
    assert torch.equal(ours["head.classifier.weight"][0], untouched["head.classifier.weight"][0])
    assert not torch.equal(ours["head.classifier.weight"][0], theirs["head.classifier.weight"][0])
    assert report.kept_classes == [("Ring", 4, 1), ("BLOB", 2, 2)] and report.new_classes == ["sky"]
    assert report.resized == [(POS, (1, 17, 32), (1, 37, 32))] and report.reinitialised == []


def test_init_from_then_frozen_backbone_trains_only_the_head(source_run, tmp_path, folder, monkeypatch, capsys):
    captured = {}
    build_trainer, step = train_module.build_trainer, train_module.Trainer.step

    def capture_trainer(config, model, runtime, class_weight=None):
        trainer = build_trainer(config, model, runtime, class_weight)
        captured["trainer"] = trainer
        captured["start"] = {k: v.clone() for k, v in model.state_dict().items()}
        return trainer

    def capture_modes(self, batches, iteration=0):
        captured.setdefault("modes", []).append((self.model.backbone.training, self.model.head.training))
        return step(self, batches, iteration)

    monkeypatch.setattr(train_module, "build_trainer", capture_trainer)
    monkeypatch.setattr(train_module.Trainer, "step", capture_modes)
    config = _load(_target(tmp_path, folder, model={"init_from": str(source_run), "freeze": "backbone"},
                           run={"eval_every": 1}))
    best = train(config, progress=False)

    trainer, start = captured["trainer"], captured["start"]
    source = load_file(str(source_run / "model.safetensors"))
    for name, tensor in start.items():  # what the first step started from
        if name.startswith("backbone.") and name != POS:
            assert torch.equal(tensor, source[name]), name
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    named = dict(trainer.model.named_parameters())
    assert not any(id(p) in optimised for n, p in named.items() if n.startswith("backbone."))
    assert all(id(p) in optimised for n, p in named.items() if n.startswith("head."))
    assert captured["modes"] == [(False, True)] * 3  # frozen backbone in eval mode, even after evaluation

    final = load_file(str(best.parent / "final" / "model.safetensors"))
    for name, tensor in final.items():
        if name.startswith("backbone."):
            assert torch.equal(tensor, start[name]), name  # frozen: not moved
    assert not torch.equal(final["head.classifier.weight"], start["head.classifier.weight"])  # it trained
    assert not torch.equal(final["head.affinity.out.weight"], start["head.affinity.out.weight"])
    recorded = json.loads((best.parent / "init_from.json").read_text())
    assert recorded["kept_classes"] == [{"name": "Ring", "from": 4, "to": 1}, {"name": "BLOB", "from": 2, "to": 2}]
    out = capsys.readouterr().out
    assert "initialised from" in out and "resized" in out and "frozen:" in out


def test_freeze_blocks_keeps_embeddings_and_first_blocks(tmp_path):
    model = build_model("tiny-deit", 3)
    frozen = set(apply_freeze(model, "blocks:1"))
    assert {"backbone.vit.pos_embed", "backbone.vit.cls_token", "backbone.vit.dist_token",
            "backbone.vit.patch_embed.proj.weight", "backbone.vit.blocks.0.attn.qkv.weight"} <= frozen
    assert not any(n.startswith(("backbone.vit.blocks.1.", "backbone.vit.norm.", "head.")) for n in frozen)
    vit = model.backbone.vit
    assert set(map(id, frozen_modules(model))) == {id(vit.patch_embed), id(vit.blocks[0])}
    with pytest.raises(RegproxyError, match="only 2 blocks"):
        apply_freeze(build_model("tiny-deit", 3), "blocks:3")


def test_frozen_batch_norm_statistics_stay_put():
    """BN in a frozen module (the affinity head here; hybrid stems elsewhere) keeps its running statistics."""
    model = build_model("tiny-vit", 3)
    for parameter in model.head.affinity.parameters():
        parameter.requires_grad_(False)
    frozen = frozen_modules(model)
    assert [id(m) for m in frozen] == [id(model.head.affinity)]
    before = model.head.affinity.depthwise_bn.running_mean.clone()
    train_mode(model, frozen)
    assert model.training and model.backbone.training and not model.head.affinity.depthwise_bn.training
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.head.affinity.depthwise_bn.running_mean, before)
    model.train()  # without train_mode the statistics would move: the check above can fail
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(model.head.affinity.depthwise_bn.running_mean, before)


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=tiny-deit"], "does not fit: backbone tiny-vit, the config's model.backbone is tiny-deit"),
    (["model.m=2"], r"does not fit: head depth M = 1, the config's is 2 \(set model.m=1\)"),
    (["model.baseline=true"], r"does not fit: it is RegProxy, the config trains the linear baseline"),
])
def test_a_source_that_does_not_fit_is_a_one_line_error(source_run, tmp_path, folder, overrides, message):
    config = _load(_target(tmp_path, folder, model={"init_from": str(source_run)}), *overrides)
    with pytest.raises(RegproxyError, match=message) as error:
        train(config, progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "target").exists()  # nothing written


def test_a_missing_source_is_one_line_naming_it_and_writes_nothing(tmp_path, folder, cli):
    config = _target(tmp_path, folder, model={"init_from": str(tmp_path / "nowhere" / "best")})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "nowhere").mkdir()
    result = cli("train", str(path))
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.init_from" in lines[0] and str(tmp_path / "nowhere" / "best") in lines[0]
    assert not (tmp_path / "target").exists()


def test_auto_class_weights_are_recorded_and_reused_on_resume(tmp_path, folder, monkeypatch):
    captured = []
    build_trainer = train_module.build_trainer

    def capture(config, model, runtime, class_weight=None):
        captured.append(class_weight)
        return build_trainer(config, model, runtime, class_weight)

    monkeypatch.setattr(train_module, "build_trainer", capture)
    config = _load(_target(tmp_path, folder, optim={"iters": 1}, run={"eval_every": 1, "save_every": 1}),
                   "loss.class_weight=auto", "loss.kind=focal")
    train(config, progress=False)
    # independently: count the mask files' pixels with numpy, then median frequency
    counts = np.zeros(3, np.int64)
    for mask in sorted((folder / "masks" / "train").glob("*.png")):
        values = np.array(Image.open(mask))
        counts += np.array([(values == c).sum() for c in range(3)])
    frequency = counts / counts.sum()
    expected = np.median(frequency) / frequency
    saved = json.loads((tmp_path / "target" / "class_weights.json").read_text())
    np.testing.assert_allclose(saved["weights"], expected)
    assert saved["pixel_counts"] == counts.tolist() and saved["classes"] == TARGET_CLASSES
    assert captured[0] == saved["weights"]
    np.testing.assert_array_equal(pixel_counts(FolderDataset(folder, "train")), counts)

    # change the masks: a resumed run keeps the numbers it started with
    for mask in (folder / "masks" / "train").glob("*.png"):
        Image.fromarray(np.full((96, 96), 2, np.uint8)).save(mask)
    longer = _load(_target(tmp_path, folder, optim={"iters": 2}, run={"eval_every": 1, "save_every": 1}),
                   "loss.class_weight=auto", "loss.kind=focal")
    train(longer, resume=True, allow_config_change=True, progress=False)
    assert captured[1] == saved["weights"]
    assert (tmp_path / "target" / "config.yaml").read_text().count("class_weight: auto") == 1


def test_suggested_weights_are_median_frequency():
    counts = np.array([600, 300, 0, 100])
    frequency = np.array([0.6, 0.3, 0.1])  # of 1000 labelled pixels; the absent class is left out
    median = 0.3
    np.testing.assert_allclose(suggested_class_weights(counts), [median / 0.6, 1.0, 0.0, median / 0.1])
    assert suggested_class_weights(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert frequency.sum() == pytest.approx(1.0)


def test_a_weight_list_of_the_wrong_length_is_a_one_line_error(tmp_path, folder):
    config = _load(_target(tmp_path, folder), "loss.class_weight=[1, 2]")
    with pytest.raises(RegproxyError, match=r"loss.class_weight: 2 weights for the 3 classes of .*three"):
        train(config, progress=False)
    assert not (tmp_path / "target").exists()
