"""Image loading in every PIL mode, one-line load errors, label PNGs and dataset metadata."""

import numpy as np
import pytest
from PIL import Image

from regproxy_cli import RegproxyError
from regproxy_cli.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    PASCAL_CONTEXT59_CLASSES,
    PASCAL_CONTEXT59_PALETTE,
    PASCAL_CONTEXT_CLASSES,
    PASCAL_CONTEXT_PALETTE,
    default_palette,
)
from regproxy_cli.images import load_image, save_label_png, save_png_atomic
from regproxy_cli.viz import colorize

RNG = np.random.default_rng(0)


def saved(tmp_path, image: Image.Image, name: str, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def grey3(values) -> np.ndarray:
    """The RGB array load_image should give for grey levels ``values``."""
    values = np.asarray(values, dtype=np.uint8)
    return np.repeat(values[..., None], 3, axis=-1)


def test_rgb_round_trip(tmp_path):
    array = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    got = load_image(saved(tmp_path, Image.fromarray(array), "rgb.png"))
    assert got.dtype == np.uint8 and got.shape == (9, 11, 3)
    np.testing.assert_array_equal(got, array)


def test_grey_and_bilevel(tmp_path):
    grey = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(saved(tmp_path, Image.fromarray(grey), "l.png")), grey3(grey))
    bits = Image.fromarray(grey > 127).convert("1")
    assert bits.mode == "1"
    np.testing.assert_array_equal(load_image(saved(tmp_path, bits, "1.png")), grey3(np.where(grey > 127, 255, 0)))


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    got = load_image(saved(tmp_path, Image.fromarray(rgba), "rgba.png"))
    np.testing.assert_array_equal(got[0], [[200, 100, 50], [0, 0, 0], [100, 50, 25]])
    la = Image.fromarray(rgba[..., [0, 3]])
    assert la.mode == "LA"
    np.testing.assert_array_equal(load_image(saved(tmp_path, la, "la.png")), grey3([[200, 0, 100]]))


def test_palette_with_and_without_transparency(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [10, 20, 30]], dtype=np.uint8)
    image = Image.fromarray(indices)
    image.putpalette(colours.tobytes())
    assert image.mode == "P"
    np.testing.assert_array_equal(load_image(saved(tmp_path, image, "p.png")), colours[indices])
    transparent = load_image(saved(tmp_path, image, "pt.png", transparency=1))
    expected = colours[indices]
    expected[indices == 1] = 0
    np.testing.assert_array_equal(transparent, expected)
    gif = load_image(saved(tmp_path, image, "p.gif"))
    np.testing.assert_array_equal(gif, colours[indices])


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    got = load_image(saved(tmp_path, Image.fromarray(cmyk, mode="CMYK"), "cmyk.tiff"))
    np.testing.assert_array_equal(got[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])


def test_16_bit_is_scaled_by_its_depth(tmp_path):
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    got = load_image(saved(tmp_path, image, "16.png"))
    np.testing.assert_array_equal(got, grey3([[0, 0, 1, 128, 255]]))
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_image(saved(tmp_path, big_endian, "16b.tiff")), grey3([[0, 0, 1, 128, 255]]))


def test_32_bit_integer_and_float(tmp_path):
    wide = Image.fromarray(np.array([[0, 1 << 23, 2**31 - 1, -5]], dtype=np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(load_image(saved(tmp_path, wide, "i.tiff")), grey3([[0, 1, 255, 0]]))
    floats = Image.fromarray(np.array([[-5.0, 12.4, 127.6, 300.0]], dtype=np.float32))
    assert floats.mode == "F"
    np.testing.assert_array_equal(load_image(saved(tmp_path, floats, "f.tiff")), grey3([[0, 12, 128, 255]]))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[:4, :4] = (255, 0, 0)  # a red mark in the stored top-left corner
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    got = load_image(saved(tmp_path, image, f"rot.{suffix}", exif=exif))
    assert got.shape == (30, 20, 3)
    assert got[1, -2, 0] > 200 and got[1, 1, 0] < 50  # the mark is now top-right


def test_load_errors_are_one_line_with_the_path(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    good = saved(tmp_path, Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (tmp_path / "missing.png", tmp_path, text, truncated):
        with pytest.raises(RegproxyError) as caught:
            load_image(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and "\n" not in message


def test_save_png_atomic(tmp_path):
    path = tmp_path / "out.png"
    first = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    save_png_atomic(path, first)
    save_png_atomic(path, Image.fromarray(first[..., 0]))  # overwrites in place
    np.testing.assert_array_equal(np.asarray(Image.open(path)), first[..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left behind
    with pytest.raises(RegproxyError, match="cannot write"):
        save_png_atomic(tmp_path / "no-such-dir" / "out.png", first)


def test_label_png_is_a_palette_png_of_class_ids(tmp_path):
    labels = RNG.integers(0, 19, (7, 9))
    save_label_png(tmp_path / "labels.png", labels, CITYSCAPES_PALETTE)
    with Image.open(tmp_path / "labels.png") as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), labels)
        palette = np.array(image.getpalette()[: 19 * 3]).reshape(19, 3)
        np.testing.assert_array_equal(palette, CITYSCAPES_PALETTE)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), colorize(labels, CITYSCAPES_PALETTE))


def test_many_classes_give_a_16_bit_png(tmp_path):
    labels = RNG.integers(0, 300, (5, 8))
    labels[0, 0] = 299
    save_label_png(tmp_path / "labels.png", labels, default_palette(300))
    with Image.open(tmp_path / "labels.png") as image:
        assert image.mode in ("I;16", "I")  # Pillow versions differ in how they open 16-bit grey PNGs
        np.testing.assert_array_equal(np.asarray(image), labels)


def test_label_ids_must_fit(tmp_path):
    with pytest.raises(ValueError, match="label ids"):
        save_label_png(tmp_path / "x.png", np.array([[-1, 0]]), CITYSCAPES_PALETTE)


def test_dataset_metadata():
    for classes, palette, count in [
        (ADE20K_CLASSES, ADE20K_PALETTE, 150),
        (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, 19),
        (PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE, 60),
        (PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE, 59),
    ]:
        assert len(classes) == len(palette) == count
        assert len(set(classes)) == count
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    assert CITYSCAPES_CLASSES[0] == "road" and PASCAL_CONTEXT_CLASSES[0] == "background"
    assert PASCAL_CONTEXT59_CLASSES[0] == "aeroplane"


def test_default_palette_is_distinct_and_deterministic():
    colours = default_palette(1000)
    assert len(set(colours)) == 1000 and (0, 0, 0) not in colours
    assert colours[:3] == list(ADE20K_PALETTE[:3])
    assert default_palette(1000) == colours and default_palette(10) == colours[:10]
