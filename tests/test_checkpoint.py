"""The model directory format: bit-exact round trip, the model card, clear errors for broken directories."""

import json
import re

import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY_HYBRID, TINY_VIT
from regproxy_cli import RegproxyError, build_model
from regproxy_cli.hub.checkpoint import load_pretrained, save_pretrained
from regproxy_cli.model.config import ModelConfig


@pytest.mark.parametrize("spec, kwargs", [(TINY_VIT, {"region_res": (2, 8)}), (TINY_HYBRID, {}),
                                          (TINY_VIT, {"baseline": True})], ids=["vit", "hybrid", "baseline"])
def test_round_trip_is_bit_exact(tmp_path, spec, kwargs):
    model = build_model(spec, 7, **kwargs)
    with torch.no_grad():  # make BN statistics non-trivial
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    model.config.classes = [f"thing {i}" for i in range(7)]
    model.config.metrics = {"mIoU": 12.5}
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert not loaded.training and type(loaded) is type(model)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert loaded.config == model.config
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_config_json_and_card(tmp_path):
    model = build_model(TINY_VIT, 3)
    model.config.dataset = "ade20k"
    save_pretrained(model, tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("backbone", "m", "region_res", "classes", "palette", "mean", "std", "crop_size", "inference_mode",
                "window_stride", "test_scale", "dataset", "metrics"):
        assert key in data
    assert data["backbone"] == "tiny-vit" and data["num_classes"] == 3 and data["m"] == 1
    assert data["region_res"] == [4, 4] and data["baseline"] is False and data["crop_size"] == 64
    assert data["mean"] == [123.675, 116.28, 103.53] and data["std"] == [58.395, 57.12, 57.375]  # ImageNet, RGB 0-255
    assert data["dataset"] == "ade20k" and data["metrics"] == {} and len(data["classes"]) == len(data["palette"]) == 3
    card = (tmp_path / "m" / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    assert front.startswith("---\n")
    meta = yaml.safe_load(front.removeprefix("---\n"))
    assert meta["library_name"] == "regproxy" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["datasets"] == ["ade20k"] and "model-index" not in meta  # no metrics yet: nothing to index
    body_lines = body.splitlines()
    assert "# RegProxy (h×w = 4×4) on tiny-vit" in body_lines
    assert "- backbone: `tiny-vit`, token-head depth M = 1" in body_lines
    assert "- classes: 3 (ade20k)" in body_lines
    assert "- normalisation: mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375] on RGB 0-255" in body_lines
    assert not list((tmp_path / "m").glob(".*tmp"))  # no leftovers of the atomic writes


def test_broken_directories_give_one_line_errors(tmp_path):
    with pytest.raises(RegproxyError, match="config.json is missing"):
        load_pretrained(tmp_path)
    save_pretrained(build_model(TINY_VIT, 3), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "colour": "blue"}))
    with pytest.raises(RegproxyError, match="unknown key\\(s\\) colour"):
        load_pretrained(tmp_path / "m")
    config.write_text(json.dumps({**data, "num_classes": 4, "classes": list("abcd"), "palette": [[0, 0, 0]] * 4}))
    with pytest.raises(RegproxyError, match="weights do not fit the model: shape mismatch: head.classifier.weight"):
        load_pretrained(tmp_path / "m")
    config.write_text("{not json")
    with pytest.raises(RegproxyError, match="config.json: cannot read the JSON"):
        load_pretrained(tmp_path / "m")
    config.write_text(json.dumps(data))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RegproxyError, match="cannot read weights"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("change, message", [
    ({"num_classes": 10**9}, "key num_classes: must be <= 65535, got 1000000000"),
    ({"num_classes": -3}, "key num_classes: must be >= 1, got -3"),
    ({"num_classes": "3"}, "key num_classes: expected int, got '3'"),
    ({"crop_size": -64}, "key crop_size: must be >= 1, got -64"),
    ({"test_scale": [2048, -1]}, r"key test_scale\[1\]: must be >= 1, got -1"),
    ({"palette": [[0, 0, 0], [999, 0, 0], [1, 2, 3]]}, r"key palette\[1\]\[0\]: must be <= 255, got 999"),
    ({"palette": [[0, 0], [9, 0, 0], [1, 2, 3]]}, r"key palette\[0\]: expected 3 values, got 2"),
    ({"mean": "imagenet"}, "key mean: expected a list, got 'imagenet'"),
    ({"std": [0, 0, 0]}, r"key std\[0\]: must be > 0, got 0.0"),
    ({"format_version": "1"}, "key format_version: expected int, got '1'"),
    ({"inference_mode": "tiles"}, "key inference_mode: 'tiles' is not one of whole, slide"),
    ({"baseline": "no"}, "key baseline: expected bool, got 'no'"),
])
def test_model_config_json_is_validated_at_load_one_line_naming_the_key(tmp_path, change, message):
    save_pretrained(build_model(TINY_VIT, 3), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(RegproxyError, match=f"^{re.escape(str(config))}: {message}") as caught:
        load_pretrained(tmp_path / "m")
    assert "\n" not in str(caught.value)


def test_model_config_json_top_level_must_be_a_mapping(tmp_path, cli):
    save_pretrained(build_model(TINY_VIT, 3), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps([json.loads(config.read_text())]))
    with pytest.raises(RegproxyError, match="config.json: expected a mapping of keys to values, got list"):
        load_pretrained(tmp_path / "m")
    config.write_text(json.dumps({**json.loads(config.read_text())[0], "std": [0, 0, 0]}))
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    result = cli("predict", str(image), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {config}: key std[0]: must be > 0, got 0.0"]
    assert not (tmp_path / "out").exists()


def test_config_validation():
    with pytest.raises(RegproxyError, match="3 classes but 2 names"):
        ModelConfig(backbone="s16", num_classes=3, m=5, classes=["a", "b"])
    with pytest.raises(RegproxyError, match="inference mode"):
        ModelConfig(backbone="s16", num_classes=3, m=5, inference_mode="tiles")


def test_push_to_hub_uploads_a_loadable_directory(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, revision, commit_message):
            calls.append(("upload", sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()), repo_id,
                          revision))
            return "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from regproxy_cli.hub.remote import push_to_hub

    save_pretrained(build_model(TINY_VIT, 3), tmp_path / "m")
    assert push_to_hub(tmp_path / "m", "me/tiny", private=True) == "https://huggingface.co/me/tiny/commit/abc"
    assert calls == [("token", None), ("create", "me/tiny", True, True),
                     ("upload", ["README.md", "config.json", "model.safetensors"], "me/tiny", None)]
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(RegproxyError, match="model.safetensors is missing"):
        push_to_hub(tmp_path / "m", "me/tiny")
