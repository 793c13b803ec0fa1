"""Resolving --model: zoo names, Hub repo ids (through a local fake Hub cache, offline), local files, and the
fallback to the authors' release (only when the Hub does not have the model), downloaded with a sha256
check, converted on the fly and cached."""

import dataclasses
import functools
import hashlib
import http.server
import threading
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from authors import authors_state_dict
from conftest import hub_snapshot
from regproxy_cli import RegproxyError, build_model
from regproxy_cli.hub import remote as hub_module
from regproxy_cli.hub import zoo as zoo_module
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.hub.zoo import ZOO, ZooEntry, load_model, model_config

TINY_ADE = ZooEntry("tiny-ade", "tiny-vit", "ade20k", 1, 64, "driveid", 1.0, 2.0)


@pytest.fixture
def caches(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("REGPROXY_CACHE", str(tmp_path / "regproxy"))
    return hub_cache, tmp_path / "regproxy"


def _publish_to_fake_hub(hub, repo_id: str, model, tag: str | None = None) -> None:
    """A cached snapshot named by refs/main and, with ``tag``, by refs/<tag> too."""
    snapshot = hub_snapshot(hub, repo_id)
    if tag is not None:
        (snapshot.parent.parent / "refs" / tag).write_text(snapshot.name)
    save_pretrained(model, snapshot)


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
    monkeypatch.setitem(ZOO, "tiny-ade", TINY_ADE)
    model = build_model("tiny-vit", 150)
    _publish_to_fake_hub(hub, TINY_ADE.hub_repo, model, tag=TINY_ADE.hub_revision)
    assert torch.equal(load_model("tiny-ade").head.classifier.weight, model.head.classifier.weight)


def test_zoo_loads_its_pinned_hub_revision(caches, monkeypatch):
    """refs/main (a later push) and refs/v1 name different snapshots: the entry's revision decides."""
    hub, _ = caches
    monkeypatch.setitem(ZOO, "tiny-ade", TINY_ADE)
    assert TINY_ADE.hub_revision == "v1" and {e.hub_revision for e in ZOO.values()} == {"v1"}
    _publish_to_fake_hub(hub, TINY_ADE.hub_repo, build_model("tiny-vit", 150))  # main only
    with pytest.raises(RegproxyError, match="not cached and the network is off"):  # no v1 in the cache
        load_model("tiny-ade")
    pinned = build_model("tiny-vit", 150)
    revision = "fedcba9876543210fedcba9876543210fedcba98"
    repo = hub / "models--regproxy--tiny-ade"
    save_pretrained(pinned, repo / "snapshots" / revision)
    (repo / "refs" / "v1").write_text(revision)
    assert torch.equal(load_model("tiny-ade").head.classifier.weight, pinned.head.classifier.weight)


def test_model_config_finds_the_model_as_load_model_does_and_reads_only_its_config(caches, monkeypatch, tmp_path):
    """A model directory, its weights file, a Hub repo and a zoo model on the Hub: load_model's config, read from
    config.json; None where only loading tells (an authors' .pth, a zoo model the Hub lacks); load_model's errors."""
    hub, _ = caches
    model = build_model("tiny-vit", 4)
    model.config.classes = ["sky", "road", "car", "tree"]
    save_pretrained(model, tmp_path / "m")
    _publish_to_fake_hub(hub, "someone/tiny-seg", model)
    monkeypatch.setitem(ZOO, "tiny-ade", TINY_ADE)
    _publish_to_fake_hub(hub, TINY_ADE.hub_repo, build_model("tiny-vit", 150), tag=TINY_ADE.hub_revision)
    for spec in (tmp_path / "m", tmp_path / "m" / "model.safetensors", "someone/tiny-seg", "tiny-ade"):
        config = model_config(spec)
        assert config == load_model(spec).config and config.num_classes in (4, 150), spec
    assert model_config(tmp_path / "m").classes == ["sky", "road", "car", "tree"]
    (tmp_path / "authors.pth").write_bytes(b"an authors' checkpoint: only converting it tells its config")
    assert model_config(tmp_path / "authors.pth") is None
    assert model_config("s16-ade") is None  # offline with nothing cached: only the authors' release has it
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    for spec, message in ((tmp_path / "half", "model.safetensors is missing"), ("./nope", "no such file"),
                          ("someone/not-cached", "hf download someone/not-cached")):
        with pytest.raises(RegproxyError, match=message):
            model_config(spec)
        with pytest.raises(RegproxyError, match=message):
            load_model(spec)
    with pytest.raises(RegproxyError, match="is for ONNX models"):
        model_config(tmp_path / "m", provider="openvino")


@pytest.fixture
def release(caches, monkeypatch, tmp_path):
    """The authors' release of a tiny zoo entry, served over HTTP on 127.0.0.1; returns (state, file)."""
    monkeypatch.setitem(ZOO, "tiny-ade", TINY_ADE)
    served = tmp_path / "served"
    served.mkdir()
    state = authors_state_dict(width=32, depth=2, num_classes=150, grid=4, prefix=1)
    torch.save({"meta": {}, "state_dict": state}, served / "release.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(zoo_module, "_offline", lambda: False)
    monkeypatch.setattr(zoo_module, "AUTHORS_URL", f"http://127.0.0.1:{server.server_port}/release.pth?id={{id}}")
    yield state, served / "release.pth"
    server.shutdown()
    thread.join()


def test_zoo_falls_back_to_the_authors_release_and_caches_the_conversion(caches, release):
    _, cache = caches
    state, served = release
    model = load_model("tiny-ade")
    original = cache / "authors" / "tiny-ade.pth"
    assert original.read_bytes() == served.read_bytes()
    assert (cache / "converted" / "tiny-ade" / "model.safetensors").is_file()
    assert model.config.dataset == "ade20k" and model.config.metrics["mIoU"] == 1.0
    torch.testing.assert_close(model.head.classifier.weight, state["decode_head.mlp.0.0.weight"])
    served.unlink()  # the second time comes from the converted cache, no download
    again = load_model("tiny-ade")
    assert torch.equal(again.head.classifier.weight, model.head.classifier.weight)


@pytest.mark.parametrize("pinned", [False, True])
def test_the_first_download_records_its_sha256(caches, release, monkeypatch, pinned):
    _, cache = caches
    digest = hashlib.sha256(release[1].read_bytes()).hexdigest()
    if pinned:
        monkeypatch.setitem(ZOO, "tiny-ade", dataclasses.replace(TINY_ADE, sha256=digest))
    assert load_model("tiny-ade").config.source.startswith("the authors' release")
    record = cache / "authors" / "tiny-ade.pth.sha256"
    if pinned:  # the pin is the reference: nothing to record
        assert not record.exists()
    else:
        assert record.read_text() == f"{digest}  tiny-ade.pth\n"  # as `sha256sum` writes it


def test_a_download_with_the_wrong_pinned_sha256_is_refused(caches, release, monkeypatch):
    _, cache = caches
    monkeypatch.setitem(ZOO, "tiny-ade", dataclasses.replace(TINY_ADE, sha256="0" * 64))
    with pytest.raises(RegproxyError) as info:
        load_model("tiny-ade")
    assert "failed its sha256 check" in str(info.value) and "drive.google.com/file/d/driveid/view" in str(info.value)
    assert list((cache / "authors").iterdir()) == [] and not (cache / "converted").exists()


def test_a_cached_release_that_changed_is_refused(caches, release):
    _, cache = caches
    load_model("tiny-ade")
    original = cache / "authors" / "tiny-ade.pth"
    recorded = (cache / "authors" / "tiny-ade.pth.sha256").read_text()
    for path in (cache / "converted" / "tiny-ade").iterdir():  # so that the next load converts again
        path.unlink()
    other = authors_state_dict(width=32, depth=2, num_classes=150, grid=4, prefix=1)  # a valid but different file
    torch.save({"meta": {}, "state_dict": other}, original)
    with pytest.raises(RegproxyError) as info:
        load_model("tiny-ade")
    message = str(info.value)
    assert "not the recorded" in message and "download it again from https://drive.google.com/file/d/driveid/view" in message
    assert "\n" not in message and not original.exists() and not (cache / "converted" / "tiny-ade" / "config.json").exists()
    assert (cache / "authors" / "tiny-ade.pth.sha256").read_text() == recorded  # the first download stays the reference


def _fake_response(status: int):
    return SimpleNamespace(status_code=status, headers={}, request=None)


def _raising(error):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise error

    snapshot_download.calls = calls
    return snapshot_download


@pytest.mark.parametrize("error, message", [
    (HfHubHTTPError("401 Client Error: Unauthorized", response=_fake_response(401)), "HTTP 401.*hf auth login"),
    (HfHubHTTPError("500 Server Error: Internal Server Error", response=_fake_response(500)), "HTTP 500.*try again"),
    (OSError("Consistency check failed: file should be of size 100 but has size 7"), "Consistency check failed"),
])
def test_a_failing_hub_is_reported_not_replaced_by_the_authors_release(caches, release, monkeypatch, error, message):
    _, cache = caches
    fake = _raising(error)
    monkeypatch.setattr(hub_module, "snapshot_download", fake)
    with pytest.raises(RegproxyError, match=f"cannot download regproxy/tiny-ade \\(revision v1\\).*{message}") as info:
        load_model("tiny-ade")
    assert "\n" not in str(info.value)
    assert not (cache / "authors").exists()  # no fallback download
    assert fake.calls == [("regproxy/tiny-ade", {"revision": "v1", "allow_patterns": fake.calls[0][1]["allow_patterns"]})]


@pytest.mark.parametrize("error", [
    RepositoryNotFoundError("404 Client Error: Repository Not Found", response=_fake_response(404)),
    RevisionNotFoundError("404 Client Error: Revision Not Found", response=_fake_response(404)),
    EntryNotFoundError("404 Client Error: Entry Not Found"),
    LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
])
def test_a_hub_without_the_model_falls_back_to_the_authors_release(caches, release, monkeypatch, error):
    _, cache = caches
    monkeypatch.setattr(hub_module, "snapshot_download", _raising(error))
    assert load_model("tiny-ade").config.source.startswith("the authors' release")
    assert (cache / "authors" / "tiny-ade.pth").is_file()


def test_a_web_page_instead_of_the_checkpoint_is_reported(caches, monkeypatch, tmp_path):
    _, cache = caches
    monkeypatch.setitem(ZOO, "tiny-ade", TINY_ADE)
    page = tmp_path / "page.html"
    page.write_text("<html>Google Drive can't scan this file for viruses</html>")
    monkeypatch.setattr(zoo_module, "_offline", lambda: False)
    monkeypatch.setattr(zoo_module, "AUTHORS_URL", page.as_uri())
    with pytest.raises(RegproxyError, match="download https://drive.google.com/file/d/driveid/view by hand"):
        load_model("tiny-ade")
    assert not (cache / "authors" / "tiny-ade.pth").exists()
    assert not (cache / "authors" / "tiny-ade.pth.sha256").exists()  # a page is never trusted


def test_unreachable_download_is_one_line(caches, monkeypatch):
    monkeypatch.setitem(ZOO, "tiny-ade", TINY_ADE)
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
