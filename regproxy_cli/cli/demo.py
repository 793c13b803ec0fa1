"""``regproxy demo``: a local web page that segments uploaded images (Gradio)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from regproxy_cli.cli.options import (
    DeviceOption,
    ModelOption,
    Precision,
    PrecisionOption,
    check_precision,
    model_device,
    parse_device,
)
from regproxy_cli.cli.output import console

SUMMARY = "A local web page: upload an image, see its classes, regions and confidence (the 'demo' extra)."
HELP = """Serve a web page on this machine (http://HOST:PORT/, loopback by default) around one model: upload an
image or pick an example, and see the class overlay (with an opacity slider), the learned regions, the model's
confidence and a table of the classes found (pixel share, colour), in whole, sliding-window or TTA mode. The first
example is segmented when the page opens. The same segmentation is an HTTP API endpoint, `segment` (see the page's
"Use via API" link, or gradio_client). Examples are the images in --examples DIR, or a few generated scenes.

Needs Gradio: pip install 'regproxy\\[demo]'. Nothing is sent anywhere: no analytics, no share link.

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory, an authors' .pth file or an
exported .onnx file (no regions picture for that one)."""

EXAMPLES = """[bold]Examples[/]

  regproxy demo --model runs/demo/best

  regproxy demo --model s16-ade --examples photos/ --port 8080

  regproxy demo --model runs/demo/best --device cpu --precision int8"""


def demo(
    model: ModelOption,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 7860,
    examples: Annotated[Path | None, typer.Option(help="A folder of example images (default: generated scenes).",
                                                  file_okay=False)] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.fp32,
) -> None:
    from regproxy_cli.engine.runner import open_model
    from regproxy_cli.web.demo import check_port, import_gradio, serve

    import_gradio()  # a missing extra or a taken port stops here, before the model loads
    check_port(host, port)
    torch_device = parse_device(model_device(device, model))
    run_precision = check_precision(precision, torch_device)
    segmenter = open_model(model, torch_device, precision=run_precision)  # as predict opens it
    serve(segmenter, host=host, port=port, examples=examples, title=model, precision=run_precision,
          ready=lambda url: console.print(f"regproxy demo of {model} on {url} (Ctrl+C stops it)"))
