"""The 2025 plain ViTs as backbones: DINOv3 (timm Eva: rotary embeddings, registers, layer scale) and DINOv2 with
registers (patch 14). Checked against timm's own forward passes, RegProxy's painting at stride 14 against a naive
loop, and the whole path (train, save, load, export to ONNX, predict at sizes that are not multiples of the stride,
init_from, frozen training) on tiny 2-block, width-32 versions; the declarations in backbones/pyproject.toml
through the entry-point machinery; the Hub's offline and gated failures as one line."""

import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import onnxruntime
import pytest
import timm
import tomllib
import torch
import torch.nn.functional as F
from huggingface_hub.errors import GatedRepoError
from timm.layers import resample_abs_pos_embed

from conftest import TINY_DINO_SPECS, TINY_DINOV2, TINY_DINOV3
from regproxy_cli import RegproxyError, build_model, list_backbones, load_pretrained, refresh_backbones, save_pretrained
from regproxy_cli.engine.finetune import apply_freeze, frozen_modules, init_from
from regproxy_cli.model.ops import NEIGHBOURS
from regproxy_cli.model.plugins import ENTRY_POINT_GROUP
from regproxy_cli.onnx.export import export_onnx

BACKBONES_DIR = Path(__file__).resolve().parents[1] / "backbones"
DINO_NAMES = ["dinov3-s16", "dinov3-b16", "dinov3-l16", "dinov2-s14", "dinov2-b14", "dinov2-l14"]


def _declared() -> dict[str, str]:
    """name -> "module:attr" of every backbone backbones/pyproject.toml registers."""
    project = tomllib.loads((BACKBONES_DIR / "pyproject.toml").read_text())
    return project["project"]["entry-points"][ENTRY_POINT_GROUP]


