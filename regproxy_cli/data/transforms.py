"""The authors' (mmsegmentation 0.17) training pipeline on (image, label) pairs.

mmseg's ADE20K recipe runs: resize to scale (2048, 512) with a random ratio in [0.5, 2] keeping the aspect
ratio, random 512x512 crop with ``cat_max_ratio`` 0.75, horizontal flip with probability 0.5, photometric
distortion, normalisation, and padding to the crop size (image 0 after normalisation, label 255). The classes
here have the same semantics, written on torch tensors with torchvision's functional ops.

Every transform takes ``(image, label)`` and returns the pair. Images enter as uint8 RGB, either a numpy
HxWx3 array or a tensor (CxHxW, or HxWx3 when the last dimension is 3 and the first is not); labels as an integer
HxW array or tensor. Internally images are uint8 CxHxW tensors and labels HxW tensors; :class:`Normalize`
turns the image into a float CxHxW tensor and the label into int64.

All randomness is drawn from the ``generator`` given to a transform, or from torch's global RNG when it is None,
never from numpy or ``random``: DataLoader workers seed torch's RNG from the main process's, so a seeded run is
reproducible, and saving the torch RNG state makes it resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from regproxy_cli.constants import IMAGENET_MEAN, IMAGENET_STD

Pair = tuple[torch.Tensor, torch.Tensor]
ArrayLike = np.ndarray | torch.Tensor


def to_tensors(image: ArrayLike, label: ArrayLike | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring an (image, label) pair into the internal layout: image CxHxW tensor, label HxW tensor.

    Args:
        image: HxWx3 numpy array, or a CxHxW / HxWx3 tensor.
        label: HxW numpy array or tensor, or None.

    Returns:
        The image as a CxHxW tensor (dtype kept) and the label as an HxW tensor (dtype kept) or None.
    """
    if isinstance(image, np.ndarray):
        # torch refuses to share read-only memory (e.g. np.asarray of a PIL image) without a warning; copy those.
        image = np.ascontiguousarray(image) if image.flags.writeable else image.copy()
        image = torch.from_numpy(image).permute(2, 0, 1)
    elif image.ndim == 3 and image.shape[-1] == 3 and image.shape[0] != 3:
        image = image.permute(2, 0, 1)
    if isinstance(label, np.ndarray):
        # uint16 has no torch counterpart for most ops; labels fit in int64 whatever their file format.
        if label.dtype == np.uint16 or not label.flags.writeable:
            label = label.astype(np.int64 if label.dtype == np.uint16 else label.dtype)
        label = torch.from_numpy(np.ascontiguousarray(label))
    return image, label


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The size mmseg's ``Resize(keep_ratio=True)`` (mmcv ``rescale_size``) gives an image for a test scale.

    The image is scaled by ``min(long / max(h, w), short / min(h, w))`` with ``long, short = max(scale),
    min(scale)``, so the long side is at most ``long`` and the short side at most ``short``; sides round half up.

    Args:
        height: the image height.
        width: the image width.
        scale: (long_max, short_max), e.g. (2048, 512) for ADE20K; the order does not matter, as in mmcv.

    Returns:
        (new_height, new_width), each at least 1.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    # a sliver (1 x 100000) would round its short side to 0 pixels, which nothing can resize to
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """A random integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _coin(p: float, generator: torch.Generator | None) -> bool:
    return float(torch.rand((), generator=generator)) < p


class RandomResize:
    """Aspect-keeping resize to ``scale`` times a random ratio (mmseg ``Resize`` with ``ratio_range``).

    Args:
        scale: base (long edge, short edge), e.g. (2048, 512) for ADE20K.
        ratio_range: the ratio is drawn uniformly from this range and multiplies both edges.
        generator: random source; torch's global RNG when None.
    """

    def __init__(self, scale: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0),
                 generator: torch.Generator | None = None) -> None:
        self.scale = scale
        self.ratio_range = ratio_range
        self.generator = generator

    def __call__(self, image: ArrayLike, label: ArrayLike) -> Pair:
        image, label = to_tensors(image, label)
        ratio = _uniform(*self.ratio_range, self.generator)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = list(rescale_size(image.shape[-2], image.shape[-1], target))
        # mmcv resizes with OpenCV's INTER_LINEAR, which does not antialias when shrinking.
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        label = F.resize(label[None], size, interpolation=InterpolationMode.NEAREST)[0]
        return image, label


class RandomCrop:
    """Random crop of ``crop`` = (height, width), retried so no class dominates (mmseg ``RandomCrop``).

    A crop is accepted when it holds at least two non-ignored classes and the most frequent one covers less than
    ``cat_max_ratio`` of its non-ignored pixels. After 10 rejected crops a fresh random crop is used unchecked,
    as mmseg does. Images smaller than the crop along a side keep that side whole (:class:`Pad` fills it later).

    Args:
        crop: (height, width) of the crop.
        cat_max_ratio: the largest share one class may take; 1 disables the check.
        ignore_index: label value left out of the class shares.
        generator: random source; torch's global RNG when None.
    """

    def __init__(self, crop: tuple[int, int] = (512, 512), cat_max_ratio: float = 0.75, ignore_index: int = 255,
                 generator: torch.Generator | None = None) -> None:
        self.crop = crop
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.generator = generator

    def _random_box(self, height: int, width: int) -> tuple[int, int]:
        top = _randint(0, max(height - self.crop[0], 0), self.generator)
        left = _randint(0, max(width - self.crop[1], 0), self.generator)
        return top, left

    def _acceptable(self, label: torch.Tensor) -> bool:
        _, counts = torch.unique(label[label != self.ignore_index], return_counts=True)
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def __call__(self, image: ArrayLike, label: ArrayLike) -> Pair:
        image, label = to_tensors(image, label)
        height, width = label.shape
        ch, cw = self.crop
        top, left = self._random_box(height, width)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                if self._acceptable(label[top:top + ch, left:left + cw]):
                    break
                top, left = self._random_box(height, width)
        return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


class RandomFlip:
    """Horizontal flip of image and label together with probability ``p``.

    Args:
        p: flip probability.
        generator: random source; torch's global RNG when None.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = p
        self.generator = generator

    def __call__(self, image: ArrayLike, label: ArrayLike) -> Pair:
        image, label = to_tensors(image, label)
        if _coin(self.p, self.generator):
            image, label = F.horizontal_flip(image), F.horizontal_flip(label)
        return image, label


