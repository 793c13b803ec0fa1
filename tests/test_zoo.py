"""Resolving --model: zoo names, Hub repo ids (through a local fake Hub cache, offline), local files, and the
fallback to the authors' release, converted on the fly and cached."""

import pytest
import torch

from authors import authors_state_dict
from conftest import hub_snapshot
from regproxy_cli import RegproxyError, build_model
from regproxy_cli.io import zoo as zoo_module
from regproxy_cli.io.checkpoint import save_pretrained
from regproxy_cli.io.zoo import ZOO, ZooEntry, load_model


@pytest.fixture
def caches(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("REGPROXY_CACHE", str(tmp_path / "regproxy"))
    return hub_cache, tmp_path / "regproxy"


def _publish_to_fake_hub(hub, repo_id: str, model) -> None:
    save_pretrained(model, hub_snapshot(hub, repo_id))


def test_zoo_entries_follow_the_paper_and_the_official_configs():
    assert list(ZOO) == ["t16-ade", "s16-ade", "r26-s32-ade", "b16-ade", "r50-l32-ade", "l16-ade",
                         "t16-city", "s16-city", "b16-city", "l16-city"]
    s16 = ZOO["s16-ade"].config()
    assert (s16.m, s16.crop_size, s16.stride, s16.test_scale, s16.num_classes) == (5, 512, 512, (2048, 512), 150)
    assert s16.classes[0] == "wall" and s16.metrics == {"mIoU": 47.6, "mIoU (ms+flip)": 48.5}
    l16 = ZOO["l16-city"].config()
    assert (l16.m, l16.crop_size, l16.stride, l16.test_scale, l16.num_classes) == (6, 768, 512, (2048, 1024), 19)
    assert ZOO["r50-l32-ade"].config().test_scale == (2048, 640) and ZOO["r26-s32-ade"].m == 0
    assert ZOO["b16-city"].config().classes[-1] == "bicycle"


def test_hub_repo_id_loads_from_the_cache_offline(caches):
    hub, _ = caches
    model = build_model("tiny-vit", 4)
    _publish_to_fake_hub(hub, "someone/tiny-seg", model)
    loaded = load_model("someone/tiny-seg")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_hub_repo_offline_without_cache_is_a_clear_error(caches):
    hub, _ = caches
    with pytest.raises(RegproxyError) as info:
        load_model("someone/not-cached")
    message = str(info.value)
    assert "hf download someone/not-cached" in message and str(hub) in message and "\n" not in message


def test_zoo_name_offline_with_nothing_cached_says_what_to_fetch(caches):
    _, cache = caches
    with pytest.raises(RegproxyError) as info:
        load_model("s16-ade")
    message = str(info.value)
    assert "drive.google.com/file/d/1pJD4-xRiVj36SplzNhonIuNHd82A05GX" in message
    assert str(cache / "authors" / "s16-ade.pth") in message and "hf download regproxy/s16-ade" in message


def test_zoo_name_prefers_the_hub(caches, monkeypatch):
    hub, _ = caches
    entry = ZooEntry("tiny-ade", "tiny-vit", "ade20k", 1, 64, "driveid", 1.0, 2.0)
    monkeypatch.setitem(ZOO, "tiny-ade", entry)
    model = build_model("tiny-vit", 150)
    _publish_to_fake_hub(hub, entry.hub_repo, model)
    assert torch.equal(load_model("tiny-ade").head.classifier.weight, model.head.classifier.weight)


def test_zoo_falls_back_to_the_authors_release_and_caches_the_conversion(caches, monkeypatch, tmp_path):
    _, cache = caches
    entry = ZooEntry("tiny-ade", "tiny-vit", "ade20k", 1, 64, "driveid", 1.0, 2.0)
    monkeypatch.setitem(ZOO, "tiny-ade", entry)
    state = authors_state_dict(width=32, depth=2, num_classes=150, grid=4, prefix=1)
    release = tmp_path / "release.pth"
    torch.save({"meta": {}, "state_dict": state}, release)
    monkeypatch.setattr(zoo_module, "_offline", lambda: False)
    monkeypatch.setattr(zoo_module, "AUTHORS_URL", release.as_uri())
    model = load_model("tiny-ade")
    assert (cache / "authors" / "tiny-ade.pth").is_file()
    assert (cache / "converted" / "tiny-ade" / "model.safetensors").is_file()
    assert model.config.dataset == "ade20k" and model.config.metrics["mIoU"] == 1.0
    torch.testing.assert_close(model.head.classifier.weight, state["decode_head.mlp.0.0.weight"])
    release.unlink()  # the second time comes from the converted cache, no download
    again = load_model("tiny-ade")
    assert torch.equal(again.head.classifier.weight, model.head.classifier.weight)


def test_a_web_page_instead_of_the_checkpoint_is_reported(caches, monkeypatch, tmp_path):
    _, cache = caches
    monkeypatch.setitem(ZOO, "tiny-ade", ZooEntry("tiny-ade", "tiny-vit", "ade20k", 1, 64, "driveid", 1.0, 2.0))
    page = tmp_path / "page.html"
    page.write_text("<html>Google Drive can't scan this file for viruses</html>")
    monkeypatch.setattr(zoo_module, "_offline", lambda: False)
    monkeypatch.setattr(zoo_module, "AUTHORS_URL", page.as_uri())
    with pytest.raises(RegproxyError, match="download https://drive.google.com/file/d/driveid/view by hand"):
        load_model("tiny-ade")
    assert not (cache / "authors" / "tiny-ade.pth").exists()


def test_unreachable_download_is_one_line(caches, monkeypatch):
    monkeypatch.setitem(ZOO, "tiny-ade", ZooEntry("tiny-ade", "tiny-vit", "ade20k", 1, 64, "driveid", 1.0, 2.0))
    monkeypatch.setattr(zoo_module, "_offline", lambda: False)
    monkeypatch.setattr(zoo_module, "AUTHORS_URL", "http://127.0.0.1:9/{id}")  # discard port: refused at once
    with pytest.raises(RegproxyError, match="cannot download tiny-ade"):
        load_model("tiny-ade")


def test_local_directory_file_and_unknown_specs(tmp_path):
    model = build_model("tiny-vit", 3)
    save_pretrained(model, tmp_path / "m")
    assert load_model(tmp_path / "m").config.backbone == "tiny-vit"
    assert load_model(str(tmp_path / "m" / "model.safetensors")).config.num_classes == 3
    with pytest.raises(RegproxyError, match="unknown model 'nope'.*s16-ade.*owner/name"):
        load_model("nope")


def test_models_cli_lists_the_zoo(cli):
    result = cli("models", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for name in ZOO:
        assert name in result.stdout
    assert "47.6" in result.stdout and "82.7" in result.stdout
