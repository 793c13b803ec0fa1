"""Video files in and out with PyAV (FFmpeg bundled): decode a clip to RGB frames, encode frames to an MP4 atomically.

PyAV is optional (``pip install 'regproxy[video]'``) and imported only when a video is read or written. Decoding
problems (not a video, a truncated file, no video stream) become one :class:`~regproxy_cli.errors.RegproxyError`
line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from regproxy_cli.errors import RegproxyError, missing_extra, one_line, require_extra
from regproxy_cli.files import write_atomic

if TYPE_CHECKING:
    from typing_extensions import Self

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")  # what `predict` treats as a video (lower-case)
MISSING_EXTRA = missing_extra("video", "reading and writing videos")
# H.264 at CRF 18 is visually lossless for overlays and plays everywhere; MPEG-4 Part 2 where an FFmpeg build has
# no x264 (PyAV's wheels have it).
ENCODERS = ("libx264", "mpeg4")
ENCODER_OPTIONS = {"libx264": {"crf": "18"}, "mpeg4": {"qscale": "3"}}
# A stream that ends this much before its declared duration was cut short: a few frames of slack for containers
# whose duration counts the audio too.
_SHORT_FRAMES = 3
_SHORT_FRACTION = 0.02


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a video suffix (.mp4, .mov, .avi, .mkv, .webm; any case)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def import_av() -> ModuleType:
    """The ``av`` module, or one error line saying which extra to install."""
    return require_extra("av", "video", "reading and writing videos")


@dataclass(frozen=True)
class VideoInfo:
    """What a video stream declares: size, (average) frame rate, frame count and duration in seconds (None when the
    container does not say: Matroska has no frame count)."""

    width: int
    height: int
    fps: Fraction
    frames: int | None
    duration: float | None = None

    @property
    def frames_estimate(self) -> int | None:
        """The declared frame count, else duration x frame rate (for a progress bar), else None."""
        if self.frames:
            return self.frames
        return round(self.duration * self.fps) if self.duration else None


class VideoReader:
    """The frames of a video file's first video stream as (H, W, 3) uint8 RGB arrays, in display order.

    Use as a context manager; ``info`` is read when the file is opened, so a file that is not a video fails there.
    Iterating decodes the stream once and checks that it was not cut short: fewer frames than the container
    declares, or the last frame ending well before the declared duration, is an error rather than a shorter clip.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        av = import_av()
        self._errors = (av.error.FFmpegError, OSError)
        if self.path.is_dir():
            raise RegproxyError(f"{self.path}: is a directory, not a video")
        if not self.path.exists():
            raise RegproxyError(f"{self.path}: no such file")
        try:
            self._container = av.open(str(self.path), mode="r")
        except self._errors as error:
            raise RegproxyError(f"{self.path}: cannot read the video ({one_line(error)})") from None
        try:
            self._open_stream()
        except BaseException:
            self._container.close()
            raise

    def _open_stream(self) -> None:
        if not self._container.streams.video:
            raise RegproxyError(f"{self.path}: has no video stream")
        stream = self._container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"  # frame- and slice-threaded decoding where the codec allows
        fps = stream.average_rate or stream.guessed_rate
        if not fps or stream.width < 1 or stream.height < 1:
            raise RegproxyError(f"{self.path}: the video stream has no frame rate or size")
        self._stream = stream
        self.info = VideoInfo(width=stream.width, height=stream.height, fps=Fraction(fps),
                              frames=stream.frames or None, duration=self._declared_duration() or None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        count, end = 0, 0.0
        try:
            for frame in self._container.decode(self._stream):
                count += 1
                if frame.time is not None:
                    end = max(end, float(frame.time) + 1 / float(self.info.fps))
                yield frame.to_ndarray(format="rgb24")
        except self._errors as error:
            raise RegproxyError(f"{self.path}: cannot decode frame {count} ({one_line(error)})") from None
        self._check_complete(count, end)

    def _check_complete(self, count: int, end: float) -> None:
        if count == 0:
            raise RegproxyError(f"{self.path}: the video stream has no frames")
        if self.info.frames is not None and count < self.info.frames:
            raise RegproxyError(f"{self.path}: truncated: decoded {count} of {self.info.frames} frames")
        declared = self.info.duration or 0.0
        slack = max(_SHORT_FRAMES / float(self.info.fps), _SHORT_FRACTION * declared)
        if end and declared and end < declared - slack:
            raise RegproxyError(f"{self.path}: truncated: the frames end at {end:.2f} s of {declared:.2f} s")

    def _declared_duration(self) -> float:
        """Seconds: the video stream's own duration, else the container's (0 when neither is known)."""
        if self._stream.duration and self._stream.time_base:
            return float(self._stream.duration * self._stream.time_base)
        if self._container.duration:
            return self._container.duration / 1_000_000  # AV_TIME_BASE
        return 0.0


def read_video(path: str | os.PathLike) -> tuple[VideoInfo, list[np.ndarray]]:
    """Every frame of a (short) video in memory: (info, RGB frames). :class:`VideoReader` streams long ones."""
    with VideoReader(path) as video:
        return video.info, list(video)


def _encoder(av: ModuleType, codec: str | None) -> str:
    if codec is not None:
        return codec
    for name in ENCODERS:
        if name in av.codecs_available:
            return name
    raise RegproxyError(f"this FFmpeg build has none of the video encoders {', '.join(ENCODERS)}")


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: Fraction | float,
    *,
    codec: str | None = None,
    pix_fmt: str | None = None,
    options: dict[str, str] | None = None,
) -> int:
    """Encode (H, W, 3) uint8 RGB frames to an MP4 at a constant ``fps``, atomically: ``path`` is the old file or
    the complete new video, never a partial one (a failure or an interrupt part-way leaves no file behind).

    ``frames`` may be a generator: it is consumed while encoding, so a long clip is never held in memory. The size
    is the first frame's; every frame must have it.

    Args:
        codec: an FFmpeg encoder; default H.264 (libx264, CRF 18), else MPEG-4 Part 2.
        pix_fmt: default yuv420p, the format every player decodes; yuv444p when a side is odd (4:2:0 halves the
            colour planes, which needs even sides), rgb24 for the libx264rgb encoder.
        options: the encoder's options (e.g. ``{"qp": "0"}`` with libx264rgb for lossless).

    Returns:
        The number of frames written.

    Raises:
        RegproxyError: no frames, frames of another size or dtype, or the file cannot be written.
    """
    av = import_av()
    path = Path(path)
    name = _encoder(av, codec)
    written = 0

    def encode(temp_name: str) -> None:
        nonlocal written
        todo = iter(frames)
        first = next(todo, None)
        if first is None:
            raise RegproxyError(f"{path}: no frames to write")
        height, width = _check_frame(first, None, path)
        container = av.open(temp_name, mode="w", format="mp4")
        try:
            stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1_000_000),
                                          options=ENCODER_OPTIONS.get(name, {}) if options is None else options)
            stream.width, stream.height = width, height
            stream.pix_fmt = pix_fmt or _pixel_format(name, height, width)
            for frame in _chain(first, todo):
                _check_frame(frame, (height, width), path)
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                picture.pts = written  # one tick of 1/fps per frame: a constant frame rate
                container.mux(stream.encode(picture))
                written += 1
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
        finally:
            container.close()

    try:
        write_atomic(path, encode)
    except (av.error.FFmpegError, OSError) as error:
        raise RegproxyError(f"{path}: cannot write the video ({one_line(error)})") from None
    return written


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _pixel_format(codec: str, height: int, width: int) -> str:
    if codec == "libx264rgb":
        return "rgb24"
    if codec == "mpeg4":
        return "yuv420p"  # its only format
    return "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"


def _check_frame(frame: np.ndarray, size: tuple[int, int] | None, path: Path) -> tuple[int, int]:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise RegproxyError(f"{path}: frames must be HxWx3 uint8 RGB, got shape {frame.shape} dtype {frame.dtype}")
    if size is not None and frame.shape[:2] != size:
        raise RegproxyError(f"{path}: a {frame.shape[0]}x{frame.shape[1]} frame in a {size[0]}x{size[1]} video")
    return frame.shape[:2]