class PhotoMetricDistortion:
    """mmseg's photometric distortion of a uint8 RGB image; the label passes through.

    In order: brightness (add a value in +-``brightness_delta``), contrast either second or last (multiply by a
    factor in ``contrast_range``), saturation (scale HSV saturation by a factor in ``saturation_range``), hue
    (rotate by up to ``hue_delta`` in OpenCV's 0-180 hue units). Each step happens with probability 0.5. The
    arithmetic is float with clipping to [0, 255] after every step and one rounding at the end (mmseg truncates
    to uint8 after every step, a bias of under one grey level per step).

    Args:
        brightness_delta: largest brightness offset, in grey levels.
        contrast_range: range of the contrast factor.
        saturation_range: range of the saturation factor.
        hue_delta: largest hue shift in OpenCV units (180 = full circle).
        generator: random source; torch's global RNG when None.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
                 generator: torch.Generator | None = None) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta
        self.generator = generator

    def _contrast(self, img: torch.Tensor) -> torch.Tensor:
        if _coin(0.5, self.generator):
            img = (img * _uniform(*self.contrast_range, self.generator)).clamp(0, 255)
        return img

    def __call__(self, image: ArrayLike, label: ArrayLike) -> Pair:
        image, label = to_tensors(image, label)
        img = image.float()
        if _coin(0.5, self.generator):
            img = (img + _uniform(-self.brightness_delta, self.brightness_delta, self.generator)).clamp(0, 255)
        contrast_first = _coin(0.5, self.generator)
        if contrast_first:
            img = self._contrast(img)
        if _coin(0.5, self.generator):
            img = scale_saturation(img, _uniform(*self.saturation_range, self.generator))
        if _coin(0.5, self.generator):
            shift = _randint(-self.hue_delta, self.hue_delta, self.generator)
            img = F.adjust_hue(img / 255, shift / 180) * 255
        if not contrast_first:
            img = self._contrast(img)
        return img.round().clamp(0, 255).to(torch.uint8), label


def scale_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply the HSV saturation of a float RGB image (0-255) by ``factor``, clipped at 1; hue and value kept.

    In HSV each channel is ``c = V * (1 - S * f_c)`` with ``V`` the channel maximum and ``f_c`` fixed by the hue,
    so scaling S by k moves every channel towards V: ``c' = V - (V - c) * k``. Clipping S' at 1 caps k at 1 / S.
    This is OpenCV's HSV round trip (mmseg's saturation step) without the conversion. torchvision's
    ``adjust_saturation`` blends with greyscale instead, which changes the value too, so it is not used here.

    Args:
        img: float tensor (3, H, W) with values in [0, 255].
        factor: saturation multiplier, >= 0.

    Returns:
        The adjusted image, same shape and dtype.
    """
    value = img.amax(dim=0, keepdim=True)
    chroma = value - img.amin(dim=0, keepdim=True)
    # k <= V / (V - min) keeps S' = S * k <= 1; grey pixels (chroma 0) are unchanged whatever k is.
    cap = torch.where(chroma > 0, value / chroma.clamp_min(1e-6), torch.full_like(value, float("inf")))
    k = cap.clamp(max=factor)
    return (value - (value - img) * k).clamp(0, 255)


