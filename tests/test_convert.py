"""Converting the authors' checkpoints: exact key layout for all six architectures, logits parity with an
independent port of the authors' forward pass, and clear errors for checkpoints that do not fit."""

import copy

import pytest
import timm
import torch

from authors import authors_forward, authors_state_dict
from regproxy_cli import RegproxyError, build_model, get_backbone
from regproxy_cli.io.checkpoint import load_state_dict_checked
from regproxy_cli.io.convert import convert_authors_checkpoint, infer_config, map_authors_keys, tap_index_from_meta
from regproxy_cli.io.zoo import ZOO
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.regproxy import build_from_config

HYBRID_ARCH = {"r26-s32": "vit_small_r26_s32_384", "r50-l32": "vit_large_r50_s32_384"}


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


def _tiny_checkpoint(name: str, num_classes: int = 6):
    spec = get_backbone(name)
    stem_module, stem_state = None, None
    if spec.stride == 32:
        stem_module = copy.deepcopy(build_model(spec, 2).backbone.cnn_stem).eval()
        for p in stem_module.parameters():
            p.data.normal_(0, 0.05)
        stem_state = stem_module.state_dict()
    state = authors_state_dict(width=spec.width, depth=spec.depth, num_classes=num_classes,
                               grid=spec.crop_size // spec.stride, prefix=spec.num_prefix_tokens,
                               stem_state=stem_state)
    return state, stem_module


@pytest.mark.parametrize("name", list(TINY_CASES))
def test_converted_logits_equal_the_authors_forward(tmp_path, name):
    """/16, DeiT-distilled B/16 layout and a hybrid, each through a real .pth file and convert."""
    tap, heads = TINY_CASES[name]
    state, stem = _tiny_checkpoint(name)
    meta = {"config": f"model = dict(backbone=dict(out_indices=[{tap}, 1]))", "CLASSES": tuple("abcdef")}
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
    assert tap_index_from_meta({"config": "backbone=dict(out_indices=(4, 11), qkv_bias=True)"}) == 4
    assert tap_index_from_meta({"config": "out_indices=[-1, 23]"}) == -1
    assert tap_index_from_meta({}) is None


def test_unexpected_and_missing_keys_are_named(tmp_path):
    state, _ = _tiny_checkpoint("tiny-vit")
    state["decode_head.conv_seg.weight"] = torch.zeros(6, 32, 1, 1)
    with pytest.raises(RegproxyError, match="unexpected keys decode_head.conv_seg.weight"):
        map_authors_keys(state)
    del state["decode_head.conv_seg.weight"]
    del state["backbone.layers.1.ln2.bias"]
    torch.save({"state_dict": state}, tmp_path / "a.pth")
    with pytest.raises(RegproxyError, match=r"missing keys: backbone.vit.blocks.1.norm2.bias"):
        convert_authors_checkpoint(tmp_path / "a.pth", backbone="tiny-vit", m=1)


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
    torch.save({"meta": {"config": "out_indices=[0, 1]"}, "state_dict": state}, tmp_path / "a.pth")
    result = cli("convert", str(tmp_path / "a.pth"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "tiny-vit, M=1, 6 classes" in result.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    result = cli("convert", str(tmp_path / "a.pth"), str(tmp_path / "out2"), "--zoo", "s16-ade")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
