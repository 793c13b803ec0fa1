"""Publishing: `regproxy push` of a model directory, a training run and an authors' .pth through a fake HfApi (no
network), the model card's Hub metadata as huggingface_hub parses it, and `regproxy convert --all` of the cached
authors' releases."""

import hashlib
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import model_index_to_eval_results
from typer.testing import CliRunner

from authors import authors_forward, authors_meta, authors_state_dict
from regproxy_cli import RegproxyError, build_model
from regproxy_cli.cli.app import app, main
from regproxy_cli.hub import remote
from regproxy_cli.hub.checkpoint import load_pretrained, model_card, save_pretrained
from regproxy_cli.hub.remote import push_to_hub
from regproxy_cli.hub.zoo import ZOO, ZooEntry
from regproxy_cli.model.config import ModelConfig

runner = CliRunner()


class FakeHub:
    """Stands in for HfApi: records every call, and keeps a copy of each uploaded folder (the upload may come
    from a temporary folder that is gone afterwards)."""

    def __init__(self, tmp_path: Path, error: Exception | None = None):
        self.calls, self.uploads, self.root, self.error = [], [], tmp_path / "hub-uploads", error

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, **kwargs):
                hub.calls.append(("create_repo", repo_id, kwargs))
                if hub.error is not None:
                    raise hub.error

            def create_branch(self, repo_id, **kwargs):
                hub.calls.append(("create_branch", repo_id, kwargs))

            def upload_folder(self, *, folder_path, repo_id, **kwargs):
                hub.calls.append(("upload_folder", repo_id, kwargs))
                kept = hub.root / str(len(hub.uploads))
                shutil.copytree(folder_path, kept)
                hub.uploads.append(kept)
                return f"https://huggingface.co/{repo_id}/commit/abc"

        return Api()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    return fake


def _tiny_model(dataset="cityscapes", metrics=None):
    model = build_model("tiny-vit", 3)
    model.config.dataset = dataset
    model.config.metrics = dict(metrics or {})
    return model


