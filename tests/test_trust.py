"""Hostile and careless inputs: nothing is written outside the folders given, nothing read outside the source, and
every refusal is one line (docs/trust.md)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regproxy_cli.data.formats import import_annotations
from regproxy_cli.data.formats.cvat import cvat_labelmap, cvat_labelmap_text
from regproxy_cli.data.formats.voc import voc_colormap
from regproxy_cli.errors import RegproxyError

pytest.importorskip("pycocotools")

H, W = 12, 16


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> content hash): what a test compares before and after."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def outside_changes(root: Path, before: dict[str, str], destination: Path) -> dict[str, str]:
    """Files added or changed under ``root`` but outside ``destination`` since ``before``."""
    inside = str(destination.relative_to(root))
    return {k: v for k, v in tree(root).items()
            if before.get(k) != v and not (k == inside or k.startswith(inside + "/"))}


def picture(path: Path, size=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 90, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def place(tmp_path):
    """tmp_path/deep/er/src (the export) and tmp_path/deep/er/ds (DST), so that '../..' from DST stays in tmp_path."""
    src, dst = tmp_path / "deep" / "er" / "src", tmp_path / "deep" / "er" / "ds"
    src.mkdir(parents=True)
    return tmp_path, src, dst


def check_refused(root: Path, dst: Path, run, message: str) -> str:
    before = tree(root)
    with pytest.raises(RegproxyError, match=message) as caught:
        run()
    assert "\n" not in str(caught.value)
    assert outside_changes(root, before, dst) == {} and tree(root) == before  # nothing new, anywhere
    assert not dst.exists()
    return str(caught.value)


# ---------------------------------------------------------------------------------------------------- item 1


def _cvat_masks_zip(path: Path, members: list[str]) -> Path:
    labelmap = cvat_labelmap(["road"], [(128, 64, 128)])
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("labelmap.txt", cvat_labelmap_text(labelmap))
        for member in members:
            mask = np.zeros((H, W, 3), dtype=np.uint8)
            mask[2:6, 2:6] = (128, 64, 128)
            encoded = io.BytesIO()
            Image.fromarray(mask).save(encoded, format="PNG")
            archive.writestr(zipfile.ZipInfo(member), encoded.getvalue())  # writestr keeps the name as it is
        archive.writestr("JPEGImages/x.png", picture(path.parent / "x.png").read_bytes())
    return path


@pytest.mark.parametrize("member", ["SegmentationClass/../../../X.png", "SegmentationClass/../../../../../X.png",
                                    "SegmentationClass/sub/X.png", "SegmentationClass/..\\..\\X.png"])
def test_cvat_zip_member_that_climbs_is_refused_and_writes_nothing(place, member):
    root, src, dst = place
    archive = _cvat_masks_zip(src / "export.zip", [member])
    check_refused(root, dst, lambda: import_annotations("cvat", archive, dst, images=src),
                  "is not a plain file name")


def _voc(src: Path, train_lines: str) -> Path:
    base = src / "VOC2012"
    picture(base / "JPEGImages" / "a.jpg")
    mask = Image.fromarray(np.zeros((H, W), dtype=np.uint8), mode="L")
    mask.putpalette(voc_colormap(256).tobytes())
    (base / "SegmentationClass").mkdir(parents=True)
    mask.save(base / "SegmentationClass" / "a.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text(train_lines)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    return base


@pytest.mark.parametrize("line", ["../../../../X", "../SegmentationClass/a", "/etc/hostname", "sub/a"])
def test_voc_split_list_line_that_climbs_is_refused_and_writes_nothing(place, line):
    root, src, dst = place
    _voc(src, f"a\n{line}\n")
    message = check_refused(root, dst, lambda: import_annotations("voc", src, dst), "is not a plain file name")
    assert "train.txt" in message


def test_a_climbing_name_is_one_line_from_the_command(place, cli):
    root, src, dst = place
    archive = _cvat_masks_zip(src / "export.zip", ["SegmentationClass/../../../X.png"])
    before = tree(root)
    result = cli("data", "import", "--from", "cvat", str(archive), str(dst), "--images", str(src))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "is not a plain file name" in result.stderr
    assert tree(root) == before and not dst.exists()


# ---------------------------------------------------------------------------------------------------- item 2


def _labelme(src: Path, image_path: str) -> Path:
    document = {"version": "5.5.0", "flags": {}, "imagePath": image_path, "imageData": None, "imageHeight": H,
                "imageWidth": W, "shapes": [{"label": "a", "points": [[1, 1], [8, 1], [8, 8]],
                                             "shape_type": "polygon"}]}
    path = src / "one.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("how", ["absolute", "climbing"])
def test_labelme_image_path_outside_the_source_is_refused_unless_allowed(place, how):
    root, src, dst = place
    secret = picture(root / "private" / "secret.png")  # a real picture of the right size, outside SRC
    name = str(secret) if how == "absolute" else "../../../private/secret.png"
    _labelme(src, name)
    check_refused(root, dst, lambda: import_annotations("labelme", src, dst), "outside .* --allow-outside-paths")
    import_annotations("labelme", src, dst, allow_outside_paths=True)  # the explicit option reads it
    assert (dst / "images" / "train" / "one.png").read_bytes() == secret.read_bytes()


def test_the_refusal_does_not_tell_whether_an_outside_file_exists(place):
    root, src, dst = place
    (root / "private").mkdir()
    (root / "private" / "exists").write_text("a secret")
    messages = []
    for name in (str(root / "private" / "exists"), str(root / "private" / "missing"), "/etc/hostname",
                 "/no/such/file"):
        _labelme(src, name)
        message = check_refused(root, dst, lambda: import_annotations("labelme", src, dst), "outside")
        messages.append(message.replace(repr(name), "NAME"))
    assert len(set(messages)) == 1, messages


def test_coco_file_name_that_climbs_is_refused_unless_allowed(place):
    root, src, dst = place
    outside = picture(root / "deep" / "er" / "x.jpg")
    document = {"images": [{"id": 1, "file_name": "../x.jpg", "height": H, "width": W}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                 "segmentation": [[1, 1, 8, 1, 8, 8]], "iscrowd": 0}],
                "categories": [{"id": 1, "name": "a"}]}
    (src / "instances.json").write_text(json.dumps(document))
    check_refused(root, dst, lambda: import_annotations("coco", src / "instances.json", dst),
                  r"its image '../x.jpg' is outside")
    import_annotations("coco", src / "instances.json", dst, allow_outside_paths=True)
    assert (dst / "images" / "train" / "x.jpg").read_bytes() == outside.read_bytes()


def test_a_climbing_name_is_looked_up_by_file_name_inside_the_source(place):
    root, src, dst = place
    picture(root / "elsewhere.png", size=(3, 3))  # the wrong size: would fail if it were read
    inside = picture(src / "elsewhere.png")
    _labelme(src, "../../../elsewhere.png")
    import_annotations("labelme", src, dst)
    assert (dst / "images" / "train" / "one.png").read_bytes() == inside.read_bytes()


def test_a_symlink_in_the_source_that_points_outside_is_not_followed(place):
    root, src, dst = place
    secret = picture(root / "private" / "secret.png")
    (src / "link.png").symlink_to(secret)
    _labelme(src, "link.png")
    check_refused(root, dst, lambda: import_annotations("labelme", src, dst), "is not in")
    import_annotations("labelme", src, dst, allow_outside_paths=True)
    assert (dst / "images" / "train" / "one.png").read_bytes() == secret.read_bytes()
