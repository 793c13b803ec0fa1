"""Many images through one model: decoding and writing on a small thread pool while the caller's thread runs the
network, and same-size images batched into one forward pass on CUDA.

Pillow releases the GIL while it decodes and encodes (zlib too), so a couple of threads overlap reading the next
images and writing the last ones' outputs with the forward pass of this one. What is in flight is bounded: about
``ahead`` decoded images waiting for the network and ``ahead`` outputs waiting to be written.

Writes run on one thread by default: :func:`regproxy_cli.files.write_atomic` reads the umask by setting it and
putting it back, which two threads doing at once can leave at 0 for the whole process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.inference.predictor import device_of, normalise, predict_labels
from regproxy_cli.inference.protocol import TestProtocol, network_logits
from regproxy_cli.inference.runtime import autocast
from regproxy_cli.model.resize import resize_argmax

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")
Result = TypeVar("Result")
Written = TypeVar("Written")
_END = object()
AHEAD = 4  # decoded images waiting for the network, and outputs waiting to be written, at most


def forward_batch(model: nn.Module, batch: int) -> int:
    """Images per forward pass worth grouping for ``model``: ``batch`` on CUDA, 1 elsewhere (a CPU runs the network
    image by image anyway, see ``Segmenter.grid_logits``)."""
    if batch < 1:
        raise RegproxyError(f"batch must be at least 1, got {batch}")
    return batch if device_of(model).type == "cuda" else 1


@torch.inference_mode()
def predict_label_batch(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    mode: str | None = None,
    tta: bool = False,
    scale: float = 1.0,
    batch_size: int = 8,
    precision: str = "fp32",
) -> list[np.ndarray]:
    """:func:`~regproxy_cli.inference.predictor.predict_labels` of several same-size (H, W, 3) uint8 RGB images, with
    one forward pass for all of them (whole or sliding-window). TTA, a single image or images of different sizes go
    through ``predict_labels`` one at a time. On a CPU the network still runs image by image, so the labels are
    those of ``predict_labels``; on a GPU a batched kernel may round differently, which can flip float ties.
    """
    if tta or len(images) < 2 or len({image.shape for image in images}) > 1:
        return [predict_labels(model, image, mode=mode, tta=tta, scale=scale, batch_size=batch_size,
                               precision=precision) for image in images]
    protocol = TestProtocol.from_config(model.config, mode=mode, scale=scale, batch_size=batch_size)
    height, width = images[0].shape[:2]
    device = device_of(model)
    x = torch.cat([normalise(image, model.config, device) for image in images])
    size = protocol.working_size(height, width)
    with autocast(device, precision):  # the steps of predict_labels, on a batch
        if protocol.mode == "whole" and size == (height, width):
            return list(model.labels(x).cpu().numpy())
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = network_logits(model, x, protocol)
    return [resize_argmax(one.float(), (height, width)).cpu().numpy() for one in logits]


class _Inline:
    """An executor that runs each call at once in the caller's thread: the sequential path (``workers=0``)."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed over like a pool thread's exception
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _attempt(fn: Callable, *args: Any) -> tuple[Any, str | None]:
    """(fn(*args), None), or (None, the message) when it raises a RegproxyError; any other exception is a bug and
    propagates."""
    try:
        return fn(*args), None
    except RegproxyError as exc:
        return None, str(exc)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the GPU running out of memory (its own class since torch 1.13; a plain RuntimeError from
    some kernels)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _infer_group(infer: Callable[[list], list], loaded: list) -> list[tuple[Any, str | None]]:
    """(result, error) per loaded item; a group that fails is retried item by item, so the error lands on the item
    that caused it. A group that runs out of GPU memory is retried in halves, down to single items; an item that
    runs out alone gets an error line, and the items after it go on."""
    out_of_memory = False
    try:
        results, error = _attempt(infer, loaded)
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        out_of_memory = True
    if out_of_memory:  # retried outside the handler: the exception's frames hold the failed group's tensors
        torch.cuda.empty_cache()  # give the cached blocks back before the smaller tries
        if len(loaded) == 1:
            return [(None, ("out of GPU memory on this image; try --precision bf16, a smaller --window-batch or "
                           "--device cpu"))]
        half = (len(loaded) + 1) // 2
        return _infer_group(infer, loaded[:half]) + _infer_group(infer, loaded[half:])
    if error is None:
        return [(result, None) for result in results]
    if len(loaded) == 1:
        return [(None, error)]
    return [_infer_group(infer, [one])[0] for one in loaded]