def _card(folder: Path) -> tuple[dict, str]:
    """The uploaded card's metadata as huggingface_hub reads it, and its text."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    return ModelCard(text).data.to_dict(), text


def test_cli_passes_model_repo_private_and_revision(monkeypatch, tmp_path):
    pushed = []
    monkeypatch.setattr(remote, "push_to_hub", lambda *a, **k: pushed.append((a, k)) or "https://hub/commit/1")
    result = runner.invoke(app, ["push", "--model", str(tmp_path / "m"), "me/tiny", "--private", "--revision", "dev"])
    assert result.exit_code == 0, result.output
    assert pushed == [((tmp_path / "m", "me/tiny"), {"private": True, "revision": "dev"})]
    assert "pushed" in result.output and "https://hub/commit/1" in result.output
    assert "deprecated" not in result.stderr
    result = runner.invoke(app, ["push", "me/tiny", "-m", str(tmp_path / "m")])
    assert result.exit_code == 0 and pushed[1] == ((tmp_path / "m", "me/tiny"), {"private": False, "revision": None})


def test_cli_keeps_the_positional_model_for_one_release_with_a_deprecation_line(monkeypatch, tmp_path):
    pushed = []
    monkeypatch.setattr(remote, "push_to_hub", lambda *a, **k: pushed.append((a, k)) or "https://hub/commit/1")
    result = runner.invoke(app, ["push", str(tmp_path / "m"), "me/tiny", "--private"])
    assert result.exit_code == 0, result.output
    assert pushed == [((tmp_path / "m", "me/tiny"), {"private": True, "revision": None})]
    (line,) = result.stderr.splitlines()
    assert line.startswith("deprecated:") and "regproxy push --model MODEL REPO_ID" in line
    assert "deprecated" not in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["me/tiny"], "push needs the model: regproxy push --model MODEL REPO_ID"),
    (["--model", "a", "b", "me/tiny"], "push takes one REPO_ID, got b me/tiny"),
    (["a", "b", "me/tiny"], "push takes one REPO_ID, got a b me/tiny"),
])
def test_cli_names_a_missing_or_doubled_model(monkeypatch, argv, message):
    monkeypatch.setattr(remote, "push_to_hub", lambda *a, **k: pytest.fail("nothing is uploaded"))
    result = runner.invoke(app, ["push", *argv])
    assert result.exit_code == 1 and message in str(result.exception)


def test_push_a_model_directory(hub, tmp_path):
    save_pretrained(_tiny_model(), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    result = runner.invoke(app, ["push", "--model", str(tmp_path / "m"), "me/tiny", "--private", "--revision", "v1"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert hub.calls == [
        ("create_repo", "me/tiny", {"private": True, "exist_ok": True}),
        ("create_branch", "me/tiny", {"branch": "v1", "exist_ok": True}),
        ("upload_folder", "me/tiny", {"revision": "v1", "commit_message": "Upload regproxy model"}),
    ]
    (uploaded,) = hub.uploads
    assert {p.name: p.read_bytes() for p in uploaded.iterdir()} == before  # the directory, card included, as is
    runner.invoke(app, ["push", "-m", str(tmp_path / "m"), "me/tiny"])
    assert hub.calls[3:] == [("create_repo", "me/tiny", {"private": False, "exist_ok": True}),
                             ("upload_folder", "me/tiny", {"revision": None, "commit_message": "Upload regproxy model"})]
    push_to_hub(tmp_path / "m" / "model.safetensors", "me/tiny")  # the weights file names its directory
    assert {p.name: p.read_bytes() for p in hub.uploads[-1].iterdir()} == before


def test_push_a_training_run_takes_best_and_puts_its_config_in_the_card(hub, tmp_path):
    run = tmp_path / "runs" / "x"
    metrics = {"mIoU": 61.25, "mAcc": 70.5, "aAcc": 88.75, "iteration": 40}
    model = _tiny_model("cityscapes", metrics)
    save_pretrained(model, run / "best")
    training = {"model": {"backbone": "tiny-vit", "region_res": 4}, "optim": {"lr": 6e-05, "iters": 40}}
    (run / "config.yaml").write_text(yaml.safe_dump(training, sort_keys=False))
    own_card = (run / "best" / "README.md").read_bytes()

    assert push_to_hub(run, "me/run") == "https://huggingface.co/me/run/commit/abc"
    (uploaded,) = hub.uploads
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (uploaded / "model.safetensors").read_bytes() == (run / "best" / "model.safetensors").read_bytes()
    meta, text = _card(uploaded)
    assert meta["library_name"] == "regproxy" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["license"] == "apache-2.0" and "regproxy" in meta["tags"] and meta["datasets"] == ["cityscapes"]
    name, results = model_index_to_eval_results(meta["model-index"])  # raises on a malformed model-index
    assert name == "RegProxy (h×w = 4×4) on tiny-vit"
    assert {(r.metric_type, r.metric_value) for r in results} == {("mIoU", 61.25), ("mAcc", 70.5), ("aAcc", 88.75)}
    assert {(r.task_type, r.dataset_type, r.dataset_name) for r in results} == {
        ("image-segmentation", "cityscapes", "Cityscapes")}
    block = re.search(r"## Training config\n\n```yaml\n(.*?)```", text, re.DOTALL)
    assert block and yaml.safe_load(block.group(1)) == training
    assert "| mIoU | 61.25 |" in text and "| iteration | 40 |" in text  # the measured table keeps every value
    bibtex = re.search(r"```bibtex\n(.*?)```", text, re.DOTALL).group(1)
    assert "title     = {Semantic Segmentation by Early Region Proxy}" in bibtex
    assert "author    = {Yifan Zhang and Bo Pang and Cewu Lu}" in bibtex and "year      = {2022}" in bibtex
    # the run is left as it was: its own card, no staging folder
    assert (run / "best" / "README.md").read_bytes() == own_card
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.yaml"]
    # pushing RUN/best directly is the same model with the same card
    push_to_hub(run / "best", "me/run")
    assert (hub.uploads[1] / "README.md").read_text(encoding="utf-8") == text


def test_push_an_authors_checkpoint_converts_it_first(hub, tmp_path):
    state = authors_state_dict(width=32, depth=2, num_classes=6, grid=4, prefix=1)
    meta = authors_meta(tap=0, num_classes=6, mode="whole", crop=64, classes="abcdef")
    torch.save({"meta": meta, "state_dict": state}, tmp_path / "a.pth")
    result = runner.invoke(app, ["push", "--model", str(tmp_path / "a.pth"), "me/authors"])
    assert result.exit_code == 0, (result.output, result.exception)
    (uploaded,) = hub.uploads
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = load_pretrained(uploaded)
    assert model.config.classes == list("abcdef") and model.config.m == 1
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(img), authors_forward(state, img, depth=2, heads=2, tap=0),
                                   rtol=1e-4, atol=1e-4)
    assert _card(uploaded)[0]["library_name"] == "regproxy"


@pytest.mark.parametrize("dataset, metrics, expected", [
    ("ade20k", {"mIoU": 47.6, "mIoU (ms+flip)": 48.5},  # a zoo entry's
     {("mIoU", "mIoU", 47.6), ("mIoU", "mIoU (ms+flip)", 48.5)}),
    ("ade20k", {}, None),  # nothing measured: no model index
    (None, {"mIoU": 10.0}, None),  # measured on an unknown dataset: no model index
])
def test_card_model_index_holds_the_configs_metrics(dataset, metrics, expected):
    config = ModelConfig(backbone="tiny-vit", num_classes=3, m=1, dataset=dataset, metrics=metrics)
    meta = ModelCard(model_card(config)).data.to_dict()
    assert meta["library_name"] == "regproxy" and meta["pipeline_tag"] == "image-segmentation"
    assert meta.get("datasets") == ([dataset] if dataset else None)
    if expected is None:
        assert "model-index" not in meta
    else:
        _, results = model_index_to_eval_results(meta["model-index"])
        assert {(r.metric_type, r.metric_name, r.metric_value) for r in results} == expected
        assert {r.dataset_name for r in results} == {"ADE20K"}


@pytest.mark.parametrize("error, message", [
    (HfHubHTTPError("401 Client Error: Unauthorized",
                    response=type("R", (), {"status_code": 401, "headers": {}, "request": None})()),
     r"cannot push to me/tiny \(revision dev\) on the Hugging Face Hub \(HTTP 401.*hf auth login"),
    (OSError("Name or service not known"), r"cannot push to me/tiny .*Name or service not known.*network"),
])
def test_hub_failures_are_one_line(hub, tmp_path, error, message):
    hub.error = error
    save_pretrained(_tiny_model(), tmp_path / "m")
    with pytest.raises(RegproxyError, match=message) as info:
        push_to_hub(tmp_path / "m", "me/tiny", revision="dev")
    assert "\n" not in str(info.value) and hub.uploads == []


def test_nothing_is_uploaded_for_a_missing_path(hub, tmp_path):
    with pytest.raises(RegproxyError, match="no such file or directory"):
        push_to_hub(tmp_path / "nowhere", "me/tiny")
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(RegproxyError, match="is a file, not a model directory"):
        push_to_hub(tmp_path / "m.onnx", "me/tiny")
    (tmp_path / "run").mkdir()
    with pytest.raises(RegproxyError, match="config.json is missing"):  # a run without a model yet
        push_to_hub(tmp_path / "run", "me/tiny")
    assert hub.calls == []


TINY_ENTRIES = [ZooEntry("tiny-ade", "tiny-vit", "ade20k", 1, 64, "adeid", 1.5, 2.5),
                ZooEntry("tiny-deit-ade", "tiny-deit", "ade20k", 1, 64, "deitid", 3.5, 4.5),
                ZooEntry("tiny-missing", "tiny-vit", "cityscapes", 1, 64, "missingid", 5.5, 6.5)]


@pytest.fixture
def tiny_zoo():
    """Only tiny entries in the zoo (the real ones are full size), the real zoo back afterwards in its order."""
    saved = dict(ZOO)
    ZOO.clear()
    ZOO.update({entry.name: entry for entry in TINY_ENTRIES})
    yield
    ZOO.clear()
    ZOO.update(saved)


def test_convert_all_converts_the_cached_releases(tmp_path, monkeypatch, tiny_zoo):
    cache = tmp_path / "cache"
    monkeypatch.setenv("REGPROXY_CACHE", str(cache))
    (cache / "authors").mkdir(parents=True)
    states = {"tiny-ade": authors_state_dict(width=32, depth=2, num_classes=150, grid=4, prefix=1),
              "tiny-deit-ade": authors_state_dict(width=32, depth=2, num_classes=150, grid=4, prefix=2)}
    for name, state in states.items():
        torch.save({"meta": {}, "state_dict": state}, cache / "authors" / f"{name}.pth")

    result = runner.invoke(app, ["convert", "--all", str(tmp_path / "mirror")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted(p.name for p in (tmp_path / "mirror").iterdir()) == ["tiny-ade", "tiny-deit-ade"]
    img = torch.randn(1, 3, 64, 64)
    for entry in TINY_ENTRIES[:2]:
        model = load_pretrained(tmp_path / "mirror" / entry.name)
        assert model.config == entry.config()  # the zoo entry's settings and paper metrics
        with torch.no_grad():
            torch.testing.assert_close(model(img), authors_forward(states[entry.name], img, depth=2, heads=2, tap=0),
                                       rtol=1e-4, atol=1e-4)
        original = cache / "authors" / f"{entry.name}.pth"  # checked as --model NAME checks it: sha256 recorded
        recorded = (cache / "authors" / f"{entry.name}.pth.sha256").read_text().split()[0]
        assert recorded == hashlib.sha256(original.read_bytes()).hexdigest()
    rows = {line.split()[1]: line for line in result.output.splitlines() if re.match(r"\W*tiny-", line)}
    assert "converted" in rows["tiny-ade"] and str(tmp_path / "mirror" / "tiny-ade") in rows["tiny-ade"]
    assert "converted" in rows["tiny-deit-ade"]
    assert "missing" in rows["tiny-missing"] and str(cache / "authors" / "tiny-missing.pth") in rows["tiny-missing"]
    assert "https://drive.google.com/file/d/missingid/view" in rows["tiny-missing"]
    assert "2 converted, 1 missing" in result.output


@pytest.mark.parametrize("argv, message", [
    (["convert", "--all", "d", "a.pth"], "error: --all DIR converts the cached zoo releases: give no SOURCE"),
    (["convert", "--all", "d", "--zoo", "s16-ade"], "error: --all DIR uses each zoo entry's settings"),
    (["convert", "a.pth"], "error: give the authors' .pth SOURCE and the DESTINATION directory (or --all DIR)"),
    (["convert"], "error: give the authors' .pth SOURCE and the DESTINATION directory (or --all DIR)"),
])
def test_convert_bad_combinations_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.startswith(message) and len(err.strip().splitlines()) == 1
