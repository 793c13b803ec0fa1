"""``regproxy predict clip.mp4``: the video half of predict (progress by frames, a summary of the classes found);
:mod:`regproxy_cli.engine.video` segments. ``regproxy_cli.cli.predict`` hands video inputs here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from regproxy_cli.cli.options import Precision, Provider, check_precision, model_device, parse_device
from regproxy_cli.cli.output import console, err_console, print_classes_present, print_error
from regproxy_cli.errors import RegproxyError

FRAMES_HELP = ("Videos: also write each segmented frame's label PNG, OUT/<video name>/<frame number>.png "
               "(000000.png, ...; numbered from 0 in the source).")
EVERY_HELP = ("Videos: segment every Nth frame (0, N, 2N, ...). The overlay video keeps every frame at the source's "
              "rate; frames in between are drawn with the labels of the last segmented frame.")


def check_video_options(*, regions: bool, confidence: bool, save_probs: bool, formats: list[str], ray: bool) -> None:
    """The image-only options, refused for videos with one line."""
    image_only = {"--regions": regions, "--confidence": confidence, "--save-probs": save_probs,
                  "--format": bool(formats) and formats != ["png"], "--engine ray": ray}
    given = [option for option, used in image_only.items() if used]
    if given:
        raise RegproxyError(f"{', '.join(given)} apply to images; a video gets OUT/<name>_overlay.mp4 and, with "
                            "--frames, label PNGs (segment videos and images in separate calls)")


def predict_videos(
    inputs: list[str],
    *,
    model: str,
    out: Path,
    mode: str | None = None,
    scale: float = 1.0,
    tta: bool = False,
    device: str = "auto",
    precision: Precision = Precision.fp32,
    window_batch: int = 8,
    batch: int = 1,
    compile_network: bool = False,
    provider: Provider = Provider.cpu,
    frames: bool = False,
    every: int = 1,
    opacity: float = 0.5,
) -> None:
    """The video half of ``regproxy predict``: every input a video file (or a glob of them); a progress bar by
    frames, a summary of the classes found, and a non-zero exit when a video fails (the others still run)."""
    from tqdm import tqdm

    from regproxy_cli.data.video import VideoReader, import_av
    from regproxy_cli.engine.outputs import output_names
    from regproxy_cli.engine.runner import open_model
    from regproxy_cli.engine.video import VIDEO_OUTPUT_FILES, expand_videos, predict_video

    # --window-batch, --batch and --opacity are checked by regproxy_cli.cli.predict, --every by typer
    import_av()  # a missing extra stops here, before loading the model
    paths = expand_videos(inputs)
    torch_device = parse_device(model_device(device, model))
    run_precision = check_precision(precision, torch_device)
    segmenter = open_model(model, torch_device, precision=run_precision, provider=provider.value,
                           compile_network=compile_network, status=err_console.status)
    stems = output_names(paths, files=VIDEO_OUTPUT_FILES)  # the rule predict applies to images
    reports, failed = [], []
    for path in paths:
        stem = stems[path]
        try:
            with VideoReader(path) as video:  # the frame count for the bar, and a bad file fails before any output
                total = video.info.frames_estimate
            with tqdm(total=total, unit="frame", desc=path.name) as bar:
                reports.append(predict_video(segmenter, path, out, frames=frames, every=every, opacity=opacity,
                                             batch=batch, stem=stem, progress=bar.update, mode=mode, tta=tta,
                                             scale=scale, batch_size=window_batch, precision=run_precision))
        except RegproxyError as error:
            failed.append(str(error))
    for problem in failed:
        print_error(problem)
    if reports:
        print_classes_present(segmenter.config.classes, sum((r.pixels for r in reports), Counter()),
                              sum((r.frames_with for r in reports), Counter()), "frames")
        for report in reports:
            pngs = f" and {len(report.label_pngs)} label maps" if report.label_pngs else ""
            console.print(f"wrote {report.overlay} ({report.frames} frames, {report.segmented} segmented){pngs}")
    if failed:
        raise typer.Exit(1)