class Normalize:
    """uint8 RGB CxHxW -> float ``(x - mean) / std``; the label becomes int64.

    Args:
        mean: per-channel mean on the 0-255 scale (ImageNet by default, as every authors' model uses).
        std: per-channel standard deviation on the 0-255 scale.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image: ArrayLike, label: ArrayLike | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image, label = to_tensors(image, label)
        image = (image.float() - self.mean) / self.std
        return image, None if label is None else label.long()


class Pad:
    """Pad image and label at the bottom and right up to ``size`` = (height, width); larger inputs are kept.

    mmseg pads after normalisation, so ``image_value`` 0 is the dataset mean colour, not black.

    Args:
        size: (height, width) to reach.
        label_value: label of padded pixels (the ignore index).
        image_value: image value of padded pixels.
    """

    def __init__(self, size: tuple[int, int] = (512, 512), label_value: int = 255, image_value: float = 0.0) -> None:
        self.size = size
        self.label_value = label_value
        self.image_value = image_value

    def __call__(self, image: ArrayLike, label: ArrayLike) -> Pair:
        image, label = to_tensors(image, label)
        bottom = max(self.size[0] - image.shape[-2], 0)
        right = max(self.size[1] - image.shape[-1], 0)
        if bottom or right:
            # torchvision's padding order is (left, top, right, bottom).
            image = F.pad(image, [0, 0, right, bottom], fill=self.image_value)
            label = F.pad(label[None], [0, 0, right, bottom], fill=self.label_value)[0]
        return image, label


class Compose:
    """Apply pair transforms in order.

    Args:
        transforms: callables taking and returning ``(image, label)``.
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: ArrayLike, label: ArrayLike | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label


def train_pipeline(crop: tuple[int, int] = (512, 512), scale: tuple[int, int] = (2048, 512),
                   ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                   flip_p: float = 0.5, photometric: bool = True, ignore_index: int = 255,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   generator: torch.Generator | None = None) -> Compose:
    """mmseg's training pipeline: resize, crop, flip, photometric distortion, normalise, pad.

    Args:
        crop: (height, width) of the training crop, 512x512 for ADE20K, 768x768 for Cityscapes.
        scale: base (long, short) resize scale, (2048, 512) for ADE20K, (2048, 1024) for Cityscapes.
        ratio_range: range of the random resize ratio.
        cat_max_ratio: largest share of one class in a crop (see :class:`RandomCrop`).
        flip_p: horizontal flip probability.
        photometric: whether to apply :class:`PhotoMetricDistortion`.
        ignore_index: label value of ignored and padded pixels.
        mean: normalisation mean on the 0-255 scale.
        std: normalisation std on the 0-255 scale.
        generator: random source shared by all steps; torch's global RNG when None.

    Returns:
        A callable mapping (uint8 image, label) to (float CxHxW tensor, int64 HxW tensor) of exactly ``crop`` size.
    """
    steps: list[Callable] = [
        RandomResize(scale, ratio_range, generator=generator),
        RandomCrop(crop, cat_max_ratio, ignore_index, generator=generator),
        RandomFlip(flip_p, generator=generator),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion(generator=generator))
    steps += [Normalize(mean, std), Pad(crop, label_value=ignore_index, image_value=0.0)]
    return Compose(steps)


def test_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Normalize:
    """The evaluation-time transform: normalisation only (resizing and windows belong to the inference code).

    Args:
        mean: normalisation mean on the 0-255 scale.
        std: normalisation std on the 0-255 scale.

    Returns:
        A callable mapping (uint8 image, label or None) to (float CxHxW tensor, int64 HxW tensor or None).
    """
    return Normalize(mean, std)


test_transform.__test__ = False  # its name would otherwise make pytest collect it wherever a test imports it
