"""Values several layers agree on: defined once here, so training, evaluation and inference cannot drift apart."""

import os
import warnings
from pathlib import Path

VERSION = "0.1.0"

IGNORE_INDEX = 255  # label id of pixels that are neither trained on nor scored (mmseg's ignore_index)

# Every authors' checkpoint, AugReg ones included, normalises RGB 0-255 with ImageNet statistics.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# How the network may compute: fp32, bf16/fp16 autocast (fp16 needs CUDA), int8 (inference on CPU only: the backbone's
# linear layers in oneDNN int8, inference/quantize.py). The one list the CLI, the configs and the runtime check.
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# How a model sees an image at test time: whole, or in crop-sized sliding windows (mmseg 0.17's test modes).
INFERENCE_MODES = ("whole", "slide")
# the ONNX opsets `regproxy export` writes (the newest the TorchScript-based exporter writes)
MIN_OPSET, MAX_OPSET = 17, 20

# What `predict` takes from a folder and a dataset folder reads as images (lower-case, with the dot).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

# The one folder regproxy keeps things in: converted zoo models, the authors' downloads, CPU kernel choices.
CACHE_ENV = "REGPROXY_CACHE"
DEPRECATED_CACHE_ENV = "REGPROXY_CACHE_DIR"  # the CPU kernel cache's old name for it; goes in the next release


def cache_dir() -> Path:
    """``$REGPROXY_CACHE``, default ``~/.cache/regproxy``. ``$REGPROXY_CACHE_DIR``, the old spelling, still works
    when ``$REGPROXY_CACHE`` is not set, with a FutureWarning."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get(DEPRECATED_CACHE_ENV):
        warnings.warn(f"${DEPRECATED_CACHE_ENV} is deprecated: set ${CACHE_ENV} instead", FutureWarning, stacklevel=2)
        return Path(os.environ[DEPRECATED_CACHE_ENV])
    return Path.home() / ".cache" / "regproxy"
