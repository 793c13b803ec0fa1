"""``regproxy demo``: a local web page (Gradio) around one loaded model.

Upload an image or pick an example and see, side by side, the class overlay (with an opacity slider), the learned
regions (the paper's Figs. 6 and 8), the model's confidence (the winning class's probability) and a table of the
classes found with their pixel share and colour. The same segmentation is an HTTP endpoint named ``segment``
(``gradio_client.Client(url).predict(image, mode, opacity, api_name="/segment")``).

Nothing leaves the machine: Gradio's analytics and version check are turned off before it is imported, no share
link is made, server-side rendering (a Node process) is off, and the default theme's fonts are served by the page
itself. Gradio is optional (``pip install 'regproxy[demo]'``) and imported only when a page is built.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from regproxy_cli.constants import IMAGE_SUFFIXES, INFERENCE_MODES
from regproxy_cli.data.synthetic import SyntheticScenes
from regproxy_cli.errors import RegproxyError, require_extra
from regproxy_cli.images import load_image, save_png_atomic
from regproxy_cli.inference.predictor import device_of, normalise, to_rgb_array
from regproxy_cli.inference.protocol import TestProtocol, segment_probs
from regproxy_cli.inference.runtime import autocast, synchronize
from regproxy_cli.viz import overlay, predict_regions

MODES = (*INFERENCE_MODES, "tta")  # the demo's third: the paper's multi-scale + flip test
MODE_LABELS = {"whole": "whole image", "slide": "sliding windows", "tta": "TTA (multi-scale + flip)"}
MAX_SIDE = 1024  # larger uploads are shrunk first: the page shows them smaller anyway, and K x H x W probabilities
MAX_EXAMPLES = 12
GENERATED_EXAMPLES = 3
DEFAULT_OPACITY = 0.5
TABLE_COLUMNS = ("colour", "class", "id", "pixels %")
# Confidence 0 -> 1 as a dark-to-bright ramp (violet, blue, teal, green, yellow): readable, and monotone in lightness.
CONFIDENCE_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float32)


def import_gradio() -> Any:
    """The gradio module, with its analytics off; one error line naming the extra when it is not installed.

    Gradio's temporary files (uploads, results, its own folders) go to this process's :func:`demo_folder`, which
    is removed at exit, unless ``GRADIO_TEMP_DIR`` already names a place."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read once, at import: no usage reports, no version check
    if "gradio" not in sys.modules:
        os.environ.setdefault("GRADIO_TEMP_DIR", str(demo_folder() / "gradio"))  # some modules read it at import
    return require_extra("gradio", "demo", "regproxy demo")


_FOLDER: list[Path] = []


def demo_folder() -> Path:
    """This process's temporary folder for the demo (created once, removed at exit, SIGTERM included while
    :func:`serve` runs)."""
    if not _FOLDER:
        _FOLDER.append(Path(tempfile.mkdtemp(prefix="regproxy-demo-")))
        atexit.register(shutil.rmtree, _FOLDER[0], ignore_errors=True)
    return _FOLDER[0]


@dataclass
class Segmentation:
    """One image through the model: what the page shows is drawn from these."""

    image: np.ndarray  # (H, W, 3) uint8 RGB, the image segmented (after the MAX_SIDE shrink)
    labels: np.ndarray  # (H, W) int64 class ids
    confidence: np.ndarray  # (H, W) float32: the winning class's probability
    regions: np.ndarray | None  # (H, W, 3) uint8 picture of the learned regions; None for a model without a head
    mode: str
    seconds: float


@dataclass(frozen=True)
class ClassShare:
    """One row of the class table."""

    class_id: int
    name: str
    percent: float  # of the image's pixels
    colour: str  # "#rrggbb", the palette colour the overlay uses