def _done(value: tuple[Any, str | None]) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def run_pipeline(
    items: Iterable[Item],
    load: Callable[[Item], Loaded],
    infer: Callable[[list[Loaded]], list[Result]],
    write: Callable[[Item, Loaded, Result], Written],
    *,
    batch: int = 1,
    workers: int = 2,
    writers: int = 1,
    ahead: int = AHEAD,
    key: Callable[[Loaded], Hashable] = np.shape,
) -> Iterator[tuple[Item, Written | None, str | None]]:
    """``write(item, loaded, result)`` for every item, in order, with ``load`` and ``write`` on a thread pool.

    ``load`` runs up to ``ahead`` items ahead on ``workers`` threads; the caller's thread groups consecutive loaded
    items whose ``key`` is equal (up to ``batch`` of them) and runs ``infer`` on the group, then hands each item's
    result to ``write`` on ``writers`` threads. At most ``ahead + batch`` loaded items wait for ``infer`` (``ahead``
    queued and the group being formed) and at most ``ahead`` writes are pending once a group is handed over;
    ``workers=0`` does everything in the caller's thread. With one writer (the default) the writes run one at a
    time in the order of ``items``, so ``write`` may append to a shared file.

    A ``RegproxyError`` from ``load``, ``infer`` or ``write`` fails that item only (a group that fails is retried
    item by item, so the error belongs to the right one); a group that runs out of GPU memory is retried in halves
    down to single images; other exceptions propagate.

    Yields:
        (item, what ``write`` returned, None) or (item, None, the error message), in the order of ``items``.
    """
    if workers < 0 or writers < 1 or ahead < 1 or batch < 1:
        raise RegproxyError(f"need workers >= 0, writers >= 1, ahead >= 1 and batch >= 1, got {workers}, {writers}, "
                            f"{ahead}, {batch}")
    readers = ThreadPoolExecutor(workers, thread_name_prefix="regproxy-read") if workers else _Inline()
    writing = ThreadPoolExecutor(writers, thread_name_prefix="regproxy-write") if workers else _Inline()
    todo = iter(items)
    loads: deque[tuple[Item, Future]] = deque()
    writes: deque[tuple[Item, Future]] = deque()

    def top_up() -> None:
        while len(loads) < ahead and (item := next(todo, _END)) is not _END:
            loads.append((item, readers.submit(_attempt, load, item)))

    try:
        top_up()
        while loads:
            item, future = loads.popleft()
            loaded, error = future.result()
            if error is not None:
                writes.append((item, _done((None, error))))
            else:
                group = [(item, loaded)]  # consecutive loaded items of one key, for one forward pass
                while len(group) < batch and loads:
                    top_up()
                    following, error = loads[0][1].result()
                    if error is not None or key(following) != key(loaded):
                        break
                    group.append((loads.popleft()[0], following))
                top_up()
                outcomes = _infer_group(infer, [one for _, one in group])
                for (item, one), (result, error) in zip(group, outcomes):
                    pending = _done((None, error)) if error else writing.submit(_attempt, write, item, one, result)
                    writes.append((item, pending))
            top_up()
            while writes and (writes[0][1].done() or len(writes) > ahead):
                item, pending = writes.popleft()
                yield item, *pending.result()
        while writes:
            item, pending = writes.popleft()
            yield item, *pending.result()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writing.shutdown(wait=True, cancel_futures=True)
