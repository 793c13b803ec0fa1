"""Videos: decoding and atomic encoding (regproxy_cli.data.video), and `regproxy predict clip.mp4` frame by frame against
image predict on the decoded frames."""

from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

from regproxy_cli import RegproxyError
from regproxy_cli.cli.video import predict_videos
from regproxy_cli.data.video import MISSING_EXTRA, VideoReader, is_video, read_video, write_video
from regproxy_cli.engine.video import expand_videos, predict_video
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.viz import overlay

HEIGHT, WIDTH = 48, 64


def _scene(index: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A textured background with a red square moving right and a green bar moving left."""
    yy, xx = np.mgrid[0:height, 0:width]
    frame = np.stack([xx * 3 % 256, yy * 5 % 256, (xx + yy) * 2 % 256], -1).astype(np.uint8)
    frame[8:28, 4 + 7 * index: 24 + 7 * index] = (230, 40, 40)
    frame[30:44, max(0, 40 - 5 * index): 56 - 5 * index] = (40, 220, 60)
    return frame


def _encode(path, frames, fps=Fraction(12), fmt=None, options=None):
    """Encode RGB frames losslessly (x264 RGB, qp 0) with PyAV directly, independently of write_video."""
    container = av.open(str(path), "w", format=fmt, options=options or {})
    stream = container.add_stream("libx264rgb", rate=fps, options={"qp": "0"})
    stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "rgb24"
    for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()


def _decode(path):
    """(the stream's properties, its frames as RGB) read with PyAV directly.

    The properties are copied while the file is open: PyAV 18 refuses to read a stream of a closed container."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        codec = SimpleNamespace(name=stream.codec_context.name, pix_fmt=stream.codec_context.pix_fmt)
        return SimpleNamespace(width=stream.width, height=stream.height, average_rate=stream.average_rate,
                               codec_context=codec), frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    _encode(path, [_scene(i) for i in range(6)])
    return path


def test_the_test_clip_decodes_to_its_frames_exactly(clip):
    info, frames = read_video(clip)
    assert (info.width, info.height, info.fps, info.frames) == (WIDTH, HEIGHT, Fraction(12), 6)
    assert all(np.array_equal(frame, _scene(i)) for i, frame in enumerate(frames))


def test_write_video_keeps_rate_size_and_frames(tmp_path):
    frames = [_scene(i, 47, 65) for i in range(5)]  # odd sides: 4:4:4, the size kept exactly
    count = write_video(tmp_path / "lossless.mp4", iter(frames), Fraction(30000, 1001), codec="libx264rgb",
                        options={"qp": "0"})
    stream, decoded = _decode(tmp_path / "lossless.mp4")
    assert count == 5 and stream.average_rate == Fraction(30000, 1001) and (stream.width, stream.height) == (65, 47)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, frames)) and len(decoded) == 5
    write_video(tmp_path / "default.mp4", frames, 25)  # H.264 CRF 18: close, not exact
    stream, decoded = _decode(tmp_path / "default.mp4")
    assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv444p"
    assert len(decoded) == 5 and stream.average_rate == 25
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(decoded, frames)) < 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.mp4", "lossless.mp4"]  # no temporary files