def fit_size(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """``image`` shrunk (bilinear, aspect kept) so that its longer side is at most ``max_side``; as is if it is."""
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def segment_with_confidence(model: nn.Module, image: np.ndarray, mode: str = "whole") -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidence) at the image's size: the argmax and the max of the class probabilities.

    ``mode`` is ``whole``, ``slide`` or ``tta`` (the paper's multi-scale + flip test in the model's own mode). The
    probabilities are mmseg's: each view's logits resized to the image, softmaxed and averaged
    (:func:`regproxy_cli.inference.protocol.segment_probs`), so the labels are those of ``regproxy predict`` up to
    float rounding ties.
    """
    if mode not in MODES:
        raise RegproxyError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    config = model.config
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    x = normalise(rgb, config, device_of(model))
    protocol = TestProtocol.from_config(config, mode=None if mode == "tta" else mode, tta=mode == "tta")
    probs = segment_probs(model, x, protocol, (height, width))
    confidence, labels = probs.max(dim=0)
    return labels.cpu().numpy(), confidence.float().cpu().numpy()


def region_picture(model: nn.Module, image: np.ndarray) -> np.ndarray | None:
    """The learned regions drawn over ``image`` at its size, or None for a model without a proxy head (the linear
    baseline, an exported .onnx)."""
    if not model.has_regions:
        return None
    return predict_regions(model, image)


def segment(model: nn.Module, image: np.ndarray, mode: str = "whole", precision: str = "fp32") -> Segmentation:
    """Labels, confidence and regions of one (H, W, 3) uint8 RGB image (shrunk to :data:`MAX_SIDE` first), the
    network at ``precision`` (fp32, or bf16 / fp16 autocast, as predict runs it)."""
    start = time.perf_counter()
    image = fit_size(to_rgb_array(image))
    with autocast(device_of(model), precision):
        labels, confidence = segment_with_confidence(model, image, mode)
        regions = region_picture(model, image)
    synchronize(device_of(model))
    return Segmentation(image, labels, confidence, regions, mode, time.perf_counter() - start)


def class_shares(labels: np.ndarray, classes: list[str] | tuple[str, ...], palette: Any) -> list[ClassShare]:
    """The classes present in ``labels``, most pixels first, with their share in percent and overlay colour."""
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    total = int(counts.sum())
    rows = [ClassShare(int(i), classes[int(i)], round(100 * int(n) / total, 2),
                       "#{:02x}{:02x}{:02x}".format(*(int(c) for c in palette[int(i)])))
            for i, n in zip(ids, counts)]
    return sorted(rows, key=lambda row: (-row.percent, row.class_id))


def confidence_picture(confidence: np.ndarray) -> np.ndarray:
    """(H, W) probabilities in [0, 1] to an (H, W, 3) uint8 picture along :data:`CONFIDENCE_RAMP` (dark: low)."""
    values = np.clip(np.asarray(confidence, dtype=np.float32), 0, 1)
    stops = np.linspace(0, 1, len(CONFIDENCE_RAMP))
    channels = [np.interp(values, stops, CONFIDENCE_RAMP[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def class_table(rows: list[ClassShare]) -> Any:
    """The class table as a pandas Styler: the colour column is a swatch (its cell painted in the colour)."""
    import pandas as pd  # a Gradio dependency

    frame = pd.DataFrame([(r.colour, r.name, r.class_id, r.percent) for r in rows], columns=list(TABLE_COLUMNS))
    return frame.style.map(lambda colour: f"background-color: {colour}; color: {colour}", subset=["colour"]).format(
        {"pixels %": "{:.2f}"})


def summary_line(result: Segmentation, original: tuple[int, int]) -> str:
    height, width = result.labels.shape
    shrunk = f" (shrunk from {original[1]}×{original[0]})" if (height, width) != original else ""
    return (f"{width}×{height} px{shrunk}, {MODE_LABELS[result.mode]}, {result.seconds:.2f} s; "
            f"mean confidence {float(result.confidence.mean()):.3f}")


def example_images(folder: str | os.PathLike | None, scratch: str | os.PathLike,
                   count: int = GENERATED_EXAMPLES) -> list[Path]:
    """The images offered as examples, as files in ``scratch`` (the only folder the page serves): copies of those
    in ``folder`` (sorted, at most :data:`MAX_EXAMPLES`), or ``count`` generated synthetic scenes.

    Copies, never the folder itself: whatever else lies beside an example (``.env``, notes) stays unreachable."""
    Path(scratch).mkdir(parents=True, exist_ok=True)
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise RegproxyError(f"--examples {folder}: not a directory")
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise RegproxyError(f"--examples {folder}: no images in this directory")
        copies = []
        for index, path in enumerate(found[:MAX_EXAMPLES]):
            copy = Path(scratch) / f"{index:02d}_{path.name}"  # numbered: two folders may hold one name
            shutil.copyfile(path, copy)
            copies.append(copy)
        return copies
    scenes = SyntheticScenes(count, size=(256, 256), num_classes=5, seed=0, split="demo")
    paths = []
    for index in range(count):
        path = Path(scratch) / f"scene_{index}.png"
        save_png_atomic(path, scenes.render(index)[0])
        paths.append(path)
    return paths


def build_demo(model: nn.Module, examples: list[Path], title: str = "RegProxy", precision: str = "fp32") -> Any:
    """The page as a ``gradio.Blocks``; it opens with the first example already segmented (whole image)."""
    gr = import_gradio()
    config = model.config
    palette = np.array(config.palette, dtype=np.uint8)
    first = load_image(examples[0])

    def run(image: np.ndarray | None, mode: str, opacity: float):
        if image is None:
            return None, None, None, class_table([]), "", None
        try:
            result = segment(model, image, mode, precision)
        except RegproxyError as exc:
            raise gr.Error(str(exc)) from None
        rows = class_shares(result.labels, config.classes, palette)
        return (overlay(result.image, result.labels, palette, float(opacity)), result.regions,
                confidence_picture(result.confidence), class_table(rows),
                summary_line(result, tuple(image.shape[:2])), (result.image, result.labels))

    def reblend(state: tuple[np.ndarray, np.ndarray] | None, opacity: float):
        if state is None:
            return None
        image, labels = state
        return overlay(image, labels, palette, float(opacity))

    # The first example is segmented here, once: the page opens with its result, no request needed.
    initial = run(first, "whole", DEFAULT_OPACITY)
    kind = "linear baseline" if config.baseline else "RegProxy"
    about = (f"**{title}**: {kind} on {config.backbone}, {config.num_classes} classes, {config.inference_mode} "
             f"protocol, on {device_of(model)}. Images larger than {MAX_SIDE} px are shrunk first.")
    with gr.Blocks(title=f"regproxy demo: {title}", analytics_enabled=False) as blocks:
        gr.Markdown(f"## RegProxy segmentation\n{about}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                image = gr.Image(value=first, type="numpy", image_mode="RGB", label="image",
                                 sources=["upload", "clipboard"], elem_id="input-image")
                mode = gr.Radio([(MODE_LABELS[m], m) for m in MODES], value="whole", label="mode",
                                elem_id="mode")
                opacity = gr.Slider(0, 1, value=DEFAULT_OPACITY, step=0.05, label="overlay opacity",
                                    elem_id="opacity")
                button = gr.Button("Segment", variant="primary")
                gr.Examples([[str(p)] for p in examples], inputs=[image], label="examples", cache_examples=False)
            with gr.Column(scale=3):
                with gr.Row():
                    shown = gr.Image(initial[0], label="classes (overlay)", format="png", interactive=False,
                                     elem_id="overlay")
                    regions = gr.Image(initial[1], label="learned regions", format="png", interactive=False,
                                       elem_id="regions")
                    confidence = gr.Image(initial[2], label="confidence (dark 0 → bright 1)", format="png",
                                          interactive=False, elem_id="confidence")
                with gr.Row():
                    table = gr.Dataframe(value=initial[3], label="classes present", interactive=False,
                                         elem_id="class-table")
                summary = gr.Markdown(initial[4], elem_id="summary")
        state = gr.State(initial[5])
        outputs = [shown, regions, confidence, table, summary, state]
        # One queue slot for the model, whichever event asks for it.
        gr.on([button.click, image.change, mode.change], run, [image, mode, opacity], outputs,
              api_name="segment", concurrency_id="model", concurrency_limit=1)
        opacity.release(reblend, [state, opacity], [shown], api_visibility="private", queue=False)
    return blocks


def check_port(host: str, port: int) -> None:
    """One error line when ``host:port`` cannot be listened on (in use, or an address this machine lacks)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RegproxyError(f"--host {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "in use" if exc.errno == 98 else exc.strerror
            raise RegproxyError(f"cannot listen on {host}:{port}: {reason}; pick another --port") from None


def serve(
    model: nn.Module,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: str | os.PathLike | None = None,
    title: str = "RegProxy",
    ready: Callable[[str], None] | None = None,
    precision: str = "fp32",
) -> None:
    """Serve the demo page for ``model`` on ``http://host:port/`` until interrupted; ``ready`` gets the URL once
    it answers."""
    import_gradio()
    check_port(host, port)
    # Everything the demo writes (example copies, uploads, results) lives in one temporary folder, removed when it
    # stops, by Ctrl+C or SIGTERM; the page serves the example copies and Gradio's own cache in it, nothing else.
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set a signal handler
    previous_term = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        with tempfile.TemporaryDirectory(prefix="examples-", dir=demo_folder()) as scratch:
            paths = example_images(examples, scratch)
            blocks = build_demo(model, paths, title, precision)
            try:
                blocks.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                              prevent_thread_lock=True, quiet=True, ssr_mode=False, mcp_server=False,
                              footer_links=["api", "settings"], allowed_paths=[str(paths[0].parent.resolve())],
                              show_error=True)
            except OSError as exc:
                raise RegproxyError(f"cannot serve on {host}:{port}: {exc}") from None
            try:
                if ready is not None:
                    ready(f"http://{host}:{port}/")
                while blocks.is_running:
                    time.sleep(0.2)
            finally:
                blocks.close()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_term)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks and atexit: the temporary folder goes
