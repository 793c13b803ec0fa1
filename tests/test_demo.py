"""`regproxy demo`: the page's functions against predict, and the real server: a gradio_client call and the page
in headless Chromium, all on a loopback port."""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from browser import Browser, chromium
from PIL import Image

from regproxy_cli import RegproxyError, build_model
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.viz import overlay
from regproxy_cli.web import demo

GREEN = (0, 255, 0)  # every class's colour in the served model: the overlay of a black image is (0, 128, 0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model_classes():
    return ["sky", "tree", "road"]


def test_segmentation_matches_predict(model):
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    labels, confidence = demo.segment_with_confidence(model, image, "whole")
    assert labels.shape == confidence.shape == (70, 90)
    expected = predict_labels(model, image, mode="whole")
    assert (labels == expected).mean() > 0.999  # float ties aside, predict's labels
    assert np.all((confidence >= 1 / 3 - 1e-6) & (confidence <= 1))  # a max of 3 probabilities
    tta_labels, _ = demo.segment_with_confidence(model, image, "tta")
    assert (tta_labels == predict_labels(model, image, tta=True)).mean() > 0.999  # in the model's own mode


def test_segment_shrinks_large_uploads_and_draws_regions(model):
    image = np.zeros((300, 2000, 3), np.uint8)
    result = demo.segment(model, image)
    assert result.labels.shape == (154, 1024) and result.image.shape == (154, 1024, 3)
    assert result.regions is not None and result.regions.shape == (154, 1024, 3)


def test_demo_runs_the_network_at_the_precision_asked(model, monkeypatch):
    """--precision reaches the page: the network runs under predict's autocast at bf16 (labels as predict's bf16
    ones); fp16 on a CPU is the one error line predict gives."""
    image = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    seen = []
    real_autocast = demo.autocast
    monkeypatch.setattr(demo, "autocast", lambda device, precision: seen.append(precision) or real_autocast(
        device, precision))
    result = demo.segment(model, image, "whole", "bf16")
    assert seen == ["bf16"]
    assert (result.labels == predict_labels(model, image, mode="whole", precision="bf16")).mean() > 0.99
    with pytest.raises(RegproxyError, match="fp16 needs a CUDA device"):
        demo.segment(model, image, "whole", "fp16")


def test_class_table_and_confidence_colours():
    labels = np.array([[0, 0, 2], [2, 2, 2]])
    rows = demo.class_shares(labels, ["a", "b", "c"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    assert [(r.name, r.percent, r.colour) for r in rows] == [("c", 66.67, "#0000ff"), ("a", 33.33, "#ff0000")]
    ramp = demo.confidence_picture(np.linspace(0, 1, 11)[None])
    lightness = ramp.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lightness[0]) > 0)  # brighter means more confident, monotonically
    assert tuple(ramp[0, 0]) == tuple(demo.CONFIDENCE_RAMP[0]) and tuple(ramp[0, -1]) == tuple(demo.CONFIDENCE_RAMP[-1])


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RegproxyError, match=f"cannot listen on 127.0.0.1:{port}: in use"):
            demo.check_port("127.0.0.1", port)


def test_missing_gradio_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(RegproxyError, match=r"pip install 'regproxy\[demo\]'"):
        demo.import_gradio()


def test_examples_folder_errors(tmp_path):
    with pytest.raises(RegproxyError, match="not a directory"):
        demo.example_images(tmp_path / "missing", tmp_path)
    with pytest.raises(RegproxyError, match="no images"):
        demo.example_images(tmp_path, tmp_path)
    generated = demo.example_images(None, tmp_path, count=2)
    assert [p.name for p in generated] == ["scene_0.png", "scene_1.png"] and all(p.is_file() for p in generated)


