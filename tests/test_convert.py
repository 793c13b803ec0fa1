"""Converting the authors' checkpoints: exact key layout for all six architectures, logits parity with an
independent port of the authors' forward pass, the test protocol read from the embedded mmseg config or a
matching zoo entry, and clear errors for checkpoints that do not fit."""

import dataclasses
import json

import pytest
import timm
import torch

from authors import authors_forward, authors_meta, authors_state_dict
from regproxy_cli import RegproxyError, get_backbone
from regproxy_cli.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from regproxy_cli.hub.checkpoint import load_state_dict_checked
from regproxy_cli.hub.convert import (
    UnknownProtocolError,
    convert_authors_checkpoint,
    infer_config,
    map_authors_keys,
    parse_mmcv_config,
    protocol_from_meta,
    tap_index_from_meta,
)
from regproxy_cli.hub.zoo import ZOO, ZooEntry, load_model
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.regproxy import build_from_config

HYBRID_ARCH = {"r26-s32": "vit_small_r26_s32_384", "r50-l32": "vit_large_r50_s32_384"}
TINY_HYBRID_ARCH = "vit_small_r26_s32_384"  # conftest's tiny-hybrid: the R26 stem, a 2-block width-32 ViT on it


def _full_size_authors_state(name: str, num_classes: int, crop: int) -> dict:
    spec = get_backbone(name)
    stem = None
    if name in HYBRID_ARCH:
        with torch.device("meta"):
            stem = timm.create_model(HYBRID_ARCH[name], num_classes=0).patch_embed.backbone.state_dict()
    return authors_state_dict(width=spec.width, depth=spec.depth, num_classes=num_classes, grid=crop // spec.stride,
                              prefix=spec.num_prefix_tokens, stem_state=stem, device="meta")


@pytest.mark.parametrize("zoo_name", list(ZOO))
def test_every_zoo_checkpoint_layout_maps_onto_our_model(zoo_name):
    entry = ZOO[zoo_name]
    config = entry.config()
    state = _full_size_authors_state(entry.backbone, config.num_classes, entry.crop)
    assert infer_config(state) == {"backbone": entry.backbone, "num_classes": config.num_classes,
                                   "region_res": (4, 4), "crop_size": entry.crop}
    with torch.device("meta"):
        model = build_from_config(config)
    load_state_dict_checked(model, map_authors_keys(state), zoo_name)  # every key mapped, every shape equal


@pytest.mark.parametrize("name, entries, values", [("s16-ade", 166, 22.25e6), ("r26-s32-ade", 253, 36.39e6)])
def test_layout_matches_the_published_checkpoints(name, entries, values):
    entry = ZOO[name]
    state = _full_size_authors_state(entry.backbone, 150, entry.crop)
    assert len(state) == entries
    assert sum(v.numel() for v in state.values()) == pytest.approx(values, rel=1e-3)


TINY_CASES = {  # our tiny spec name -> (official tap index, heads)
    "tiny-vit": (0, 2),
    "tiny-deit": (0, 2),
    "tiny-hybrid": (-1, 2),
}


def _tiny_checkpoint(name: str, num_classes: int = 6, crop: int | None = None):
    spec = get_backbone(name)
    stem_module, stem_state = None, None
    if spec.stride == 32:
        # the authors' ResNet stem straight from timm (as _full_size_authors_state takes it), not from our model;
        # the ViT around it is made tiny only to build quickly: the stem does not depend on it
        vit = timm.create_model(TINY_HYBRID_ARCH, num_classes=0, embed_dim=32, depth=1, num_heads=2)
        stem_module = vit.patch_embed.backbone.eval()
        for p in stem_module.parameters():
            p.data.normal_(0, 0.05)
        stem_state = stem_module.state_dict()
    state = authors_state_dict(width=spec.width, depth=spec.depth, num_classes=num_classes,
                               grid=(crop or spec.crop_size) // spec.stride, prefix=spec.num_prefix_tokens,
                               stem_state=stem_state)
    return state, stem_module


@pytest.mark.parametrize("name", list(TINY_CASES))
def test_converted_logits_equal_the_authors_forward(tmp_path, name):
    """/16, DeiT-distilled B/16 layout and a hybrid, each through a real .pth file and convert."""
    tap, heads = TINY_CASES[name]
    state, stem = _tiny_checkpoint(name)
    meta = authors_meta(tap=tap, num_classes=6, mode="whole", crop=64, classes="abcdef")
    path = tmp_path / "authors.pth"
    torch.save({"meta": meta, "state_dict": state}, path)

    model = convert_authors_checkpoint(path)
    assert model.config.backbone == name and model.config.m == tap + 1 and model.config.classes == list("abcdef")
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(img)
        theirs = authors_forward(state, img, depth=2, heads=heads, tap=tap, stem=stem)
    assert ours.abs().max() > 0.1  # non-trivial logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_tap_index_from_the_embedded_config():
    assert tap_index_from_meta({"config": "model = dict(backbone=dict(out_indices=(4, 11), qkv_bias=True))"}) == 4
    assert tap_index_from_meta({"config": "model = dict(\n    backbone=dict(\n        out_indices=[-1, 23]))"}) == -1
    assert tap_index_from_meta(authors_meta(tap=5, num_classes=150)) == 5
    # the backbone's out_indices, not the first ones in the text (a neck has its own)
    text = "model = dict(neck=dict(out_indices=[7, 8]), backbone=dict(type='VisionTransformer', out_indices=[2, 11]))"
    assert tap_index_from_meta({"config": text}) == 2
    assert tap_index_from_meta({}) is None