def test_write_video_is_atomic(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")

    def frames():
        yield _scene(0)
        yield _scene(1)
        raise RegproxyError("decoding failed half-way")

    with pytest.raises(RegproxyError, match="half-way"):
        write_video(target, frames(), 10)
    with pytest.raises(RegproxyError, match="a 10x10 frame in a 48x64 video"):
        write_video(target, [_scene(0), np.zeros((10, 10, 3), np.uint8)], 10)
    with pytest.raises(RegproxyError, match="no frames"):
        write_video(target, [], 10)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_bad_videos_are_one_error_line(tmp_path, clip):
    data = clip.read_bytes()
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video " * 20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: gone
    for name in ("garbage.mp4", "empty.mp4", "cut.mp4", "missing.mp4"):
        with pytest.raises(RegproxyError, match=name) as error:
            read_video(tmp_path / name)
        assert "\n" not in str(error.value)
    # The index first (faststart): it opens, and the missing data fails while decoding.
    _encode(tmp_path / "fast.mp4", [_scene(i) for i in range(6)], options={"movflags": "faststart"})
    fast = (tmp_path / "fast.mp4").read_bytes()
    (tmp_path / "fast_cut.mp4").write_bytes(fast[: len(fast) * 3 // 4])
    with pytest.raises(RegproxyError, match="fast_cut.mp4: (cannot decode|truncated)"):
        read_video(tmp_path / "fast_cut.mp4")


def test_a_file_with_sound_only_is_not_a_video(tmp_path):
    container = av.open(str(tmp_path / "sound.mp4"), "w")
    stream = container.add_stream("aac", rate=8000)
    tone = av.AudioFrame.from_ndarray(np.sin(np.arange(8000, dtype=np.float32) / 10)[None] * 0.3, format="flt",
                                      layout="mono")
    tone.sample_rate = 8000
    container.mux(stream.encode(tone))
    container.mux(stream.encode(None))
    container.close()
    with pytest.raises(RegproxyError, match="sound.mp4: has no video stream"):
        read_video(tmp_path / "sound.mp4")


def test_a_truncated_matroska_is_an_error_not_a_short_clip(tmp_path):
    # Matroska declares no frame count: the last frame's time against the declared duration catches the cut.
    frames = [_scene(i % 8) for i in range(40)]
    _encode(tmp_path / "long.mkv", frames, fps=Fraction(10), fmt="matroska")
    info, decoded = read_video(tmp_path / "long.mkv")
    assert info.frames is None and info.frames_estimate == len(decoded) == 40  # the progress bar's total
    data = (tmp_path / "long.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    with pytest.raises(RegproxyError, match=r"cut.mkv: truncated: the frames end at"):
        read_video(tmp_path / "cut.mkv")


@pytest.mark.parametrize("workers", [0, 2])
def test_every_frame_is_labelled_as_image_predict_labels_it(tmp_path, model, clip, workers):
    _, frames = _decode(clip)
    report = predict_video(model, clip, tmp_path, frames=True, workers=workers)
    expected = [predict_labels(model, frame) for frame in frames]
    assert len({label.tobytes() for label in expected}) > 1  # the shapes move: the labels change between frames
    assert [p.name for p in report.label_pngs] == [f"{i:06d}.png" for i in range(6)]
    for index, labels in enumerate(expected):
        png = Image.open(tmp_path / "clip" / f"{index:06d}.png")
        assert png.mode == "P" and np.array_equal(np.asarray(png), labels), index
    assert report.frames == report.segmented == 6
    assert sum(report.pixels.values()) == 6 * HEIGHT * WIDTH
    stream, pictures = _decode(tmp_path / "clip_overlay.mp4")
    assert (stream.width, stream.height, stream.average_rate, len(pictures)) == (WIDTH, HEIGHT, 12, 6)
    palette = np.array(model.config.palette, dtype=np.uint8)
    wanted = [overlay(frame, labels, palette).astype(int) for frame, labels in zip(frames, expected)]
    for index, picture in enumerate(pictures):
        error = np.abs(picture.astype(int) - wanted[index]).mean()
        assert error < 8  # H.264 at CRF 18 with 4:2:0 chroma on a 64x48 textured clip: about 5 grey levels
        # and each frame is its own overlay, not a neighbour's (the shapes move between frames)
        neighbour = wanted[index - 1 if index else 1]
        assert error < np.abs(picture.astype(int) - neighbour).mean()


def test_every_nth_frame_holds_its_labels_over_the_frames_between(tmp_path, model, clip):
    _, frames = _decode(clip)
    report = predict_video(model, clip, tmp_path, frames=True, every=4, opacity=0.6)
    assert [p.name for p in report.label_pngs] == ["000000.png", "000004.png"]
    assert (report.frames, report.segmented) == (6, 2)
    labels = {i: predict_labels(model, frames[i]) for i in (0, 4)}
    assert np.array_equal(np.asarray(Image.open(tmp_path / "clip" / "000004.png")), labels[4])
    _, pictures = _decode(tmp_path / "clip_overlay.mp4")
    assert len(pictures) == 6  # every source frame, at the source's rate
    palette = np.array(model.config.palette, dtype=np.uint8)
    for index, picture in enumerate(pictures):
        held = overlay(frames[index], labels[4 * (index // 4)], palette, alpha=0.6)
        assert np.abs(picture.astype(int) - held).mean() < 5, index
    # the labels held on frame 3 are frame 0's, not its own
    own = overlay(frames[3], predict_labels(model, frames[3]), palette, alpha=0.6)
    held = overlay(frames[3], labels[0], palette, alpha=0.6)
    assert np.abs(pictures[3].astype(int) - held).mean() < np.abs(pictures[3].astype(int) - own).mean()


def test_a_failed_video_leaves_the_old_overlay(tmp_path, model, clip):
    data = clip.read_bytes()
    bad = tmp_path / "in" / "clip.mp4"
    bad.parent.mkdir()
    bad.write_bytes(data[:-200])  # the index at the end is damaged
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip_overlay.mp4").write_bytes(b"old")
    with pytest.raises(RegproxyError, match="clip.mp4"):
        predict_video(model, bad, out)
    assert (out / "clip_overlay.mp4").read_bytes() == b"old"
    assert sorted(p.name for p in out.iterdir()) == ["clip_overlay.mp4"]


def test_inputs_must_all_be_videos(tmp_path, clip):
    assert is_video("a/B.MKV") and is_video("x.webm") and not is_video("x.png")
    assert expand_videos([str(clip), str(clip.parent / "*.mp4")]) == [clip, clip]
    with pytest.raises(RegproxyError, match="photo.png: not a video"):
        expand_videos([str(clip), "photo.png"])
    with pytest.raises(RegproxyError, match="no videos match"):
        expand_videos([str(tmp_path / "*.mov")])


def test_pyav_missing_is_one_line(monkeypatch, clip, model_dir):
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(RegproxyError) as error:
        predict_videos([str(clip)], model=str(model_dir), out=clip.parent / "out")
    assert str(error.value) == MISSING_EXTRA == "reading and writing videos needs the 'video' extra: pip install 'regproxy[video]'"
    with pytest.raises(RegproxyError, match="pip install 'regproxy\\[video\\]'"):
        VideoReader(clip)


def test_predict_cli_on_a_video(tmp_path, model, model_dir, clip, cli):
    out = tmp_path / "out"
    result = cli("predict", str(clip), "--model", str(model_dir), "--out", str(out), "--frames", "--every", "2",
                 "--opacity", "0.7", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "clip").iterdir()) == ["000000.png", "000002.png", "000004.png"]
    _, frames = _decode(clip)
    for index in (0, 2, 4):
        png = np.asarray(Image.open(out / "clip" / f"{index:06d}.png"))
        assert np.array_equal(png, predict_labels(model, frames[index])), index
    stream, pictures = _decode(out / "clip_overlay.mp4")
    assert (stream.width, stream.height, stream.average_rate, len(pictures)) == (WIDTH, HEIGHT, 12, 6)
    palette = np.array(model.config.palette, dtype=np.uint8)
    for index, picture in enumerate(pictures):  # --opacity reaches the overlay; odd frames hold the even ones' labels
        held = overlay(frames[index], predict_labels(model, frames[index - index % 2]), palette, alpha=0.7)
        assert np.abs(picture.astype(int) - held).mean() < 5, index
    assert "Classes present" in result.stdout and "6 frames, 3 segmented" in result.stdout


def test_predict_cli_bad_videos_fail_with_one_line(tmp_path, model_dir, clip, cli):
    (tmp_path / "garbage.mp4").write_bytes(b"\x00garbage" * 50)
    data = clip.read_bytes()
    (tmp_path / "cut.mov").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = cli("predict", str(tmp_path / "garbage.mp4"), str(tmp_path / "cut.mov"), "--model", str(model_dir),
                 "--out", str(out))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "garbage.mp4" in errors[0] and "cut.mov" in errors[1], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*.mp4"))
    # images and videos in one run: one line, before the model is loaded
    result = cli("predict", str(clip), str(tmp_path / "photo.png"), "--model", str(model_dir), "--out", str(out))
    assert result.returncode == 1 and "photo.png: not a video" in result.stderr and "Traceback" not in result.stderr
    # options that only images have: one line naming them, nothing written
    for extra in (["--regions"], ["--confidence", "--save-probs"], ["--format", "coco"]):
        result = cli("predict", str(clip), "--model", str(model_dir), "--out", str(out), *extra)
        assert result.returncode == 1 and f"{extra[0]}" in result.stderr and "apply to images" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not list(out.glob("*.mp4"))
    # PyAV missing in the process: one line naming the extra
    blocker = tmp_path / "blocker" / "av"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no PyAV here')\n")
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    result = cli("predict", str(clip), "--model", str(model_dir), "--out", str(out), env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: reading and writing videos needs the 'video' extra: pip install 'regproxy[video]'"


def test_videos_get_distinct_output_names_by_predicts_rule():
    """Same stems in two folders, and a video whose stem is another's folder-prefixed name: no two share a file."""
    from regproxy_cli.engine.outputs import output_names
    from regproxy_cli.engine.video import VIDEO_OUTPUT_FILES

    paths = [Path("x/clip.mp4"), Path("y/clip.mp4"), Path("z/x_clip.mov"), Path("w/solo.mkv")]
    names = output_names(paths, files=VIDEO_OUTPUT_FILES)
    assert names == {Path("z/x_clip.mov"): "x_clip", Path("w/solo.mkv"): "solo", Path("x/clip.mp4"): "x_clip_mp4",
                     Path("y/clip.mp4"): "y_clip"}
    written = [template.format(name) for name in names.values() for template in VIDEO_OUTPUT_FILES]
    assert len(set(written)) == len(written)