def test_cli_refuses_a_port_in_use(cli, tmp_path, model):
    save_pretrained(model, tmp_path / "m")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("demo", "--model", str(tmp_path / "m"), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1 and "in use" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory, model):
    """`regproxy demo` in a subprocess on a free loopback port, its one example a black image."""
    root = tmp_path_factory.mktemp("demo")
    green = build_model("tiny-vit", 3)
    green.load_state_dict(model.state_dict())
    green.config.classes, green.config.palette = ["sky", "tree", "road"], [list(GREEN)] * 3
    save_pretrained(green.eval(), root / "model")
    (root / "examples").mkdir()
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(root / "examples" / "black.png")
    port = _free_port()
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "regproxy_cli", "demo", "--model", str(root / "model"),
                                   "--port", str(port), "--examples", str(root / "examples"), "--device", "cpu"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while "(Ctrl+C stops it)" not in (root / "server.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the demo did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/", root, green
        server.terminate()
        server.wait(timeout=30)


def test_demo_answers_gradio_client(served, tmp_path):
    from gradio_client import Client, handle_file

    url, _, model = served
    image = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
    shown, regions, confidence, table, summary = client.predict(
        handle_file(str(tmp_path / "photo.png")), "whole", 0.5, api_name="/segment")
    labels = predict_labels(model, image, mode="whole")
    expected = overlay(image, labels, model.config.palette, 0.5)
    got = np.asarray(Image.open(shown).convert("RGB"))
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1
    assert np.asarray(Image.open(regions)).shape[:2] == (64, 80)
    assert np.asarray(Image.open(confidence)).shape[:2] == (64, 80)
    assert "80×64 px" in summary and "whole image" in summary
    present = {model.config.classes[i] for i in np.unique(labels)}
    assert {row[1] for row in table["data"]} == present


OVERLAY_SHOWN = ("(() => { const images = [...document.querySelectorAll('#overlay img')];"
                 " return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0)"
                 " && !document.body.innerText.includes('processing'); })()")


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed here (.ci/run installs it)")
def test_the_page_shows_the_result_in_chromium(served, tmp_path):
    url, root, _ = served
    with Browser() as browser:
        browser.open(url)
        assert browser.wait_for(OVERLAY_SHOWN, timeout=120), "the overlay never appeared"
        shot = browser.screenshot(tmp_path / "page.png")
        text = browser.evaluate("document.body.innerText")
    page = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    overlay_green = np.all(np.abs(page - (0, 128, 0)) <= 3, axis=-1)  # the black example under green classes
    assert overlay_green.sum() > 2000, "the screenshot does not show the overlay of the example"
    assert "classes present" in text and "128×96 px, whole image" in text
    shutil.copy(shot, root / "page.png")  # kept next to the server log


def test_the_demo_serves_copies_of_the_examples_only_and_removes_its_files(tmp_path, model):
    """A secret beside an example is not reachable over HTTP; the example's copy is (the same route, so the refusal
    is not an accident of the URL); after SIGTERM nothing of the demo is left in its temporary folder."""
    import urllib.error
    import urllib.request

    from gradio_client import Client, handle_file

    save_pretrained(model, tmp_path / "model")
    examples = tmp_path / "examples"
    (examples / "notes").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(examples / "black.png")
    (examples / ".env").write_text("API_KEY=hunter2")
    (examples / "notes" / "secret.txt").write_text("hunter2")
    system_tmp = tmp_path / "tmp"
    system_tmp.mkdir()
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(system_tmp), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"}
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "regproxy_cli", "demo", "--model", str(tmp_path / "model"),
                                   "--port", str(port), "--examples", str(examples), "--device", "cpu"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "(Ctrl+C stops it)" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/gradio_api/file="

        def get(path) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"{url}{path}", timeout=30) as answer:
                    return answer.status, answer.read()
            except urllib.error.HTTPError as error:
                return error.code, b""

        (scratch,) = system_tmp.glob("regproxy-demo-*")
        (copy,) = scratch.glob("examples-*/*black.png")
        assert get(copy) == (200, copy.read_bytes())
        for secret in (examples / ".env", examples / "notes" / "secret.txt", examples / "black.png",
                       copy.parent / ".." / ".." / ".." / "examples" / ".env"):
            status, body = get(secret)
            assert status != 200 and b"hunter2" not in body, secret
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(tmp_path / "upload.png")
        client.predict(handle_file(str(tmp_path / "upload.png")), "whole", 0.5, api_name="/segment")
        assert any((scratch / "gradio").rglob("*.png"))  # the upload and results: in the demo's own folder
    finally:
        server.terminate()
        server.wait(timeout=30)
    # the copies, uploads and results are gone with the demo (regproxy-cache-*: the test suite's model cache;
    # .ses: onnxruntime's session id, written when torch 2.4's torch.onnx imports it on timm's torchvision import)
    assert [p.name for p in system_tmp.iterdir() if not p.name.startswith("regproxy-cache-") and p.name != ".ses"] == []
    assert sorted(p.name for p in examples.rglob("*")) == [".env", "black.png", "notes", "secret.txt"]