@pytest.mark.parametrize("where", ["top", "data", "both"])
def test_test_protocol_from_the_embedded_config(where):
    meta = authors_meta(tap=2, num_classes=19, crop=768, stride=512, img_scale=(2048, 1024), where=where)
    assert protocol_from_meta(meta) == {"m": 3, "inference_mode": "slide", "crop_size": 768, "window_stride": 512,
                                        "test_scale": (2048, 1024)}
    ade = authors_meta(tap=4, num_classes=150, crop=512, stride=512, img_scale=(512, 2048), where=where)
    assert protocol_from_meta(ade)["test_scale"] == (2048, 512)  # mmseg's keep-ratio bound: (long, short)
    whole = authors_meta(tap=-1, num_classes=150, mode="whole", img_scale=None, where=where)
    assert protocol_from_meta(whole) == {"m": 0, "inference_mode": "whole", "test_scale": None}
    exact = authors_meta(tap=4, num_classes=150, where=where)
    exact["config"] = exact["config"].replace("keep_ratio=True", "keep_ratio=False")
    assert "test_scale" not in protocol_from_meta(exact)  # a resize to an exact size is not a keep-ratio bound


def test_the_embedded_config_is_parsed_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = (f"evil = __import__('pathlib').Path({str(marker)!r}).touch()\n"
            "model = dict(backbone=dict(out_indices=[2, 11], drop=rate * 2), test_cfg=dict(mode='whole'))\n"
            "label = 'it's'\n"  # mmcv writes strings without escaping: one broken line must not lose the rest
            "test_pipeline = [dict(type='MultiScaleFlipAug', img_scale=(2048, 1024), transforms=[])]\n")
    config = parse_mmcv_config(text)
    assert not marker.exists() and "evil" not in config and "label" not in config
    assert config["model"] == {"backbone": {"out_indices": [2, 11]}, "test_cfg": {"mode": "whole"}}
    assert protocol_from_meta({"config": text}) == {"m": 3, "inference_mode": "whole", "test_scale": (2048, 1024)}


def test_cityscapes_checkpoint_is_tested_as_its_embedded_config_says(tmp_path):
    """No --zoo: crop from the weights, window stride, test scale and mode from the embedded config."""
    state, _ = _tiny_checkpoint("tiny-vit", num_classes=19, crop=768)
    assert state["backbone.pos_embed"].shape[1] == 48 * 48 + 1
    meta = authors_meta(tap=0, num_classes=19, crop=768, stride=512, img_scale=(2048, 1024),
                        classes=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE)
    torch.save({"meta": meta, "state_dict": state}, tmp_path / "city.pth")
    config = convert_authors_checkpoint(tmp_path / "city.pth").config
    assert (config.crop_size, config.stride, config.test_scale, config.inference_mode) == (768, 512, (2048, 1024),
                                                                                           "slide")
    assert config.m == 1 and config.classes[-1] == "bicycle" and config.palette[0] == [128, 64, 128]


def test_embedded_window_size_must_be_the_training_crop(tmp_path):
    state, _ = _tiny_checkpoint("tiny-vit", num_classes=19)  # 64x64 position grid
    torch.save({"meta": authors_meta(tap=0, num_classes=19, crop=768), "state_dict": state}, tmp_path / "a.pth")
    with pytest.raises(RegproxyError, match="crop_size: weights say 64, config says 768"):
        convert_authors_checkpoint(tmp_path / "a.pth")


TINY_CITY = ZooEntry("tiny-city", "tiny-vit", "cityscapes", 2, 768, "cityid", 1.0, 2.0)
TINY_ADE = ZooEntry("tiny-ade", "tiny-vit", "ade20k", 1, 64, "adeid", 1.0, 2.0)


