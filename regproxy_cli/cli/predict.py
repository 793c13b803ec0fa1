"""``regproxy predict``: segment images into label PNGs, colour overlays and region pictures."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from regproxy_cli.cli.options import (
    CompileOption,
    DeviceOption,
    ModelOption,
    ModeOption,
    OpacityOption,
    Precision,
    PrecisionOption,
    Provider,
    ProviderOption,
    TtaOption,
    WindowBatchOption,
    check_batch,
    check_precision,
    check_window_batch,
    model_device,
    parse_device,
)
from regproxy_cli.cli.output import console, err_console, print_classes_present, print_error
from regproxy_cli.cli.video import EVERY_HELP, FRAMES_HELP, predict_videos
from regproxy_cli.data.formats import check_formats
from regproxy_cli.data.video import is_video
from regproxy_cli.engine.runner import (
    PredictReport,
    check_opacity,
    check_out_dir,
    expand_inputs,
    open_model,
    predict_files,
    prepare_out_dir,
)
from regproxy_cli.errors import RegproxyError

SUMMARY = "Segment images into label PNGs, colour overlays and region pictures."
HELP = """Segment images: files, directories and glob patterns. For each image writes OUT/<name>.png (class ids,
palette-coloured), OUT/<name>_overlay.png and, with --regions, OUT/<name>_regions.png (the learned regions: their
boundaries as lines over the image at its size, each region tinted by its token's class or, --regions-by token, in a
colour of its own). --confidence adds heat maps (dark violet low, yellow high, fixed scales): OUT/<name>_maxprob.png
(the top class probability, 0 to 1), OUT/<name>_entropy.png (the entropy of the class probabilities, 0 to ln K) and,
with --tta, OUT/<name>_disagreement.png (the fraction of the 12 augmented views whose own label differs from the
final one). --save-probs writes OUT/<name>_probs.npz (float16): `probs`, the K class probabilities at the model's
output resolution (the working size divided by the output stride, 4 for /16 models), and `max_prob`, `entropy`
(nats) and, with --tta, `disagreement` at the image's size, plus `classes`.
--format coco|labelme|cvat (repeatable) writes annotation-tool files instead or as well: OUT/predictions.json
(COCO RLE, category_id = class id), OUT/<name>.json (labelme polygons), OUT/cvat.zip (CVAT Segmentation mask 1.1).

<name> is the image's file stem. Inputs that share a stem are named <folder>_<stem>, and when that is taken too,
<folder>_<stem>_<suffix>, then -2, -3, ...: the names are fixed before the first write, so no output overwrites
another (compared ignoring case). An image that fails is one error line; the others still run, and the exit
status is 1.

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory, an authors' .pth file or a
`regproxy export`ed .onnx file (run by onnxruntime on --provider)."""

EXAMPLES = """[bold]Examples[/]

  regproxy predict photo.jpg --model s16-ade

  regproxy predict photos/ 'more/*.png' --model s16-ade --out seg --regions --tta

  regproxy predict photo.jpg --model s16-ade --confidence --tta --save-probs --opacity 0.35"""

BATCH_HELP = ("Images per forward pass on CUDA: consecutive images of one size are batched (not with --tta). On a CPU "
              "the network runs image by image anyway, so this only applies on CUDA.")


class OutputFormat(str, Enum):
    """What predict writes: label PNG + overlay, COCO RLE, labelme polygons, CVAT Segmentation mask 1.1."""

    png = "png"
    coco = "coco"
    labelme = "labelme"
    cvat = "cvat"


FORMAT_HELP = ("Output format, repeatable (default: png): png (label PNG + overlay), coco (OUT/predictions.json), "
               "labelme (OUT/<name>.json), cvat (OUT/cvat.zip). coco and labelme need the 'annotations' extra.")
TOLERANCE_HELP = "labelme polygons: simplification tolerance in pixels (0: exact region boundaries)."
CONFIDENCE_HELP = ("Also write heat maps of the top class probability and the entropy (and with --tta the views' "
                   "disagreement).")
SAVE_PROBS_HELP = "Also write OUT/<name>_probs.npz: class probabilities (float16) and the confidence maps."


class RegionsBy(str, Enum):
    """How --regions tints each learned region: its token's predicted class, or a colour per token."""

    cls = "class"
    token = "token"
    prototype = "prototype"


REGIONS_BY_HELP = ("Tint each region with its token's predicted class colour (class), a colour per token (token) or "
                   "the shade of the class prototype its token matched (prototype, a protoseg model); implies "
                   "--regions.")
PROTOTYPES_HELP = "Colour the learned regions by the prototype that painted them (a protoseg model); implies --regions."