def _declared_spec(name: str):
    """The spec the declaration points at, imported from this tree (installed or not yet reinstalled)."""
    module, attr = _declared()[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _randomise(backbone: torch.nn.Module) -> None:
    """Layer scale starts at 1e-5, which would make every block nearly the identity and the checks weak."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if "gamma" in name or name.endswith(("_token", "pos_embed")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def _timm_patch_tokens(vit: torch.nn.Module, x: torch.Tensor, stride: int, prefix: int) -> torch.Tensor:
    """timm's forward_features of the zero-padded input, prefix tokens dropped, as a (B, C, rows, cols) grid."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (0, -width % stride, 0, -height % stride))
    tokens = vit.forward_features(padded)[:, prefix:]
    rows, cols = padded.shape[-2] // stride, padded.shape[-1] // stride
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (48, 80), (50, 37), (130, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dinov3_tokens_equal_timm_forward_features_at_any_size(size):
    backbone = TINY_DINOV3.build().eval()
    _randomise(backbone)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        _, final = backbone(x)
        reference = _timm_patch_tokens(backbone.vit, x, 16, 5)
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("img_size, size", [(70, (70, 70)), (70, (65, 58)), (112, (100, 105)), (42, (40, 30))],
                         ids=lambda v: str(v))
def test_dinov2_tokens_equal_timm_forward_features_on_the_stored_grid(img_size, size):
    """Padded to the stored grid, tokens equal timm's forward_features exactly (its grid is then not resized)."""
    backbone = TINY_DINOV2.build(img_size=img_size).eval()
    _randomise(backbone)
    x = torch.randn(2, 3, *size)
    assert (-(-size[0] // 14), -(-size[1] // 14)) == backbone.pos_grid
    with torch.no_grad():
        _, final = backbone(x)
        reference = _timm_patch_tokens(backbone.vit, x, 14, 5)
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(98, 70), (42, 140), (37, 50)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dinov2_tokens_equal_timm_on_other_grids_with_dinov2s_own_resize(size):
    """Off the stored grid timm antialiases the bicubic resize (an op with no ONNX export); DINOv2's code does not,
    and neither do we: the reference is timm built for the new grid, holding the non-antialiased resize."""
    backbone = TINY_DINOV2.build().eval()
    _randomise(backbone)
    x = torch.randn(1, 3, *size)
    grid = [-(-size[0] // 14), -(-size[1] // 14)]
    reference_vit = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=(grid[0] * 14,
                                      grid[1] * 14), dynamic_img_size=True, embed_dim=32, depth=2, num_heads=2).eval()
    state = backbone.vit.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid, old_size=[5, 5],
                                                num_prefix_tokens=0, interpolation="bicubic", antialias=False)
    reference_vit.load_state_dict(state)
    with torch.no_grad():
        _, final = backbone(x)
        reference = _timm_patch_tokens(reference_vit, x, 14, 5)
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", TINY_DINO_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("m", [0, 1, 2])
def test_tap_is_block_m_output_without_norm(spec, m):
    backbone = spec.build(m=m).eval()
    _randomise(backbone)
    x = torch.randn(1, 3, spec.crop_size, spec.crop_size)  # DINOv2: timm resizes other grids differently
    grid = spec.crop_size // spec.stride
    with torch.no_grad():
        tap, _ = backbone(x)
        if m == 0:  # right after the embeddings: timm's intermediates start at block 0, so compare the grid alone
            assert tap.shape == (1, 32, grid, grid)
            return
        reference = backbone.vit.forward_intermediates(x, indices=[m - 1], norm=False, intermediates_only=True)[0]
    torch.testing.assert_close(tap, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows, cols", [(1, 1), (4, 4), (3, 7), (32, 45)])
def test_rotary_embedding_equals_timms(rows, cols):
    backbone = TINY_DINOV3.build()
    torch.testing.assert_close(backbone.rope_embedding(rows, cols), backbone.rope.get_embed(shape=[rows, cols]),
                               rtol=0, atol=0)
    assert backbone.pos_grid is None  # nothing stored per grid


def _naive_logits(token_logits, affinity, stride, size):
    """Algorithm 1 pixel by pixel, then the bilinear resize (align_corners=False) of the painted grid written out."""
    _, classes, rows, cols = token_logits.shape
    _, _, sub_h, sub_w, _, _ = affinity.shape
    painted = torch.zeros(classes, rows * sub_h, cols * sub_w, dtype=torch.float64)
    for y in range(rows):
        for x in range(cols):
            for i in range(sub_h):
                for j in range(sub_w):
                    for n in range(NEIGHBOURS):
                        ny, nx = y + n // 3 - 1, x + n % 3 - 1
                        weight = affinity[0, n, i, j, y, x].double()
                        if not (0 <= ny < rows and 0 <= nx < cols):
                            assert weight == 0  # the border mask
                            continue
                        painted[:, y * sub_h + i, x * sub_w + j] += weight * token_logits[0, :, ny, nx].double()
    # the resize to the padded frame (rows * stride, cols * stride), then the crop; sub-pixel centres sit at
    # (k + 0.5) * stride / sub_h pixels: 3.5 px apart at stride 14 with 4 sub-pixels
    out_h, out_w = rows * stride, cols * stride
    logits = torch.zeros(classes, *size, dtype=torch.float64)
    for py in range(size[0]):
        sy = max((py + 0.5) * painted.shape[1] / out_h - 0.5, 0.0)
        y0 = min(int(sy), painted.shape[1] - 1)
        y1, fy = min(y0 + 1, painted.shape[1] - 1), sy - min(int(sy), painted.shape[1] - 1)
        for px in range(size[1]):
            sx = max((px + 0.5) * painted.shape[2] / out_w - 0.5, 0.0)
            x0 = min(int(sx), painted.shape[2] - 1)
            x1, fx = min(x0 + 1, painted.shape[2] - 1), sx - x0
            top = (1 - fx) * painted[:, y0, x0] + fx * painted[:, y0, x1]
            bottom = (1 - fx) * painted[:, y1, x0] + fx * painted[:, y1, x1]
            logits[:, py, px] = (1 - fy) * top + fy * bottom
    return painted, logits


@pytest.mark.parametrize("region_res", [(4, 4), (2, 7), (7, 7), (3, 5)], ids=lambda r: f"{r[0]}x{r[1]}")
def test_painting_at_stride_14_equals_a_naive_loop(region_res):
    """Stride 14 with 4x4 sub-pixels (output stride 3.5, not an integer), 2x7 and 7x7 (exact), 3x5 (neither)."""
    torch.manual_seed(0)
    model = build_model(TINY_DINOV2, 4, region_res=region_res).eval()
    torch.nn.init.normal_(model.head.affinity.out.weight, std=0.5)  # sharp, uneven affinities
    size = (45, 60)  # 4 x 5 tokens of 14, padded by 11 and 10
    with torch.no_grad():
        out = model.forward_all(torch.randn(1, 3, *size))
    assert out.affinity.shape == (1, 9, *region_res, 4, 5)
    painted, logits = _naive_logits(out.token_logits, out.affinity, 14, size)
    torch.testing.assert_close(out.region_logits[0].double(), painted, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits[0].double(), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", TINY_DINO_SPECS, ids=lambda s: s.name)
def test_trains_saves_loads_exports_and_predicts_at_any_size(spec, tmp_path):
    torch.manual_seed(0)
    model = build_model(spec.name, 3)
    model.config.classes = ["sky", "tree", "road"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, target = torch.randn(2, 3, spec.crop_size, spec.crop_size), torch.randint(0, 3, (2, spec.crop_size,
                                                                                          spec.crop_size))
    before = model.backbone.vit.blocks[0].attn.qkv.weight.clone()
    for _ in range(2):
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(before, model.backbone.vit.blocks[0].attn.qkv.weight)  # gradients reach the backbone
    model.eval()
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    odd = torch.randn(1, 3, 2 * spec.stride + 5, 3 * spec.stride - 3)  # not multiples of the stride
    with torch.no_grad():
        logits = model(odd)
        torch.testing.assert_close(loaded(odd), logits, rtol=0, atol=0)
        assert torch.equal(loaded.labels(odd), logits.argmax(1))
    assert logits.shape == (1, 3, *odd.shape[-2:])
    path = export_onnx(loaded, tmp_path / "m.onnx", size=spec.crop_size)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, spec.crop_size, spec.crop_size), (2, 3, 80, 112), tuple(odd.shape), (1, 3, 150, 33)]:
        image = torch.randn(shape)
        with torch.no_grad():
            expected = loaded(image)
        got = torch.from_numpy(session.run(None, {"image": image.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_init_from_needs_no_position_embedding_with_rotary_and_resizes_dinov2s_without_prefix_rows():
    torch.manual_seed(0)
    for spec, other_crop in ((TINY_DINOV3, 96), (TINY_DINOV2, 98)):
        source = build_model(spec.name, 3)
        _randomise(source.backbone)
        source.config.classes = ["a", "b", "c"]
        model = build_model(spec.name, 3, img_size=other_crop)
        model.config.classes = ["a", "b", "c"]
        report = init_from(model, source, "source")
        assert not report.reinitialised
        if spec is TINY_DINOV3:
            assert not report.resized and "backbone.vit.pos_embed" not in model.state_dict()
            for name, tensor in model.state_dict().items():
                assert torch.equal(tensor, source.state_dict()[name]), name
        else:
            assert report.resized == [("backbone.vit.pos_embed", (1, 25, 32), (1, 49, 32))]
            expected = resample_abs_pos_embed(source.backbone.vit.pos_embed, new_size=[7, 7], old_size=[5, 5],
                                              num_prefix_tokens=0, interpolation="bicubic", antialias=False)
            torch.testing.assert_close(model.backbone.vit.pos_embed, expected, rtol=0, atol=0)


@pytest.mark.parametrize("spec", TINY_DINO_SPECS, ids=lambda s: s.name)
def test_frozen_backbone_builds_no_graph_through_it(spec):
    """model.freeze=backbone: the tap and final tokens carry no autograd history, so no backbone activation is kept
    for a backward; the head still gets gradients."""
    model = build_model(spec.name, 3)
    apply_freeze(model, "backbone")
    assert [id(m) for m in frozen_modules(model)] == [id(model.backbone)]
    tap, final = model.backbone(torch.randn(1, 3, spec.crop_size, spec.crop_size))
    assert tap.grad_fn is None and final.grad_fn is None and not final.requires_grad
    model(torch.randn(1, 3, spec.crop_size, spec.crop_size)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_frozen_training_on_generated_scenes_keeps_the_backbone_and_the_head_learns(tmp_path, monkeypatch):
    from regproxy_cli.engine import train as train_module
    from regproxy_cli.engine.config import load_config
    from regproxy_cli.engine.evaluate import evaluate
    from regproxy_cli.engine.train import train

    captured = {}
    build_trainer = train_module.build_trainer

    def capture(config, model, runtime, class_weight=None):
        captured["start"] = {k: v.clone() for k, v in model.state_dict().items()}
        return build_trainer(config, model, runtime, class_weight)

    monkeypatch.setattr(train_module, "build_trainer", capture)
    settings = {
        "model": {"backbone": "tiny-dinov2", "pretrained": False, "freeze": "backbone"},
        "data": {"kind": "synthetic", "root": str(tmp_path / "scenes"), "synthetic_train": 8, "synthetic_val": 2,
                 "synthetic_size": 70, "crop_size": 70, "scale": [140, 70], "workers": 0},
        "test": {"inference_mode": "whole", "test_scale": None},
        "optim": {"lr": 2e-2, "batch_size": 4, "iters": 30, "warmup_iters": 1},
        "run": {"out_dir": str(tmp_path / "run"), "eval_every": 30, "save_every": 30, "log_every": 10,
                "threads": 1},
    }
    config = load_config(None, [f"{section}.{key}={json.dumps(value)}" for section, values in settings.items()
                                for key, value in values.items()])
    torch.manual_seed(0)
    best = train(config, progress=False)
    final = load_pretrained(best.parent / "final")
    start = captured["start"]
    for name, tensor in final.state_dict().items():
        if name.startswith("backbone."):
            assert torch.equal(tensor, start[name]), name  # bit-identical
    untrained = load_pretrained(best.parent / "final")
    untrained.load_state_dict(start)
    val = config.data.open("val")
    before = evaluate(untrained, val, progress=False)["mIoU"]
    after = evaluate(final, val, progress=False)["mIoU"]
    assert after > before + 5, (before, after)


def test_the_declared_dino_backbones_match_their_modules():
    """Every DINO declaration against the module it builds (on the meta device: L costs nothing)."""
    declared = _declared()
    assert set(DINO_NAMES) <= set(declared)
    for name in DINO_NAMES:
        spec = _declared_spec(name)
        assert spec.name == name
        with torch.device("meta"):
            backbone = spec.build()
        vit = backbone.vit
        assert (backbone.stride, backbone.width, backbone.m) == (spec.stride, spec.width, spec.m)
        assert vit.patch_embed.patch_size == (spec.stride, spec.stride)
        assert len(vit.blocks) == spec.depth and vit.blocks[0].attn.num_heads == spec.heads
        assert vit.num_prefix_tokens == spec.num_prefix_tokens == 5
        assert spec.crop_size % spec.stride == 0
        assert timm.list_pretrained(spec.pretrained) == [spec.pretrained]
        with torch.no_grad():
            tap, final = backbone(torch.zeros(1, 3, 3 * spec.stride + 1, 4 * spec.stride, device="meta"))
        assert tap.shape == final.shape == (1, spec.width, 4, 4)


def test_declared_entry_points_are_discovered_as_installed(tmp_path, monkeypatch, cli):
    """backbones/pyproject.toml's entry points as pip would install them (a regproxy-backbones dist-info in front
    of the environment's), found by list_backbones and shown by `regproxy backbones` and `regproxy flops`."""
    site = tmp_path / "site"
    info = site / "regproxy_backbones-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: regproxy-backbones\nVersion: 0.1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in _declared().items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(BACKBONES_DIR))
    refresh_backbones()
    try:
        assert set(DINO_NAMES) <= set(list_backbones())
    finally:
        monkeypatch.undo()
        refresh_backbones()
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(BACKBONES_DIR), os.environ.get("PYTHONPATH", "")])}
    listed = cli("backbones", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["dinov2-s14"]["stride"] == 14 and rows["dinov3-s16"]["num_prefix_tokens"] == 5
    flops = cli("flops", "--backbone", "dinov3-s16", "--backbone", "dinov2-s14", "--size", "512", "--json", env=env)
    assert flops.returncode == 0, flops.stderr
    counted = {row["backbone"]: row for row in json.loads(flops.stdout)}
    assert 30e9 < counted["dinov3-s16"]["true_macs"] < 35e9  # 32.2 G at 512^2
    assert counted["dinov2-s14"]["true_macs"] > counted["dinov3-s16"]["true_macs"]  # 37^2 tokens against 32^2


def test_offline_without_cache_is_one_line(hub_cache):
    with pytest.raises(RegproxyError) as info:
        build_model(TINY_DINOV2, 3, pretrained=True)
    message = str(info.value)
    assert f"timm/{TINY_DINOV2.pretrained}" in message and "\n" not in message
    assert f"hf download timm/{TINY_DINOV2.pretrained}" in message


def test_gated_dinov3_weights_are_one_line_naming_the_licence_and_hf_token(monkeypatch):
    def gated(*args, **kwargs):
        raise GatedRepoError("403 Client Error: access to model timm/vit_small_patch16_dinov3.lvd1689m is restricted",
                             response=SimpleNamespace(status_code=403, headers={}, request=None))

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", gated)  # what timm's pretrained=True downloads with
    with pytest.raises(RegproxyError) as info:
        build_model(TINY_DINOV3, 3, pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "gated" in message and "licence" in message and "HF_TOKEN" in message
    assert "https://huggingface.co/timm/vit_small_patch16_dinov3" in message


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinov3-s16", "dinov2-s14"])
def test_full_size_tokens_equal_timm_forward_features(name):
    torch.set_num_threads(2)
    spec = _declared_spec(name)
    backbone = spec.build().eval()
    _randomise(backbone)
    # DINOv3 at any size; DINOv2 padded up to its stored grid, where timm does not resize (see above)
    size = (spec.crop_size - 5, spec.crop_size - 3) if spec.stride == 14 else (spec.crop_size - 5, 333)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        _, final = backbone(x)
        reference = _timm_patch_tokens(backbone.vit, x, spec.stride, 5)
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-5)



@pytest.mark.parametrize("name", DINO_NAMES)
def test_true_gmacs_at_512_agree_with_torchs_counter(name):
    """The count `regproxy flops` and docs/backbones.md give, against torch.utils.flop_counter (meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    from regproxy_cli.model.flops import count_flops

    spec = _declared_spec(name)
    ours = count_flops(spec, size=512).true_macs
    with torch.device("meta"):
        model = build_model(spec, 150, img_size=512 if spec.stride == 16 else 518).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 512, 512, device="meta"))
    assert ours == pytest.approx(counter.get_total_flops() / 2, rel=0.01)


@pytest.mark.parametrize("spec", TINY_DINO_SPECS, ids=lambda s: s.name)
def test_pretrained_weights_resolve_through_timms_names_from_the_hub_cache(spec, hub_cache):
    """`pretrained: true` asks timm for `timm/<name>.<tag>`; with the file in the Hub cache it loads offline. DINOv2's
    position embedding (stored for 37x37 at 518^2) is resized to the crop's grid without prefix rows."""
    from safetensors.torch import save_file

    from conftest import hub_snapshot

    arch = spec.pretrained.split(".")[0]
    source = timm.create_model(arch, num_classes=0, embed_dim=32, depth=2, num_heads=2)  # DINOv2: 518^2, 37x37
    _randomise(source)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(hub_snapshot(hub_cache, f"timm/{spec.pretrained}") / "model.safetensors"))
    model = build_model(spec, 3, pretrained=True, img_size=6 * spec.stride)
    vit = model.backbone.vit
    for name, tensor in state.items():
        if name == "pos_embed":
            expected = resample_abs_pos_embed(tensor, new_size=[6, 6], old_size=[37, 37], num_prefix_tokens=0,
                                              interpolation="bicubic", antialias=False)
            torch.testing.assert_close(vit.pos_embed, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(vit.state_dict()[name], tensor), name


@pytest.mark.parametrize("spec", TINY_DINO_SPECS, ids=lambda s: s.name)
def test_registers_and_layer_scale_are_not_weight_decayed(spec):
    from regproxy_cli.engine.train import param_groups

    model = build_model(spec.name, 3)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    gammas = {n for n in names.values() if "gamma" in n}
    assert len(gammas) == 4 and gammas | {"backbone.vit.reg_token", "backbone.vit.cls_token"} <= skipped
    assert "backbone.vit.blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}


def test_sliding_windows_at_stride_14_equal_a_naive_loop():
    """Windows of 70 (5 x 14) every 42 (3 x 14) over a 100 x 150 image: each window the model's own logits."""
    from regproxy_cli.inference.protocol import slide_logits

    torch.manual_seed(0)
    model = build_model("tiny-dinov2", 3).eval()
    image = torch.randn(1, 3, 100, 150)
    got = slide_logits(model, image, num_classes=3, window=(70, 70), stride=(42, 42), batch_size=4)
    total, count = torch.zeros(3, 100, 150), torch.zeros(100, 150)
    for y in (0, 30):  # 0, 42 -> the last window is moved back to end at the border (mmseg)
        for x in (0, 42, 80):
            with torch.no_grad():
                total[:, y:y + 70, x:x + 70] += model(image[..., y:y + 70, x:x + 70])[0]
            count[y:y + 70, x:x + 70] += 1
    torch.testing.assert_close(got[0], total / count, rtol=0, atol=1e-5)


def test_a_rotary_embedding_other_than_dinov3s_is_refused_in_one_line():
    """EVA-style axial rope (timm's RotaryEmbeddingCat) is computed differently; the wrapper must not guess."""
    from regproxy_cli.model.timm_vit import TimmViTBackbone

    vit = timm.create_model("vit_base_patch16_rope_224", num_classes=0, embed_dim=32, depth=2, num_heads=2,
                            dynamic_img_size=True)
    with pytest.raises(RegproxyError, match="only DINOv3's axial rotary embedding") as info:
        TimmViTBackbone(vit, m=1, stride=16)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["dinov3-s16-ade", "dinov3-s16-city", "dinov2-s14-ade", "dinov2-s14-city"])
def test_frozen_recipes_load_and_their_crops_and_windows_are_multiples_of_the_stride(name):
    from regproxy_cli.engine.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    spec = _declared_spec(config.model.backbone)
    assert config.model.freeze == "backbone" and config.model.pretrained
    assert config.data.crop_size % spec.stride == 0 and config.test.window_stride % spec.stride == 0
    assert config.model.m == (spec.m if name.endswith("ade") else 3)