def test_without_an_embedded_config_the_matching_zoo_entry_says_the_protocol(tmp_path, monkeypatch):
    """`--model x.pth` (and `regproxy convert`): the one zoo entry with these shapes gives M, classes, protocol."""
    monkeypatch.setitem(ZOO, TINY_CITY.name, TINY_CITY)
    monkeypatch.setitem(ZOO, TINY_ADE.name, TINY_ADE)
    state, _ = _tiny_checkpoint("tiny-vit", num_classes=19, crop=768)
    torch.save({"meta": {"mmseg_version": "0.17.0"}, "state_dict": state}, tmp_path / "city.pth")
    config = load_model(tmp_path / "city.pth").config
    assert (config.crop_size, config.stride, config.test_scale, config.inference_mode) == (768, 512, (2048, 1024),
                                                                                           "slide")
    assert config.m == 2 and config.classes == list(CITYSCAPES_CLASSES) and config.dataset == "cityscapes"
    assert config.metrics == {} and "tiny-city" in config.source  # the protocol is the entry's, not its results


@pytest.mark.parametrize("entries, why", [([], "match no zoo model"),
                                          ([TINY_ADE, dataclasses.replace(TINY_ADE, name="tiny-ade2")],
                                           "match several zoo models")])
def test_a_checkpoint_that_states_no_protocol_names_the_options(tmp_path, monkeypatch, entries, why):
    for entry in entries:
        monkeypatch.setitem(ZOO, entry.name, entry)
    state, _ = _tiny_checkpoint("tiny-vit", num_classes=150)
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "a.pth")
    with pytest.raises(UnknownProtocolError) as info:
        convert_authors_checkpoint(tmp_path / "a.pth", known={e.name: e.config() for e in entries})
    message = str(info.value)
    assert why in message and "\n" not in message
    assert message.endswith("pass --mode whole|slide --test-scale LONGxSHORT --window-stride N (or --zoo NAME)")
    with pytest.raises(RegproxyError) as info:  # predict/eval --model a.pth
        load_model(tmp_path / "a.pth")
    assert (f"run `regproxy convert {tmp_path / 'a.pth'} DIR --mode whole|slide --test-scale LONGxSHORT "
            f"--window-stride N` (or `--zoo NAME`)") in str(info.value)
    # only what is not stated is asked for
    config = convert_authors_checkpoint(tmp_path / "a.pth", inference_mode="whole", test_scale=(1024, 256)).config
    assert (config.inference_mode, config.test_scale) == ("whole", (1024, 256))


def test_unexpected_and_missing_keys_are_named(tmp_path):
    state, _ = _tiny_checkpoint("tiny-vit")
    state["decode_head.conv_seg.weight"] = torch.zeros(6, 32, 1, 1)
    with pytest.raises(RegproxyError, match="unexpected keys decode_head.conv_seg.weight"):
        map_authors_keys(state)
    del state["decode_head.conv_seg.weight"]
    del state["backbone.layers.1.ln2.bias"]
    torch.save({"state_dict": state}, tmp_path / "a.pth")
    with pytest.raises(RegproxyError, match=r"missing keys: backbone.vit.blocks.1.norm2.bias"):
        convert_authors_checkpoint(tmp_path / "a.pth", backbone="tiny-vit", m=1, inference_mode="whole",
                                   test_scale=(2048, 512))


def test_config_that_contradicts_the_weights_is_refused(tmp_path):
    state, _ = _tiny_checkpoint("tiny-vit", num_classes=6)
    torch.save({"state_dict": state}, tmp_path / "a.pth")
    config = ModelConfig(backbone="tiny-vit", num_classes=150, m=1, crop_size=64)
    with pytest.raises(RegproxyError, match="num_classes: weights say 6, config says 150"):
        convert_authors_checkpoint(tmp_path / "a.pth", config)


@pytest.mark.parametrize("content, message", [(b"not a checkpoint", "not a readable PyTorch checkpoint"),
                                              (None, "no such checkpoint file")])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RegproxyError, match=message):
        convert_authors_checkpoint(path)


def test_convert_cli_writes_a_loadable_directory(tmp_path, cli):
    state, _ = _tiny_checkpoint("tiny-vit")
    torch.save({"meta": {"config": "model = dict(backbone=dict(out_indices=[0, 1]))"}, "state_dict": state},
               tmp_path / "a.pth")
    result = cli("convert", str(tmp_path / "a.pth"), str(tmp_path / "out"))  # the config states no test protocol
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pass --mode whole|slide --test-scale LONGxSHORT --window-stride N" in result.stderr
    result = cli("convert", str(tmp_path / "a.pth"), str(tmp_path / "out"), "--mode", "slide", "--window-stride",
                 "32", "--test-scale", "512x1024")
    assert result.returncode == 0, result.stderr
    assert "tiny-vit, M=1, 6 classes" in result.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["inference_mode"], saved["window_stride"], saved["test_scale"]) == ("slide", 32, [1024, 512])
    result = cli("convert", str(tmp_path / "a.pth"), str(tmp_path / "out2"), "--zoo", "s16-ade")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