def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image or video files, directories or glob patterns.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("predictions"),
    mode: ModeOption = None,
    scale: Annotated[float, typer.Option(help="Multiply the model's test scale.")] = 1.0,
    tta: TtaOption = False,
    regions: Annotated[bool, typer.Option("--regions", help="Also draw the learned regions.")] = False,
    regions_by: Annotated[RegionsBy | None, typer.Option("--regions-by", help=REGIONS_BY_HELP)] = None,
    prototypes: Annotated[bool, typer.Option("--prototypes", help=PROTOTYPES_HELP)] = False,
    confidence: Annotated[bool, typer.Option("--confidence", help=CONFIDENCE_HELP)] = False,
    save_probs: Annotated[bool, typer.Option("--save-probs", help=SAVE_PROBS_HELP)] = False,
    opacity: OpacityOption = 0.5,
    device: DeviceOption = "auto",
    window_batch: WindowBatchOption = 8,
    precision: PrecisionOption = Precision.fp32,
    compile_network: CompileOption = False,
    provider: ProviderOption = Provider.cpu,
    formats: Annotated[list[OutputFormat] | None, typer.Option("--format", help=FORMAT_HELP)] = None,
    polygon_tolerance: Annotated[float, typer.Option("--polygon-tolerance", min=0.0, help=TOLERANCE_HELP)] = 1.0,
    batch: Annotated[int, typer.Option("--batch", help=BATCH_HELP)] = 1,
    frames: Annotated[bool, typer.Option("--frames", help=FRAMES_HELP)] = False,
    every: Annotated[int, typer.Option("--every", min=1, help=EVERY_HELP)] = 1,
) -> None:
    if prototypes:
        if regions_by not in (None, RegionsBy.prototype):
            raise RegproxyError(f"--prototypes colours regions by prototype; it cannot go with --regions-by "
                                f"{regions_by.value}")
        regions_by = RegionsBy.prototype
    check_window_batch(window_batch)
    check_batch(batch)
    check_opacity(opacity)
    if any(is_video(item) for item in inputs):  # .mp4/.mov/.avi/.mkv/.webm: regproxy_cli.cli.video
        image_only = {"--regions": regions or regions_by is not None, "--confidence": confidence,
                      "--save-probs": save_probs, "--format": bool(formats) and formats != [OutputFormat.png]}
        given = [option for option, used in image_only.items() if used]
        if given:
            raise RegproxyError(f"{', '.join(given)} apply to images; a video gets OUT/<name>_overlay.mp4 and, with "
                                "--frames, label PNGs (segment videos and images in separate calls)")
        return predict_videos(inputs, model=model, out=out, mode=mode.value if mode else None, scale=scale, tta=tta,
                              device=device, precision=precision, window_batch=window_batch, batch=batch,
                              compile_network=compile_network, provider=provider, frames=frames, every=every,
                              opacity=opacity)
    regions = regions or regions_by is not None
    output_formats = check_formats(formats or [OutputFormat.png])  # a missing extra stops here, before loading
    torch_device = parse_device(model_device(device, model))
    run_precision = check_precision(precision, torch_device)
    paths, problems = expand_inputs(inputs)
    check_out_dir(out)  # an --out that is a file or cannot be written stops here, before the model loads
    segmenter = open_model(model, torch_device, precision=run_precision, provider=provider.value,
                           compile_network=compile_network, regions=regions, status=err_console.status)
    prepare_out_dir(out)  # created only once the model has loaded, and before the progress bar shows
    partial = PredictReport()  # filled as images finish: what a Ctrl-C can report
    try:
        with tqdm(total=len(paths), unit="image", desc="segmenting", disable=not paths) as bar:
            report = predict_files(segmenter, paths, out, regions=regions, progress=bar.update,
                                   formats=output_formats, polygon_tolerance=polygon_tolerance,
                                   regions_by=(regions_by or RegionsBy.cls).value, confidence=confidence,
                                   save_probs=save_probs, opacity=opacity, mode=mode.value if mode else None,
                                   tta=tta, scale=scale, batch_size=window_batch, precision=run_precision,
                                   batch=batch, report=partial)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {len(partial.finished)} of {len(paths)} images written to {out} (each file "
                          "complete); run the same command again to segment them all")
        raise typer.Exit(130) from None
    for problem in problems + report.failed:
        print_error(problem)
    if report.written:
        print_classes_present(segmenter.config.classes, report.pixels, report.images, "images")
        console.print(f"wrote {len(report.written)} label maps to {out}")
    if problems or report.failed or not report.written:
        raise typer.Exit(1)

