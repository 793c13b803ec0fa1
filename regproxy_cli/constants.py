"""Values several layers agree on: defined once here, so training, evaluation and inference cannot drift apart."""

VERSION = "0.1.0"

IGNORE_INDEX = 255  # label id of pixels that are neither trained on nor scored (mmseg's ignore_index)

# Every authors' checkpoint, AugReg ones included, normalises RGB 0-255 with ImageNet statistics.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# What `predict` takes from a folder and a dataset folder reads as images (lower-case, with the dot).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
