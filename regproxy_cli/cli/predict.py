"""``regproxy predict``: segment images into label PNGs, colour overlays and region pictures."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

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
)
from regproxy_cli.cli.predict_images import Engine, RegionsBy, check_options, predict_images, predict_on_ray
from regproxy_cli.cli.video import EVERY_HELP, FRAMES_HELP, check_video_options, predict_videos
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

  regproxy predict photo.jpg --model s16-ade --confidence --tta --save-probs --opacity 0.35

  regproxy predict photos/ --model s16-ade --engine ray --workers 2 --out seg"""

BATCH_HELP = ("Images per forward pass on CUDA: consecutive images of one size are batched (not with --tta). On a CPU "
              "the network runs image by image anyway, so this only applies on CUDA.")


class OutputFormat(str, Enum):
    """What predict writes: label PNG + overlay, COCO RLE, labelme polygons, CVAT Segmentation mask 1.1."""

    png = "png"
    coco = "coco"
    labelme = "labelme"
    cvat = "cvat"
    parquet = "parquet"


FORMAT_HELP = ("Output format, repeatable (default: png): png (label PNG + overlay), coco (OUT/predictions.json), "
               "labelme (OUT/<name>.json), cvat (OUT/cvat.zip), parquet (--engine ray: OUT/labels.parquet/, rows of "
               "path, label PNG bytes, class histogram). coco and labelme need the 'annotations' extra.")
TOLERANCE_HELP = "labelme polygons: simplification tolerance in pixels (0: exact region boundaries)."
CONFIDENCE_HELP = ("Also write heat maps of the top class probability and the entropy (and with --tta the views' "
                   "disagreement).")
SAVE_PROBS_HELP = "Also write OUT/<name>_probs.npz: class probabilities (float16) and the confidence maps."


REGIONS_BY_HELP = ("Tint each region with its token's predicted class colour (class), a colour per token (token) or "
                   "the shade of the class prototype its token matched (prototype, a protoseg model); implies "
                   "--regions.")
PROTOTYPES_HELP = "Colour the learned regions by the prototype that painted them (a protoseg model); implies --regions."


ENGINE_HELP = ("local: this process (under torchrun each process a share); ray: actors on a Ray cluster, one model each "
               "(the 'ray' extra; docs/scale.md).")
ADDRESS_HELP = "--engine ray: auto (a running cluster) or ray://HOST:10001; default RAY_ADDRESS, else a local one."
WORKERS_HELP = "--engine ray: actors (default: one per --gpus-per-worker share of the GPUs, else per CPU but one)."
GPUS_HELP = "--engine ray: GPUs per actor (0: CPU actors; 0.5: two share a GPU)."


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
    engine: Annotated[Engine, typer.Option("--engine", help=ENGINE_HELP)] = Engine.local,
    address: Annotated[str | None, typer.Option("--address", help=ADDRESS_HELP)] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help=WORKERS_HELP)] = None,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help=GPUS_HELP)] = 0.0,
) -> None:
    from regproxy_cli.data.video import is_video

    regions_by = check_options(window_batch=window_batch, batch=batch, opacity=opacity, prototypes=prototypes,
                               regions_by=regions_by, engine=engine, address=address, workers=workers,
                               gpus_per_worker=gpus_per_worker)
    if any(is_video(item) for item in inputs):  # .mp4/.mov/.avi/.mkv/.webm: regproxy_cli.cli.video
        check_video_options(regions=regions or regions_by is not None, confidence=confidence, save_probs=save_probs,
                            formats=[f.value for f in formats or []], ray=engine is Engine.ray)
        return predict_videos(inputs, model=model, out=out, mode=mode.value if mode else None, scale=scale, tta=tta,
                              device=device, precision=precision, window_batch=window_batch, batch=batch,
                              compile_network=compile_network, provider=provider, frames=frames, every=every,
                              opacity=opacity)
    output_formats = [f.value for f in formats or [OutputFormat.png]]
    options = {"regions": regions or regions_by is not None, "regions_by": (regions_by or RegionsBy.cls).value,
               "confidence": confidence, "save_probs": save_probs, "opacity": opacity, "tta": tta, "scale": scale,
               "polygon_tolerance": polygon_tolerance, "mode": mode.value if mode else None,
               "batch_size": window_batch, "batch": batch}
    if engine is Engine.ray:
        return predict_on_ray(inputs, model=model, out=out, compile_network=compile_network, address=address,
                              workers=workers, gpus_per_worker=gpus_per_worker, device=device, precision=precision.value,
                              provider=provider.value, formats=output_formats, **options)
    if "parquet" in output_formats:
        raise RegproxyError("--format parquet goes with --engine ray")
    predict_images(inputs, model=model, out=out, device=device, precision=precision, provider=provider.value,
                   compile_network=compile_network, formats=output_formats, **options)
